"""Every departure and forget of a local user is in the audit log, whatever the route.

Synapse serves leaves and forgets on many routes besides the module's
endpoints: the state API, /kick (of oneself or by another member), bans,
account deactivation (by the user or an admin), the admin room deletion, its
own ``forget_rooms_on_leave``. Each must leave one entry saying how it
happened (``via``) and who acted when it was not the user (``actor``), and
every forget must move the room's retention state. The module runs in
``listener`` mode here, so the client port is Synapse's own client API.
"""

import inspect
import json
import os
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from matrix_leave_forget.timestamps import now_ms
from tests.integration.retention_helpers import (
    RELAXED_FORGET,
    FederatedPair,
)
from tests.integration.route_helpers import V3, RouteHelpers, self_route
from tests.support import rawdb
from tests.support.harness import (
    SynapseProcess,
    User,
    quote_room,
    wait_until,
)

_TRANSACTIONS = re.compile(
    r'^synapse_storage_transaction_time_count(?:_total)?\{desc="([^"]+)"[^}]*\} (\S+)$', re.M
)


class ClientRouteTests(RouteHelpers):
    """Departures through Synapse's own client API."""

    def test_state_api_leave_every_spelling(self) -> None:
        """A leave through the state API (raw or percent-encoded own id, r0 or v3)
        is one entry with via state_api, the event's id, reason and time."""
        for version, quoted in (("v3", False), ("v3", True), ("r0", False), ("r0", True)):
            room_id, (alice, bob) = self.joined_room(2)
            event_id = self.state_leave(bob, room_id, version, quoted)
            entry = self.one_entry(bob, room_id, "leave")
            self.assertEqual(entry["via"], self_route("state_api"), (version, quoted))
            self.assertEqual(entry["event_id"], event_id)
            self.assertEqual(entry["reason"], "by state")
            self.assertEqual(entry["outcome"], "ok")
            self.assertNotIn("actor", entry)
            self.assertIsInstance(entry["event_ts"], int)

    def test_state_api_rejects_invite(self) -> None:
        """Rejecting an invite through the state API is a leave entry too."""
        alice, bob = self.user("alice"), self.user("bob")
        room_id = self.hs.create_room(alice)
        self.native(
            alice, "POST", f"{V3}/rooms/{quote_room(room_id)}/invite", {"user_id": bob.user_id}
        )
        event_id = self.state_leave(bob, room_id)
        entry = self.one_entry(bob, room_id, "leave")
        self.assertEqual((entry["via"], entry["event_id"]), (self_route("state_api"), event_id))

    def test_self_kick_post_and_put(self) -> None:
        """Kicking oneself (POST /kick, PUT /kick/{txnId}): a leave entry, via kick, no actor."""
        for method in ("POST", "PUT"):
            room_id, (alice, bob) = self.joined_room(2)
            path = f"{V3}/rooms/{quote_room(room_id)}/kick"
            if method == "PUT":
                path += f"/txn{os.urandom(3).hex()}"
            self.native(bob, method, path, {"user_id": bob.user_id, "reason": "self"})
            entry = self.one_entry(bob, room_id, "leave")
            self.assertEqual(entry["via"], self_route("kick"), method)
            self.assertNotIn("actor", entry)
            self.assertEqual(entry["reason"], "self")

    def test_kick_and_ban_by_another_member(self) -> None:
        """A kick and a ban of a local user by another member name that member as actor."""
        room_id, (alice, bob, carol) = self.joined_room(3)
        self.native(
            alice,
            "POST",
            f"{V3}/rooms/{quote_room(room_id)}/kick",
            {"user_id": bob.user_id, "reason": "k"},
        )
        self.native(
            alice,
            "POST",
            f"{V3}/rooms/{quote_room(room_id)}/ban",
            {"user_id": carol.user_id, "reason": "b"},
        )
        kick = self.one_entry(bob, room_id, "leave")
        ban = self.one_entry(carol, room_id, "leave")
        self.assertEqual((kick["via"], kick["actor"], kick["reason"]), ("kick", alice.user_id, "k"))
        self.assertEqual((ban["via"], ban["actor"], ban["reason"]), ("ban", alice.user_id, "b"))
        self.assertEqual(kick["event_id"], self.current_event_id(room_id, bob))

    def test_native_leave_knock_rescission_and_forget(self) -> None:
        """Synapse's own /leave (rescinding a knock) and /forget on a listener the module
        does not serve are recorded (via client), the forget with retention state."""
        alice, bob = self.user("alice"), self.user("bob")
        room_id = self.hs.create_room(
            alice,
            room_version="10",
            initial_state=[
                {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}
            ],
        )
        self.native(bob, "POST", f"{V3}/knock/{quote_room(room_id)}", {"reason": "let me in"})
        self.native(
            bob, "POST", f"{V3}/rooms/{quote_room(room_id)}/leave", {"reason": "never mind"}
        )
        leave = self.one_entry(bob, room_id, "leave")
        self.assertEqual((leave["via"], leave["reason"]), ("client", "never mind"))
        self.leave(alice, room_id)
        self.native(bob, "POST", f"{V3}/rooms/{quote_room(room_id)}/forget")
        self.native(alice, "POST", f"{V3}/rooms/{quote_room(room_id)}/forget")
        for user in (alice, bob):
            forget = self.one_entry(user, room_id, "forget")
            self.assertEqual(forget["via"], "client")
        self.assertEqual(self.state(room_id), "forgotten")

    def test_module_leave_recorded_once(self) -> None:
        """A leave served by the module is one entry (via api, with the device),
        not also recorded from Synapse's event notification."""
        room_id, (alice, bob) = self.joined_room(2)
        self.leave(bob, room_id, reason="bye")
        event_id = self.current_event_id(room_id, bob)
        # A later departure in the same room, seen only through notifications:
        # once it is logged, bob's would have been too.
        self.native(alice, "POST", f"{V3}/rooms/{quote_room(room_id)}/leave")
        self.one_entry(alice, room_id, "leave")
        entry = self.one_entry(bob, room_id, "leave")
        self.assertEqual((entry["via"], entry["event_id"]), ("api", event_id))
        self.assertEqual(entry["device_id"], bob.device_id)

    def test_module_leave_commits_with_its_event(self) -> None:
        """A leave served by the module (alone: no other leave in flight) is
        written in the transaction that persists its event, with no record
        transaction of its own, on both engines."""
        room_id, (_alice, bob) = self.joined_room(2)
        before = self.transaction_counts()
        self.leave(bob, room_id, reason="with its event")
        after = self.transaction_counts()
        entry = self.one_entry(bob, room_id, "leave")
        self.assertEqual(
            (entry["via"], entry["device_id"], entry["reason"]),
            ("api", bob.device_id, "with its event"),
        )
        self.assertEqual(entry["event_id"], self.current_event_id(room_id, bob))
        records = after.get("leave_forget_record", 0) - before.get("leave_forget_record", 0)
        self.assertGreaterEqual(after["persist_events"] - before["persist_events"], 1)
        self.assertEqual(records, 0)

    def transaction_counts(self) -> dict[str, float]:
        """Synapse's count of transactions per description, from its metrics."""
        counts: dict[str, float] = {}
        for desc, value in _TRANSACTIONS.findall(self.hs.metrics()):
            counts[desc] = counts.get(desc, 0.0) + float(value)
        return counts


