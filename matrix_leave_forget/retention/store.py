"""The module's store: its own tables in Synapse's database.

SQL lives in the stores and only there (Synapse's own tables are read through
``_synapse/``). Every method runs one transaction under one description
string, as Synapse's stores do. This one holds the two roles together
(``audit``: the audit log, ``retention``: the retention state) and runs the
transactions that span them: the schema, and departures recorded from
Synapse's events stream. A forget's transaction, which also writes Synapse's
own rows, is membership/forget_writer.py's.
"""

from collections.abc import Callable, Sequence
from typing import Any

import attr
from signedjson.types import SigningKey
from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget.audit.log import AuditFields, AuditLog
from matrix_leave_forget.db.schema import run_migrations
from matrix_leave_forget.retention.receipt import purge_receipt_view_txn
from matrix_leave_forget.retention.state import RetentionState

# Positions in Synapse's events stream (leave_forget_stream_positions.name):
# where the module was installed (nothing before it is recorded as a
# departure), and how far the catch-up has read (membership/reconcile.py).
STREAM_INSTALLED = "installed"
STREAM_DEPARTURES = "departures"


@attr.s(frozen=True, auto_attribs=True)
class DepartureEvent:
    """A membership event that took a local user out of a room, as the log records it.

    (The history guard's ``history.departures.Departure`` is another thing: a
    user's current leave as the guard needs it, from Synapse's caches.)
    """

    event_id: str
    room_id: str
    user_id: str
    sender: str
    membership: str
    origin_server_ts: int
    reason: str | None
    stream_ordering: int = 0


class RetentionStore:
    """The audit log and the retention state, and the transactions spanning them.

    Args:
        api: The module API (for run_db_interaction and the clock).
        origin: The server name entries are signed as.
        instance: This process's instance name, recorded in each entry.
        signing_key: The homeserver's signing key.
    """

    def __init__(self, api: ModuleApi, origin: str, instance: str, signing_key: SigningKey) -> None:
        self._api = api
        self.audit = AuditLog(api, origin, instance, signing_key)
        self.retention = RetentionState(api, self.audit)

    async def setup(self, stream_position: Callable[[LoggingTransaction], int]) -> int:
        """Create or upgrade the schema; returns the version now in place.

        Args:
            stream_position: Reads the newest position of Synapse's events
                stream; at the first start-up with this schema it is recorded
                as the installation point (and the catch-up starts there).
        """

        def txn_fn(txn: LoggingTransaction) -> int:
            version = run_migrations(txn)
            txn.execute(
                "SELECT 1 FROM leave_forget_stream_positions WHERE name = ?",
                (STREAM_INSTALLED,),
            )
            if txn.fetchone() is None:
                position = stream_position(txn)
                for name in (STREAM_INSTALLED, STREAM_DEPARTURES):
                    txn.execute(
                        "INSERT INTO leave_forget_stream_positions (name, stream_id) VALUES (?, ?)",
                        (name, position),
                    )
            return version

        return await self._api.run_db_interaction("leave_forget_migrate", txn_fn)

    async def probe(self) -> None:
        """The smallest transaction: what waiting for the database costs right now."""

        def txn_fn(txn: LoggingTransaction) -> None:
            txn.execute("SELECT 1")
            txn.fetchone()

        await self._api.run_db_interaction("leave_forget_probe", txn_fn)

    async def purge_receipt(self, room_id: str) -> dict[str, Any] | None:
        """The room's purge receipt and where its media stands (``purge_receipt_view_txn``)."""
        return await self._api.run_db_interaction(
            "leave_forget_purge_receipt", purge_receipt_view_txn, room_id
        )

    async def record_departure(self, fields: AuditFields) -> bool:
        """Append a departure seen in Synapse's events, once per event.

        Returns:
            False if an entry for the event was already in the log (the
            module's endpoint, or another route, recorded it first).
        """

        def txn_fn(txn: LoggingTransaction) -> bool:
            if self.audit.has_event_txn(txn, fields.event_id):
                return False
            self.audit.append_txn(txn, fields)
            return True

        return await self.audit.run_grouped(txn_fn)

    # -- catch-up from Synapse's events stream ---------------------------

    async def stream_position(self, name: str) -> int:
        """A stored position in Synapse's events stream (0 if never set)."""

        def txn_fn(txn: LoggingTransaction) -> int:
            txn.execute(
                "SELECT stream_id FROM leave_forget_stream_positions WHERE name = ?", (name,)
            )
            row = txn.fetchone()
            return int(row[0]) if row else 0

        return await self._api.run_db_interaction("leave_forget_stream_position", txn_fn)

    async def record_recovered_departures(
        self, departures: Sequence[tuple[DepartureEvent, AuditFields]], position: int
    ) -> int:
        """Record the departures the log lacks and advance the catch-up, atomically.

        Returns:
            How many entries were appended (events already in the log are skipped).
        """

        def txn_fn(txn: LoggingTransaction) -> int:
            missing = [
                fields for d, fields in departures if not self.audit.has_event_txn(txn, d.event_id)
            ]
            self.audit.append_many_txn(txn, missing)
            txn.execute(
                "UPDATE leave_forget_stream_positions SET stream_id = ? "
                "WHERE name = ? AND stream_id < ?",
                (position, STREAM_DEPARTURES, position),
            )
            return len(missing)

        return await self.audit.run_grouped(txn_fn)
