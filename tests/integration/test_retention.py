"""Room retention and the audit log, against real Synapse processes.

Each class is one Synapse (two for the federated class) with its own module
config. Retention periods are short (1-3 s) and the sweep runs every 100 ms;
tests wait for the sweep by polling the admin API with a deadline
(:func:`wait_until`), never with a bare sleep. "The sweep has been past a room"
is proved with a *sentinel*: a room forgotten by everyone after the room under
test, whose purge (or dry run) shows that a sweep ran after the room under
test fell due.

On one server, a room that every local user has left is dead: nobody can
rejoin it, invite to it or knock on it (Synapse answers 404 "no servers that
are in the room"). Cancellation of a pending purge by a rejoin, a new invite or
a knock therefore only happens for rooms that live on other servers too;
:class:`FederatedRetentionTests` runs a second homeserver and federates with it
over loopback TLS (and, there, deletes a purged room's cached copy of the remote
server's media). On one server, an invite or knock that is pending when the
last member forgets keeps the room from ever becoming "forgotten"; the
single-server tests cover that.
"""

import json
import os
import signal
from collections.abc import Sequence
from typing import Any, ClassVar

from matrix_leave_forget.timestamps import now_ms
from tests.integration.media_helpers import MediaHelpers, png
from tests.integration.retention_helpers import (
    ADMIN,
    FAST_RETENTION,
    RELAXED_FORGET,
    FederatedPair,
    RetentionHelpers,
)
from tests.support import rawdb
from tests.support.harness import (
    Response,
    User,
    quote_room,
    request,
    run_cli,
    wait_until,
)