class AccountAndAdminRouteTests(RouteHelpers):
    """Deactivation and admin room deletion: every room left and forgotten, each an entry."""

    def deactivate_self(self, user: User) -> None:
        localpart = user.user_id[1:].split(":")[0]
        self.native(
            user,
            "POST",
            f"{V3}/account/deactivate",
            {
                "auth": {
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": localpart},
                    "password": "pw-" + localpart,
                }
            },
        )

    def wait_parted(self, user: User) -> None:
        """Until Synapse's background parting of a deactivated user is over."""

        def parted() -> bool:
            return not rawdb.query(
                self.hs,
                "SELECT 1 FROM users_pending_deactivation WHERE user_id = ?",
                (user.user_id,),
            )

        wait_until(parted, what=f"{user.user_id} to be parted from its rooms")

    def assert_departed_everywhere(
        self, user: User, rooms: list[str], via: str, actor: str | None
    ) -> None:
        for room_id in rooms:
            leave = self.one_entry(user, room_id, "leave")
            self.assertEqual(leave["via"], via, room_id)
            self.assertEqual(leave.get("actor"), actor, room_id)
            # Whatever Synapse forgot has its entry, in the same transaction.
            if self.forgotten_in_synapse(user, room_id):
                forget = self.one_entry(user, room_id, "forget")
                self.assertEqual((forget["via"], forget.get("actor")), (via, actor))
            else:
                self.assertEqual(self.entries(user, room_id, "forget"), [])

    def test_self_deactivation(self) -> None:
        """POST /account/deactivate: each room left (and the invite rejected) is an entry
        with via deactivation; each room Synapse forgets too, with retention state."""
        bob = self.user("bob")
        alone = self.hs.create_room(bob)
        alice_room, _ = self.joined_room(1)
        self.join(bob, alice_room)
        inviter = self.user("inviter")
        invited = self.hs.create_room(inviter)
        self.native(
            inviter, "POST", f"{V3}/rooms/{quote_room(invited)}/invite", {"user_id": bob.user_id}
        )
        self.deactivate_self(bob)
        self.wait_parted(bob)
        self.assert_departed_everywhere(bob, [alone, alice_room, invited], "deactivation", None)
        if self.forgotten_in_synapse(bob, alone):
            # Newer Synapse forgets on deactivation: bob was alone, the room is forgotten by all.
            self.wait_state(alone, "forgotten")

    def test_admin_deactivation_names_the_admin(self) -> None:
        """The admin API's deactivation: entries name the admin as actor."""
        bob = self.user("bob")
        room_id, _ = self.joined_room(1)
        self.join(bob, room_id)
        self.native(
            self.admin,
            "POST",
            f"/_synapse/admin/v1/deactivate/{urllib.parse.quote(bob.user_id)}",
            {},
        )
        self.wait_parted(bob)
        self.assert_departed_everywhere(bob, [room_id], "deactivation", self.admin.user_id)

    def test_admin_room_delete_v1_and_v2(self) -> None:
        """DELETE /_synapse/admin/v1/rooms/{roomId} and v2: every local member's leave and
        forget is an entry with via admin_room_delete and the admin as actor."""
        for version in ("v1", "v2"):
            room_id, users = self.joined_room(2)
            self.native(
                self.admin, "DELETE", f"/_synapse/admin/{version}/rooms/{quote_room(room_id)}", {}
            )
            for user in users:
                leave = self.one_entry(user, room_id, "leave")
                self.assertEqual(
                    (leave["via"], leave["actor"]), ("admin_room_delete", self.admin.user_id)
                )
                forget = self.one_entry(user, room_id, "forget")
                self.assertEqual(
                    (forget["via"], forget["actor"]), ("admin_room_delete", self.admin.user_id)
                )


