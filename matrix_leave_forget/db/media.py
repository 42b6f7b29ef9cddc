"""The media reference index's rows and its positions in Synapse's events stream."""

from collections.abc import Iterable, Sequence

from synapse.module_api import LoggingTransaction, ModuleApi

# Positions (leave_forget_stream_positions.name): how far the index has read
# Synapse's events stream; where the back-fill of events from before the
# index ends (it is complete once ``forward`` reaches it); and the lowest
# stream ordering read (events back-filled over federation come below it).
STREAM_MEDIA_FORWARD = "media_refs"
STREAM_MEDIA_TARGET = "media_refs_backfill_target"
STREAM_MEDIA_LOW = "media_refs_low"

# One reference: (server name, media id, room id, event id, kind).
RefRow = tuple[str, str, str, str, str]


class MediaRefStore:
    """The reference index (leave_forget_media_refs).

    Args:
        api: The module API (for run_db_interaction).
    """

    def __init__(self, api: ModuleApi) -> None:
        self._api = api

    @staticmethod
    def positions_txn(txn: LoggingTransaction) -> dict[str, int]:
        """The index's stream positions by name (absent until it first ran)."""
        names = (STREAM_MEDIA_FORWARD, STREAM_MEDIA_TARGET, STREAM_MEDIA_LOW)
        txn.execute(
            "SELECT name, stream_id FROM leave_forget_stream_positions WHERE name IN (?, ?, ?)",
            names,
        )
        return {name: int(position) for name, position in txn.fetchall()}

    @staticmethod
    def start_txn(txn: LoggingTransaction, low: int, high: int) -> None:
        """Set the positions at the index's first run: back-fill every event from ``low``."""
        for name, position in (
            (STREAM_MEDIA_FORWARD, low - 1),
            (STREAM_MEDIA_TARGET, high),
            (STREAM_MEDIA_LOW, low),
        ):
            txn.execute(
                "INSERT INTO leave_forget_stream_positions (name, stream_id) VALUES (?, ?)",
                (name, position),
            )

    @staticmethod
    def add_txn(txn: LoggingTransaction, refs: Iterable[RefRow], name: str, position: int) -> None:
        """Add references (once each) and move stream position ``name`` to ``position``.

        One transaction: a crash between the two re-reads the batch, and the
        unique key makes the re-read add nothing twice.
        """
        txn.execute_batch(
            "INSERT INTO leave_forget_media_refs"
            " (media_origin, media_id, room_id, event_id, kind) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (media_origin, media_id, event_id, kind) DO NOTHING",
            list(refs),
        )
        txn.execute(
            "UPDATE leave_forget_stream_positions SET stream_id = ? WHERE name = ?",
            (position, name),
        )

    async def positions(self) -> dict[str, int]:
        return await self._api.run_db_interaction(
            "leave_forget_media_positions", self.positions_txn
        )

    async def count(self) -> int:
        """How many references the index holds."""

        def txn_fn(txn: LoggingTransaction) -> int:
            txn.execute("SELECT COUNT(*) FROM leave_forget_media_refs")
            row = txn.fetchone()
            return int(row[0]) if row else 0

        return await self._api.run_db_interaction("leave_forget_media_count", txn_fn)

    async def refs_of_room(self, room_id: str) -> Sequence[RefRow]:
        """The references a room's events make, in key order."""

        def txn_fn(txn: LoggingTransaction) -> list[RefRow]:
            txn.execute(
                "SELECT media_origin, media_id, room_id, event_id, kind"
                " FROM leave_forget_media_refs WHERE room_id = ?"
                " ORDER BY media_origin, media_id, event_id, kind",
                (room_id,),
            )
            return [tuple(r) for r in txn.fetchall()]  # type: ignore[misc]

        return await self._api.run_db_interaction("leave_forget_media_room_refs", txn_fn)
