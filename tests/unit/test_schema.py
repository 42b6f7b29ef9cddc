"""The module's schema migrations, run against real SQLite and (optionally) PostgreSQL.

``run_migrations`` is handed what Synapse hands it: a cursor-like transaction
with ``database_engine.module`` and ``?`` placeholders. Here that is a thin
wrapper over a DB-API cursor: SQLite takes ``?`` natively; for PostgreSQL the
wrapper converts ``?`` to ``%s`` and the connection runs at REPEATABLE READ,
Synapse's default isolation level.

PostgreSQL tests run when ``MLF_TEST_DATABASE=postgres`` (server from the PG*
variables, as for the integration suite).
"""

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.db.schema import MIGRATIONS, SCHEMA_VERSION, run_migrations
from tests.unit.db_helpers import Txn, postgres_or_skip

MODULE_TABLES_BY_VERSION = {
    1: {"leave_forget_audit", "leave_forget_rooms"},
    2: {"leave_forget_holds"},
    3: set(),  # an index only
    4: set(),  # columns only
    5: {"leave_forget_stream_positions"},
    6: set(),  # columns and indexes only
    7: {"leave_forget_media_refs", "leave_forget_media_rooms", "leave_forget_media_deletions"},
}


class MigrationTestsMixin:
    """The migration tests, for any engine; subclasses provide connections."""

    # Provided by the engine-specific subclass.
    connect: Callable[[], Any]
    engine_module: Any
    paramstyle: str

    # Provided by SynchronousTestCase.
    assertEqual: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFalse: Callable[..., None]
    assertIn: Callable[..., None]
    assertRaises: Callable[..., Any]
    addCleanup: Callable[..., None]

    def txn(self, conn: Any) -> Txn:
        return Txn(conn.cursor(), self.engine_module, self.paramstyle)

    def migrate(self, conn: Any, target: int = SCHEMA_VERSION) -> int:
        """One run_migrations in one committed transaction, as Synapse runs it."""
        try:
            version = run_migrations(self.txn(conn), target=target)
        except BaseException:
            conn.rollback()
            raise
        conn.commit()
        return version

    def tables(self, conn: Any) -> set[str]:
        raise NotImplementedError

    def new_database(self) -> None:
        """Make the next connect() open a fresh, empty database."""

    def stored_version(self, conn: Any) -> int | None:
        cur = conn.cursor()
        cur.execute("SELECT version FROM leave_forget_schema_version")
        rows = cur.fetchall()
        conn.commit()
        self.assertTrue(len(rows) <= 1, f"more than one version row: {rows}")
        return int(rows[0][0]) if rows else None

    def assert_latest(self, conn: Any) -> None:
        self.assertEqual(self.stored_version(conn), SCHEMA_VERSION)
        expected = set().union(*MODULE_TABLES_BY_VERSION.values())
        self.assertEqual(
            {t for t in self.tables(conn) if t.startswith("leave_forget_")},
            expected | {"leave_forget_schema_version"},
        )

    def test_versions_cover_every_migration(self) -> None:
        """The test's table map knows every migration (so a new one is not silently untested)."""
        self.assertEqual(SCHEMA_VERSION, len(MIGRATIONS))
        self.assertEqual(sorted(MODULE_TABLES_BY_VERSION), list(range(1, SCHEMA_VERSION + 1)))

    def test_empty_to_latest(self) -> None:
        """An empty database migrates to the latest version with every table in place."""
        conn = self.connect()
        self.assertEqual(self.migrate(conn), SCHEMA_VERSION)
        self.assert_latest(conn)
        # The tables are usable as the store uses them.
        cur = conn.cursor()
        cur.execute(
            "INSERT INTO leave_forget_holds (room_id, held_by, reason, created_at) "
            f"VALUES ({', '.join([self.paramstyle] * 4)})",
            ("!r:test.local", "@a:test.local", None, 1),
        )
        cur.execute(
            "INSERT INTO leave_forget_rooms (room_id, state, updated_at) "
            f"VALUES ({', '.join([self.paramstyle] * 3)})",
            ("!r:test.local", "forgotten", 1),
        )
        conn.commit()

    def test_target_zero_on_empty_database(self) -> None:
        """Migrating an empty database to version 0 creates no module table and no version row."""
        conn = self.connect()
        self.assertEqual(self.migrate(conn, target=0), 0)
        self.assertEqual(self.stored_version(conn), None)
        self.assertFalse(self.tables(conn) & set().union(*MODULE_TABLES_BY_VERSION.values()))
        self.assertEqual(self.migrate(conn), SCHEMA_VERSION)
        self.assert_latest(conn)

    def test_each_earlier_version_to_latest(self) -> None:
        """From every earlier version k, the upgrade reaches the latest and keeps existing rows."""
        for k in range(1, SCHEMA_VERSION):
            self.new_database()
            conn = self.connect()
            self.assertEqual(self.migrate(conn, target=k), k)
            self.assertEqual(self.stored_version(conn), k)
            present = self.tables(conn)
            for version, tables in MODULE_TABLES_BY_VERSION.items():
                if version <= k:
                    self.assertTrue(tables <= present, f"v{k}: {tables} missing")
                else:
                    self.assertFalse(tables & present, f"v{k}: {tables} already there")
            cur = conn.cursor()
            cur.execute(
                "INSERT INTO leave_forget_rooms (room_id, state, updated_at) "
                f"VALUES ({', '.join([self.paramstyle] * 3)})",
                (f"!v{k}:test.local", "forgotten", k),
            )
            conn.commit()
            self.assertEqual(self.migrate(conn), SCHEMA_VERSION)
            self.assert_latest(conn)
            cur = conn.cursor()
            cur.execute("SELECT room_id, state FROM leave_forget_rooms")
            self.assertEqual(cur.fetchall(), [(f"!v{k}:test.local", "forgotten")])
            conn.commit()

    def test_stepwise_upgrade(self) -> None:
        """Upgrading one version at a time ends at the same schema as one jump."""
        conn = self.connect()
        for k in range(1, SCHEMA_VERSION + 1):
            self.assertEqual(self.migrate(conn, target=k), k)
            self.assertEqual(self.stored_version(conn), k)
        self.assert_latest(conn)

    def test_second_run_is_a_noop(self) -> None:
        """Running the migrations again changes nothing and runs no DDL beyond the version check."""
        conn = self.connect()
        self.migrate(conn)
        txn = self.txn(conn)
        self.assertEqual(run_migrations(txn), SCHEMA_VERSION)
        conn.commit()
        writes = ("CREATE TABLE LEAVE", "CREATE INDEX", "INSERT", "UPDATE")
        ddl = [sql for sql in txn.statements if sql.lstrip().upper().startswith(writes)]
        self.assertEqual(ddl, [])
        self.assert_latest(conn)
        self.assertEqual(self.migrate(conn), SCHEMA_VERSION)
        self.assert_latest(conn)

    def test_lower_target_does_not_downgrade(self) -> None:
        """Asking for an older target on a newer database leaves it as it is."""
        conn = self.connect()
        self.migrate(conn)
        self.assertEqual(self.migrate(conn, target=1), SCHEMA_VERSION)
        self.assert_latest(conn)

    def test_newer_database_is_refused(self) -> None:
        """A database at a version this code does not know raises RuntimeError and is untouched."""
        conn = self.connect()
        self.migrate(conn)
        cur = conn.cursor()
        cur.execute(
            f"UPDATE leave_forget_schema_version SET version = {self.paramstyle}",
            (SCHEMA_VERSION + 1,),
        )
        conn.commit()
        with self.assertRaises(RuntimeError) as caught:
            self.migrate(conn)
        self.assertIn(str(SCHEMA_VERSION + 1), str(caught.exception))
        self.assertIn("upgrade the module", str(caught.exception))
        self.assertEqual(self.stored_version(conn), SCHEMA_VERSION + 1)

    def test_version_table_holds_one_row(self) -> None:
        """The version table cannot hold a second row (the lock column is unique)."""
        conn = self.connect()
        self.migrate(conn)
        cur = conn.cursor()
        with self.assertRaises(self.engine_module.IntegrityError):
            cur.execute("INSERT INTO leave_forget_schema_version (version) VALUES (1)")
        conn.rollback()
        self.assertEqual(self.stored_version(conn), SCHEMA_VERSION)