class ForgetOnLeaveTests(RouteHelpers):
    """Synapse's own forget_rooms_on_leave: its forgets are entries and move retention."""

    EXTRA_CONFIG = {"forget_rooms_on_leave": True}

    def test_automatic_forget_is_recorded(self) -> None:
        """Each leave is followed by Synapse's automatic forget, recorded with via
        forget_on_leave; the room forgotten by all this way gets its retention row;
        the module says so at start-up."""
        room_id, users = self.joined_room(2)
        for user in users:
            self.leave(user, room_id)
        for user in users:
            entry = self.one_entry(user, room_id, "forget")
            self.assertEqual(entry["via"], "forget_on_leave")
        self.wait_state(room_id, "forgotten")
        self.assertIn("forget_rooms_on_leave is on", self.hs.log_text())


class LifecycleTests(RouteHelpers):
    """Retention state follows the room's whole life."""

    def test_purged_room_known_again_is_due_again(self) -> None:
        """A room the module recorded as purged, that Synapse knows again (a federated
        room rejoined after the purge), is forgotten by all again → due again.

        Purging then rejoining needs a second homeserver; the module's decision
        depends only on its own row and Synapse's memberships, so the row is
        set to ``purged`` directly, as a purge would have left it."""
        room_id, (alice, bob) = self.joined_room(2)
        self.leave_and_forget([alice], room_id)
        rawdb.query(
            self.hs,
            "INSERT INTO leave_forget_rooms (room_id, state, forgotten_at, purged_at, updated_at) "
            "VALUES (?, 'purged', 1, 2, 2)",
            (room_id,),
        )
        self.leave_and_forget([bob], room_id)
        retention = self.wait_state(room_id, "forgotten")
        self.assertIsNone(retention["purged_at"])
        self.assertIsNotNone(retention["purge_due_at"])


