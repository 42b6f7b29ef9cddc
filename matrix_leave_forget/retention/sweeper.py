"""The retention sweep: purge rooms that every local user has forgotten, once due.

The sweep runs where Synapse runs its background tasks (``run_background_tasks_on``,
the main process by default), so exactly one process purges. All state lives in
the database, so a restart loses nothing: rooms still due are picked up by the
next sweep and rooms whose purge was started are re-submitted to Synapse until
Synapse no longer has them.

Every ``sweep_interval`` the sweep counts the backlog and starts the *purge
pump* unless it runs already. The pump drains the backlog at the pace
:class:`~matrix_leave_forget.retention.pacer.PurgePacer` allows, independently of the
sweep interval: it looks at the purges in flight (one transaction for all of
them, every fraction of a typical purge), and as slots free up it decides the
next due rooms, only as many as it can start now. So each room is re-checked
(rejoin, invite, knock, hold) in the transaction that records its decision,
immediately before Synapse is asked to purge it, however long it queued.
"""

import logging
import time
from typing import Protocol

import attr
from synapse.module_api import ModuleApi

from matrix_leave_forget import metrics
from matrix_leave_forget._synapse.contexts import run_in_background_process
from matrix_leave_forget._synapse.leftovers import (
    purge_leftovers_txn,
    purge_remaining_state_groups,
    room_footprint_txn,
)
from matrix_leave_forget._synapse.purge_tasks import purge_tasks_txn
from matrix_leave_forget.config import MEDIA_DELETE, RetentionConfig
from matrix_leave_forget.retention.pacer import PurgePacer
from matrix_leave_forget.retention.receipt import MEDIA_POLICY_KEEP
from matrix_leave_forget.retention.state import (
    STATE_PURGING,
    why_not_abandoned_many_txn,
    why_not_forgotten_many_txn,
)
from matrix_leave_forget.retention.store import RetentionStore
from matrix_leave_forget.timestamps import now_ms


class MediaBeforePurge(Protocol):
    """What the sweeper asks of media deletion (media/reaper.py), which sits above it."""

    @property
    def enabled(self) -> bool:
        """Whether purged rooms' media is deleted (else kept)."""

    async def before_purge(self, room_id: str) -> None:
        """Record what deciding the room's media needs, before its events go."""


logger = logging.getLogger(__name__)

# How many rooms in "purging" the pump follows (more only after a restart
# with a lower max_concurrent_purges).
SWEEP_BATCH = 1000
# Due rooms decided per transaction under dry_run (nothing to pace). Each
# transaction holds the audit chain's lock (so leave and forget wait for it):
# 1000 rooms is tens of milliseconds.
DECIDE_BATCH = 1000
# Bound on one sweep's decision transactions (10^6 due rooms); the rest wait.
MAX_DECIDE_TRANSACTIONS = 1000
# Back-off before asking again after Synapse's purge of a room failed.
PURGE_RETRY_MS = 5 * 1000
MAX_PURGE_RETRY_MS = 60 * 60 * 1000
# Synapse's worker locks expire this long after their holder's last renewal
# (synapse.storage.databases.main.lock._LOCK_TIMEOUT), plus its reaper's interval.
SYNAPSE_LOCK_TIMEOUT_S = 120 + 12
# While purging, how often the pump looks for rooms that fell due meanwhile.
DUE_RECHECK_S = 1.0
# The shortest sleep of the pump between two rounds.
MIN_WAIT_S = 0.01


@attr.s(auto_attribs=True)
class _InFlight:
    """A room in "purging", as this process follows it.

    Attributes:
        requested_ms: When this process last asked Synapse to purge it (None:
            not yet, or before a restart).
        attempts: How often this process asked.
        retry_at_ms: After a failure, when to ask again (0: not waiting).
    """

    requested_ms: int | None = None
    attempts: int = 0
    retry_at_ms: int = 0