class RetentionTests(RetentionHelpers):
    """Audit entries, purges, holds and the admin API in `listener` mode."""

    MODULE_CONFIG = {"forget_rate_limit": RELAXED_FORGET, "retention": FAST_RETENTION}

    def test_audit_entry_for_every_served_leave_and_forget(self) -> None:
        """Each leave and forget the module serves, succeeded or refused, leaves one audit entry."""
        alice, bob = self.user("alice"), self.user("bob")
        room = self.hs.create_room(alice, preset="public_chat")
        self.join(bob, room)
        unknown = f"!unknown{os.urandom(4).hex()}:test.local"
        expected = []

        def call(user: User, action: str, room_id: str, status: int, **kw: Any) -> Response:
            resp = self.via_module(
                kw.pop("method", "POST"),
                room_id,
                action,
                kw.pop("body", {}),
                token=user.access_token,
                **kw,
            )
            self.assertEqual(resp.status, status, resp.body)
            return resp

        before = now_ms()
        call(bob, "leave", room, 200, body={"reason": "moving on"})
        expected.append((bob, "leave", room, "ok", "moving on"))
        # Read while alice is still in: once everyone left, Synapse drops the room's state.
        bob_leave_event = self.hs.member_event(self.admin, room, bob.user_id)
        self.assertEqual(bob_leave_event["content"]["membership"], "leave")
        resp = call(alice, "forget", room, 400)  # still joined
        expected.append((alice, "forget", room, resp.errcode, None))
        resp = call(bob, "leave", room, 403)  # already left
        expected.append((bob, "leave", room, resp.errcode, None))
        call(bob, "forget", room, 200)
        expected.append((bob, "forget", room, "ok", None))
        txn_path = f"/_matrix/client/v3/rooms/{quote_room(room)}/leave/txn{os.urandom(3).hex()}"
        call(alice, "leave", room, 200, method="PUT", path=txn_path, body={"reason": "done"})
        expected.append((alice, "leave", room, "ok", "done"))
        # A replayed transaction is answered from Synapse's cache, not served again.
        call(alice, "leave", room, 200, method="PUT", path=txn_path, body={"reason": "done"})
        call(alice, "forget", room, 200)
        expected.append((alice, "forget", room, "ok", None))
        resp = call(alice, "leave", unknown, 404)
        self.assertEqual(resp.errcode, "M_UNKNOWN")
        expected.append((alice, "leave", unknown, "M_UNKNOWN", None))
        call(alice, "forget", unknown, 200)  # as Synapse: 200 for a room never known
        expected.append((alice, "forget", unknown, "noop", None))
        # Garbage room ids are not worth a row, refused (leave) or not (forget).
        call(alice, "leave", "garbage", 404)
        call(alice, "forget", "garbage", 200)
        after = now_ms()

        entries = [e for e in self.audit() if e["user_id"] in (alice.user_id, bob.user_id)]
        self.assertEqual(
            [(e["user_id"], e["action"], e["room_id"], e["outcome"], e["reason"]) for e in entries],
            [(u.user_id, a, r, o, why) for u, a, r, o, why in expected],
        )
        self.assertEqual(
            [e["seq"] for e in entries], sorted({e["seq"] for e in entries}), "seq not increasing"
        )
        for entry, (user, action, _, outcome, _) in zip(entries, expected, strict=True):
            self.assertEqual(entry["device_id"], user.device_id)
            self.assertEqual(entry["origin"], self.hs.homeserver_config()["server_name"])
            self.assertTrue(before - 1000 <= entry["ts"] <= after + 1000, entry)
            self.assertTrue(entry["hash"] and entry["signatures"], entry)
            if action == "leave" and outcome == "ok":
                self.assertTrue(entry["event_id"].startswith("$"), entry)
            else:
                self.assertIsNone(entry["event_id"], entry)
        # The recorded leave event is the one Synapse persisted.
        bob_leave = self.audit(user_id=bob.user_id, room_id=room)[0]
        self.assertEqual(bob_leave["event_id"], bob_leave_event["event_id"])
        self.assertEqual(bob_leave_event["content"].get("reason"), "moving on")
        # Filters agree with the full log.
        self.assertEqual(
            [e["seq"] for e in self.audit(user_id=alice.user_id)],
            [e["seq"] for e in entries if e["user_id"] == alice.user_id],
        )
        self.assertEqual(
            [e["seq"] for e in self.audit(room_id=unknown)],
            [e["seq"] for e in entries if e["room_id"] == unknown],
        )
        in_window = self.audit(since=str(entries[0]["ts"]), until=str(entries[-1]["ts"] + 1))
        self.assertTrue({e["seq"] for e in entries} <= {e["seq"] for e in in_window})

    def test_export_streams_the_same_entries(self) -> None:
        """GET audit/export returns the audit entries as JSON lines, filters applied."""
        alice = self.user("alice")
        room = self.hs.create_room(alice)
        self.leave(alice, room, reason="export me")
        self.forget(alice, room)
        resp = self.admin_api("GET", f"/audit/export?user_id={quote_room(alice.user_id)}")
        self.assertEqual(resp.status, 200)
        self.assertEqual(resp.headers["content-type"], "application/x-ndjson")
        lines = [json.loads(line) for line in resp.raw.decode().splitlines()]
        self.assertEqual(lines, self.audit(user_id=alice.user_id))
        self.assertEqual([e["action"] for e in lines], ["leave", "forget"])

    def test_room_forgotten_by_all_is_purged(self) -> None:
        """A room every local user left and forgot is purged once the period has passed."""
        alice, bob = self.user("alice"), self.user("bob")
        room = self.hs.create_room(alice, preset="public_chat")
        self.join(bob, room)
        self.leave_and_forget([alice], room)
        self.assertIsNone(self.retention(room), "forgotten by one of two is not pending")
        # Held across bob's forget and the listings below, so a loaded machine
        # cannot let the 1 s period run out (and the sweep purge the room)
        # before they read it pending; the purge comes once the hold is lifted.
        self.hold(room)
        self.leave_and_forget([bob], room)

        retention = self.retention(room)
        self.assertIsNotNone(retention)
        self.assertEqual(retention["state"], "forgotten")
        self.assertEqual(retention["purge_due_at"] - retention["forgotten_at"], 1000)
        self.assertIn(room, self.listed("pending"))
        self.assertIn(room, self.listed("forgotten"))
        self.assertNotIn(room, self.listed("purged"))
        self.assertEqual(self.purge_outcomes(room), [])

        self.release(room)
        self.assert_purged(room)
        self.assertIn(room, self.listed("purged"))
        self.assertNotIn(room, self.listed("pending"))
        self.assertNotIn(room, self.listed("forgotten"))
        self.assertNotIn(room, self.listed("abandoned"))
        purges = [e for e in self.audit(room_id=room) if e["action"] == "purge"]
        self.assertEqual([e["user_id"] for e in purges], [None, None])
        # The audit log keeps the members' history after Synapse dropped the room.
        self.assertEqual(
            [
                (e["user_id"], e["action"])
                for e in self.audit(room_id=room)
                if e["action"] in ("leave", "forget")
            ],
            [
                (alice.user_id, "leave"),
                (alice.user_id, "forget"),
                (bob.user_id, "leave"),
                (bob.user_id, "forget"),
            ],
        )

    def test_pending_local_invite_prevents_purge(self) -> None:
        """A local user's pending invite keeps the room from being forgotten by all, so unpurged."""
        alice, carol = self.user("alice"), self.user("carol")
        room = self.hs.create_room(alice, preset="private_chat")
        resp = self.hs.membership(alice, room, "invite", {"user_id": carol.user_id})
        self.assertEqual(resp.status, 200, resp.body)
        self.assert_last_forget_keeps(alice, room)
        self.assertNotIn(room, self.listed("abandoned"))
        members = {m["user_id"]: m for m in self.detail(room)["local_members"]}
        self.assertEqual(members[carol.user_id]["membership"], "invite")

        # Rejecting the invite and forgetting makes carol the last to forget.
        since = now_ms()
        self.leave(carol, room, reason="no thanks")
        self.forget(carol, room)
        self.assert_forgotten_by_all(room, since)
        self.assert_purged(room)

    def test_pending_local_knock_prevents_purge(self) -> None:
        """A local user's pending knock keeps the room from being forgotten by all, so unpurged."""
        alice, carol = self.user("alice"), self.user("carol")
        room = self.hs.create_room(
            alice,
            room_version="10",
            initial_state=[
                {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
            ],
        )
        resp = self.hs.membership(carol, room, "knock", {"reason": "let me in"})
        self.assertEqual(resp.status, 200, resp.body)
        self.assert_last_forget_keeps(alice, room)
        members = {m["user_id"]: m for m in self.detail(room)["local_members"]}
        self.assertEqual(members[carol.user_id]["membership"], "knock")

        # Rescinding the knock and forgetting makes carol the last to forget.
        since = now_ms()
        self.leave(carol, room)
        self.forget(carol, room)
        self.assert_forgotten_by_all(room, since)
        self.assert_purged(room)

    def test_admin_hold_prevents_purge_until_lifted(self) -> None:
        """A hold placed through the admin API keeps a due room; lifting it lets the purge run."""
        room, users = self.joined_room()
        path = f"/rooms/{quote_room(room)}/hold"
        # Placed before the forget: placed after it, a loaded machine could let
        # the 1 s period run out and the sweep purge the room before the PUT.
        self.assertEqual(
            self.admin_ok("PUT", path, {"reason": "legal hold"}),
            {"room_id": room, "held": True, "created": True},
        )
        self.assertEqual(
            self.admin_ok("PUT", path, {"reason": "again"}),
            {"room_id": room, "held": True, "created": False},
        )
        self.leave_and_forget(users, room)
        self.assertEqual(self.state(room), "forgotten")
        held = {r["room_id"]: r for r in self.listing("held")}
        self.assertEqual(held[room]["held_by"], self.admin.user_id)
        self.assertEqual(held[room]["reason"], "legal hold")
        self.assertEqual(self.detail(room)["hold"]["reason"], "legal hold")

        self.sweep_past()
        retention = self.retention(room)
        self.assertEqual(retention["state"], "forgotten")
        self.assertLess(retention["purge_due_at"], now_ms(), "the room is past due")
        self.assertEqual(self.purge_outcomes(room), [])
        self.assertTrue(self.synapse_has_room(room))
        self.assertIn(room, self.listed("pending"))

        self.assertEqual(
            self.admin_ok("DELETE", path), {"room_id": room, "held": False, "lifted": True}
        )
        self.assertEqual(
            self.admin_ok("DELETE", path), {"room_id": room, "held": False, "lifted": False}
        )
        self.assertNotIn(room, self.listed("held"))
        self.assert_purged(room)
        self.assertEqual(
            [
                (e["action"], e["outcome"], e["user_id"], e["reason"])
                for e in self.audit(room_id=room)
                if e["action"] in ("hold", "unhold")
            ],
            [
                ("hold", "ok", self.admin.user_id, "legal hold"),
                ("unhold", "ok", self.admin.user_id, None),
            ],
        )

    def test_forget_of_unknown_or_garbage_room_creates_no_retention_state(self) -> None:
        """Forgetting a room the server never knew (or a non-room id) arms no purge."""
        alice = self.user("alice")
        unknown = f"!never{os.urandom(4).hex()}:test.local"
        garbage = f"not-a-room-{os.urandom(2).hex()}"
        self.forget(alice, unknown)
        self.forget(alice, garbage)
        self.assertIsNone(self.retention(unknown))

        self.sweep_past()
        self.assertIsNone(self.retention(unknown))
        resp = self.admin_api("GET", f"/rooms/{quote_room(garbage)}")
        self.assertEqual((resp.status, resp.errcode), (400, "M_INVALID_PARAM"))
        for state in ("forgotten", "pending", "dry_run", "purged", "abandoned", "held"):
            listed = self.listed(state)
            self.assertNotIn(unknown, listed, state)
            self.assertNotIn(garbage, listed, state)
        self.assertEqual(
            [(e["action"], e["outcome"]) for e in self.audit(room_id=unknown)],
            [("forget", "noop")],
        )
        self.assertEqual(self.audit(room_id=garbage), [])

    def test_abandoned_listing_and_member_detail(self) -> None:
        """abandoned lists rooms all local users left; the detail shows their leaves and forgets."""
        alice, bob = self.user("alice"), self.user("bob")
        left = self.hs.create_room(alice, preset="public_chat")
        self.join(bob, left)
        still_joined = self.hs.create_room(alice, preset="public_chat")
        self.join(bob, still_joined)
        self.leave(alice, left, reason="alice out")
        self.leave(bob, left, reason="bob out")
        self.forget(alice, left)
        self.leave(alice, still_joined)

        abandoned = self.listed("abandoned")
        self.assertIn(left, abandoned)
        self.assertNotIn(still_joined, abandoned)
        self.assertIsNone(self.retention(left), "bob has not forgotten")
        self.assertNotIn(left, self.listed("forgotten"))

        detail = self.detail(left)
        self.assertEqual(detail["room_id"], left)
        self.assertIsNone(detail["hold"])
        members = {m["user_id"]: m for m in detail["local_members"]}
        self.assertEqual(set(members), {alice.user_id, bob.user_id})
        audit = {(e["user_id"], e["action"]): e for e in self.audit(room_id=left)}
        a, b = members[alice.user_id], members[bob.user_id]
        self.assertEqual((a["membership"], a["forgotten"]), ("leave", True))
        self.assertEqual((b["membership"], b["forgotten"]), ("leave", False))
        self.assertEqual(a["leave_reason"], "alice out")
        self.assertEqual(b["leave_reason"], "bob out")
        self.assertEqual(a["leave_ts"], audit[(alice.user_id, "leave")]["ts"])
        self.assertEqual(a["forget_ts"], audit[(alice.user_id, "forget")]["ts"])
        self.assertEqual(b["leave_ts"], audit[(bob.user_id, "leave")]["ts"])
        self.assertLessEqual(a["leave_ts"], a["forget_ts"])
        self.assertEqual(a["leave_event_id"], audit[(alice.user_id, "leave")]["event_id"])
        self.assertNotIn("forget_ts", b)

        # Once bob forgets too, the room is pending and (until purged) still abandoned.
        since = now_ms()
        self.forget(bob, left)
        self.assert_forgotten_by_all(left, since)

    def test_listing_validation(self) -> None:
        """An unknown listing state or a bad paging argument is a 400, not a 500."""
        for query in ("/rooms?state=bogus", "/rooms?limit=x", "/rooms?limit=-1", "/audit?from=x"):
            resp = self.admin_api("GET", query)
            self.assertEqual((resp.status, resp.errcode), (400, "M_INVALID_PARAM"), query)

    def test_admin_routes_refuse_non_admins_and_anonymous(self) -> None:
        """Every admin route answers 403 M_FORBIDDEN to a non-admin and 401 without a token."""
        mallory = self.user("mallory")
        room = self.forgotten_room(members=1)
        routes = [
            ("GET", "/rooms?state=forgotten", None),
            ("GET", f"/rooms/{quote_room(room)}", None),
            ("GET", "/audit", None),
            ("GET", "/audit/export", None),
            ("PUT", f"/rooms/{quote_room(room)}/hold", {"reason": "mine"}),
            ("DELETE", f"/rooms/{quote_room(room)}/hold", None),
            ("GET", "/no-such-route", None),  # no probing of routes either
        ]
        for method, path, body in routes:
            resp = self.admin_api(method, path, body, token=mallory.access_token)
            self.assertEqual((resp.status, resp.errcode), (403, "M_FORBIDDEN"), (method, path))
            resp = request(self.module_port, method, ADMIN + path, body)
            self.assertEqual((resp.status, resp.errcode), (401, "M_MISSING_TOKEN"), (method, path))
            resp = self.admin_api(method, path, body, token="not-a-token")
            self.assertEqual((resp.status, resp.errcode), (401, "M_UNKNOWN_TOKEN"), (method, path))
        self.assertIsNone(self.detail(room)["hold"], "the refused PUT placed no hold")
        self.assertEqual(
            [e for e in self.audit(room_id=room) if e["action"] in ("hold", "unhold")], []
        )


class DryRunTests(RetentionHelpers):
    """`dry_run: true`: due rooms are recorded, never purged."""

    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {**FAST_RETENTION, "dry_run": True},
    }

    def test_dry_run_purges_nothing(self) -> None:
        """A due room goes to dry_run with an audit entry; Synapse keeps it, sweep after sweep."""
        room = self.forgotten_room()
        retention = self.wait_state(room, "dry_run")
        self.assertGreaterEqual(retention["purge_started_at"], retention["purge_due_at"])
        self.assertIsNone(retention["purged_at"])
        self.assertEqual(self.purge_outcomes(room), ["dry_run"])
        self.assertTrue(self.synapse_has_room(room))
        self.assertIn(room, self.listed("dry_run"))
        self.assertIn(room, self.listed("forgotten"))
        self.assertNotIn(room, self.listed("pending"))
        self.assertNotIn(room, self.listed("purged"))

        # Later sweeps (shown by a later room reaching dry_run) leave it alone.
        later = self.forgotten_room(members=1)
        self.wait_state(later, "dry_run")
        self.assertEqual(self.state(room), "dry_run")
        self.assertEqual(self.purge_outcomes(room), ["dry_run"])
        self.assertTrue(self.synapse_has_room(room))
        self.assertTrue(self.synapse_has_room(later))
        self.assertEqual(self.listed("purged"), [])


