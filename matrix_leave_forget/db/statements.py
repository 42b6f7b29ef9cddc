"""Write statements sent to the database together, in one round trip where it can.

A lone forget is one short transaction, and on PostgreSQL most of its time is
round trips to the server: each statement waits for the last. Statements that
return no rows and do not depend on each other can go in one call instead:
psycopg2 sends ``"a; b; c"`` as one query. SQLite is in process (no round
trips) and runs one statement per call, so there they run one by one.
"""

from collections.abc import Sequence
from typing import Any

from synapse.module_api import LoggingTransaction

from matrix_leave_forget._synapse.sql import is_postgres


class StatementBatch:
    """Statements to run in order, in the caller's transaction, returning no rows."""

    def __init__(self) -> None:
        self._each: list[tuple[str, list[Sequence[Any]]]] = []

    def add_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run ``sql`` once per row of arguments (``?`` placeholders)."""
        if rows:
            self._each.append((sql, list(rows)))

    def run(self, txn: LoggingTransaction) -> None:
        """Send everything added so far: one call on PostgreSQL, one per statement on SQLite."""
        if not self._each:
            return
        if is_postgres(txn):
            txn.execute(
                "; ".join(sql for sql, rows in self._each for _ in rows),
                [value for _, rows in self._each for row in rows for value in row],
            )
        else:
            for sql, rows in self._each:
                if len(rows) == 1:
                    txn.execute(sql, rows[0])
                else:
                    txn.execute_batch(sql, rows)
        self._each = []
