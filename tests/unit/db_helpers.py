"""A stand-in for Synapse's LoggingTransaction over a DB-API cursor; PostgreSQL or skip."""

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twisted.trial.unittest import SkipTest


class _Engine:
    def __init__(self, module: Any) -> None:
        self.module = module


class Txn:
    """Just enough of Synapse's LoggingTransaction for run_migrations."""

    def __init__(self, cursor: Any, module: Any, paramstyle: str = "?") -> None:
        self._cursor = cursor
        self.database_engine = _Engine(module)
        self._paramstyle = paramstyle
        self.statements: list[str] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.statements.append(sql)
        if self._paramstyle != "?":
            sql = sql.replace("?", self._paramstyle)
        self._cursor.execute(sql, tuple(args))

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> Any:
        return self._cursor.fetchall()

    def execute_batch(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.statements.append(sql)
        self._cursor.executemany(sql.replace("?", self._paramstyle), [tuple(r) for r in rows])

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)

    def call_after(self, fn: Callable[..., Any], *args: Any) -> None:
        """Synapse runs these after commit; nothing here needs them."""


def postgres_or_skip() -> Any:
    if os.environ.get("MLF_TEST_DATABASE") != "postgres":
        raise SkipTest(
            "PostgreSQL migration tests need MLF_TEST_DATABASE=postgres "
            "(and a server named by the PG* variables)"
        )
    try:
        import psycopg2
    except ImportError:
        raise SkipTest("psycopg2 is not installed")
    return psycopg2


# The columns of Synapse's own tables that the module's queries read, and
# nothing else: enough to run those queries on SQLite in process.
SYNAPSE_TABLES = (
    "CREATE TABLE rooms (room_id TEXT PRIMARY KEY)",
    "CREATE TABLE local_current_membership "
    "(room_id TEXT, user_id TEXT, event_id TEXT, membership TEXT, PRIMARY KEY (user_id, room_id))",
    "CREATE TABLE room_memberships (event_id TEXT PRIMARY KEY, user_id TEXT, room_id TEXT, "
    "membership TEXT, forgotten INTEGER NOT NULL DEFAULT 0)",
)


class World:
    """An in-memory SQLite database with the module's tables and Synapse's membership tables.

    ``txn`` stands in for Synapse's LoggingTransaction over it.
    """

    def __init__(self) -> None:
        from matrix_leave_forget.db.schema import run_migrations

        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.txn = Txn(self.conn.cursor(), sqlite3)
        run_migrations(self.txn)
        for statement in SYNAPSE_TABLES:
            self.txn.execute(statement)
        self._events = 0

    def member(self, user_id: str, room_id: str, membership: str, forgotten: bool = False) -> None:
        """Set user_id's current membership in room_id (the room exists from then on)."""
        self._events += 1
        event_id = f"$e{self._events}"
        self.txn.execute("INSERT OR IGNORE INTO rooms (room_id) VALUES (?)", (room_id,))
        self.txn.execute(
            "INSERT INTO room_memberships (event_id, user_id, room_id, membership, forgotten) "
            "VALUES (?, ?, ?, ?, ?)",
            (event_id, user_id, room_id, membership, int(forgotten)),
        )
        self.txn.execute(
            "INSERT OR REPLACE INTO local_current_membership "
            "(room_id, user_id, event_id, membership) VALUES (?, ?, ?, ?)",
            (room_id, user_id, event_id, membership),
        )

    def room(self, room_id: str) -> None:
        """A room Synapse has, with no local member."""
        self.txn.execute("INSERT OR IGNORE INTO rooms (room_id) VALUES (?)", (room_id,))

    def forget_rows(self, pairs: Sequence[tuple[str, str]]) -> None:
        """What Synapse's forget writes to room_memberships."""
        for user_id, room_id in pairs:
            self.txn.execute(
                "UPDATE room_memberships SET forgotten = 1 WHERE user_id = ? AND room_id = ?",
                (user_id, room_id),
            )

    def rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.txn.execute(sql, args)
        return [tuple(r) for r in self.txn.fetchall()]


class InlineApi:
    """The ModuleApi calls the stores make, run at once on a World's connection."""

    server_name = "example.org"

    def __init__(self, world: World) -> None:
        self._world = world

    async def run_db_interaction(self, desc: str, fn: Callable[..., Any], *args: Any) -> Any:
        self._world.txn.execute("BEGIN")
        try:
            result = fn(self._world.txn, *args)
        except BaseException:
            self._world.txn.execute("ROLLBACK")
            raise
        self._world.txn.execute("COMMIT")
        return result