class RestartTests(RetentionHelpers):
    """Pending purges survive a restart of Synapse; configured holds."""

    RETENTION: ClassVar[dict[str, Any]] = {"period": "3s", "sweep_interval": "100ms"}
    MODULE_CONFIG = {"forget_rate_limit": RELAXED_FORGET, "retention": RETENTION}

    def restart(self, sig: int = signal.SIGTERM, holds: Sequence[str] = ()) -> None:
        self.hs.stop(sig)
        retention = dict(self.RETENTION, holds=list(holds)) if holds else self.RETENTION
        self.hs.reconfigure(
            module_config={"mount": self.MODE, **self.MODULE_CONFIG, "retention": retention}
        )
        self.hs.start()

    def assert_pending(self, room_id: str) -> None:
        """Guard: the room is still waiting for its purge at the stop (held, so
        however slow the machine)."""
        retention = self.retention(room_id)
        self.assertEqual(retention["state"], "forgotten")
        self.assertIsNotNone(retention["purge_due_at"])
        self.assertEqual(self.purge_outcomes(room_id), [])

    def _restart_loses_nothing(self, sig: int) -> None:
        # Held from before the forget until after the restart: the stop finds
        # them pending however long the setup took; only the database can
        # carry them (and their hold) across the restart.
        prepared = [self.joined_room() for _ in range(3)]
        rooms = [room for room, _ in prepared]
        for room, users in prepared:
            self.hold(room)
            self.leave_and_forget(users, room)
        for room in rooms:
            self.assert_pending(room)
        self.restart(sig)
        for room in rooms:
            self.assert_pending(room)
            self.release(room)
        for room in rooms:
            self.assert_purged(room)

    def test_restart_with_pending_purges_sigterm(self) -> None:
        """Rooms pending purge when Synapse is stopped (SIGTERM) are purged after it restarts."""
        self._restart_loses_nothing(signal.SIGTERM)

    def test_restart_with_pending_purges_sigkill(self) -> None:
        """Rooms pending purge when Synapse is killed (SIGKILL) are purged after it restarts."""
        self._restart_loses_nothing(signal.SIGKILL)

    def test_config_hold_prevents_purge(self) -> None:
        """A room in retention.holds is never purged; the admin API cannot lift a config hold."""
        room, users = self.joined_room()
        # An admin hold covers the setup; the configured hold must keep the
        # room once the admin hold is lifted.
        self.hold(room)
        self.leave_and_forget(users, room)
        self.assert_pending(room)
        self.restart(holds=[room])
        try:
            self.assertEqual(self.release(room), {"room_id": room, "held": True, "lifted": True})
            self.sweep_past()
            retention = self.retention(room)
            self.assertEqual(retention["state"], "forgotten")
            self.assertLess(retention["purge_due_at"], now_ms(), "the room is past due")
            self.assertEqual(self.purge_outcomes(room), [])
            self.assertTrue(self.synapse_has_room(room))
            held = {r["room_id"]: r for r in self.listing("held")}
            self.assertEqual(held[room]["held_by"], "config")
            self.assertEqual(self.detail(room)["hold"]["held_by"], "config")
            self.assertEqual(
                self.admin_ok("DELETE", f"/rooms/{quote_room(room)}/hold"),
                {"room_id": room, "held": True, "lifted": False},
            )
        finally:
            self.restart(holds=[])
        # Taken out of the config, the hold is gone and the overdue room is purged.
        self.assert_purged(room)


