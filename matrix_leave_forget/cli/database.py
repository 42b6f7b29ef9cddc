"""The read-only connection to Synapse's database (SQLite or PostgreSQL)."""

import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import attr

from matrix_leave_forget.cli.config import HomeserverConfig, database_settings
from matrix_leave_forget.cli.errors import CliError, one_line
from matrix_leave_forget.cli.render import warn
from matrix_leave_forget.db.schema import SCHEMA_VERSION


@attr.s(auto_attribs=True)
class Database:
    """A read-only connection to Synapse's database.

    Attributes:
        conn: The DB-API connection.
        paramstyle: The placeholder its driver wants (passed to the shared
            ``*_txn`` query functions, which are written with ``?``).
        description: What it is, for messages.
    """

    conn: Any
    paramstyle: str
    description: str
    # Opens another connection to the same database (for the worker processes
    # of a parallel verify), seeing the snapshot export_snapshot named if any.
    reopen: Callable[[str | None], "Database"] | None = None

    def cursor(self) -> Any:
        """A new DB-API cursor inside the run's one read transaction."""
        return self.conn.cursor()

    def refresh(self) -> None:
        """End the read transaction and start a new one, to see rows written since."""
        if self.paramstyle == "?":  # SQLite, in explicit transactions
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN")
        else:  # psycopg2 starts the next transaction with the next query
            self.conn.rollback()

    def close(self) -> None:
        """Close the connection, ending the read transaction."""
        self.conn.close()

    def export_snapshot(self) -> str | None:
        """A name for this connection's snapshot that reopen can start from (PostgreSQL), or None.

        SQLite has no shared snapshots: the log is append-only, so another
        connection sees at least the same entries, and an entry changed in
        between is checked as it was read (a chunk and its neighbour are
        joined by a hash and a signature, not by this process's read).
        """
        if self.paramstyle == "?":
            return None
        cur = self.conn.cursor()
        cur.execute("SELECT pg_export_snapshot()")
        return str(cur.fetchone()[0])


def _open_sqlite(args: Mapping[str, Any]) -> Database:
    """Open the SQLite file named in ``args`` read-only; it must exist."""
    path = args.get("database")
    if not isinstance(path, str) or not path or path == ":memory:":
        raise CliError("database.args.database must name the SQLite database file")
    # Synapse resolves a relative path against its working directory; so do we.
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise CliError(
            f"SQLite database {path} does not exist (a relative path is resolved "
            "against the current directory, as Synapse does)"
        )
    # mode=ro: the CLI must never write to a live homeserver's database.
    # isolation_level=None lets us open one explicit read transaction, so that
    # every batch of a long run sees the same snapshot.
    try:
        conn = sqlite3.connect(
            f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, isolation_level=None
        )
        try:
            conn.execute("BEGIN")
            # Reading one page here makes an unreadable or foreign file fail
            # now, with its path, rather than as "no module tables".
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise CliError(f"cannot open SQLite database {path}: {_sqlite_cause(path, exc)}")
    return Database(conn, "?", f"SQLite database {path}", lambda _snapshot: _open_sqlite(args))


def _sqlite_cause(path: str, exc: sqlite3.Error) -> str:
    """Why SQLite could not read ``path``, and what to do about it."""
    message = one_line(str(exc))
    as_synapse = "run as the user Synapse runs as (e.g. sudo -u matrix-synapse ...)"
    if not os.access(path, os.R_OK):
        return f"{message}: permission denied on the file ({as_synapse}, or grant read access)"
    directory = os.path.dirname(path)
    if not os.access(directory, os.R_OK | os.X_OK):
        return f"{message}: permission denied on {directory} ({as_synapse})"
    if "not a database" in message or "malformed" in message:
        return f"{message} (database.args.database must name Synapse's SQLite file)"
    # A database in WAL mode needs its -wal and -shm files (or, without them,
    # a writable directory to create them), even to be read.
    return (
        f"{message} (SQLite also needs to read {os.path.basename(path)}-wal and "
        f"-shm beside it, or to create them in {directory}: {as_synapse})"
    )


