"""The purge pump under load: concurrency bound, pacing, visibility, races and crashes.

Each class is one Synapse (two for the race, which needs a remote server so
that a local user can rejoin a room every local user forgot). Purges are
followed through the audit log (``started`` and ``purged`` entries, each with
its time) and through Synapse's own ``scheduled_tasks`` table, read directly.
"""

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from matrix_leave_forget.retention.pacer import BURST_S
from matrix_leave_forget.retention.sweeper import SYNAPSE_LOCK_TIMEOUT_S
from matrix_leave_forget.timestamps import now_ms
from tests.integration.retention_helpers import (
    RELAXED_FORGET,
    FederatedPair,
    RetentionHelpers,
)
from tests.support import rawdb
from tests.support.harness import (
    User,
    quote_room,
    run_cli,
    wait_until,
    wait_while_progressing,
)

ACTIVE_TASKS_SQL = (
    "SELECT COUNT(*) FROM scheduled_tasks WHERE status IN ('scheduled', 'active') "
    "AND action IN ('purge_room', 'shutdown_and_purge_room')"
)


class TaskWatcher(threading.Thread):
    """Counts Synapse's unfinished purge tasks every 20 ms; remembers the most seen."""

    def __init__(self, hs: Any) -> None:
        super().__init__(daemon=True)
        self.hs = hs
        self.most = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.most = max(self.most, int(rawdb.query(self.hs, ACTIVE_TASKS_SQL)[0][0]))
            except Exception:
                pass  # the database is briefly locked or the server restarting
            self.stop_event.wait(0.02)

    def __enter__(self) -> "TaskWatcher":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.join(5)


class ThroughputHelpers(RetentionHelpers):
    """Storms of rooms and what the audit log says about their purges."""

    def storm(self, count: int) -> list[str]:
        """``count`` rooms, one member each, left and forgotten back to back."""
        prepared = [self.joined_room(members=1) for _ in range(count)]
        for room, users in prepared:
            self.leave_and_forget(users, room)
        return [room for room, _ in prepared]

    def wait_all_purged(self, rooms: list[str], timeout: float = 120.0) -> None:
        def done() -> bool:
            return all(self.state(room) == "purged" for room in rooms)

        wait_until(done, timeout, "every room to be purged")

    def intervals(self, rooms: list[str]) -> dict[str, tuple[int, int]]:
        """Per room: (time of its ``started`` entry, time of its ``purged`` entry)."""
        out: dict[str, tuple[int, int]] = {}
        for room in rooms:
            entries = [e for e in self.audit(room_id=room) if e["action"] == "purge"]
            self.assertEqual([e["outcome"] for e in entries], ["started", "purged"], room)
            out[room] = (entries[0]["ts"], entries[1]["ts"])
        return out

    @staticmethod
    def most_overlapping(intervals: dict[str, tuple[int, int]]) -> int:
        """The most purges between their start and their recorded end at one moment.

        A purge is recorded ``purged`` after Synapse finished it, so this is at
        least the true concurrency."""
        points = sorted(
            [(start, 1) for start, _ in intervals.values()]
            + [(end, -1) for _, end in intervals.values()],
            key=lambda p: (p[0], p[1]),
        )
        most = current = 0
        for _, step in points:
            current += step
            most = max(most, current)
        return most

    @staticmethod
    def busy_ms(intervals: dict[str, tuple[int, int]]) -> int:
        """The length of the union of the purges' intervals."""
        total, end_so_far = 0, None
        for start, end in sorted(intervals.values()):
            if end_so_far is None or start > end_so_far:
                total += end - start
                end_so_far = end
            elif end > end_so_far:
                total += end - end_so_far
                end_so_far = end
        return total

    def status(self) -> dict[str, Any]:
        return dict(self.admin_ok("GET", "/retention"))


