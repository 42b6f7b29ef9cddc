"""Limits, values and engine facts shared by the queries on Synapse's tables."""

from collections.abc import Sequence
from typing import Any, Protocol

# Room ids per IN (...) list: well under SQLite's oldest variable limit (999).
IN_LIST_MAX = 500

# Memberships that keep a room alive for a local user: the room is not
# forgotten by all, a forget is refused, a purge must wait. The one definition,
# for the rules and for every query on Synapse's membership tables.
LIVE_MEMBERSHIPS = frozenset({"join", "invite", "knock"})
LIVE = tuple(sorted(LIVE_MEMBERSHIPS))
# As SQL literals, for a statement whose other arguments are its own
# (constants from the line above, never user input).
LIVE_SQL = ", ".join(f"'{membership}'" for membership in LIVE)


def is_postgres(txn: Any) -> bool:
    """Whether a Synapse LoggingTransaction talks to PostgreSQL.

    Why: ModuleApi does not say which engine the database is; the
    transaction's ``database_engine`` (Synapse's own) does.
    """
    return "psycopg" in txn.database_engine.module.__name__


class StatementSink(Protocol):
    """Where writes that return no rows are collected, to be sent together
    (db/statements.py's ``StatementBatch``)."""

    def add_each(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run ``sql`` once per row of arguments (``?`` placeholders)."""

    def run(self, txn: Any) -> None:
        """Send everything collected so far, in txn."""
