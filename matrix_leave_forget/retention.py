"""The retention sweep: purge rooms that every local user has forgotten, once due.

The sweep runs where Synapse runs its background tasks (``run_background_tasks_on``,
the main process by default), so exactly one process purges. All state lives in
the database, so a restart loses nothing: rooms still due are picked up by the
next sweep and rooms whose purge was started are re-submitted to Synapse until
Synapse no longer has them.
"""

import logging
import time
from typing import TYPE_CHECKING, Dict, Set, Tuple

from synapse.module_api import ModuleApi

from matrix_leave_forget import metrics
from matrix_leave_forget.audit import now_ms
from matrix_leave_forget.config import RetentionConfig
from matrix_leave_forget.handler import MembershipHandler
from matrix_leave_forget.store import STATE_PURGING, RetentionStore

if TYPE_CHECKING:
    from matrix_leave_forget._synapse import SynapseInternals

logger = logging.getLogger(__name__)

# How many rooms in "purging" one sweep looks at.
SWEEP_BATCH = 1000
# Due rooms decided per transaction. Each transaction holds the audit chain's
# lock (so leave and forget wait for it): 1000 rooms is tens of milliseconds.
DECIDE_BATCH = 1000
# Bound on one sweep's decision transactions (10^6 due rooms); the rest wait.
MAX_DECIDE_TRANSACTIONS = 1000
# Purges this process keeps in flight at once.
MAX_CONCURRENT_PURGES = 1
# Back-off before asking again after Synapse's purge of a room failed.
PURGE_RETRY_MS = 5 * 1000
MAX_PURGE_RETRY_MS = 60 * 60 * 1000
# Synapse's worker locks expire this long after their holder's last renewal
# (synapse.storage.databases.main.lock._LOCK_TIMEOUT), plus its reaper's interval.
SYNAPSE_LOCK_TIMEOUT_S = 120 + 12


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
        # Per room in "purging": how often this process asked Synapse to purge
        # it, and when it last did.
        self._attempts: Dict[str, Tuple[int, int]] = {}
        # Rooms whose purge Synapse resumed from an earlier process, once reported.
        self._resumed: Set[str] = set()
        # What the last sweep's decisions cost (ms), for logs and benchmarks.
        self.last_stats: Dict[str, float] = {}

    async def sweep(self) -> Dict[str, int]:
        """One pass: decide every due room, then check on purges in progress.

        Returns:
            How many rooms ended in each outcome, for logs and tests.
        """
        counts: Dict[str, int] = {}
        now = now_ms()
        server_name = self._api.server_name
        started = time.monotonic()
        stats: Dict[str, float] = {"transactions": 0}
        # Each transaction decides a batch of due rooms (oldest first) and
        # takes them out of "forgotten", so every one makes progress; `now`
        # is fixed, so the loop ends with the rooms due when it began.
        for _ in range(MAX_DECIDE_TRANSACTIONS):
            batch_started = time.monotonic()
            batch = await self._store.decide_due(
                now,
                DECIDE_BATCH,
                self._handler.why_not_forgotten_many_txn,
                self._config.holds,
                self._config.dry_run,
            )
            per_room = (time.monotonic() - batch_started) / max(
                1, len(batch.decided) + len(batch.cancelled)
            )
            stats["transactions"] += 1
            for key, value in batch.timings_ms.items():
                stats[key] = round(stats.get(key, 0.0) + value, 2)
            decided = "dry_run" if self._config.dry_run else "purge"
            for outcome, n in ((decided, len(batch.decided)), ("cancelled", len(batch.cancelled))):
                if n:
                    counts[outcome] = counts.get(outcome, 0) + n
                    metrics.purges_total.labels(server_name, outcome).inc(n)
                    metrics.purge_seconds.labels(server_name, outcome).observe(per_room)
            if not batch.more:
                break
        held = await self._store.count_due_held(now, self._config.holds)
        if held:
            counts["held"] = held
            metrics.purges_total.labels(server_name, "held").inc(held)
        stats["decide_ms"] = round((time.monotonic() - started) * 1000, 1)
        purged = await self._drive_purges()
        if purged:
            counts["purged"] = purged
            metrics.purges_total.labels(server_name, "purged").inc(purged)
        stats["sweep_ms"] = round((time.monotonic() - started) * 1000, 1)
        self.last_stats = stats
        if counts:
            logger.info(
                "Retention sweep: %s (decided in %d ms, %d transaction(s))",
                counts,
                stats["decide_ms"],
                stats["transactions"],
            )
        else:
            logger.debug("Retention sweep: nothing due")
        return counts

    async def _drive_purges(self) -> int:
        """Move rooms in "purging" along, one Synapse purge at a time.

        Synapse purges in several transactions and is heavy on the database,
        so the module keeps at most MAX_CONCURRENT_PURGES in flight. Rooms are
        taken in the order they were decided. A purge Synapse lost (a restart)
        is requested again at once; one that failed, after a back-off.

        Returns:
            How many rooms were found gone from Synapse and recorded as purged.
        """
        purged = 0
        in_flight = 0
        now = now_ms()
        for room_id in await self._store.get_in_state(STATE_PURGING, SWEEP_BATCH):
            # A running purge may already have deleted the room's row (Synapse
            # purges in several transactions): the room is purged once the
            # task is no longer running, not as soon as the row is gone.
            status, error = await self._internals.purge_task_status(room_id)
            if status == "active":
                if room_id not in self._attempts and room_id not in self._resumed:
                    self._resumed.add(room_id)
                    # After a crash Synapse's purge lock outlives the process
                    # that held it; Synapse lets it expire rather than guess.
                    logger.warning(
                        "Synapse is already purging %s, a purge this process did not "
                        "request (resumed after a restart, or asked through Synapse's "
                        "admin API); after a crash Synapse resumes it only once the "
                        "stopped process's purge lock expires (up to %d s)",
                        room_id,
                        SYNAPSE_LOCK_TIMEOUT_S,
                    )
                in_flight += 1
                continue
            exists = await self._api.run_db_interaction(
                "leave_forget_room_exists", self._internals.room_exists_txn, room_id
            )
            if not exists:
                await self._store.mark_purged(room_id)
                self._attempts.pop(room_id, None)
                self._resumed.discard(room_id)
                purged += 1
                continue
            if in_flight >= MAX_CONCURRENT_PURGES:
                continue
            attempts, last_at = self._attempts.get(room_id, (0, 0))
            if status == "failed":
                backoff = min(PURGE_RETRY_MS * 2 ** max(attempts - 1, 0), MAX_PURGE_RETRY_MS)
                if now - last_at < backoff:
                    continue
                logger.warning("Synapse's purge of %s failed (%s); retrying", room_id, error)
                metrics.purge_failures_total.labels(self._api.server_name, "failed").inc()
            if await self._request_purge(room_id):
                self._attempts[room_id] = (attempts + 1, now)
                in_flight += 1
        return purged

    async def _request_purge(self, room_id: str) -> bool:
        try:
            await self._api.delete_room(room_id)
        except Exception:
            logger.exception("Synapse refused to purge %s; will retry", room_id)
            metrics.purge_failures_total.labels(self._api.server_name, "refused").inc()
            return False
        return True