class ConcurrencyTests(ThroughputHelpers):
    """max_concurrent_purges: 2, no load budget (purge_load: 1)."""

    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {
            "period": "1s",
            "sweep_interval": "100ms",
            "max_concurrent_purges": 2,
            "purge_load": 1,
        },
    }

    def test_never_more_purges_than_the_bound(self) -> None:
        """A storm of 12 rooms drains with at most 2 Synapse purge tasks
        unfinished at any moment (read from Synapse's table every 20 ms and
        from the audit log), and it does use 2 at once."""
        with TaskWatcher(self.hs) as watcher:
            rooms = self.storm(12)
            self.wait_all_purged(rooms)
        intervals = self.intervals(rooms)
        self.assertLessEqual(watcher.most, 2)
        self.assertGreaterEqual(watcher.most, 1, "the watcher saw the purges")
        # A slot frees when the pump records the purge done, so the audit
        # intervals are the pump's own accounting: exact, not an estimate.
        self.assertLessEqual(self.most_overlapping(intervals), 2)
        for room in rooms:
            self.assert_purged(room)
        status = self.status()
        self.assertEqual((status["backlog"], status["in_flight"], status["eta_s"]), (0, 0, 0))
        self.assertGreaterEqual(status["purged_last_minute"], 12)
        self.assertEqual(status["pacing"]["max_concurrent_purges"], 2)

    def test_metrics_show_backlog_and_in_flight(self) -> None:
        """The backlog and in-flight gauges exist and read 0 once all is purged;
        the purge duration histogram counted the purges."""
        rooms = self.storm(3)
        self.wait_all_purged(rooms)
        gauges = ("synapse_leave_forget_purge_backlog", "synapse_leave_forget_purges_in_flight")

        def gauges_at_zero() -> str | None:
            text = self.hs.metrics()
            zero = all(f'{g}{{server_name="test.local"}} 0.0' in text for g in gauges)
            return text if zero else None

        text = wait_until(gauges_at_zero, what="the gauges to read 0")
        counts = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("synapse_leave_forget_purge_task_seconds_count{")
        ]
        self.assertTrue(counts and counts[0] >= 3, counts)


class PacingTests(ThroughputHelpers):
    """A small load budget, one purge at a time: purges are spread out, and the
    admin API shows the backlog."""

    LOAD = 0.1
    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {
            "period": "1s",
            "sweep_interval": "100ms",
            "max_concurrent_purges": 1,
            "purge_load": LOAD,
        },
    }

    def test_load_budget_spreads_purges_and_status_shows_backlog(self) -> None:
        """With purge_load 0.1, the purges of a 30-room storm keep Synapse busy
        at most 10 % of the drain (plus one burst and one purge), where
        unpaced they would run back to back; meanwhile GET /retention shows a
        backlog, the pacer waiting and a time to drain."""
        rooms = self.storm(30)
        wait_until(lambda: self.status()["backlog"] >= 3, what="a backlog to build up")
        cli = run_cli(self.hs.config_path, "--json", "rooms", "--state", "pending")
        self.assertEqual(cli.returncode, 0, cli.stderr)
        summary = json.loads(cli.stdout)["retention"]
        self.assertGreaterEqual(summary["backlog"] + summary["in_flight"], 1, summary)
        self.assertEqual(
            set(summary),
            {
                "backlog",
                "in_flight",
                "held",
                "waiting",
                "purged_last_minute",
                "rate_per_s",
                "eta_s",
            },
        )
        snapshots: list[dict[str, Any]] = []

        def purged() -> int:
            snapshots.append(self.status())
            return sum(1 for room in rooms if self.state(room) == "purged")

        # The drain lasts ~10x the purges' own time (load 0.1), which a loaded
        # machine stretches; at this budget purges start at most ~10 purge
        # durations apart, so two minutes without one means the pump is stuck.
        wait_while_progressing(purged, len(rooms), 120, "every room to be purged")
        intervals = self.intervals(rooms)
        busy = self.busy_ms(intervals) / 1000
        first_start = min(start for start, _ in intervals.values())
        last_end = max(end for _, end in intervals.values())
        elapsed = (last_end - first_start) / 1000
        longest = max(end - start for start, end in intervals.values()) / 1000
        # Otherwise the burst alone could have covered the storm.
        self.assertGreater(busy, BURST_S + longest, "the storm outlasted one burst")
        # The intervals are the audit entries' times, each written a little
        # after the pacer's own start and end (a transaction, a poll): allow
        # that lag per purge on top of the budget.
        lag = 0.5 + 0.05 * len(intervals)
        self.assertLessEqual(busy, self.LOAD * elapsed + BURST_S + longest + lag, intervals)
        waiting = [
            s
            for s in snapshots
            if s["backlog"] > 0 and s["pacing"] and s["pacing"]["next_start_in_s"] > 0
        ]
        self.assertTrue(waiting, "no snapshot showed the pacer holding back a backlog")
        self.assertTrue(any(s["eta_s"] and s["eta_s"] > 0 for s in waiting), waiting[-1])
        final = self.status()
        self.assertEqual((final["backlog"], final["in_flight"], final["eta_s"]), (0, 0, 0))
        self.assertEqual(final["pacing"]["purge_load"], self.LOAD)
        cli = run_cli(self.hs.config_path, "rooms", "--state", "pending")
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertIn("Backlog: 0 due (0 held, 0 not yet due), 0 purging;", cli.stdout)
        self.assertIn("time to drain ~0 s", cli.stdout)


