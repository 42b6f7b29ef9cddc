"""The history guard (issue 9): after leave no later events, after forget no history.

One Synapse with the module (``mount: intercept``, ``history_guard`` on) per
class. The oracle for "what a user who was never in the room gets" is a
never-member on the same server (``carol``): a forgotten room must answer her
status, errcode and error (with the user id swapped). The oracle for "history
before the departure stays as native" is Synapse's own backward pagination,
which it already clamps at the departure.
"""

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

from tests.integration.guard_scenes import (
    BASE_CONFIG,
    INCLUDE_LEAVE,
    HistoryGuardTestCase,
    Scene,
    names,
    q,
)
from tests.support.harness import FAST_BACKGROUND_UPDATES, User, request, wait_until


class AfterLeaveTests(HistoryGuardTestCase):
    """After leave, kick or ban (not forgotten): nothing sent after the departure."""

    def test_messages_forward_stops_at_the_departure(self) -> None:
        """Forward /messages (no from, a pre-leave from) ends at the departure, as backward does."""
        for kind in ("leave", "kick", "ban"):
            with self.subTest(kind=kind):
                s = self.scene(kind)
                if kind == "ban":
                    self.assert_banned_reads_nothing(s)
                    continue
                backward = self.ok(self.messages(s.bob, s.room_id, "dir=b&limit=50"), "b").body
                # Synapse clamps backward paging at the departure: the native oracle.
                self.assertEqual(backward["chunk"][0]["event_id"], s.departure)
                forward = self.ok(self.messages(s.bob, s.room_id, "dir=f&limit=50"), "f").body
                self.assertEqual(self.ids(forward["chunk"]), self.ids(backward["chunk"])[::-1])
                self.assertNotIn("end", forward)
                query = f"dir=f&limit=50&from={q(s.pre_token)}"
                later = self.ok(self.messages(s.bob, s.room_id, query), "from").body
                self.assertEqual(self.ids(later["chunk"]), [s.departure])
                # alice, who stayed, still sees everything.
                alice = self.ok(self.messages(s.alice, s.room_id, "dir=f&limit=50"), "a").body
                self.assertIn(s.after, self.ids(alice["chunk"]))

    def assert_banned_reads_nothing(self, s: Scene) -> None:
        """Synapse refuses /messages to a banned user outright, in both directions."""
        for query in ("dir=b", "dir=f", f"dir=f&from={q(s.pre_token)}"):
            mine = self.messages(s.bob, s.room_id, query)
            never = self.messages(self.carol, s.room_id, query)
            self.assertEqual((mine.status, mine.errcode), (never.status, never.errcode), query)

    def test_context_event_relations_threads_hide_later_events(self) -> None:
        """/context around an earlier event, /event, /relations, /threads: no later event."""
        s = self.scene("kick")
        later = {s.after, s.reply_after}
        ctx = self.ok(self.get(s.bob, self.room_path(s.room_id, f"context/{q(s.before)}")), "c")
        after_ids = self.ids(ctx.body["events_after"])
        self.assertIn(s.reply_before, after_ids)
        self.assertFalse(later & set(after_ids) | later & set(self.ids(ctx.body["state"])))
        self.assertNotIn(s.after, ctx.raw.decode())
        # A later event answers as to a never-member (and as Synapse does here).
        for tail in (f"event/{q(s.after)}", f"context/{q(s.after)}"):
            mine = self.get(s.bob, self.room_path(s.room_id, tail))
            never = self.get(self.carol, self.room_path(s.room_id, tail))
            self.assertEqual((mine.status, mine.errcode), (never.status, never.errcode), tail)
        event = self.ok(self.get(s.bob, self.room_path(s.room_id, f"event/{q(s.before)}")), "e")
        self.assertEqual(event.body["event_id"], s.before)
        self.assertNotIn(s.reply_after, event.raw.decode())
        for name in ("relations", "relations thread"):
            rel = self.ok(self.get(s.bob, self.read_paths(s)[name]), name).body
            self.assertEqual(self.ids(rel["chunk"]), [s.reply_before], name)
        threads = self.ok(self.get(s.bob, self.read_paths(s)["threads"]), "threads")
        self.assertEqual(self.ids(threads.body["chunk"]), [s.before])
        self.assertNotIn(s.reply_after, threads.raw.decode())
        # Before the guard, the thread summary named the later reply: alice still sees it.
        alice_threads = self.get(s.alice, self.read_paths(s)["threads"])
        self.assertIn(s.reply_after, alice_threads.raw.decode())

    def test_rejoin_restores_normal_access(self) -> None:
        """After a rejoin the user reads what Synapse lets a member read, later events too."""
        s = self.scene("leave")
        self.forget(s)
        self.ok(self.hs.membership(s.alice, s.room_id, "invite", {"user_id": s.bob.user_id}), "i")
        self.ok(self.hs.membership(s.bob, s.room_id, "join"), "rejoin")
        forward = self.ok(self.messages(s.bob, s.room_id, "dir=f&limit=50"), "f").body
        self.assertIn(s.after, self.ids(forward["chunk"]))
        self.ok(self.get(s.bob, self.read_paths(s)["context"]), "context")