def open_postgres(args: Mapping[str, Any]) -> Database:
    """Connect to PostgreSQL with Synapse's psycopg2 args, in a read-only transaction."""
    try:
        import psycopg2
    except ImportError:
        raise CliError(
            "the homeserver uses PostgreSQL but psycopg2 is not installed: "
            "pip install 'matrix-leave-forget[postgres]'"
        )
    # cp_* keys configure Twisted's connection pool, not the connection;
    # psycopg2 rejects them.
    connect_args = {k: v for k, v in args.items() if not k.startswith("cp_")}
    try:
        conn = psycopg2.connect(**connect_args)
    except psycopg2.Error as exc:
        server = (
            f"{connect_args.get('host') or 'the local socket'}:{connect_args.get('port', 5432)}"
        )
        name = connect_args.get("database") or connect_args.get("dbname") or "?"
        raise CliError(
            f"cannot connect to PostgreSQL database {name} "
            f"on {server} as {connect_args.get('user') or 'the current user'}: "
            f"{one_line(str(exc))} (check database.args in homeserver.yaml, and that this "
            "machine may connect: pg_hba.conf, the password)"
        )
    # One read-only REPEATABLE READ transaction for the whole run: a snapshot
    # consistent across batches, and no way to write by mistake.
    conn.set_session(readonly=True, isolation_level="REPEATABLE READ")
    where = connect_args.get("database") or connect_args.get("dbname") or "?"
    return Database(conn, "%s", f"PostgreSQL database {where}", lambda s: _reopen_postgres(args, s))


def _reopen_postgres(args: Mapping[str, Any], snapshot: str | None) -> Database:
    """Another connection like open_postgres's, in the snapshot ``snapshot`` if given."""
    db = open_postgres(args)
    if snapshot is not None:
        # The first statement of the read-only REPEATABLE READ transaction.
        db.conn.cursor().execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
    return db


def open_database(config: HomeserverConfig) -> Database:
    """Connect read-only to the homeserver's database and check the module's tables are there.

    Args:
        config: The homeserver config.

    Returns:
        The open database; the caller closes it.

    Raises:
        CliError: unsupported driver, missing file, or no module tables.
    """
    name, args = database_settings(config)
    if name == "sqlite3":
        db = _open_sqlite(args)
    elif name == "psycopg2":
        db = open_postgres(args)
    else:
        raise CliError(
            f"{config.sources[-1]}: unsupported database {name!r} "
            "(Synapse and this tool support sqlite3 and psycopg2)"
        )
    try:
        _check_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def _check_schema(db: Database) -> None:
    """Refuse a database without the module's tables; warn about a newer schema."""
    cur = db.cursor()
    try:
        # Not schema.current_version: that creates the table, and we are read-only.
        cur.execute("SELECT version FROM leave_forget_schema_version")
        row = cur.fetchone()
    except Exception as exc:
        if not is_database_error(exc):
            raise
        raise CliError(
            f"{db.description} has no matrix-leave-forget tables "
            "(has Synapse run with the module loaded?)"
        )
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        warn(
            f"{db.description} was written by a newer matrix-leave-forget (schema "
            f"{version}, this tool knows {SCHEMA_VERSION}): upgrade this tool"
        )


def is_database_error(exc: BaseException) -> bool:
    """Whether exc comes from a database driver (so it is the operator's to fix, not a bug)."""
    if isinstance(exc, sqlite3.Error):
        return True
    return type(exc).__module__.split(".")[0] == "psycopg2"


def max_seq(db: Database) -> int:
    """The newest entry's seq, the 100% mark of the progress bar (0 for an empty log)."""
    cur = db.cursor()
    cur.execute("SELECT MAX(seq) FROM leave_forget_audit")
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def next_seq(db: Database, after: int) -> int | None:
    """The seq of the row after ``after``, to name a row whose columns do not decode."""
    cur = db.cursor()
    cur.execute(
        "SELECT MIN(seq) FROM leave_forget_audit WHERE seq > ?".replace("?", db.paramstyle),
        (after,),
    )
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else None


def newest_start(db: Database, filters: Mapping[str, Any], count: int, after: int) -> int:
    """The seq to page from (exclusive) so that the page holds the newest ``count``
    entries matching ``filters`` (select_audit_txn's keywords) after ``after``."""
    clauses, args = ["seq > ?"], [after]
    for column, op in (("user_id", "="), ("room_id", "="), ("ts", ">="), ("ts", "<")):
        key = {"=": column, ">=": "since_ts", "<": "until_ts"}[op]
        if filters.get(key) is not None:
            clauses.append(f"{column} {op} ?")
            args.append(filters[key])
    cur = db.cursor()
    cur.execute(
        (
            f"SELECT seq FROM leave_forget_audit WHERE {' AND '.join(clauses)} "
            "ORDER BY seq DESC LIMIT 1 OFFSET ?"
        ).replace("?", db.paramstyle),
        (*args, count - 1),
    )
    row = cur.fetchone()
    return int(row[0]) - 1 if row else after
