"""The media reference index: which events reference which media, kept up to date.

The index follows Synapse's events stream from the background-tasks process,
one transaction per stretch of stream positions: each reads the stretch's
events that hold an ``mxc://`` URI, records their references and moves the
stored position, so a restart (or SIGKILL) resumes where the last committed
stretch ended and a re-read adds nothing twice. At its first run it starts
below the lowest event, so the events from before the module (or before this
index) are back-filled by the same loop; ``backfill_done`` says when the
position has passed the head seen then. Events back-filled over federation
later take stream orderings below every earlier one; each run reads those too.

Nothing is read on the send path: a send costs nothing more, and the index
trails the stream by about ``INTERVAL_MS``. Media deletion asks
:meth:`MediaIndexer.covers` before it trusts the index.
"""

import json
import logging
from typing import Any

from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget import metrics
from matrix_leave_forget._synapse.media import events_with_mxc_txn, stream_bounds_txn
from matrix_leave_forget.db.media import (
    STREAM_MEDIA_FORWARD,
    STREAM_MEDIA_LOW,
    STREAM_MEDIA_TARGET,
    MediaRefStore,
    RefRow,
)
from matrix_leave_forget.media.refs import media_refs

logger = logging.getLogger(__name__)

# How often the stream is read; the index trails new events by about this.
INTERVAL_MS = 1000
# Stream positions per transaction: a stretch of nearly all text events is
# one index range scan returning few rows; a stretch of media a few hundred.
BATCH_POSITIONS = 5000


def refs_of_rows(rows: list[tuple[int, str, str, str, str]]) -> list[RefRow]:
    """The references in ``events_with_mxc_txn``'s rows (unreadable JSON is skipped)."""
    refs: list[RefRow] = []
    for _stream, event_id, room_id, event_type, text in rows:
        try:
            event: Any = json.loads(text)
        except ValueError:
            continue
        content = event.get("content") if isinstance(event, dict) else None
        for origin, media_id, kind in sorted(media_refs(event_type, content)):
            refs.append((origin, media_id, room_id, event_id, kind))
    return refs


def index_covers(positions: dict[str, int], stream_ordering: int) -> bool:
    """Whether an index at ``positions`` (``MediaRefStore.positions_txn``) holds every
    reference of the events up to ``stream_ordering``, its back-fill done."""
    forward = positions.get(STREAM_MEDIA_FORWARD)
    return forward is not None and forward >= max(stream_ordering, positions[STREAM_MEDIA_TARGET])


def unindexed_refs_txn(
    txn: LoggingTransaction,
    paramstyle: str = "?",
    positions: dict[str, int] | None = None,
) -> set[tuple[str, str]] | None:
    """The media that events not yet in the index reference, read now; None if too many.

    The index trails the stream by a run or two, so on a server that never
    falls silent it never holds every event up to the head. A decision that
    needs every reference up to now (a deletion) takes the index, plus what
    this reads of the events past it, in its own transaction: everything up
    to the head, whatever the traffic. None until the back-fill is done, or
    while the index is more than one stretch behind (it is catching up: the
    caller waits for it). Shared with the CLI (``paramstyle``: ``%s`` on a raw
    psycopg2 cursor).

    Args:
        positions: The index's positions, if the caller read them already in
            this transaction.
    """
    if positions is None:
        positions = MediaRefStore.positions_txn(txn, paramstyle)
    forward = positions.get(STREAM_MEDIA_FORWARD)
    if forward is None or forward < positions[STREAM_MEDIA_TARGET]:
        return None
    _low, head = stream_bounds_txn(txn)
    if head - forward > BATCH_POSITIONS:
        return None
    rows = events_with_mxc_txn(txn, forward, head, paramstyle) if head > forward else []
    return {(origin, media_id) for origin, media_id, *_ in refs_of_rows(rows)}


def _read_stretch_txn(txn: LoggingTransaction, name: str, after: int, upto: int, to: int) -> int:
    rows = events_with_mxc_txn(txn, after, upto)
    refs = refs_of_rows(rows)
    MediaRefStore.add_txn(txn, refs, name, to)
    return len(refs)