class AfterForgetTests(HistoryGuardTestCase):
    """After forget: every read answers as to a user who was never in the room."""

    def assert_like_never_member(
        self, s: Scene, paths: dict[str, str], method: str = "GET"
    ) -> None:
        for name, path in paths.items():
            mine = self.hs.client(method, path, token=s.bob.access_token)
            never = self.hs.client(method, path, token=self.carol.access_token)
            self.assertEqual(mine.status, never.status, name)
            self.assertIn(mine.status, (403, 404), name)
            if method == "GET":
                self.assertEqual(mine.errcode, never.errcode, name)
                self.assertEqual(
                    mine.body["error"].replace(s.bob.user_id, "U"),
                    never.body["error"].replace(self.carol.user_id, "U"),
                    name,
                )

    def test_room_reads_answer_as_to_a_never_member(self) -> None:
        """/messages, /context, /event, /relations, /threads after leave/kick/ban + forget."""
        for kind in ("leave", "kick", "ban"):
            with self.subTest(kind=kind):
                s = self.scene(kind)
                # Before the forget the history is readable (so the check below can fail).
                self.ok(self.get(s.bob, self.read_paths(s)["context"]), "context")
                self.forget(s)
                self.assert_like_never_member(s, self.read_paths(s))

    def test_every_client_version_and_head(self) -> None:
        """api/v1, r0, unstable and percent-encoded ids are guarded too; HEAD as GET."""
        s = self.scene("leave")
        self.forget(s)
        room, before = s.room_id, q(s.before)
        paths = {
            f"{v} {tail}": f"/_matrix/client/{v}/rooms/{q(room)}/{tail}/{before}"
            for v in ("api/v1", "r0", "v3", "unstable")
            for tail in ("context", "event")
        }
        paths["raw !"] = f"/_matrix/client/v3/rooms/{room}/event/{before}"
        self.assert_like_never_member(s, paths)
        self.assert_like_never_member(s, {"HEAD event": paths["v3 event"]}, method="HEAD")

    def test_legacy_event_read_and_event_stream(self) -> None:
        """GET /events/{eventId} answers as to a never-member; /events keeps the departure only."""
        s = self.scene("leave")
        self.forget(s)
        paths = {
            f"{v} events": f"/_matrix/client/{v}/events/{q(s.before)}" for v in ("api/v1", "v3")
        }
        self.assert_like_never_member(s, paths)
        stream = self.get(s.bob, f"/_matrix/client/v3/events?timeout=0&from={q(s.stream_from)}")
        ids = self.ids([e for e in self.ok(stream, "events").body["chunk"] if "event_id" in e])
        self.assertEqual(ids, [s.departure])

    def test_world_readable_room_stays_readable(self) -> None:
        """A world_readable room's history is readable by anyone, so after forget too."""
        s = self.scene("leave", visibility="world_readable")
        self.forget(s)
        for name in ("context", "event"):
            path = self.read_paths(s)[name]
            mine, never = self.get(s.bob, path), self.get(self.carol, path)
            self.assertEqual((mine.status, never.status), (200, 200), name)

    def test_notifications_omit_the_room(self) -> None:
        """/notifications leaves out the forgotten room's notifications."""
        s = self.scene("leave")
        # alice mentions bob while he is in a second room, so not everything is hidden.
        other = self.hs.create_room(s.alice, preset="private_chat")
        self.ok(self.hs.membership(s.alice, other, "invite", {"user_id": s.bob.user_id}), "i")
        self.ok(self.hs.membership(s.bob, other, "join"), "join")
        kept = self.send(s.alice, other, "kept")
        path = "/_matrix/client/v3/notifications"
        before = self.ok(self.get(s.bob, path), "notifications").body["notifications"]
        self.assertIn(s.room_id, {n["room_id"] for n in before})
        self.forget(s)
        after = self.ok(self.get(s.bob, path), "notifications").body["notifications"]
        self.assertEqual({n["room_id"] for n in after}, {other})
        self.assertIn(kept, {n["event"]["event_id"] for n in after})

    def test_notification_pages_lead_past_the_forgotten_room(self) -> None:
        """Paging /notifications with next_token reaches every notification of the
        rooms the user still has, in order, and none of the forgotten room's, even
        when a whole page of Synapse's was the forgotten room's (the guard empties
        that page but keeps its next_token, so the client pages on)."""
        n = next(names)
        alice, bob = self.hs.register(f"alice{n}"), self.hs.register(f"bob{n}")
        kept_room = self.hs.create_room(alice, preset="private_chat")
        self.ok(self.hs.membership(alice, kept_room, "invite", {"user_id": bob.user_id}), "i")
        self.ok(self.hs.membership(bob, kept_room, "join"), "join")
        kept = [self.send(alice, kept_room, f"kept{n}x{i}") for i in range(3)]
        gone_room = self.hs.create_room(alice, preset="private_chat")
        self.ok(self.hs.membership(alice, gone_room, "invite", {"user_id": bob.user_id}), "i")
        self.ok(self.hs.membership(bob, gone_room, "join"), "join")
        gone = [self.send(alice, gone_room, f"gone{n}x{i}") for i in range(2)]
        path = "/_matrix/client/v3/notifications?limit=2"
        page = self.ok(self.get(bob, path), "notifications").body
        self.assertEqual([x["event"]["event_id"] for x in page["notifications"]], gone[::-1])
        self.ok(self.hs.membership(bob, gone_room, "leave"), "leave")
        self.ok(self.get(bob, self.room_path(gone_room, "forget"), "POST", {}), "forget")
        seen: list[dict[str, Any]] = []
        query = ""
        for _ in range(10):
            page = self.ok(self.get(bob, path + query), "notifications").body
            seen.extend(page["notifications"])
            if not page.get("next_token"):
                break
            query = f"&from={q(page['next_token'])}"
        self.assertEqual({x["room_id"] for x in seen}, {kept_room})
        messages = [x["event"]["event_id"] for x in seen if x["event"]["type"] == "m.room.message"]
        self.assertEqual(messages, kept[::-1])


