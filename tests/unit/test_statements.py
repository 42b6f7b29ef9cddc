"""StatementBatch: writes sent together, against real SQLite and (optionally) PostgreSQL."""

import sqlite3
from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.db.statements import StatementBatch
from tests.unit.db_helpers import Txn, postgres_or_skip


class BatchTxn(Txn):
    """Txn with execute_batch, counting the calls that reach the database."""

    def __init__(self, cursor: Any, module: Any, paramstyle: str = "?") -> None:
        super().__init__(cursor, module, paramstyle)
        self.calls = 0

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.calls += 1
        super().execute(sql, args)

    def execute_batch(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.calls += 1
        self.statements.append(sql)
        self._cursor.executemany(sql.replace("?", self._paramstyle), [tuple(r) for r in rows])


class _StatementBatchCase(SynchronousTestCase):
    """Helpers only (no tests of its own): a table, a batch, what it left."""

    txn: BatchTxn

    def rows(self) -> list[Any]:
        self.txn.execute("SELECT k, v FROM t ORDER BY k")
        return [tuple(r) for r in self.txn.fetchall()]

    def fill(self) -> StatementBatch:
        self.txn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        self.txn.calls = 0
        batch = StatementBatch()
        batch.add_each("INSERT INTO t (k, v) VALUES (?, ?)", [(1, "a"), (2, "b; c"), (3, "?")])
        batch.add_each("UPDATE t SET v = ? WHERE k = ?", [("x", 2)])
        batch.add_each("DELETE FROM t WHERE k = ?", [])
        return batch

    def check_order_and_values(self) -> None:
        """Every statement ran, in order, with its own arguments (";" and "?"
        inside values are data, not syntax)."""
        self.fill().run(self.txn)
        self.assertEqual(self.rows(), [(1, "a"), (2, "x"), (3, "?")])


class SQLiteStatementBatchTests(_StatementBatchCase):
    def setUp(self) -> None:
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        self.txn = BatchTxn(conn.cursor(), sqlite3)

    def test_order_and_values(self) -> None:
        self.check_order_and_values()

    def test_one_call_per_statement(self) -> None:
        """SQLite runs one statement per call: the three inserts go in one
        executemany, the update in one execute, the empty delete not at all."""
        batch = self.fill()
        batch.run(self.txn)
        self.assertEqual(self.txn.calls, 2)
        batch.run(self.txn)  # emptied by the first run
        self.assertEqual(self.txn.calls, 2)


class PostgresStatementBatchTests(_StatementBatchCase):
    def setUp(self) -> None:
        psycopg2 = postgres_or_skip()
        from tests.support.harness import create_pg_database, drop_pg_database
        from tests.support.rawdb import pg_connection

        name = create_pg_database()
        self.addCleanup(drop_pg_database, name)
        conn = pg_connection(name)
        self.addCleanup(conn.close)
        self.txn = BatchTxn(conn.cursor(), psycopg2, "%s")

    def test_order_and_values(self) -> None:
        self.check_order_and_values()

    def test_one_round_trip(self) -> None:
        """PostgreSQL gets everything in one call."""
        self.fill().run(self.txn)
        self.assertEqual(self.txn.calls, 1)
