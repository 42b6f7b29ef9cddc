"""The catch-up: exact recovery of departures, from Synapse's events stream.

A departure whose entry was lost (the process died between Synapse persisting
the event and the module recording it, or the module was not loaded) is
recorded at the next start with outcome ``recovered``, the event's own time
and sender, whenever it happened; nothing from before the module's
installation is. A forget and its entry are one transaction: a failure at the
entry leaves the membership unforgotten.

Faults are injected with a trigger that makes every insert into the audit
table fail, on SQLite and PostgreSQL alike, followed by SIGKILL.
"""

import signal
from collections.abc import Callable
from typing import Any

from tests.integration.route_helpers import RouteHelpers
from tests.support import rawdb
from tests.support.harness import (
    SynapseProcess,
    User,
    quote_room,
    wait_until,
)

V3 = "/_matrix/client/v3"


def break_audit_writes(hs: Any) -> None:
    """Every later insert into the audit table fails (until mend_audit_writes)."""
    if hs.pg_database is None:
        rawdb.execute(
            hs,
            "CREATE TRIGGER test_fault BEFORE INSERT ON leave_forget_audit "
            "BEGIN SELECT RAISE(ABORT, 'injected fault'); END",
        )
    else:
        rawdb.execute(
            hs,
            "CREATE OR REPLACE FUNCTION test_fault() RETURNS trigger AS "
            "$$ BEGIN RAISE EXCEPTION 'injected fault'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER test_fault BEFORE INSERT ON leave_forget_audit "
            "FOR EACH ROW EXECUTE FUNCTION test_fault()",
        )


def mend_audit_writes(hs: Any) -> None:
    if hs.pg_database is None:
        rawdb.execute(hs, "DROP TRIGGER test_fault")
    else:
        rawdb.execute(hs, "DROP TRIGGER test_fault ON leave_forget_audit")


def set_module(hs: Any, module_config: dict[str, Any] | None) -> None:
    """Load the module with module_config at the next start (None: not at all)."""
    hs.module_config = module_config
    hs.reconfigure()


def catch_up_done(hs: Any) -> Any:
    """Whether this run's start-up catch-up has finished (it logs once per start)."""
    before = hs.log_text().count("Start-up catch-up read")

    def done() -> bool:
        return bool(hs.log_text().count("Start-up catch-up read") > before)

    return done


