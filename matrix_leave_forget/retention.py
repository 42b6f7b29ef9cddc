"""The retention sweep: purge rooms that every local user has forgotten, once due.

The sweep runs where Synapse runs its background tasks (``run_background_tasks_on``,
the main process by default), so exactly one process purges. All state lives in
the database, so a restart loses nothing: rooms still due are picked up by the
next sweep and rooms whose purge was started are re-submitted to Synapse until
Synapse no longer has them.
"""

import logging
import time
from typing import TYPE_CHECKING, Dict

from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget import metrics
from matrix_leave_forget.audit import now_ms
from matrix_leave_forget.config import RetentionConfig
from matrix_leave_forget.handler import MembershipHandler
from matrix_leave_forget.store import STATE_PURGING, RetentionStore

if TYPE_CHECKING:
    from matrix_leave_forget._synapse import SynapseInternals

logger = logging.getLogger(__name__)

# How many rooms one sweep handles; the rest wait for the next sweep.
SWEEP_BATCH = 1000
# How long a requested purge may take before it is requested again.
PURGE_RETRY_MS = 10 * 60 * 1000


class RetentionSweeper:
    """Decides and performs due purges, and cancels them when someone came back.

    Whether every local user still has the room forgotten is checked when the
    purge falls due, inside the transaction that records the decision, so a
    rejoin, invite or knock through any endpoint cancels it. (Synapse's
    on_new_event callback would catch them sooner, but registering one makes
    Synapse load the room state for every event on the server.)

    Args:
        api: The module API (purges go through ModuleApi.delete_room).
        config: The retention settings.
        store: The retention store.
        handler: Source of the "forgotten by every local user" check.
        internals: Reads Synapse's tables.
    """

    def __init__(
        self,
        api: ModuleApi,
        config: RetentionConfig,
        store: RetentionStore,
        handler: MembershipHandler,
        internals: "SynapseInternals",
    ) -> None:
        self._api = api
        self._config = config
        self._store = store
        self._handler = handler
        self._internals = internals
        # When this process last asked Synapse to purge each room in "purging".
        self._requested_at: Dict[str, int] = {}

    def is_held_txn(self, txn: LoggingTransaction, room_id: str) -> bool:
        return room_id in self._config.holds or self._store.is_held_txn(txn, room_id)

    async def sweep(self) -> Dict[str, int]:
        """One pass: decide every due room, then check on purges in progress.

        Returns:
            How many rooms ended in each outcome, for logs and tests.
        """
        counts: Dict[str, int] = {}
        now = now_ms()
        server_name = self._api.server_name
        for room_id in await self._store.get_due(now, SWEEP_BATCH):
            started = time.monotonic()
            outcome = await self._store.decide_purge(
                room_id,
                self._handler.why_not_forgotten_txn,
                self.is_held_txn,
                self._config.dry_run,
            )
            if outcome == "purge":
                await self._request_purge(room_id)
            counts[outcome] = counts.get(outcome, 0) + 1
            metrics.purges_total.labels(server_name, outcome).inc()
            metrics.purge_seconds.labels(server_name, outcome).observe(time.monotonic() - started)
        for room_id in await self._store.get_in_state(STATE_PURGING, SWEEP_BATCH):
            exists = await self._api.run_db_interaction(
                "leave_forget_room_exists", self._internals.room_exists_txn, room_id
            )
            if not exists:
                await self._store.mark_purged(room_id)
                self._requested_at.pop(room_id, None)
                counts["purged"] = counts.get("purged", 0) + 1
                metrics.purges_total.labels(server_name, "purged").inc()
            elif now - self._requested_at.get(room_id, 0) > PURGE_RETRY_MS:
                # Started before a restart, or Synapse's purge failed or was
                # lost: ask again. Synapse ignores a request for a room it is
                # already deleting.
                await self._request_purge(room_id)
        if counts:
            logger.info("Retention sweep: %s", counts)
        return counts

    async def _request_purge(self, room_id: str) -> None:
        self._requested_at[room_id] = now_ms()
        try:
            await self._api.delete_room(room_id)
        except Exception:
            logger.exception("Synapse refused to purge %s; will retry", room_id)
            self._requested_at.pop(room_id, None)