class SyncTests(HistoryGuardTestCase):
    """/sync and sliding sync after forget, for this device and the user's others."""

    # Synapse's own default: the same /sync answered from its cache for 2 minutes.
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = {
        **BASE_CONFIG,
        **FAST_BACKGROUND_UPDATES,
    }

    def sync(self, user: User, since: str | None = None, include_leave: bool = False) -> Any:
        query = "timeout=0" + (f"&since={q(since)}" if since else "")
        query += f"&filter={INCLUDE_LEAVE}" if include_leave else ""
        return self.ok(self.get(user, f"/_matrix/client/v3/sync?{query}"), "sync").body

    def assert_departure_only(self, s: Scene, entry: dict[str, Any]) -> None:
        timeline = entry["timeline"]
        self.assertEqual(self.ids(timeline["events"]), [s.departure])
        self.assertTrue(timeline["limited"])
        self.assertIn("prev_batch", timeline)
        self.assertEqual(entry["state"], {"events": []})
        self.assertEqual(entry.get("account_data", {"events": []}), {"events": []})

    def test_offline_device_gets_only_the_departure(self) -> None:
        """A device that synced before leave+forget gets the room with its departure only."""
        for kind in ("leave", "kick", "ban"):
            for include_leave in (False, True):
                with self.subTest(kind=kind, include_leave=include_leave):
                    s = self.scene(kind)
                    self.forget(s)
                    body = self.sync(s.bob_other, s.since, include_leave)
                    self.assert_departure_only(s, body["rooms"]["leave"][s.room_id])
                    self.assertNotIn(s.before, json.dumps(body))

    def test_left_room_in_sync_tells_nothing_later(self) -> None:
        """A left room in /sync (incremental, initial with include_leave) ends at the
        departure, and its thread root no longer bundles the later reply."""
        for kind in ("leave", "kick"):
            with self.subTest(kind=kind):
                s = self.scene(kind)
                for body in (
                    self.sync(s.bob_other, s.since),
                    self.sync(s.bob, include_leave=True),
                ):
                    entry = body["rooms"]["leave"][s.room_id]
                    self.assertEqual(entry["timeline"]["events"][-1]["event_id"], s.departure)
                    self.assertIn(s.before, self.ids(entry["timeline"]["events"]))
                    self.assertNotIn(s.reply_after, json.dumps(body))
                    self.assertNotIn(s.after, json.dumps(body))

    def test_long_poll_with_a_forgotten_room(self) -> None:
        """A long-polling /sync of a user with a forgotten room wakes on a new event and
        carries it, without the forgotten room."""
        s = self.scene("leave")
        self.forget(s)
        other = self.hs.create_room(s.alice, preset="private_chat")
        self.ok(self.hs.membership(s.alice, other, "invite", {"user_id": s.bob.user_id}), "i")
        self.ok(self.hs.membership(s.bob, other, "join"), "join")
        since = self.sync(s.bob)["next_batch"]
        with ThreadPoolExecutor(1) as pool:
            path = f"/_matrix/client/v3/sync?timeout=20000&since={q(since)}"
            polling = pool.submit(self.get, s.bob, path)
            woke = self.send(s.alice, other, "wake")
            body = self.ok(polling.result(timeout=30), "long poll").body
        self.assertIn(woke, self.ids(body["rooms"]["join"][other]["timeline"]["events"]))
        self.assertNotIn(s.room_id, json.dumps(body))

    def test_prev_batch_of_the_stub_is_refused(self) -> None:
        """Paginating back from the stub's prev_batch answers as to a never-member."""
        s = self.scene("leave")
        self.forget(s)
        prev = self.sync(s.bob_other, s.since)["rooms"]["leave"][s.room_id]["timeline"]
        query = f"dir=b&from={q(prev['prev_batch'])}"
        mine = self.messages(s.bob_other, s.room_id, query)
        never = self.messages(self.carol, s.room_id, query)
        self.assertEqual((mine.status, mine.errcode), (never.status, never.errcode))
        self.assertEqual(mine.status, 403)

    def test_device_that_saw_the_departure_gets_nothing_more(self) -> None:
        """A sync from after the departure, or an initial sync, no longer lists the room."""
        s = self.scene("leave")
        since = self.sync(s.bob_other, s.since)["next_batch"]
        self.forget(s)
        for body in (
            self.sync(s.bob_other, since, include_leave=True),
            self.sync(s.bob_other, include_leave=True),
        ):
            self.assertNotIn(s.room_id, json.dumps(body))

    def test_forget_takes_effect_at_once_despite_the_response_cache(self) -> None:
        """The same /sync within Synapse's 2-minute cache window reflects the forget."""
        s = self.scene("leave")
        path = f"/_matrix/client/v3/sync?timeout=0&since={q(s.since)}"
        first = self.ok(self.get(s.bob_other, path), "sync")
        self.assertIn(s.before, first.raw.decode())
        self.forget(s)
        again = self.ok(self.get(s.bob_other, path), "sync again")
        # Synapse answered from its cache (same next_batch), the guard sanitised it.
        self.assertEqual(again.body["next_batch"], first.body["next_batch"])
        self.assert_departure_only(s, again.body["rooms"]["leave"][s.room_id])

    def test_sliding_sync_from_an_old_pos(self) -> None:
        """Sliding sync from a pos before leave+forget: the departure only; fresh: no room."""
        admin = self.hs.register(f"admin{next(names)}", admin=True)
        if self.sliding_sync(admin).status == 404:
            self.skipTest("this Synapse has no simplified sliding sync (added in 1.114)")
        wait_until(
            lambda: (
                not self.get(admin, "/_synapse/admin/v1/background_updates/status").body[
                    "current_updates"
                ]
            ),
            timeout=60,
            what="Synapse's background updates (sliding sync tables)",
        )
        s = self.scene("leave", sliding=True)
        self.forget(s)
        body = self.ok(self.sliding_sync(s.bob_other, s.pos), "sliding sync from pos").body
        room = body["rooms"][s.room_id]
        self.assertEqual(self.ids(room["timeline"]), [s.departure])
        self.assertTrue(room["limited"])
        self.assertEqual(self.ids(room.get("required_state", [])), [s.departure])
        self.assertNotIn(s.before, json.dumps(body))
        fresh = self.ok(self.sliding_sync(s.bob), "fresh sliding sync").body
        self.assertNotIn(s.room_id, json.dumps(fresh))
        # Left, not forgotten: the room up to the departure, no later thread reply.
        left = self.scene("leave", sliding=True)
        body = self.ok(self.sliding_sync(left.bob_other, left.pos), "left room").body
        timeline = self.ids(body["rooms"][left.room_id]["timeline"])
        self.assertEqual(timeline[-1], left.departure)
        self.assertIn(left.before, timeline)
        self.assertNotIn(left.reply_after, json.dumps(body))

    def test_never_left_user_sees_synapse_answers(self) -> None:
        """alice (never left) gets Synapse's answers: held back, changed in nothing."""
        s = self.scene("leave")
        self.forget(s)
        body = self.sync(s.alice, s.since)
        self.assertIn(s.after, json.dumps(body))
        self.assertEqual(
            body["rooms"]["join"][s.room_id]["timeline"]["events"][-1]["event_id"], s.reply_after
        )