class FederatedRetentionTests(FederatedPair, MediaHelpers, RetentionHelpers):
    """Rooms that live on on a remote server: a rejoin, invite or knock cancels a pending
    purge; the remote media a purged room referenced leaves this server's cache."""

    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {
            "period": "2s",
            "sweep_interval": "100ms",
            "media": "delete",
            "media_grace": "4s",
        },
    }

    def remote_room(self, **content: Any) -> str:
        return self.remote.create_room(self.rita, **content)

    def federated(self, user: User, room_id: str, action: str, body: Any = None) -> None:
        """Join or knock on a room through the remote server."""
        via = quote_room(self.remote.server_name)
        path = f"/_matrix/client/v3/{action}/{quote_room(room_id)}?server_name={via}"
        resp = self.hs.client("POST", path, body or {}, token=user.access_token)
        self.assertEqual(resp.status, 200, resp.body)

    def invite(self, user: User, room_id: str) -> None:
        resp = self.remote.membership(self.rita, room_id, "invite", {"user_id": user.user_id})
        self.assertEqual(resp.status, 200, resp.body)

    def local_membership(self, room_id: str, user: User) -> str | None:
        for member in self.detail(room_id)["local_members"]:
            if member["user_id"] == user.user_id:
                return str(member["membership"])
        return None

    def assert_cancelled_by(self, room_id: str, user: User, membership: str) -> None:
        """The pending purge was cancelled at its due time because of user's membership."""
        retention = self.wait_state(room_id, "active")
        self.assertIsNone(retention["purge_due_at"])
        self.assertIsNone(retention["purge_started_at"])
        self.assertIsNotNone(retention["cancelled_at"])
        self.assertEqual(retention["note"], f"{user.user_id} has membership {membership}")
        cancels = [e for e in self.audit(room_id=room_id) if e["action"] == "purge"]
        self.assertEqual(
            [(e["outcome"], e["reason"]) for e in cancels],
            [("cancelled", f"{user.user_id} has membership {membership}")],
        )
        self.assertTrue(self.synapse_has_room(room_id))
        self.assertNotIn(room_id, self.listed("pending"))
        self.assertNotIn(room_id, self.listed("purged"))

    def assert_still_pending(self, room_id: str) -> None:
        """Guard: the event under test arrived while the purge was pending, not yet decided.

        The room is held (:meth:`hold`) from before the forget, so this holds
        however slow the machine; the decision comes once the test lifts it.
        """
        retention = self.retention(room_id)
        self.assertEqual(retention["state"], "forgotten")
        self.assertIsNotNone(retention["purge_due_at"])
        self.assertEqual(self.purge_outcomes(room_id), [])

    def test_rejoin_cancels_pending_purge(self) -> None:
        """A local user rejoining after every local user forgot cancels the purge; room stays."""
        alice, bob = self.user("alice"), self.user("bob")
        room = self.remote_room(preset="public_chat")
        self.federated(alice, room, "join")
        self.federated(bob, room, "join")
        self.hold(room)
        self.leave_and_forget([alice, bob], room)
        self.assertEqual(self.state(room), "forgotten")
        self.federated(alice, room, "join")
        self.assert_still_pending(room)
        self.release(room)
        self.assert_cancelled_by(room, alice, "join")
        self.assertEqual(self.local_membership(room, alice), "join")

    def test_new_invite_cancels_pending_purge(self) -> None:
        """An invite of a local user arriving after every local user forgot cancels the purge."""
        alice, carol = self.user("alice"), self.user("carol")
        room = self.remote_room(preset="public_chat")
        self.federated(alice, room, "join")
        self.hold(room)
        self.leave_and_forget([alice], room)
        self.assertEqual(self.state(room), "forgotten")
        self.invite(carol, room)
        self.assert_still_pending(room)
        self.release(room)
        self.assert_cancelled_by(room, carol, "invite")

    def test_knock_cancels_pending_purge(self) -> None:
        """A local user knocking after every local user forgot cancels the purge."""
        alice, carol = self.user("alice"), self.user("carol")
        room = self.remote_room(
            room_version="10",
            initial_state=[
                {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
            ],
        )
        self.invite(alice, room)
        self.federated(alice, room, "join")
        self.hold(room)
        self.leave_and_forget([alice], room)
        self.assertEqual(self.state(room), "forgotten")
        self.federated(carol, room, "knock", {"reason": "let me back"})
        self.assert_still_pending(room)
        self.release(room)
        self.assert_cancelled_by(room, carol, "knock")

    def test_forget_again_after_rejoin_restarts_the_period(self) -> None:
        """Rejoin, leave and forget again: the room stays a full period after the latest forget.

        Held from before the first forget until after the second, so the first
        period cannot run out (and the room be decided) before the rejoin on a
        slow machine; the due time is read back from the admin API.
        """
        alice = self.user("alice")
        room = self.remote_room(preset="public_chat")
        self.federated(alice, room, "join")
        self.hold(room)
        self.leave_and_forget([alice], room)
        first = self.retention(room)
        self.assertEqual(first["state"], "forgotten")
        self.federated(alice, room, "join")
        self.assert_still_pending(room)
        self.leave(alice, room)
        before_second_forget = now_ms()
        self.forget(alice, room)
        second = self.retention(room)
        self.assertEqual(second["state"], "forgotten")
        self.assertGreaterEqual(second["forgotten_at"], before_second_forget - 1000)
        self.assertGreater(second["forgotten_at"], first["forgotten_at"])
        self.assertEqual(second["purge_due_at"] - second["forgotten_at"], 2000)
        self.assertEqual(self.purge_outcomes(room), [])
        self.release(room)
        self.assert_purged(room)
        self.assertGreaterEqual(self.retention(room)["purge_started_at"], second["purge_due_at"])

    def test_purged_room_drops_cached_remote_media(self) -> None:
        """A remote user's image in a purged room leaves this server's cache (row, file,
        thumbnails) after the grace, while the remote server keeps its original; one
        another local room refers to stays (``referenced_elsewhere``); the signed
        ``media_deleted`` entry counts the remote item and its bytes. The offline CLI's
        ``room`` previews this as the admin API does, and the purge receipt (admin API,
        CLI ``receipt``) says ``pending`` until the entry, then names it."""
        alice, bob = self.user("alice"), self.user("bob")
        room = self.remote_room(preset="public_chat")
        self.federated(alice, room, "join")
        self.federated(bob, room, "join")
        only_here, forwarded = (
            self.upload(self.rita, 11, on=self.remote),
            self.upload(self.rita, 12, on=self.remote),
        )
        for uri in (only_here, forwarded):
            self.assertTrue(uri.startswith(f"mxc://{self.remote.server_name}/"), uri)
            self.send_image(self.rita, room, uri, on=self.remote)
        # A local download caches the remote media here (and thumbnails it).
        for uri in (only_here, forwarded):
            self.assertEqual(self.download(alice, uri), 200)
        cached = self.remote_cache(only_here)
        assert cached is not None
        file_id, size = cached
        self.assertEqual(size, len(png(11)))
        cached_file, cached_thumbs = self.remote_cache_paths(only_here, file_id)
        self.assertTrue(os.path.exists(cached_file))
        wait_until(
            lambda: self.remote_thumbnail_rows(only_here) > 0 and os.path.exists(cached_thumbs),
            what="thumbnails of the cached remote image",
        )
        self.assertIsNotNone(self.remote_cache(forwarded))
        # The other image is also in a local room that stays.
        other_room = self.hs.create_room(alice, preset="private_chat")
        self.send_image(alice, other_room, forwarded)
        # Both images reached this server in the shared room (the index reads them there).
        wait_until(lambda: {only_here, forwarded} <= self.room_media(room), what="the images here")
        # What a purge would do with them, in the admin API and the offline CLI alike.
        preview = wait_until(
            lambda: (p := self.detail(room)["media_preview"])["index_ready"] and p,
            what="the media preview with the index ready",
        )
        self.assertEqual(
            {m["mxc"]: (m["decision"], m["reason"], m["bytes"]) for m in preview["media"]},
            {
                only_here: ("due", None, len(png(11))),
                forwarded: ("kept", "referenced_elsewhere", len(png(12))),
            },
        )
        cli = run_cli(self.hs.config_path, "room", room, "--json")
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertEqual(json.loads(cli.stdout)["media_preview"], preview)

        self.leave_and_forget([alice, bob], room)
        self.wait_state(room, "purged")
        # Until the grace is over the receipt says the media is pending.
        pending = self.detail(room)["purge_receipt"]["media"]
        self.assertEqual(pending["state"], "pending")
        receipt = self.media_entry(room)["media"]
        self.assertEqual(
            self.decisions(room),
            {only_here: ("deleted", None), forwarded: ("kept", "referenced_elsewhere")},
        )
        self.assertEqual((receipt["remote_items"], receipt["remote_bytes"]), (1, len(png(11))))
        self.assertEqual((receipt["local_items"], receipt["local_bytes"]), (0, 0))
        self.assertEqual(receipt["kept_referenced_elsewhere"], 1)
        self.assertEqual(receipt["kept"], {"kept:referenced_elsewhere": 1})
        # This server's copy is gone: row, file, thumbnails.
        self.assertIsNone(self.remote_cache(only_here))
        self.assertEqual(self.remote_thumbnail_rows(only_here), 0)
        self.assertFalse(os.path.exists(cached_file))
        self.assertFalse(os.path.exists(cached_thumbs))
        self.assertIsNotNone(self.remote_cache(forwarded))
        self.check_media_receipt(room)
        # The remote server keeps its original, and this server can fetch it again.
        self.assertTrue(self.media_row(only_here, on=self.remote))
        self.assertTrue(os.path.exists(self.media_paths(only_here, on=self.remote)[0]))
        self.assertEqual(self.download(self.rita, only_here, on=self.remote), 200)
        self.assertEqual(self.download(alice, only_here), 200)
        self.assertIsNotNone(self.remote_cache(only_here))

    def check_media_receipt(self, room_id: str) -> None:
        """The purge receipt (admin API and CLI) names the media_deleted entry beside the
        purge entry, whose own fields stay as signed."""
        entries = {e["outcome"]: e for e in self.audit(room_id=room_id) if e["action"] == "purge"}
        view = self.detail(room_id)["purge_receipt"]
        purged, media = entries["purged"], entries["media_deleted"]
        self.assertEqual((view["seq"], view["hash"]), (purged["seq"], purged["hash"]))
        self.assertEqual(view["receipt"], json.loads(purged["receipt"]))
        self.assertEqual(view["receipt"]["media"]["remote_items"], 0)
        self.assertEqual(
            view["media"],
            {
                "state": "recorded",
                "seq": media["seq"],
                "ts": media["ts"],
                "hash": media["hash"],
                "receipt": json.loads(media["receipt"]),
            },
        )
        cli = run_cli(self.hs.config_path, "receipt", room_id, "--json")
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertEqual(json.loads(cli.stdout), {"room_id": room_id, **view})
        table = run_cli(self.hs.config_path, "receipt", room_id)
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn(f"entry: {purged['seq']}:{purged['hash']}", table.stdout)
        self.assertIn(f"media: entry {media['seq']}:{media['hash']}", table.stdout)
        self.assertIn(
            f"media erased: local 0 (0 bytes), remote 1 ({len(png(11))} bytes); policy delete",
            table.stdout,
        )
        self.assertIn("media kept: referenced elsewhere 1, encrypted room 0", table.stdout)

    def room_media(self, room_id: str) -> set[str]:
        """The media this server's copy of a room refers to (its events' JSON)."""
        rows = rawdb.query(
            self.hs,
            "SELECT j.json FROM event_json AS j JOIN events AS e ON e.event_id = j.event_id"
            " WHERE e.room_id = ? AND e.type = 'm.room.message'",
            (room_id,),
        )
        return {str(json.loads(r[0])["content"].get("url")) for r in rows}


class InterceptModeTests(RetentionHelpers):
    """`mount: intercept`: the admin API and the audit answer on the client listener."""

    MODE = "intercept"
    MODULE_CONFIG = {"forget_rate_limit": RELAXED_FORGET, "retention": FAST_RETENTION}

    def test_admin_api_on_client_port(self) -> None:
        """Leave and forget on the client port are audited, and the admin API answers there too."""
        self.assertEqual(self.module_port, self.hs.client_port)
        alice = self.user("alice")
        room = self.hs.create_room(alice)
        since = now_ms()
        self.leave(alice, room, reason="intercepted")
        self.forget(alice, room)
        resp = self.hs.client(
            "GET",
            f"{ADMIN}/audit?user_id={quote_room(alice.user_id)}",
            token=self.admin.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        self.assertEqual(
            [(e["action"], e["outcome"], e["reason"]) for e in resp.body["entries"]],
            [("leave", "ok", "intercepted"), ("forget", "ok", None)],
        )
        self.assert_forgotten_by_all(room, since)
        resp = self.hs.client("GET", f"{ADMIN}/audit", token=alice.access_token)
        self.assertEqual((resp.status, resp.errcode), (403, "M_FORBIDDEN"))
        resp = self.hs.client("GET", f"{ADMIN}/audit")
        self.assertEqual((resp.status, resp.errcode), (401, "M_MISSING_TOKEN"))
        self.assert_purged(room)