class FederatedLifecycleTests(FederatedPair, RouteHelpers):
    """Two federating homeservers: a room purged here lives on at the remote."""

    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {"period": "2s", "sweep_interval": "100ms"},
    }

    def test_purged_rejoined_forgotten_again_is_purged_again(self) -> None:
        """A federated room purged by retention, rejoined on a re-invite from the
        remote, then left and forgotten again is due again and purged again."""
        alice = self.user("alice")
        room_id = self.remote.create_room(self.rita)
        for _ in range(2):
            resp = self.remote.membership(self.rita, room_id, "invite", {"user_id": alice.user_id})
            self.assertEqual(resp.status, 200, resp.body)
            wait_until(
                lambda: room_id in _invited_rooms(self.hs, alice), what="the invite to arrive"
            )
            via = quote_room(self.remote.server_name)
            self.native(alice, "POST", f"{V3}/join/{quote_room(room_id)}?server_name={via}")
            since = now_ms()
            self.leave_and_forget([alice], room_id)
            # Not state == "forgotten": the 2 s period can run out on a loaded
            # machine before this reads it. The forget's own record shows it
            # armed the purge again (after the previous purge's forget).
            self.assert_forgotten_by_all(room_id, since)
            self.wait_state(room_id, "purged")
            self.assertGreaterEqual(self.retention(room_id)["purged_at"], since)
        self.assertEqual(
            [e["outcome"] for e in self.audit(room_id=room_id) if e["action"] == "purge"],
            ["started", "purged", "started", "purged"],
        )