class GzipTests(HistoryGuardTestCase):
    """On a listener with ``compress: true`` the guarded answers are still gzip'd and right."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        listeners = cls.hs.homeserver_config()["listeners"]
        if not listeners[0]["resources"][0].get("compress"):
            listeners[0]["resources"][0]["compress"] = True
            cls.hs.stop()
            cls.hs.reconfigure(extra_config={**BASE_CONFIG, "listeners": listeners})
            cls.hs.start()

    def test_gzip_answers(self) -> None:
        """A sanitised answer and an untouched one, both gzip'd with a right length."""
        s = self.scene("leave")
        self.forget(s)
        headers = {"Accept-Encoding": "gzip"}
        path = self.read_paths(s)["context"]
        mine = request(self.hs.client_port, "GET", path, token=s.bob.access_token, headers=headers)
        self.assertEqual(mine.headers.get("content-encoding"), "gzip")
        body = json.loads(gzip.decompress(mine.raw))
        self.assertEqual((mine.status, body["errcode"]), (403, "M_FORBIDDEN"))
        alice = request(
            self.hs.client_port, "GET", path, token=s.alice.access_token, headers=headers
        )
        self.assertEqual(json.loads(gzip.decompress(alice.raw))["event"]["event_id"], s.before)


class GuardOffTests(HistoryGuardTestCase):
    """``history_guard: false`` leaves every read to Synapse, leaks included."""

    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"history_guard": False}

    def test_synapse_behaviour_is_kept(self) -> None:
        """/context after forget answers 200, forward /messages passes the leave and
        /notifications keeps the forgotten room's notifications, as natively."""
        s = self.scene("leave")
        forward = self.ok(self.messages(s.bob, s.room_id, "dir=f&limit=50"), "f").body
        self.assertIn(s.after, self.ids(forward["chunk"]))
        path = "/_matrix/client/v3/notifications"
        before = self.ok(self.get(s.bob, path), "notifications").body["notifications"]
        self.assertIn(s.room_id, {x["room_id"] for x in before})
        self.forget(s)
        self.ok(self.get(s.bob, self.read_paths(s)["context"]), "context after forget")
        after = self.ok(self.get(s.bob, path), "notifications").body["notifications"]
        self.assertIn(s.room_id, {x["room_id"] for x in after})


class ListenerModeTests(HistoryGuardTestCase):
    """In ``mount: listener`` the guard cannot work: one WARNING says so at start-up."""

    MODE = "listener"

    def test_start_up_warning(self) -> None:
        """The log names history_guard and the reason."""
        wait_until(lambda: "history_guard cannot be kept" in self.hs.log_text(), what="warning")
        self.assertIn(
            "WARNING",
            [line for line in self.hs.log_text().splitlines() if "history_guard cannot" in line][0],
        )