class SigkillMidBatchTests(ThroughputHelpers):
    """SIGKILL while several purges are in flight."""

    RETENTION: ClassVar[dict[str, Any]] = {
        "period": "2s",
        "sweep_interval": "100ms",
        "max_concurrent_purges": 3,
        "purge_load": 1,
    }
    MODULE_CONFIG = {"forget_rate_limit": RELAXED_FORGET, "retention": RETENTION}

    def test_sigkill_mid_concurrent_batch_resumes_and_loses_nothing(self) -> None:
        """Killed while purges are in flight and held up by Synapse's purge lock
        (rows that outlive the process for 2 minutes; the test ages them
        instead of waiting), restarted: every room is purged exactly once in
        the log (``started`` then ``purged``), no more than 3 purge tasks run
        at once after the restart, and the audit chain verifies.

        A purge of a small room lasts ~0.1 s, too short to catch by polling;
        so two rooms get the lock rows a purge meets in practice before they
        are forgotten: the write lock a killed purge leaves behind (this
        instance's name) and a read lock of a paginating request. Their purge
        tasks start and wait on those locks, in flight, until the kill."""
        prepared = [self.joined_room(members=1) for _ in range(12)]
        rooms = [room for room, _ in prepared]
        held = rooms[:2]
        self.hold_purge_lock(held[0], write=True)
        self.hold_purge_lock(held[1], write=False)
        # The held rooms first, forgotten together: due at the same sweep, both
        # start while the pacer's window is still whole (on a loaded machine
        # slow transactions beside a purge in flight narrow it to one).
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: self.leave_and_forget(p[1], p[0]), prepared[:2]))

        def held_purges_in_flight() -> bool:
            return all(self._state_offline(room) == "purging" for room in held)

        wait_until(held_purges_in_flight, 60, "the purges of both held rooms to be in flight")
        for room, users in prepared[2:]:
            self.leave_and_forget(users, room)
        self.hs.stop(signal.SIGKILL)
        in_flight = [r for r in rooms if self._state_offline(r) == "purging"]
        self.assertGreaterEqual(len(in_flight), 2, "the kill landed in a concurrent batch")
        self.assertLessEqual(len(in_flight), 3)
        dead_locks = self.lock_tokens()
        self.hs.start()
        with TaskWatcher(self.hs) as watcher:
            # The resumed purges of the held rooms wait on the dead locks until
            # they run out (Synapse's 2 minutes, not waited for).
            self.expire_locks(dead_locks)
            self.wait_all_purged(rooms, timeout=SYNAPSE_LOCK_TIMEOUT_S + 120)
        self.assertLessEqual(watcher.most, 3)
        self.intervals(rooms)  # exactly started + purged for each
        for room in rooms:
            self.assertFalse(self.synapse_has_room(room))
        result = run_cli(self.hs.config_path, "verify")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def hold_purge_lock(self, room_id: str, write: bool) -> None:
        """A row in Synapse's read/write lock table that no process renews:
        Synapse's purge of the room waits until it times out (2 minutes)."""
        rawdb.query(
            self.hs,
            "INSERT INTO worker_read_write_locks (lock_name, lock_key, write_lock,"
            " instance_name, token, last_renewed_ts) VALUES (?, ?, ?, ?, ?, ?)",
            ("purge_pagination_lock", room_id, write, "master", f"held{int(write)}", now_ms()),
        )

    def _state_offline(self, room_id: str) -> str | None:
        rows = rawdb.query(
            self.hs, "SELECT state FROM leave_forget_rooms WHERE room_id = ?", (room_id,)
        )
        return str(rows[0][0]) if rows else None