class MediaIndexer:
    """Fills the reference index from Synapse's events stream (background-tasks process).

    Args:
        api: The module API.
        store: The index's store.
    """

    def __init__(self, api: ModuleApi, store: MediaRefStore) -> None:
        self._api = api
        self._store = store
        self._positions: dict[str, int] | None = None
        # The head seen at the previous run: events below it have committed
        # (an event can commit after a higher one on another writer).
        self._previous_head: int | None = None
        self._running = False
        self.read_refs = 0

    async def tick(self) -> None:
        """One run: read what the stream gained (and what it gained below) since the last."""
        if self._running:
            return
        self._running = True
        try:
            await self._tick()
        finally:
            self._running = False

    async def _tick(self) -> None:
        low, head = await self._api.run_db_interaction(
            "leave_forget_media_bounds", stream_bounds_txn
        )
        if self._positions is None:
            positions = await self._store.positions()
            if STREAM_MEDIA_FORWARD not in positions:
                await self._api.run_db_interaction(
                    "leave_forget_media_start", MediaRefStore.start_txn, low, head
                )
                positions = await self._store.positions()
                logger.info("Media reference index: back-filling events %d to %d", low, head)
            self._positions = positions
        positions = self._positions
        upto, self._previous_head = self._previous_head, head
        if upto is None:
            return
        while positions[STREAM_MEDIA_FORWARD] < upto:
            after = positions[STREAM_MEDIA_FORWARD]
            end = min(after + BATCH_POSITIONS, upto)
            self.read_refs += await self._api.run_db_interaction(
                "leave_forget_media_index", _read_stretch_txn, STREAM_MEDIA_FORWARD, after, end, end
            )
            positions[STREAM_MEDIA_FORWARD] = end
            self._report(positions, upto)
        # Events back-filled over federation since the last run, below the lowest read.
        while low < positions[STREAM_MEDIA_LOW]:
            below = positions[STREAM_MEDIA_LOW]
            start = max(low, below - BATCH_POSITIONS)
            self.read_refs += await self._api.run_db_interaction(
                "leave_forget_media_index_low",
                _read_stretch_txn,
                STREAM_MEDIA_LOW,
                start - 1,
                below - 1,
                start,
            )
            positions[STREAM_MEDIA_LOW] = start
        self._report(positions, upto)

    def _report(self, positions: dict[str, int], head: int) -> None:
        server = self._api.server_name
        metrics.media_index_lag.labels(server).set(max(0, head - positions[STREAM_MEDIA_FORWARD]))
        metrics.media_index_backfill_remaining.labels(server).set(
            max(0, positions[STREAM_MEDIA_TARGET] - positions[STREAM_MEDIA_FORWARD])
        )

    async def covers(self, stream_ordering: int) -> bool:
        """Whether the index holds every reference of the events up to ``stream_ordering``.

        Read from the database, so any process can ask.
        """
        return index_covers(await self._store.positions(), stream_ordering)

    async def status(self) -> dict[str, Any]:
        """The index's progress, for ``GET …/admin/retention`` (``media_index``).

        ``position``: the last stream ordering read; ``head``: Synapse's
        newest; ``backfill_target``: the newest when the index first ran (the
        back-fill is done once ``position`` reaches it); ``backfill_done``;
        ``lag``: stream positions not yet read. Nulls before the first run.
        """
        positions = await self._store.positions()
        _low, head = await self._api.run_db_interaction(
            "leave_forget_media_bounds", stream_bounds_txn
        )
        forward = positions.get(STREAM_MEDIA_FORWARD)
        target = positions.get(STREAM_MEDIA_TARGET)
        if forward is None or target is None:
            return {
                "position": None,
                "head": head,
                "backfill_target": None,
                "backfill_done": False,
                "lag": None,
            }
        return {
            "position": forward,
            "head": head,
            "backfill_target": target,
            "backfill_done": forward >= target,
            "lag": max(0, head - forward),
        }
