"""Crashes: SIGKILL in the middle of a burst and in the middle of purges.

After a restart the audit log, the retention state and Synapse's memberships
must agree: the module reconciles what it can (rooms Synapse shows forgotten
by every local user, leaves Synapse has that the log lacks) and every pending
or started purge completes.
"""

import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from matrix_leave_forget.retention.sweeper import SYNAPSE_LOCK_TIMEOUT_S
from tests.integration.retention_helpers import RELAXED_FORGET, RetentionHelpers
from tests.support import rawdb
from tests.support.harness import (
    User,
    quote_room,
    request,
    run_cli,
    wait_until,
)


class FaultTests(RetentionHelpers):
    """SIGKILL during a burst of leaves and forgets, and during purges."""

    RETENTION: ClassVar[dict[str, Any]] = {"period": "1h", "sweep_interval": "100ms"}
    MODULE_CONFIG = {"forget_rate_limit": RELAXED_FORGET, "retention": RETENTION}

    def restart(self, retention: dict[str, Any]) -> list[str]:
        """SIGKILL Synapse (if still running) and start it with ``retention``.

        Returns the tokens of the lock rows the killed process left behind.
        """
        self.hs.stop(signal.SIGKILL)
        dead_locks = self.lock_tokens()
        self.hs.reconfigure(
            module_config={"mount": self.MODE, **self.MODULE_CONFIG, "retention": retention}
        )
        self.hs.start()
        return dead_locks

    def verify_with_cli(self) -> None:
        result = run_cli(self.hs.config_path, "verify")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def burst(self, rooms: list[tuple[str, list[User]]], kill_after: int) -> int:
        """Leave then forget every room with every member, in parallel; SIGKILL
        Synapse once ``kill_after`` requests have been answered. Returns how
        many were answered before the kill."""
        answered = 0
        lock = threading.Lock()
        killed = threading.Event()

        def one_room(room: str, users: list[User]) -> None:
            nonlocal answered
            for action in ("leave", "forget"):
                for user in users:
                    if killed.is_set():
                        return
                    try:
                        resp = request(
                            self.module_port,
                            "POST",
                            f"/_matrix/client/v3/rooms/{quote_room(room)}/{action}",
                            {},
                            token=user.access_token,
                            timeout=10,
                        )
                    except OSError:
                        return  # the server died under this request
                    self.assertLess(resp.status, 500, resp.body)
                    with lock:
                        answered += 1
                        if answered >= kill_after and not killed.is_set():
                            killed.set()
                            assert self.hs.process is not None
                            self.hs.process.send_signal(signal.SIGKILL)

        # Few rooms at a time, so that some finish (forgotten by all) before the kill.
        with ThreadPoolExecutor(max_workers=4) as pool:
            for future in [pool.submit(one_room, room, users) for room, users in rooms]:
                future.result()
        self.assertTrue(killed.is_set(), "the burst ended before the kill")
        return answered

    def test_sigkill_mid_burst_then_records_agree_with_synapse(self) -> None:
        """Killed mid-burst and restarted, the log verifies, every leave Synapse
        has is in the log (served or recovered), and every room Synapse shows
        forgotten by all its local users has retention state, and no other does."""
        rooms = [self.joined_room() for _ in range(20)]
        self.burst(rooms, kill_after=50)  # of 80 requests
        self.restart(self.RETENTION)

        self.verify_with_cli()
        room_ids = {room for room, _ in rooms}
        logged_leaves = {
            e["event_id"]
            for e in self.audit()
            if e["action"] == "leave" and e["outcome"] in ("ok", "recovered")
        }
        synapse_state = [
            row
            for row in rawdb.query(
                self.hs,
                "SELECT lcm.room_id, lcm.user_id, lcm.membership, lcm.event_id, rm.forgotten "
                "FROM local_current_membership AS lcm "
                "JOIN room_memberships AS rm USING (room_id, event_id)",
            )
            if row[0] in room_ids
        ]
        leaves = [r for r in synapse_state if r[2] == "leave"]
        self.assertTrue(leaves, "the burst left no room before the kill")
        for room_id, user_id, _, event_id, _ in leaves:
            self.assertIn(event_id, logged_leaves, f"{user_id}'s leave of {room_id} is not logged")

        by_room: dict[str, list[tuple[Any, ...]]] = {}
        for row in synapse_state:
            by_room.setdefault(row[0], []).append(row)
        forgotten_by_all = [
            room
            for room, members in by_room.items()
            if all(m[2] == "leave" and m[4] for m in members)
        ]
        self.assertTrue(forgotten_by_all, "no room was forgotten by all before the kill")
        for room in forgotten_by_all:
            # Reconciliation runs just after start-up, in the background.
            self.wait_state(room, "forgotten")
        for room in room_ids - set(forgotten_by_all):
            retention = self.retention(room)
            self.assertTrue(retention is None or retention["state"] == "active", (room, retention))
        self.verify_with_cli()

    def test_sigkill_mid_purge_resumes(self) -> None:
        """Killed while Synapse purges a room (holding its purge lock), restarted:
        the module reports the interrupted purge, and every room whose purge was
        pending or started is purged and recorded as purged."""
        retention = {"period": "2s", "sweep_interval": "100ms"}
        self.restart(retention)
        rooms = [self.joined_room() for _ in range(8)]
        for room, users in rooms:
            for user in users:
                self.leave(user, room)
        for room, users in rooms:
            for user in users:
                self.forget(user, room)
        room_ids = [room for room, _ in rooms]

        def purge_lock_held() -> list[tuple[Any, ...]]:
            return rawdb.query(
                self.hs,
                "SELECT lock_key FROM worker_read_write_locks WHERE lock_name = ?",
                ("purge_pagination_lock",),
            )

        # The worst moment: a crash leaves Synapse's lock behind in the database.
        interrupted = wait_until(purge_lock_held, what="Synapse to hold a purge lock")[0][0]
        dead_locks = self.restart(retention)
        if purge_lock_held():
            # The purge did not finish before the kill landed: Synapse resumes
            # it once the dead process's lock expires. Until then the module
            # says so, and keeps the room in "purging" even if its row is gone.
            wait_until(
                lambda: f"Synapse is already purging {interrupted}," in self.hs.log_text(),
                what="the interrupted purge to be reported",
            )
            self.assertEqual(self.retention(interrupted)["state"], "purging")
        # The dead process's locks run out (Synapse's timeout, not waited for).
        self.expire_locks(dead_locks)
        for room in room_ids:
            # Synapse resumes the interrupted purge once the dead process's
            # lock expires; the other rooms queue behind it.
            self.wait_state(room, "purged", timeout=SYNAPSE_LOCK_TIMEOUT_S + 90)
            self.assert_purged(room)
        self.verify_with_cli()
