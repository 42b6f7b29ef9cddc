"""Unit tests of the purge pacer, its config keys and the CLI's backlog summary."""

import json
import time

from synapse.module_api.errors import ConfigError
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.config import RetentionConfig, parse_config
from matrix_leave_forget.retention.pacer import BURST_S, PurgePacer
from tests.support.chain import make_chain
from tests.unit.cli_helpers import ORIGIN, CliTestCase, create_database


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PurgePacerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = FakeClock()

    def pacer(self, max_concurrent: int = 3, load: float = 0.5) -> PurgePacer:
        return PurgePacer(max_concurrent, load, clock=self.clock)

    def run_purges(self, pacer: PurgePacer, count: int, duration: float) -> None:
        """Start ``count`` purges together and finish them ``duration`` later."""
        pacer.started(count)
        self.clock.now += duration
        for left in range(count - 1, -1, -1):
            pacer.finished(duration, left)

    def test_window_starts_at_the_bound_and_regrows_after_a_back_off(self) -> None:
        """The first purges use max_concurrent_purges at once; after a back-off,
        purges on time widen the window again up to the bound, never beyond."""
        pacer = self.pacer(max_concurrent=3, load=1.0)
        self.assertEqual(pacer.slots(0), 3)
        for _ in range(5):
            self.run_purges(pacer, 3, 0.1)
        self.run_purges(pacer, 1, 5.0)  # slow: halved
        self.assertEqual(pacer.slots(0), 1)
        seen: list[int] = []
        for _ in range(20):
            slots = pacer.slots(0)
            seen.append(slots)
            self.run_purges(pacer, slots, 0.1)
        self.assertEqual(max(seen), 3)
        self.assertLess(min(seen), 3)
        self.assertEqual(pacer.slots(2), 1, "slots count the purges in flight")
        self.assertEqual(pacer.slots(3), 0)
        self.assertEqual(pacer.slots(5), 0, "more in flight than the bound (a lowered config)")

    def test_load_budget_blocks_until_busy_time_is_paid_back(self) -> None:
        """Busy time beyond BURST_S blocks new purges until wall time has paid
        it back at purge_load seconds per second."""
        pacer = self.pacer(max_concurrent=1, load=0.25)
        self.run_purges(pacer, 1, BURST_S + 3.0)  # 4 s busy, debt 3 s
        self.assertEqual(pacer.slots(0), 0)
        debt = (BURST_S + 3.0) * (1 - 0.25)
        self.assertAlmostEqual(pacer.wait_s(), (debt - BURST_S) / 0.25)
        self.clock.now += pacer.wait_s() - 0.1
        self.assertEqual(pacer.slots(0), 0, "not yet paid back")
        self.clock.now += 0.2
        self.assertEqual(pacer.slots(0), 1)

    def test_a_purge_waiting_on_a_dead_lock_is_not_busy_time(self) -> None:
        """A purge resumed after a crash waits up to 2 minutes for the dead
        process's lock: it holds its slot, but the time adds no debt, so the
        rest of the backlog is not held back afterwards. Counted as busy, the
        same wait blocks new purges for minutes."""
        for working, blocked in ((0, False), (None, True)):
            pacer = self.pacer(max_concurrent=3, load=0.3)
            pacer.started(1, working)
            self.clock.now += 120.0
            self.assertEqual(pacer.slots(1, working), 0 if blocked else 2, working)
            pacer.finished(120.0, 0, 0)
            self.assertEqual(pacer.wait_s() > 60, blocked, pacer.wait_s())

    def test_long_run_busy_share_stays_within_the_load(self) -> None:
        """Driving the pacer as the pump does, purges keep Synapse busy at most
        purge_load of the time (plus one burst)."""
        for load in (0.1, 0.5):
            pacer = self.pacer(max_concurrent=2, load=load)
            start, busy = self.clock.now, 0.0
            for _ in range(200):
                slots = pacer.slots(0)
                if slots:
                    self.run_purges(pacer, slots, 0.3)
                    busy += 0.3
                else:
                    self.clock.now += max(pacer.wait_s(), 0.01)
            elapsed = self.clock.now - start
            self.assertLessEqual(busy, load * elapsed + BURST_S + 0.3, load)
            self.assertGreater(busy, load * elapsed * 0.8, f"{load}: the budget is used")

    def test_load_one_never_waits(self) -> None:
        """purge_load 1 is no budget: only the concurrency bound applies."""
        pacer = self.pacer(max_concurrent=2, load=1.0)
        self.run_purges(pacer, 1, 60.0)
        self.assertEqual(pacer.wait_s(), 0)
        self.assertGreater(pacer.slots(0), 0)

    def test_slow_purge_halves_the_window(self) -> None:
        """A purge much slower than the typical one halves the window."""
        pacer = self.pacer(max_concurrent=4, load=1.0)
        for _ in range(30):
            self.run_purges(pacer, pacer.slots(0), 0.1)
        self.assertEqual(pacer.slots(0), 4)
        self.run_purges(pacer, 1, 2.0)
        self.assertEqual(pacer.slots(0), 2)
        self.assertEqual(pacer.slow_purges, 1)

    def test_slow_probe_halves_the_window_once_per_typical_purge(self) -> None:
        """A database probe much slower than idle while purging halves the
        window, at most once per typical purge duration."""
        pacer = self.pacer(max_concurrent=4, load=1.0)
        pacer.probe(0.002, 0)
        for _ in range(30):
            self.run_purges(pacer, pacer.slots(0), 0.5)
        self.assertEqual(pacer.slots(0), 4)
        pacer.probe(0.004, 2)  # within the margin: no change
        self.assertEqual(pacer.slots(0), 4)
        pacer.probe(0.2, 2)
        pacer.probe(0.2, 2)  # same instant: one decrease
        self.assertEqual(pacer.slots(0), 2)
        self.clock.now += 1.0
        pacer.probe(0.2, 2)
        self.assertEqual(pacer.slots(0), 1)
        self.assertEqual(pacer.slow_probes, 3)

    def test_rate_and_snapshot(self) -> None:
        """The rate counts the last minute's purges; the snapshot reports the state."""
        pacer = self.pacer(max_concurrent=2, load=0.5)
        self.assertEqual(pacer.rate_per_s(), 0.0)
        self.assertIsNone(pacer.estimated_rate_per_s())
        for _ in range(10):
            self.run_purges(pacer, 1, 0.2)
            self.clock.now += 1.8
        # Ten purges, the first seen done 19.8 s ago.
        self.assertAlmostEqual(pacer.rate_per_s(), 10 / 19.8, places=3)
        snapshot = pacer.snapshot()
        self.assertEqual(snapshot["max_concurrent_purges"], 2)
        self.assertEqual(snapshot["purge_load"], 0.5)
        self.assertAlmostEqual(snapshot["typical_purge_s"], 0.2, places=3)
        self.assertGreater(snapshot["estimated_rate_per_s"], 0)
        self.clock.now += 120
        self.assertEqual(pacer.rate_per_s(), 0.0)