class CrashTests(RouteHelpers):
    """SIGKILL at each step of leave and forget, and a restart."""

    def kill_and_restart(
        self, module: bool = True, while_down: Callable[[], None] | None = None
    ) -> None:
        """SIGKILL Synapse and start it again, with or without the module.

        Args:
            while_down: Run after the kill, before the start.
        """
        done = catch_up_done(self.hs)
        self.hs.stop(signal.SIGKILL)
        if while_down is not None:
            while_down()
        set_module(self.hs, {"mount": self.MODE, **self.MODULE_CONFIG} if module else None)
        self.hs.start()
        if module:
            wait_until(done, what="the start-up catch-up")

    def event_ts(self, user: User, event_id: str) -> int:
        """The event's origin_server_ts, as Synapse stored it."""
        rows = rawdb.query(
            self.hs, "SELECT origin_server_ts FROM events WHERE event_id = ?", (event_id,)
        )
        return int(rows[0][0])

    def leave_event_id(self, room_id: str, user: User) -> str:
        rows = rawdb.query(
            self.hs,
            "SELECT event_id FROM local_current_membership "
            "WHERE room_id = ? AND user_id = ? AND membership IN ('leave', 'ban')",
            (room_id, user.user_id),
        )
        self.assertEqual(len(rows), 1, rows)
        return str(rows[0][0])

    def test_crash_between_leave_and_its_entry(self) -> None:
        """The leave is persisted, its entry is not (the write fails), the process is
        killed: at the next start the leave is recorded as recovered, with the event's
        id, reason, sender and own time, and the admin room detail shows it."""
        room_id, (alice, bob) = self.joined_room(2)
        break_audit_writes(self.hs)
        self.leave(bob, room_id, reason="lost entry")
        event_id = self.leave_event_id(room_id, bob)
        # Killed while every audit write still fails: nothing can record it before.
        self.kill_and_restart(while_down=lambda: mend_audit_writes(self.hs))
        entry = self.one_entry(bob, room_id, "leave")
        event_ts = self.event_ts(alice, event_id)
        self.assertEqual(
            (entry["outcome"], entry["via"], entry["event_id"], entry["reason"]),
            ("recovered", "recovered", event_id, "lost entry"),
        )
        self.assertEqual(entry["event_ts"], event_ts)
        self.assertNotIn("actor", entry)
        member = {m["user_id"]: m for m in self.detail(room_id)["local_members"]}[bob.user_id]
        self.assertEqual(member["leave_outcome"], "recovered")
        self.assertEqual(member["leave_ts"], event_ts)
        self.assertEqual(member["leave_event_id"], event_id)

    def test_crash_at_forget_entry_leaves_nothing_forgotten(self) -> None:
        """A forget whose entry cannot be written is not done (one transaction): the
        client gets an error, Synapse's membership stays unforgotten across a SIGKILL,
        and the forget after the restart is done with its one entry."""
        room_id, (alice,) = self.joined_room(1)
        self.leave(alice, room_id)
        break_audit_writes(self.hs)
        try:
            resp = self.via_module("POST", room_id, "forget", {}, token=alice.access_token)
            self.assertEqual(resp.status, 500, resp.body)
            self.assertFalse(self.forgotten_in_synapse(alice, room_id))
        finally:
            mend_audit_writes(self.hs)
        self.kill_and_restart()
        self.assertFalse(self.forgotten_in_synapse(alice, room_id))
        self.assertEqual(self.entries(alice, room_id, "forget"), [])
        self.assertIsNone(self.retention(room_id))
        self.forget(alice, room_id)
        self.assertTrue(self.forgotten_in_synapse(alice, room_id))
        self.assertEqual(self.one_entry(alice, room_id, "forget")["outcome"], "ok")
        self.assertEqual(self.state(room_id), "forgotten")

    def test_departures_while_module_not_loaded_are_recovered(self) -> None:
        """Departures that happened while Synapse ran without the module, however long
        before, are recovered with their own time and sender (a kick names the kicker)."""
        room_id, (alice, bob, carol) = self.joined_room(3)
        self.kill_and_restart(module=False)
        self.native(
            alice, "POST", f"{V3}/rooms/{quote_room(room_id)}/kick", {"user_id": bob.user_id}
        )
        self.native(carol, "POST", f"{V3}/rooms/{quote_room(room_id)}/leave", {"reason": "quiet"})
        kicked, left = self.leave_event_id(room_id, bob), self.leave_event_id(room_id, carol)
        self.kill_and_restart()
        kick = self.one_entry(bob, room_id, "leave")
        leave = self.one_entry(carol, room_id, "leave")
        self.assertEqual(
            (kick["outcome"], kick["actor"], kick["event_id"]), ("recovered", alice.user_id, kicked)
        )
        self.assertEqual(kick["event_ts"], self.event_ts(alice, kicked))
        self.assertEqual((leave["event_id"], leave["reason"]), (left, "quiet"))
        self.assertEqual(leave["event_ts"], self.event_ts(alice, left))

    def test_burst_killed_every_forgotten_membership_has_its_entry(self) -> None:
        """Killed in the middle of leaves and forgets by many users: every membership
        Synapse shows forgotten has its forget entry (never one without the other),
        and every leave Synapse has is in the log after the restart."""
        rooms = [self.joined_room(2) for _ in range(10)]
        from concurrent.futures import ThreadPoolExecutor

        def one(room_id: str, users: list[User]) -> None:
            for action in ("leave", "forget"):
                for user in users:
                    try:
                        self.via_module("POST", room_id, action, {}, token=user.access_token)
                    except OSError:
                        return

        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(one, room_id, users) for room_id, users in rooms]
            wait_until(
                lambda: sum(1 for e in self.audit() if e["action"] == "forget") >= 8,
                what="some forgets",
            )
            assert self.hs.process is not None
            self.hs.process.send_signal(signal.SIGKILL)
            for future in futures:
                future.result()
        self.kill_and_restart()
        ids = {room_id for room_id, _ in rooms}
        rows = [
            r
            for r in rawdb.query(
                self.hs,
                "SELECT lcm.room_id, lcm.user_id, lcm.membership, lcm.event_id, rm.forgotten "
                "FROM local_current_membership AS lcm "
                "JOIN room_memberships AS rm USING (room_id, event_id)",
            )
            if r[0] in ids
        ]
        entries = [e for e in self.audit() if e.get("room_id") in ids]
        forgets = {(e["room_id"], e["user_id"]) for e in entries if e["action"] == "forget"}
        leaves = {e["event_id"] for e in entries if e["action"] == "leave"}
        self.assertTrue(any(r[4] for r in rows), "nothing was forgotten before the kill")
        for room_id, user_id, membership, event_id, forgotten in rows:
            self.assertEqual(bool(forgotten), (room_id, user_id) in forgets, (room_id, user_id))
            if membership == "leave":
                self.assertIn(event_id, leaves, (room_id, user_id))


class InstallationTests(RouteHelpers):
    """Nothing from before the module's installation is recorded as a departure."""

    @classmethod
    def boot(cls) -> None:
        # Synapse first runs without the module, as before an operator installs it.
        cls.hs = SynapseProcess(None)
        try:
            cls.hs.start()
            cls.admin = cls.hs.register("admin", admin=True)
        except Exception:
            cls.hs.cleanup()
            raise

    def test_departures_before_installation_are_not_recorded(self) -> None:
        """A leave from before the module was installed is not in the log; one after is."""
        alice, bob = self.user("alice"), self.user("bob")
        room_id = self.hs.create_room(alice, preset="public_chat")
        self.join(bob, room_id)
        self.native(bob, "POST", f"{V3}/rooms/{quote_room(room_id)}/leave")
        self.hs.stop()
        set_module(self.hs, {"mount": self.MODE, **self.MODULE_CONFIG})
        done = catch_up_done(self.hs)
        self.hs.start()
        wait_until(done, what="the start-up catch-up")
        self.assertEqual(self.entries(bob, room_id, "leave"), [])
        self.native(alice, "POST", f"{V3}/rooms/{quote_room(room_id)}/leave")
        self.assertEqual(self.one_entry(alice, room_id, "leave")["via"], "client")
        self.assertEqual(self.entries(bob, room_id, "leave"), [])
