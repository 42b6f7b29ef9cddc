"""The catch-up: departures Synapse has that the audit log lacks, from its events stream.

Every departure of a local user is recorded as it happens: by the module's
endpoint, or from Synapse's ``on_new_event`` callback (membership/observer.py,
registered in the package's ``__init__``). Forgets
are written with their entry in one transaction, so there is nothing to catch
up for them. What a crash can still lose is a departure whose event Synapse
persisted just before the process died, before it was recorded.

The catch-up reads Synapse's events stream from a stored position, the way
Synapse's own background jobs (the user directory, the room forgetter) do,
and records each local leave or ban missing from the log with outcome
``recovered``, ``via: recovered``, the event's own id, sender (as ``actor``
when it is not the user), reason and timestamp (``event_ts``). The position
starts at the module's installation point (recorded at the first start-up),
so nothing from before the module was installed is recorded, and it moves on
in the transaction that records what it found: a restart costs the events
since the last run, not the memberships.

It runs on the process that runs background tasks: once at start-up up to the
head of the stream, then every ``CATCH_UP_INTERVAL_MS`` up to where the stream
was at the previous run, so that the live paths (which may wait a few seconds
for another worker) always record first.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attr
from synapse.module_api import ModuleApi

from matrix_leave_forget.audit.entry import VIA_RECOVERED
from matrix_leave_forget.audit.log import OUTCOME_RECOVERED
from matrix_leave_forget.membership.observer import departure_fields, departure_from_row
from matrix_leave_forget.retention.store import STREAM_DEPARTURES, DepartureEvent, RetentionStore

if TYPE_CHECKING:
    from matrix_leave_forget._synapse.routes import SynapseRoutes

logger = logging.getLogger(__name__)

# Events stream rows one transaction reads (and records) at most.
CATCH_UP_BATCH = 1000
CATCH_UP_INTERVAL_MS = 60 * 1000
# Where Synapse cannot run on_new_event (_synapse.on_new_event_is_safe), the
# catch-up is how departures are seen at all: it runs this often, and records
# each departure with the route its event shows.
LIVE_INTERVAL_MS = 2 * 1000

# (departure) -> (via, actor) of a departure read from the stream.
StreamRoute = Callable[[DepartureEvent], Awaitable[tuple[str, str | None]]]


class Reconciler:
    """Brings the audit log up to Synapse's events stream.

    Args:
        api: The module API.
        store: The retention store.
        routes: Reads Synapse's events stream.
        live: Given where on_new_event cannot be used: the periodic runs then
            record departures as seen live (outcome ``ok``, this route).
    """

    def __init__(
        self,
        api: ModuleApi,
        store: RetentionStore,
        routes: "SynapseRoutes",
        live: StreamRoute | None = None,
    ) -> None:
        self._api = api
        self._store = store
        self._routes = routes
        self._live = live
        # The head of the stream at the previous periodic run.
        self._previous_head: int | None = None

    async def run(self) -> dict[str, int]:
        """Catch up to the head of the stream (at start-up); counts for logs and tests."""
        started = time.perf_counter()
        head = await self._head()
        counts = await self.catch_up(head)
        self._previous_head = head
        elapsed_ms = (time.perf_counter() - started) * 1000
        logger.info(
            "Start-up catch-up read %d departure(s) up to stream position %d in %.1f ms",
            counts["read"],
            head,
            elapsed_ms,
        )
        if counts["leaves"]:
            logger.warning(
                "Reconciled with Synapse: %d departure(s) were missing from the audit log "
                "(recorded with outcome 'recovered'; their devices cannot be recovered)",
                counts["leaves"],
            )
        return counts

    @property
    def interval_ms(self) -> int:
        return LIVE_INTERVAL_MS if self._live is not None else CATCH_UP_INTERVAL_MS

    async def tick(self) -> None:
        """The periodic run: up to the head seen at the previous run."""
        upto = self._previous_head
        self._previous_head = await self._head()
        if upto is not None:
            counts = await self.catch_up(upto, live=self._live)
            if counts["leaves"] and self._live is None:
                logger.warning(
                    "%d departure(s) were missing from the audit log; recorded as 'recovered'",
                    counts["leaves"],
                )

    async def catch_up(self, upto: int, live: StreamRoute | None = None) -> dict[str, int]:
        """Record missing departures up to stream position ``upto``, in batches.

        Args:
            live: Records them as seen live, with this route (else as recovered).
        """
        counts = {"leaves": 0, "read": 0}
        position = await self._store.stream_position(STREAM_DEPARTURES)
        while position < upto:
            rows = await self._api.run_db_interaction(
                "leave_forget_departures",
                self._routes.departures_txn,
                position,
                upto,
                self._api.server_name,
                CATCH_UP_BATCH,
            )
            full = len(rows) == CATCH_UP_BATCH
            reached = rows[-1][0] if full else upto
            departures = []
            for row in rows:
                departure = departure_from_row(row)
                if not self._api.is_mine(departure.user_id):
                    continue
                if live is not None:
                    via, actor = await live(departure)
                    departures.append((departure, departure_fields(departure, via, actor)))
                    continue
                actor = departure.sender if departure.sender != departure.user_id else None
                fields = departure_fields(departure, VIA_RECOVERED, actor)
                departures.append((departure, attr.evolve(fields, outcome=OUTCOME_RECOVERED)))
            counts["leaves"] += await self._store.record_recovered_departures(departures, reached)
            counts["read"] += len(rows)
            position = reached
        return counts

    async def _head(self) -> int:
        return await self._api.run_db_interaction(
            "leave_forget_stream_head", self._routes.max_stream_ordering_txn
        )