class PacingConfigTests(SynchronousTestCase):
    def test_defaults_and_values(self) -> None:
        """The pacing keys default as documented and take valid values."""
        self.assertEqual(parse_config({}).retention.max_concurrent_purges, 3)
        self.assertEqual(parse_config({}).retention.purge_load, 0.3)
        retention = parse_config(
            {"retention": {"max_concurrent_purges": 5, "purge_load": 1}}
        ).retention
        self.assertEqual((retention.max_concurrent_purges, retention.purge_load), (5, 1.0))
        self.assertEqual(RetentionConfig().max_concurrent_purges, 3)

    def test_bad_values_name_the_key(self) -> None:
        """Wrong types and out-of-range values are ConfigErrors naming the key."""
        for key, value in (
            ("max_concurrent_purges", 0),
            ("max_concurrent_purges", 101),
            ("max_concurrent_purges", 2.5),
            ("max_concurrent_purges", True),
            ("max_concurrent_purges", "3"),
            ("purge_load", 0),
            ("purge_load", 1.5),
            ("purge_load", -0.1),
            ("purge_load", "half"),
            ("purge_load", False),
        ):
            with self.assertRaises(ConfigError, msg=f"{key}={value!r}") as ctx:
                parse_config({"retention": {key: value}})
            self.assertEqual(tuple(ctx.exception.path or ()), ("retention", key))


class PendingSummaryTests(CliTestCase):
    """``rooms --state pending`` of the offline CLI: the backlog summary."""

    def setUp(self) -> None:
        super().setUp()
        tomorrow = int(time.time() * 1000) + 24 * 60 * 60 * 1000
        rooms = [
            # Due long ago, not held: the backlog.
            (f"!a:{ORIGIN}", "forgotten", 1000, 5000, None, None, None, None, 1000),
            # Due, held through the admin API.
            (f"!h:{ORIGIN}", "forgotten", 1000, 5000, None, None, None, None, 1000),
            # Not due for a long time.
            (f"!w:{ORIGIN}", "forgotten", 1000, tomorrow, None, None, None, None, 1000),
            (f"!p:{ORIGIN}", "purging", 1000, 5000, 6000, None, None, None, 6000),
            (f"!d:{ORIGIN}", "purged", 1000, 5000, 6000, 7000, None, None, 7000),
        ]
        holds = [(f"!h:{ORIGIN}", f"@admin:{ORIGIN}", "legal", 1000)]
        create_database(self.db_path, make_chain(1, self.key), rooms, holds)

    def test_json_and_table_show_the_backlog(self) -> None:
        """--json carries a retention object with the admin API's counts; the
        table ends with a one-line summary; other states have neither."""
        code, out, err = self.run_cli("rooms", "--json", "--state", "pending")
        self.assertEqual(code, 0, err)
        self.assertEqual(
            json.loads(out)["retention"],
            {
                "backlog": 1,
                "in_flight": 1,
                "held": 1,
                "waiting": 1,
                "purged_last_minute": 0,
                "rate_per_s": 0.0,
                "eta_s": None,
            },
        )
        code, out, err = self.run_cli("rooms", "--state", "pending")
        self.assertEqual(code, 0, err)
        self.assertIn(
            "Backlog: 1 due (1 held, 1 not yet due), 1 purging; 0.00 rooms/s over the last "
            "minute; no purge in the last minute, time to drain unknown.",
            out,
        )
        code, out, err = self.run_cli("rooms", "--json", "--state", "forgotten")
        self.assertEqual(code, 0, err)
        self.assertNotIn("retention", json.loads(out))
