"""How fast the retention sweep may purge: a concurrency bound and a load budget.

Synapse's purge of a room is a few large transactions (shutdown, then two
``purge_room`` passes and the state groups). While one runs, live requests
wait for the database (on SQLite for its only connection) and for Synapse's
reactor. :class:`PurgePacer` decides when the next purge may start:

* **Concurrency**: at most ``max_concurrent_purges`` purges in flight, within an
  adaptive window (below) that starts at that bound.
* **Load budget**: a token bucket on *busy time*, the wall time during which at
  least one purge is in flight. Busy time adds to a debt that wall time pays
  back at ``purge_load`` seconds per second; no purge starts while the debt
  exceeds ``BURST_S``. Purges therefore keep Synapse busy at most ``purge_load``
  of the time in the long run, whatever one costs on this server right now:
  when purges slow down (a busy server, bigger rooms, several purges sharing
  SQLite's one connection), fewer start per second, with no fixed per-sweep
  quota. Within the busy time, concurrency is what buys throughput (on
  PostgreSQL purges overlap; on SQLite they mostly queue).
* **Back-off**: a purge that takes more than ``SLOW_FACTOR`` times the typical
  duration (a moving average), or a database probe (the module's own
  transaction that follows the purges) that waits more than ``PROBE_FACTOR``
  times its idle time, halves the window; each purge on time widens it by
  1/window, up to ``max_concurrent_purges`` (additive increase, multiplicative
  decrease, at most one decrease per typical purge).

Pure logic on an injected clock, so that it is unit-tested without Synapse.
"""

import collections
import time
from collections.abc import Callable
from typing import Any

# Busy time (s) the bucket lets run ahead of the budget: purges start while the
# debt is below this, so a burst of a second or so runs at full concurrency.
BURST_S = 1.0
# A probe this many times (and PROBE_MARGIN_S) slower than idle means that
# live requests wait for the database too.
PROBE_FACTOR = 3.0
PROBE_MARGIN_S = 0.02
# A purge this many times slower than the typical one means the server is busy.
SLOW_FACTOR = 3.0
# ... and at least this much slower (s): tiny purges vary a lot in relative terms.
SLOW_MARGIN_S = 0.25
# Weight of the latest purge in the typical duration.
EWMA_WEIGHT = 0.2
# How often purges in flight are looked at: a fraction of the typical duration.
POLL_FRACTION = 0.25
MIN_POLL_S = 0.05
MAX_POLL_S = 1.0
# Completions remembered for the current rate.
RATE_WINDOW_S = 60.0