class RetentionSweeper:
    """Decides and performs due purges, and cancels them when someone came back.

    Whether every local user still has the room forgotten is checked when the
    purge is about to start, inside the transaction that records the decision,
    so a rejoin, invite or knock through any endpoint cancels it. (The
    module's on_new_event callback, membership/observer.py, records departures
    only; a purge is never cancelled from it.)

    Args:
        api: The module API (purges go through ModuleApi.delete_room).
        config: The retention settings.
        store: The retention store.
        media: Deletes purged rooms' media (retention.media: delete), or None.
    """

    def __init__(
        self,
        api: ModuleApi,
        config: RetentionConfig,
        store: RetentionStore,
        media: MediaBeforePurge | None = None,
    ) -> None:
        self._api = api
        self._media = media
        self._config = config
        self._store = store
        self.pacer = PurgePacer(config.max_concurrent_purges, config.purge_load)
        # Rooms in "purging" that this process follows (loaded from the
        # database when the pump starts, so a restart resumes them).
        self._in_flight: dict[str, _InFlight] = {}
        # Rooms whose purge Synapse resumed from an earlier process, once reported.
        self._resumed: set[str] = set()
        self._pumping = False
        self._due_checked = 0.0
        # The backlog as last counted, lowered as the pump decides rooms.
        self._backlog = 0
        # Due rooms found held at the last sweep (counted once, see sweep).
        self._held_counted: set[str] = set()
        # What the last sweep's decisions cost (ms), for logs and benchmarks.
        self.last_stats: dict[str, float] = {}

    @property
    def pumping(self) -> bool:
        """Whether the purge pump is running in this process."""
        return self._pumping

    async def sweep(self) -> dict[str, int]:
        """One pass: count the backlog and make sure the pump drains it.

        Under ``dry_run`` nothing is purged, so nothing is paced: every due room
        is decided here, in bulk.

        Returns:
            How many rooms ended in each outcome, for logs and tests.
        """
        counts: dict[str, int] = {}
        now = now_ms()
        server_name = self._api.server_name
        started = time.monotonic()
        stats: dict[str, float] = {"transactions": 0}
        if self._config.dry_run:
            await self._decide_all(now, counts, stats)
        backlog = await self._store.retention.backlog_counts(now, self._config.holds)
        if backlog["held"]:
            counts["held"] = backlog["held"]
            # A held room stays due at every sweep: count the decision to
            # keep it once, when the sweep first finds it held.
            held = await self._store.retention.held_due_rooms(now, self._config.holds)
            if held - self._held_counted:
                metrics.purges_total.labels(server_name, "held").inc(len(held - self._held_counted))
            self._held_counted = held
        else:
            self._held_counted = set()
        self._backlog = backlog["due"]
        metrics.purge_backlog.labels(server_name).set(self._backlog)
        metrics.purges_in_flight.labels(server_name).set(backlog["in_flight"])
        # Under dry_run the pump only follows purges started before it was set.
        if not self._pumping and (
            backlog["in_flight"] or (backlog["due"] and not self._config.dry_run)
        ):
            self._pumping = True
            run_in_background_process(self._api, "leave_forget_purge_pump", self._pump)
        stats["decide_ms"] = round((time.monotonic() - started) * 1000, 1)
        stats["sweep_ms"] = stats["decide_ms"]
        self.last_stats = stats
        if counts:
            logger.info(
                "Retention sweep: %s (decided in %d ms, %d transaction(s)); backlog %s",
                counts,
                stats["decide_ms"],
                stats["transactions"],
                backlog,
            )
        else:
            logger.debug("Retention sweep: backlog %s", backlog)
        return counts

    async def _decide_all(self, now: int, counts: dict[str, int], stats: dict[str, float]) -> None:
        """Decide every room due at ``now``, DECIDE_BATCH per transaction (dry run)."""
        # Each transaction decides a batch of due rooms (oldest first) and
        # takes them out of "forgotten", so every one makes progress; `now`
        # is fixed, so the loop ends with the rooms due when it began.
        for _ in range(MAX_DECIDE_TRANSACTIONS):
            batch_started = time.monotonic()
            batch = await self._store.retention.decide_due(
                now,
                DECIDE_BATCH,
                why_not_forgotten_many_txn,
                self._config.holds,
                self._config.dry_run,
                why_not_abandoned_many_txn,
            )
            stats["transactions"] += 1
            for key, value in batch.timings_ms.items():
                stats[key] = round(stats.get(key, 0.0) + value, 2)
            self._count_decisions(batch.decided, len(batch.cancelled), batch_started, counts)
            if not batch.more:
                break

    def _count_decisions(
        self, decided: list[str], cancelled: int, started: float, counts: dict[str, int]
    ) -> None:
        server_name = self._api.server_name
        per_room = (time.monotonic() - started) / max(1, len(decided) + cancelled)
        outcome = "dry_run" if self._config.dry_run else "purge"
        for name, n in ((outcome, len(decided)), ("cancelled", cancelled)):
            if n:
                counts[name] = counts.get(name, 0) + n
                metrics.purges_total.labels(server_name, name).inc(n)
                metrics.purge_seconds.labels(server_name, name).observe(per_room)
        if decided or cancelled:
            # Rooms that fell due since the last sweep are not in the count yet.
            self._backlog = max(0, self._backlog - len(decided) - cancelled)
            metrics.purge_backlog.labels(server_name).set(self._backlog)

    # -- the purge pump ----------------------------------------------------

    async def _pump(self) -> None:
        """Drain the backlog: follow purges in flight, start due ones as the pacer allows.

        Runs until nothing is in flight and nothing is due; the next sweep
        starts it again. One pump at a time (``_pumping``, set by the caller).
        """
        try:
            for room_id in await self._store.retention.get_in_state(STATE_PURGING, SWEEP_BATCH):
                self._in_flight.setdefault(room_id, _InFlight())
            if not self._in_flight:
                # What a small transaction costs with no purge running: the
                # reference the follow transactions are compared with.
                probe_started = time.monotonic()
                await self._store.probe()
                self.pacer.probe(time.monotonic() - probe_started, 0)
            more_due = True
            while True:
                purged = await self._follow()
                # Rooms fall due while the pump runs: look again when a slot
                # freed up, or every DUE_RECHECK_S.
                if more_due or purged or time.monotonic() >= self._due_checked + DUE_RECHECK_S:
                    more_due = await self._start_due()
                    self._due_checked = time.monotonic()
                metrics.purges_in_flight.labels(self._api.server_name).set(len(self._in_flight))
                if not self._in_flight and not more_due:
                    return
                now = now_ms()
                waits = [DUE_RECHECK_S]
                if self._running(now):
                    # A purge finishing is what frees a slot (or the budget).
                    waits.append(self.pacer.poll_s())
                elif more_due:
                    waits.append(max(self.pacer.wait_s(), MIN_WAIT_S))
                retries = [p.retry_at_ms for p in self._in_flight.values() if p.retry_at_ms > now]
                if retries:
                    waits.append((min(retries) - now) / 1000)
                await self._api.sleep(min(waits))
        except Exception:
            logger.exception("Retention purge pump failed; the next sweep restarts it")
        finally:
            self._pumping = False

    def _running(self, now: int) -> int:
        """Purges in flight that hold a slot (not waiting to retry after a failure)."""
        return sum(1 for p in self._in_flight.values() if p.retry_at_ms <= now)

    def _working(self, now: int) -> int:
        """Of those, the ones that count as busy time: not a purge Synapse
        resumed after a restart, which waits for the dead process's lock."""
        return sum(
            1
            for room_id, p in self._in_flight.items()
            if p.retry_at_ms <= now and room_id not in self._resumed
        )

    async def _follow(self) -> int:
        """Look at every purge in flight in one transaction; record those done.

        A running purge may already have deleted the room's row (Synapse
        purges in several transactions): a room is purged once Synapse has no
        unfinished task for it and its row is gone, not as soon as the row is.
        A purge Synapse lost (a restart) is requested again at once; one that
        failed, after a back-off.

        Returns:
            How many rooms were recorded as purged.
        """
        if not self._in_flight:
            return 0
        probe_started = time.monotonic()
        views = await self._api.run_db_interaction(
            "leave_forget_follow_purges", purge_tasks_txn, sorted(self._in_flight)
        )
        now = now_ms()
        self.pacer.probe(time.monotonic() - probe_started, self._running(now))
        purged = 0
        server_name = self._api.server_name
        for room_id, view in views.items():
            purge = self._in_flight[room_id]
            if view.status == "active":
                if purge.requested_ms is None and room_id not in self._resumed:
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
                continue
            if not view.room_exists:
                groups = await purge_remaining_state_groups(self._api, room_id)
                await self._store.retention.mark_purged(
                    room_id,
                    purge_leftovers_txn,
                    {"state_groups": groups} if groups else None,
                    media_policy=(
                        MEDIA_DELETE
                        if self._media is not None and self._media.enabled
                        else MEDIA_POLICY_KEEP
                    ),
                )
                del self._in_flight[room_id]
                self._resumed.discard(room_id)
                purged += 1
                metrics.purges_total.labels(server_name, "purged").inc()
                if purge.requested_ms is not None:
                    duration = max(0.0, (now - purge.requested_ms) / 1000)
                    self.pacer.finished(duration, self._running(now), self._working(now))
                    metrics.purge_task_seconds.labels(server_name).observe(duration)
                continue
            if purge.retry_at_ms > now:
                continue
            fresh = (
                view.status == "failed"
                and view.task_ts is not None
                and (purge.requested_ms is None or view.task_ts >= purge.requested_ms)
            )
            if fresh and purge.retry_at_ms == 0:
                backoff = min(PURGE_RETRY_MS * 2 ** max(purge.attempts - 1, 0), MAX_PURGE_RETRY_MS)
                purge.retry_at_ms = now + backoff
                logger.warning(
                    "Synapse's purge of %s failed (%s); retrying in %d s",
                    room_id,
                    view.error,
                    backoff // 1000,
                )
                metrics.purge_failures_total.labels(self._api.server_name, "failed").inc()
                continue
            # Synapse has no purge of the room under way: lost in a restart,
            # never requested (a crash right after the decision), or due for
            # its retry. The slot is already this room's.
            await self._request_purge(room_id, purge, now)
        return purged

    async def _start_due(self) -> bool:
        """Decide and start as many due rooms as the pacer has slots for.

        Returns:
            Whether more rooms may be due (the last decision filled its batch,
            or the pacer stopped it).
        """
        if self._config.dry_run:
            return False
        while True:
            now = now_ms()
            slots = self.pacer.slots(self._running(now), self._working(now))
            if slots <= 0:
                return True
            started = time.monotonic()
            batch = await self._store.retention.decide_due(
                now,
                slots,
                why_not_forgotten_many_txn,
                self._config.holds,
                False,
                why_not_abandoned_many_txn,
            )
            self._count_decisions(batch.decided, len(batch.cancelled), started, {})
            for room_id in batch.decided:
                purge = self._in_flight.setdefault(room_id, _InFlight())
                await self._request_purge(room_id, purge, now_ms())
            now = now_ms()
            self.pacer.started(self._running(now), self._working(now))
            if not batch.more:
                return False

    async def _request_purge(self, room_id: str, purge: _InFlight, now: int) -> None:
        purge.attempts += 1
        purge.requested_ms = now
        purge.retry_at_ms = 0
        try:
            if self._media is not None:
                # Before its events go: whether it is encrypted, its references.
                try:
                    await self._media.before_purge(room_id)
                except Exception:
                    # The purge goes on; without this record the room's media is
                    # never decided, i.e. kept (the safe side).
                    logger.exception("Could not record %s's media; it will be kept", room_id)
            # For the erasure receipt, and where the room's leftovers start.
            await self._store.retention.record_footprint(room_id, room_footprint_txn)
            await self._api.delete_room(room_id)
        except Exception:
            backoff = min(PURGE_RETRY_MS * 2 ** max(purge.attempts - 1, 0), MAX_PURGE_RETRY_MS)
            purge.retry_at_ms = now + backoff
            logger.exception(
                "Synapse refused to purge %s; retrying in %d s", room_id, backoff // 1000
            )
            metrics.purge_failures_total.labels(self._api.server_name, "refused").inc()