class ForgetParityTests(RouteHelpers):
    """The module's forget does what Synapse's does, in one transaction with its entry."""

    def test_forget_rows_mirror_synapse(self) -> None:
        """Synapse's forget transaction writes the tables and invalidates the caches
        that _synapse.forget.forget_rows_txn writes and invalidates (this Synapse's version)."""
        from synapse.storage.databases.main.roommember import RoomMemberWorkerStore

        from matrix_leave_forget._synapse import forget

        theirs = inspect.getsource(RoomMemberWorkerStore.forget)
        ours = inspect.getsource(forget.forget_rows_txn)
        tables = set(re.findall(r'table="(\w+)"', theirs))
        caches = set(re.findall(r"self\.(\w+),\s*\(", theirs))
        self.assertTrue(tables and caches, theirs)
        for table in tables:
            self.assertRegex(ours, rf"UPDATE {table} SET forgotten = 1\b")
        for cache in caches:
            self.assertTrue(f"store.{cache}" in ours or cache.startswith("get_sliding_sync"), cache)

    def test_module_forget_matches_native(self) -> None:
        """Same rows as Synapse's own forget (checked against a Synapse without the
        module), and the same caches invalidated: a departed user's /messages
        (did_forget) and /sync's left rooms (get_forgotten_rooms_for_user), both
        read (and cached) before the forget, are refused and empty right after;
        on PostgreSQL the same rows in the cache invalidation stream other
        workers follow (cache, keys, instance)."""
        oracle = SynapseProcess(None, database=self.hs.database)
        try:
            oracle.start()
            results = []
            for hs, forget in ((oracle, "native"), (self.hs, "module")):
                alice = hs.register(f"alice{os.urandom(3).hex()}")
                room_id = hs.create_room(alice)
                path = f"{V3}/rooms/{quote_room(room_id)}"
                token = alice.access_token
                self.assertEqual(hs.client("POST", f"{path}/leave", {}, token=token).status, 200)
                self.assertIn(room_id, _left_rooms(hs, alice))
                messages = hs.client("GET", f"{path}/messages?dir=b&limit=1", token=token)
                self.assertEqual(messages.status, 200, messages.body)
                streamed = _cache_stream_position(hs)
                if forget == "native":
                    resp = hs.client("POST", f"{path}/forget", {}, token=token)
                else:
                    resp = self.via_module("POST", room_id, "forget", {}, token=token)
                self.assertEqual(resp.status, 200, resp.body)
                invalidations = _forget_invalidations(hs, streamed, alice.user_id, room_id)
                self.assertNotIn(room_id, _left_rooms(hs, alice), forget)
                messages = hs.client("GET", f"{path}/messages?dir=b&limit=1", token=token)
                self.assertEqual(messages.status, 403, (forget, messages.body))
                rows = rawdb.query(
                    hs,
                    "SELECT membership, forgotten FROM room_memberships "
                    "WHERE user_id = ? AND room_id = ? ORDER BY membership",
                    (alice.user_id, room_id),
                )
                results.append((rows, _snapshot_rows(hs, alice.user_id, room_id), invalidations))
            self.assertEqual(results[0], results[1])
            self.assertTrue(all(r[1] == 1 for r in results[1][0]), results)
            if self.hs.database == "postgres":
                # Both sides streamed at least these (newer Synapses add sliding sync's).
                caches = {cache for _, cache, _ in results[1][2]}
                self.assertLessEqual({"did_forget", "get_forgotten_rooms_for_user"}, caches)
        finally:
            oracle.cleanup()

    def test_concurrent_forgets_do_what_each_does_alone(self) -> None:
        """Forgets sent at the same moment (run together, set-based, in shared
        transactions) do exactly what each does alone: the last two members of a
        room forgetting together leave it forgotten by all; a member still joined
        is refused with nothing written; every other forget is done in Synapse
        with one ``ok`` entry, its caches invalidated at once (a /messages read
        and cached before is refused right after), and rooms other members still
        have are not marked."""
        shared, (alice, bob) = self.joined_room(2)
        singles = [self.joined_room(2) for _ in range(8)]
        kept, (_, dave) = self.joined_room(2)
        forgets = [(alice, shared), (bob, shared)] + [(users[1], room) for room, users in singles]
        for user, room_id in forgets:
            self.leave(user, room_id)
            path = f"{V3}/rooms/{quote_room(room_id)}/messages?dir=b&limit=1"
            self.assertEqual(self.hs.client("GET", path, token=user.access_token).status, 200)
        since = now_ms()
        calls = forgets + [(dave, kept)]
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(
                pool.map(
                    lambda c: self.via_module("POST", c[1], "forget", {}, token=c[0].access_token),
                    calls,
                )
            )
        self.assertEqual([a.status for a in answers], [200] * len(forgets) + [400])
        for user, room_id in forgets:
            self.assertTrue(self.forgotten_in_synapse(user, room_id), (user.user_id, room_id))
            self.assertEqual([e["outcome"] for e in self.entries(user, room_id, "forget")], ["ok"])
            path = f"{V3}/rooms/{quote_room(room_id)}/messages?dir=b&limit=1"
            self.assertEqual(self.hs.client("GET", path, token=user.access_token).status, 403)
        self.assertFalse(self.forgotten_in_synapse(dave, kept))
        self.assertEqual([e["outcome"] for e in self.entries(dave, kept, "forget")], ["M_UNKNOWN"])
        self.assert_forgotten_by_all(shared, since)
        for room_id, _ in singles:
            self.assertIsNone(self.retention(room_id), room_id)
        self.assertIsNone(self.retention(kept))

    def test_refused_forget_writes_nothing(self) -> None:
        """Forgetting a room one is still in: 400 as Synapse, the membership untouched."""
        room_id, (alice,) = self.joined_room(1)
        resp = self.via_module("POST", room_id, "forget", {}, token=alice.access_token)
        self.assertEqual((resp.status, resp.errcode), (400, "M_UNKNOWN"))
        self.assertFalse(self.forgotten_in_synapse(alice, room_id))
        self.assertEqual(
            [e["outcome"] for e in self.entries(alice, room_id, "forget")], ["M_UNKNOWN"]
        )