class PurgePacer:
    """Admits purges under a concurrency bound and a load budget.

    Args:
        max_concurrent: The most purges in flight (``retention.max_concurrent_purges``).
        load: The share of time purges may keep Synapse busy (``retention.purge_load``).
        clock: Monotonic seconds (injected for tests).
    """

    def __init__(
        self, max_concurrent: int, load: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_concurrent = max_concurrent
        self.load = load
        self._clock = clock
        # The operator's bound until the server shows strain (AIMD from the top,
        # as Synapse's own scheduler starts its 5 at once).
        self.window = float(max_concurrent)
        self.typical_s: float | None = None
        self._debt_s = 0.0
        self._debt_at = clock()
        self._done: collections.deque[float] = collections.deque()
        self._busy = False
        self._decreased_at = -1e9
        self.idle_probe_s: float | None = None
        self.slow_purges = 0
        self.slow_probes = 0

    def _settle(self, in_flight: int | None = None) -> float:
        """Bring the debt up to now; ``in_flight`` is the count from now on."""
        now = self._clock()
        elapsed = now - self._debt_at
        if self._busy:
            self._debt_s += elapsed * (1 - self.load)
        else:
            self._debt_s = max(0.0, self._debt_s - elapsed * self.load)
        self._debt_at = now
        if in_flight is not None:
            self._busy = in_flight > 0
        return now

    def slots(self, in_flight: int, working: int | None = None) -> int:
        """How many purges may start now, with ``in_flight`` already running.

        Args:
            working: How many of those count as busy time (default: all). A
                purge that waits on a lock a dead process left behind (up to
                Synapse's 2-minute lock timeout) holds its slot but does no
                work: counted as busy, it would hold the rest of the backlog
                back for that time divided by ``load`` once it ends.
        """
        self._settle(in_flight if working is None else working)
        if self._debt_s >= BURST_S:
            return 0
        return max(0, min(self.max_concurrent, int(self.window)) - in_flight)

    def started(self, in_flight: int, working: int | None = None) -> None:
        """Purges were started: ``in_flight`` are running now (``working``: as in slots)."""
        self._settle(in_flight if working is None else working)

    def wait_s(self) -> float:
        """Seconds until a purge may start again, once none is in flight."""
        self._settle()
        return max(0.0, self._debt_s - BURST_S) / self.load

    def _decrease(self) -> None:
        now = self._clock()
        if now - self._decreased_at >= (self.typical_s or 0.0):
            self.window = max(1.0, self.window / 2)
            self._decreased_at = now

    def probe(self, seconds: float, in_flight: int) -> None:
        """A small database transaction of the module took ``seconds``.

        With nothing in flight it sets the idle reference; with purges in
        flight, one much slower than that means live requests wait too.
        """
        idle = self.idle_probe_s
        if in_flight == 0:
            self.idle_probe_s = (
                seconds if idle is None else (1 - EWMA_WEIGHT) * idle + EWMA_WEIGHT * seconds
            )
        elif idle is not None and seconds > max(idle * PROBE_FACTOR, idle + PROBE_MARGIN_S):
            self.slow_probes += 1
            self._decrease()

    def finished(self, duration_s: float, in_flight: int, working: int | None = None) -> None:
        """A purge took ``duration_s`` (``in_flight`` still running; ``working``:
        as in slots): adapt the window."""
        now = self._settle(in_flight if working is None else working)
        self._done.append(now)
        typical = self.typical_s
        if typical is not None and duration_s > max(typical * SLOW_FACTOR, typical + SLOW_MARGIN_S):
            self.slow_purges += 1
            self._decrease()
        else:
            self.window = min(float(self.max_concurrent), self.window + 1 / self.window)
        self.typical_s = (
            duration_s
            if typical is None
            else (1 - EWMA_WEIGHT) * typical + EWMA_WEIGHT * duration_s
        )

    def poll_s(self) -> float:
        """How long to wait before looking at purges in flight again."""
        if self.typical_s is None:
            return MIN_POLL_S * 2
        return min(MAX_POLL_S, max(MIN_POLL_S, self.typical_s * POLL_FRACTION))

    def rate_per_s(self) -> float:
        """Purges finished per second over the last minute (0 before the first)."""
        now = self._clock()
        while self._done and now - self._done[0] > RATE_WINDOW_S:
            self._done.popleft()
        if not self._done:
            return 0.0
        span = min(RATE_WINDOW_S, max(now - self._done[0], 1.0))
        return len(self._done) / span

    def estimated_rate_per_s(self) -> float | None:
        """The steady rate the budget allows at the typical duration, if known."""
        if not self.typical_s:
            return None
        return self.load * max(1.0, self.window) / self.typical_s

    def snapshot(self) -> dict[str, Any]:
        """The pacer's state, for the admin API."""
        estimated = self.estimated_rate_per_s()
        return {
            "max_concurrent_purges": self.max_concurrent,
            "purge_load": self.load,
            "window": round(self.window, 2),
            "typical_purge_s": None if self.typical_s is None else round(self.typical_s, 3),
            "next_start_in_s": round(self.wait_s(), 3),
            "slow_purges": self.slow_purges,
            "slow_probes": self.slow_probes,
            "idle_probe_ms": (
                None if self.idle_probe_s is None else round(self.idle_probe_s * 1000, 2)
            ),
            "estimated_rate_per_s": None if estimated is None else round(estimated, 3),
        }