class QueuedRejoinTests(FederatedPair, ThroughputHelpers):
    """A local user rejoins a room that is due but queued behind a purge in flight."""

    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {
            "period": "2s",
            "sweep_interval": "100ms",
            "max_concurrent_purges": 1,
            "purge_load": 1,
        },
    }

    def federated_join(self, user: User, room_id: str) -> None:
        via = quote_room(self.remote.server_name)
        path = f"/_matrix/client/v3/join/{quote_room(room_id)}?server_name={via}"
        resp = self.hs.client("POST", path, {}, token=user.access_token)
        self.assertEqual(resp.status, 200, resp.body)

    def test_rejoin_of_a_queued_room_cancels_its_purge(self) -> None:
        """The one purge slot is taken by a local room whose purge cannot
        finish (its purge lock is held, as another worker would); the remote
        room falls due behind it and waits. Alice rejoins it while it waits:
        at its turn the re-check cancels its purge (audit entry naming her),
        Synapse keeps it, and the room ahead is purged once its lock is free."""
        alice = self.user("alice")
        remote_room = self.remote.create_room(self.rita, preset="public_chat")
        self.federated_join(alice, remote_room)
        ahead, ahead_users = self.joined_room(members=1)
        # Held from before its forget until the lock is taken: otherwise a
        # loaded machine could let the 2 s period run out and the room ahead be
        # purged (the slot freed) before the lock exists.
        self.hold(ahead)
        self.leave_and_forget(ahead_users, ahead)
        self.assertEqual(self.state(ahead), "forgotten")
        # Taken before the room ahead can be decided: its purge waits for the lock.
        rawdb.query(
            self.hs,
            "INSERT INTO worker_read_write_locks "
            "(lock_name, lock_key, write_lock, instance_name, token, last_renewed_ts) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            ("purge_pagination_lock", ahead, True, "test-holder", "testtoken", now_ms()),
        )
        try:
            self.release(ahead)
            self.leave_and_forget([alice], remote_room)
            self.assertEqual(self.state(remote_room), "forgotten")

            def queued() -> bool:
                retention = self.retention(remote_room)
                status = self.status()
                return bool(
                    self.state(ahead) == "purging"
                    and retention["state"] == "forgotten"
                    and retention["purge_due_at"] < now_ms()
                    and status["backlog"] >= 1
                    and status["in_flight"] == 1
                )

            wait_until(queued, 60, "the remote room to be due and queued behind the room ahead")
            self.federated_join(alice, remote_room)
            self.assertEqual(self.state(remote_room), "forgotten", "still queued at the rejoin")
            self.assertEqual(self.state(ahead), "purging", "the slot was still taken")
        finally:
            rawdb.query(
                self.hs,
                "DELETE FROM worker_read_write_locks WHERE token = ?",
                ("testtoken",),
            )
        retention = self.wait_state(remote_room, "active", timeout=120)
        self.assertEqual(retention["note"], f"{alice.user_id} has membership join")
        purges = [e for e in self.audit(room_id=remote_room) if e["action"] == "purge"]
        self.assertEqual(
            [(e["outcome"], e["reason"]) for e in purges],
            [("cancelled", f"{alice.user_id} has membership join")],
        )
        self.assertTrue(self.synapse_has_room(remote_room))
        self.wait_all_purged([ahead], timeout=120)
        self.assertFalse(self.synapse_has_room(ahead))