def _invited_rooms(hs: Any, user: User) -> dict[str, Any]:
    sync_filter = {"account_data": {"not_types": [os.urandom(4).hex()]}}
    resp = hs.client(
        "GET",
        f"{V3}/sync?timeout=0&filter=" + urllib.parse.quote(json.dumps(sync_filter)),
        token=user.access_token,
    )
    assert resp.status == 200, resp.body
    return dict(resp.body.get("rooms", {}).get("invite", {}))


def _left_rooms(hs: Any, user: User) -> dict[str, Any]:
    """The left rooms of an initial /sync with a filter never used before
    (Synapse caches a sync's response by its request)."""
    sync_filter = {
        "room": {"include_leave": True},
        "account_data": {"not_types": [os.urandom(4).hex()]},
    }
    resp = hs.client(
        "GET",
        f"{V3}/sync?timeout=0&filter=" + urllib.parse.quote(json.dumps(sync_filter)),
        token=user.access_token,
    )
    assert resp.status == 200, resp.body
    return dict(resp.body.get("rooms", {}).get("leave", {}))


def _cache_stream_position(hs: Any) -> int:
    """The newest row of Synapse's cache invalidation stream (PostgreSQL; 0 on SQLite)."""
    if hs.database != "postgres":
        return 0
    rows = rawdb.query(hs, "SELECT MAX(stream_id) FROM cache_invalidation_stream_by_instance")
    return int(rows[0][0] or 0)


def _forget_invalidations(
    hs: Any, after: int, user_id: str, room_id: str
) -> list[tuple[str, str, tuple[str, ...]]]:
    """(instance, cache, keys) of the stream rows after ``after`` about user_id's
    forget caches, ids written as placeholders, sorted (PostgreSQL; [] on SQLite)."""
    if hs.database != "postgres":
        return []
    rows = rawdb.query(
        hs,
        "SELECT instance_name, cache_func, keys FROM cache_invalidation_stream_by_instance "
        "WHERE stream_id > ? AND ? = ANY(keys)",
        (after, user_id),
    )
    names = {user_id: "USER", room_id: "ROOM"}
    return sorted(
        (str(instance), str(cache), tuple(names.get(k, k) for k in keys))
        for instance, cache, keys in rows
        if cache in _FORGET_CACHES
    )


# The caches Synapse's forget invalidates (the last one since sliding sync's tables).
_FORGET_CACHES = (
    "did_forget",
    "get_forgotten_rooms_for_user",
    "get_sliding_sync_rooms_for_user_from_membership_snapshots",
)


def _snapshot_rows(hs: Any, user_id: str, room_id: str) -> Any:
    """sliding_sync_membership_snapshots.forgotten where the table exists (newer Synapse)."""
    try:
        return rawdb.query(
            hs,
            "SELECT forgotten FROM sliding_sync_membership_snapshots "
            "WHERE user_id = ? AND room_id = ?",
            (user_id, room_id),
        )
    except Exception:
        return None
