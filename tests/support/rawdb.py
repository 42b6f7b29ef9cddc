"""A test server's database, read and written behind Synapse's back, on SQLite or PostgreSQL.

Statements use ``?`` placeholders on both engines (as Synapse's own
LoggingTransaction does). ``hs`` is anything with ``workdir`` and
``pg_database`` (None on SQLite): a harness SynapseProcess, or a worker's.
"""

import os
import sqlite3
from collections.abc import Sequence
from typing import Any


def pg_connect_args(dbname: str | None) -> dict[str, Any]:
    """psycopg2 connection args for the test PostgreSQL server (PG* variables).

    ``cp_min`` and ``cp_max`` are for Synapse's homeserver.yaml; pg_connection
    leaves them out.
    """
    args: dict[str, Any] = {
        "user": os.environ.get("PGUSER", "postgres"),
        "host": os.environ.get("PGHOST", "127.0.0.1"),
        "port": int(os.environ.get("PGPORT", "5432")),
        "database": dbname or "postgres",
        "cp_min": 1,
        "cp_max": 5,
    }
    if os.environ.get("PGPASSWORD"):
        args["password"] = os.environ["PGPASSWORD"]
    return args


def pg_connection(dbname: str | None, autocommit: bool = False) -> Any:
    """A psycopg2 connection to one of the test server's databases (``postgres`` for None)."""
    import psycopg2

    args = pg_connect_args(dbname)
    args.pop("cp_min")
    args.pop("cp_max")
    conn = psycopg2.connect(**args)
    conn.autocommit = autocommit
    return conn


def sqlite_path(hs: Any) -> str:
    """The SQLite database file of a harness server."""
    return os.path.join(hs.workdir, "homeserver.db")


def connect(hs: Any, timeout: float = 30) -> tuple[Any, str]:
    """A DB-API connection to hs's database, and its paramstyle (``?`` or ``%s``)."""
    if hs.pg_database is None:
        return sqlite3.connect(sqlite_path(hs), timeout=timeout), "?"
    return pg_connection(hs.pg_database), "%s"


def query(
    hs: Any, sql: str, args: Sequence[Any] = (), timeout: float = 30
) -> list[tuple[Any, ...]]:
    """Run one statement on hs's database and commit; the rows it returned (if any)."""
    conn, paramstyle = connect(hs, timeout)
    try:
        cur = conn.cursor()
        if paramstyle == "?":
            cur.execute(sql, tuple(args))
        else:
            # psycopg2 %-formats only when given arguments: without them a
            # LIKE 'x%' pattern stays as written.
            cur.execute(sql.replace("?", paramstyle), tuple(args) or None)
        rows = [tuple(row) for row in cur.fetchall()] if cur.description else []
        conn.commit()
        return rows
    finally:
        conn.close()


def execute(hs: Any, *statements: str) -> None:
    """Run statements without arguments on hs's database, in one transaction, committed."""
    conn, _ = connect(hs)
    try:
        cur = conn.cursor()
        for statement in statements:
            cur.execute(statement)
        conn.commit()
    finally:
        conn.close()


def all_rows(hs: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the server's database, by table."""
    if hs.pg_database is None:
        conn = sqlite3.connect(os.path.join(hs.workdir, "homeserver.db"), timeout=30)
        try:
            names = [
                str(r[0])
                for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            return {n: list(conn.execute(f'SELECT * FROM "{n}"').fetchall()) for n in names}
        finally:
            conn.close()
    pg = pg_connection(hs.pg_database)
    try:
        with pg.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            names = [str(r[0]) for r in cur.fetchall()]
            out: dict[str, list[tuple[Any, ...]]] = {}
            for name in names:
                cur.execute(f'SELECT * FROM "{name}"')
                out[name] = list(cur.fetchall())
            return out
    finally:
        pg.close()