class SQLiteMigrationTests(MigrationTestsMixin, SynchronousTestCase):
    """The migrations on SQLite (a fresh database file per connection)."""

    engine_module = sqlite3
    paramstyle = "?"

    def connect(self) -> Any:
        path = os.path.join(self.mktemp() + ".db")
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        return conn

    def tables(self, conn: Any) -> set[str]:
        cur = conn.cursor()
        cur.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        names = {str(r[0]) for r in cur.fetchall()}
        conn.commit()
        return names

    def test_wrapper_engine_name(self) -> None:
        """The wrapper presents the engine the way Synapse does for SQLite."""
        self.assertEqual(self.txn(self.connect()).database_engine.module.__name__, "sqlite3")


class PostgresMigrationTests(MigrationTestsMixin, SynchronousTestCase):
    """The migrations on PostgreSQL, at Synapse's REPEATABLE READ isolation."""

    paramstyle = "%s"

    def setUp(self) -> None:
        self.engine_module = postgres_or_skip()
        self.new_database()

    def connect(self) -> Any:
        from tests.support.rawdb import pg_connection

        conn = pg_connection(self.dbname)
        # As Synapse's PostgresEngine does for every connection.
        conn.set_isolation_level(self.engine_module.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        self.addCleanup(conn.close)
        return conn

    def tables(self, conn: Any) -> set[str]:
        cur = conn.cursor()
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        names = {str(r[0]) for r in cur.fetchall()}
        conn.commit()
        return names

    def _run_in_thread(self, conn: Any, target: int = SCHEMA_VERSION) -> "_MigrationThread":
        thread = _MigrationThread(self, conn, target)
        thread.start()
        self.addCleanup(thread.join, 30)
        return thread

    def _wait_for_lock_waiter(self, observer: Any, timeout: float = 10.0) -> None:
        """Wait until some session waits on an advisory lock."""
        deadline = time.monotonic() + timeout
        cur = observer.cursor()
        while time.monotonic() < deadline:
            cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            waiting = cur.fetchone()[0]
            observer.commit()
            if waiting:
                return
            time.sleep(0.02)
        raise AssertionError("no migration ever waited for the advisory lock")

    def test_concurrent_migration_waits_for_the_first(self) -> None:
        """A start-up that began migrating while another held the lock ends at the latest version.

        Deterministic interleaving: connection A migrates and keeps its
        transaction open; connection B starts migrating and blocks on the
        advisory lock (its REPEATABLE READ snapshot already taken); A commits;
        B must then see A's work, not try to create the tables again.
        """
        first, second, observer = self.connect(), self.connect(), self.connect()
        observer.set_isolation_level(0)  # autocommit
        self.assertEqual(run_migrations(self.txn(first)), SCHEMA_VERSION)
        thread = self._run_in_thread(second)
        self._wait_for_lock_waiter(observer)
        first.commit()
        thread.join(30)
        self.assertFalse(thread.is_alive(), "second migration never finished")
        thread.reraise()
        self.assertEqual(thread.result, SCHEMA_VERSION)
        self.assert_latest(self.connect())

    def test_concurrent_upgrade_from_earlier_version(self) -> None:
        """Two processes upgrading an older schema at once both succeed, applying it once."""
        for k in range(0, SCHEMA_VERSION):
            self.new_database()
            self.migrate(self.connect(), target=k)
            first, second, observer = self.connect(), self.connect(), self.connect()
            observer.set_isolation_level(0)
            self.assertEqual(run_migrations(self.txn(first)), SCHEMA_VERSION)
            thread = self._run_in_thread(second)
            self._wait_for_lock_waiter(observer)
            first.commit()
            thread.join(30)
            self.assertFalse(thread.is_alive())
            thread.reraise()
            self.assertEqual(thread.result, SCHEMA_VERSION)
            self.assert_latest(self.connect())

    def test_concurrent_migrations_race(self) -> None:
        """Two threads migrating an empty database at the same moment both end without error."""
        for _ in range(5):
            self.new_database()
            barrier = threading.Barrier(2)
            threads = [
                _MigrationThread(self, self.connect(), SCHEMA_VERSION, barrier) for _ in range(2)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
                self.assertFalse(thread.is_alive())
                thread.reraise()
                self.assertEqual(thread.result, SCHEMA_VERSION)
            self.assert_latest(self.connect())

    def new_database(self) -> None:
        from tests.support.harness import create_pg_database, drop_pg_database

        self.dbname = create_pg_database()
        self.addCleanup(drop_pg_database, self.dbname)


class _MigrationThread(threading.Thread):
    """Runs one migration transaction on its own connection and commits it."""

    def __init__(
        self,
        case: PostgresMigrationTests,
        conn: Any,
        target: int,
        barrier: threading.Barrier | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self._case = case
        self._conn = conn
        self._target = target
        self._barrier = barrier
        self.result: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self._barrier is not None:
                self._barrier.wait(10)
            self.result = self._case.migrate(self._conn, self._target)
        except BaseException as error:  # reported by reraise() on the test thread
            self.error = error

    def reraise(self) -> None:
        if self.error is not None:
            raise AssertionError(f"migration failed: {self.error!r}") from self.error
