"""Real clients after leave and forget (issue 9): matrix-js-sdk, matrix-nio, mautrix.

The scenario of the spec's forget promise across devices: a user's device B
syncs and sees the room joined, then goes offline; meanwhile the owner sends
messages B never saw, and the user (device A) leaves and forgets the room. B
then resumes from its old sync token. B must end up showing the user as no
longer joined, and must receive none of the room's history: only the user's
own departure event. matrix-js-sdk runs its own sync loop (stopped and started
again on the same client and store, tests/integration/js/sync_device.mjs, in
Node); nio and mautrix make the /sync calls their applications make.

And the leave promise: a client whose user left cannot read events sent after
the departure, neither by paging forward from a token taken while joined nor
through its next /sync.

matrix-js-sdk is installed with npm, on demand, into a cache directory outside
the repository (``$XDG_CACHE_HOME`` or ``~/.cache``, ``matrix-leave-forget/js-<hash
of package.json>``); the js test is skipped, saying why, only if node or npm is
missing or the install fails.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Any, ClassVar

import nio
from mautrix.client import ClientAPI
from mautrix.types import PaginationDirection, RoomID, SyncToken, UserID

from tests.integration.base import SynapseTestCase, password, unique
from tests.integration.js_clients import (
    CLIENT_TIMEOUT,
    JS_SCRIPT,
    LABEL,
    NodeReports,
    js_sdk_dir,
)
from tests.support.harness import User, quote_room


def label_of(event: dict[str, Any]) -> str | None:
    content = event.get("content") or {}
    return content.get(LABEL) if isinstance(content, dict) else None


def membership_of(event: dict[str, Any]) -> tuple[str, str | None, str | None]:
    content = event.get("content") or {}
    return (event.get("type", ""), event.get("state_key"), content.get("membership"))


class HistoryClientTests(SynapseTestCase):
    """Real client libraries against the module (intercept mode, guard on)."""

    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}
    owner: ClassVar[User]

    def setUp(self) -> None:
        super().setUp()
        if "owner" not in type(self).__dict__:
            type(self).owner = self.hs.register(unique("owner"))

    # -- server side (the harness, as device A and the room's owner) ---------

    def joined_room(self) -> tuple[User, str]:
        """A new user joined to a new private room (shared history) of the owner."""
        user = self.hs.register(unique("hist"))
        room = self.hs.create_room(self.owner, preset="private_chat")
        self.ok(self.hs.membership(self.owner, room, "invite", {"user_id": user.user_id}))
        self.ok(self.hs.membership(user, room, "join"))
        return user, room

    def ok(self, resp: Any) -> Any:
        self.assertEqual(resp.status, 200, resp.body)
        return resp

    def say(self, room: str, label: str) -> str:
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote_room(room)}/send/m.room.message/{label}",
            {"msgtype": "m.text", "body": label, LABEL: label},
            token=self.owner.access_token,
        )
        return str(self.ok(resp).body["event_id"])

    def leave_and_forget(self, user: User, room: str, forget: bool = True) -> None:
        """Device A (the harness) leaves, and forgets, through the module."""
        self.ok(self.via_module("POST", room, "leave", {}, token=user.access_token))
        if forget:
            self.ok(self.via_module("POST", room, "forget", {}, token=user.access_token))

    def assert_departure_only(self, events: list[dict[str, Any]], user: User) -> None:
        """events (of the resumed device) are exactly the user's own leave event."""
        self.assertEqual(
            [membership_of(e) for e in events],
            [("m.room.member", user.user_id, "leave")],
            events,
        )

    # -- matrix-js-sdk -------------------------------------------------------

    def run_js_device(self, forget: bool) -> tuple[User, str, dict[str, Any], dict[str, Any]]:
        """js-sdk's loop sees the room joined, stops; the owner says offline-1 and
        offline-2, the user leaves (and forgets); the loop resumes. Returns the
        user, the room and the loop's two reports."""
        workdir = js_sdk_dir()
        user, room = self.joined_room()
        self.say(room, "seen-1")
        device_b = self.hs.login(user)
        env = dict(
            os.environ,
            HS_URL=f"http://127.0.0.1:{self.hs.client_port}",
            USER_ID=user.user_id,
            ACCESS_TOKEN=device_b.access_token,
            DEVICE_ID=device_b.device_id or "",
            ROOM_ID=room,
        )
        proc = subprocess.Popen(
            ["node", JS_SCRIPT],
            cwd=workdir,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        reports = NodeReports(proc)
        try:
            assert proc.stdin is not None
            joined = reports.next("joined")
            self.say(room, "offline-1")
            self.say(room, "offline-2")
            self.leave_and_forget(user, room, forget)
            self.say(room, "later-1")
            proc.stdin.write("resume\n")
            proc.stdin.flush()
            done = reports.next("done")
            proc.wait(CLIENT_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return user, room, joined, done

    def test_js_sdk_offline_device_resumes_after_leave_and_forget(self) -> None:
        """matrix-js-sdk's sync loop on device B, resumed from its old token after
        device A left and forgot: B shows the user as left, and all it received
        for the room is the departure event (none of offline-1/offline-2 it never
        saw, nothing later); its live timeline holds no event after seen-1 but
        the departure."""
        user, room, joined, done = self.run_js_device(forget=True)
        self.assertEqual(joined["membership"], "join")
        self.assertIn("seen-1", [e["label"] for e in joined["timeline"]])
        self.assertTrue(done["syncs"], done)
        self.assertIn("since=", done["syncs"][0], "the loop must resume from its old token")
        self.assertEqual(done["membership"], "leave", done)
        self.assertEqual(
            [(e["type"], e["state_key"], e["membership"]) for e in done["seen"]],
            [("m.room.member", user.user_id, "leave")],
            done["seen"],
        )
        labels = [e["label"] for e in done["timeline"] if e["label"]]
        self.assertNotIn("offline-1", labels)
        self.assertNotIn("offline-2", labels)
        self.assertNotIn("later-1", labels)

    def test_js_sdk_offline_device_resumes_after_leave(self) -> None:
        """The same after leave alone: B shows the user as left and receives the
        history from before the leave it missed (offline-1, offline-2: the spec
        keeps it readable), but nothing sent after the leave (later-1)."""
        user, room, _, done = self.run_js_device(forget=False)
        self.assertEqual(done["membership"], "leave", done)
        labels = [e["label"] for e in done["seen"] if e["label"]]
        self.assertEqual(labels, ["offline-1", "offline-2"], done["seen"])
        self.assertEqual(
            [(e["type"], e["state_key"], e["membership"]) for e in done["seen"]][-1],
            ("m.room.member", user.user_id, "leave"),
        )

    # -- matrix-nio ----------------------------------------------------------

    def test_nio_offline_device_after_leave_and_forget(self) -> None:
        """nio on device B: a full sync shows the room joined; after A leaves and
        forgets, B's next sync (from its stored next_batch) has the room in
        rooms.leave with the departure event alone and no state; a fresh initial
        sync with left rooms included does not list the room."""
        user, room = self.joined_room()
        self.say(room, "seen-1")

        async def body() -> None:
            client = nio.AsyncClient(f"http://127.0.0.1:{self.hs.client_port}", user.user_id)
            try:
                self.assertIsInstance(await client.login(password(user)), nio.LoginResponse)
                first = await client.sync(timeout=0, full_state=True)
                self.assertIsInstance(first, nio.SyncResponse, first)
                self.assertIn(room, first.rooms.join)
                self.say(room, "offline-1")
                self.leave_and_forget(user, room)
                self.say(room, "later-1")
                resumed = await client.sync(timeout=0)
                self.assertIsInstance(resumed, nio.SyncResponse, resumed)
                self.assertNotIn(room, resumed.rooms.join)
                self.assertIn(room, resumed.rooms.leave)
                left = resumed.rooms.leave[room]
                self.assert_departure_only([e.source for e in left.timeline.events], user)
                self.assertEqual(left.state, [])
                other = nio.AsyncClient(client.homeserver, user.user_id)
                other.restore_login(user.user_id, client.device_id, client.access_token)
                try:
                    fresh = await other.sync(
                        timeout=0, full_state=True, sync_filter={"room": {"include_leave": True}}
                    )
                finally:
                    await other.close()
                self.assertIsInstance(fresh, nio.SyncResponse, fresh)
                self.assertNotIn(room, fresh.rooms.leave)
                self.assertNotIn(room, fresh.rooms.join)
            finally:
                await client.close()

        asyncio.run(asyncio.wait_for(body(), CLIENT_TIMEOUT))

    def test_nio_left_user_cannot_page_to_later_events(self) -> None:
        """nio leaves through its own API (room_leave); the owner then says
        later-1. Paging forward from the token nio held while joined returns the
        history up to the leave and not later-1; nio's next sync neither."""
        user, room = self.joined_room()

        async def body() -> None:
            client = nio.AsyncClient(f"http://127.0.0.1:{self.hs.client_port}", user.user_id)
            try:
                self.assertIsInstance(await client.login(password(user)), nio.LoginResponse)
                self.assertIsInstance(await client.sync(timeout=0), nio.SyncResponse)
                token = client.next_batch
                self.say(room, "before-1")
                self.assertIsInstance(await client.room_leave(room), nio.RoomLeaveResponse)
                self.say(room, "later-1")
                page = await client.room_messages(
                    room, start=token, direction=nio.MessageDirection.front, limit=100
                )
                self.assertIsInstance(page, nio.RoomMessagesResponse, page)
                labels = [label_of(e.source) for e in page.chunk]
                self.assertIn("before-1", labels)
                self.assertNotIn("later-1", labels)
                resumed = await client.sync(timeout=0)
                self.assertIsInstance(resumed, nio.SyncResponse, resumed)
                events = [e.source for e in resumed.rooms.leave[room].timeline.events]
                self.assertNotIn("later-1", [label_of(e) for e in events])
                self.assertEqual(
                    membership_of(events[-1]), ("m.room.member", user.user_id, "leave")
                )
            finally:
                await client.close()

        asyncio.run(asyncio.wait_for(body(), CLIENT_TIMEOUT))

    # -- mautrix -------------------------------------------------------------

    def test_mautrix_offline_device_after_leave_and_forget(self) -> None:
        """mautrix on device B: after A leaves and forgets, B's /sync from its old
        token has the room in rooms.leave with the departure alone, limited, no
        state; paging back from that prev_batch is refused as /messages refuses
        a never-member (403 M_FORBIDDEN)."""
        user, room = self.joined_room()
        stranger = self.hs.register(unique("never"))

        async def body() -> None:
            client = ClientAPI(
                UserID(user.user_id), base_url=f"http://127.0.0.1:{self.hs.client_port}"
            )
            try:
                await client.login(password=password(user), store_access_token=True)
                first = await client.sync(timeout=0, full_state=True)
                self.assertIn(room, first["rooms"]["join"])
                since = SyncToken(first["next_batch"])
                self.say(room, "offline-1")
                self.leave_and_forget(user, room)
                resumed = await client.sync(since=since, timeout=0)
                left = resumed["rooms"]["leave"][room]
                self.assert_departure_only(left["timeline"]["events"], user)
                self.assertTrue(left["timeline"]["limited"])
                self.assertEqual(left.get("state", {}).get("events", []), [])
                prev = left["timeline"]["prev_batch"]
                ours = self.hs.client(
                    "GET",
                    f"/_matrix/client/v3/rooms/{quote_room(room)}/messages?dir=b&from={prev}",
                    token=client.api.token,
                )
                never = self.hs.client(
                    "GET",
                    f"/_matrix/client/v3/rooms/{quote_room(room)}/messages?dir=b",
                    token=stranger.access_token,
                )
                self.assertEqual((ours.status, ours.errcode), (never.status, never.errcode))
                self.assertEqual(ours.status, 403)
            finally:
                await client.api.session.close()

        asyncio.run(asyncio.wait_for(body(), CLIENT_TIMEOUT))

    def test_mautrix_left_user_cannot_page_to_later_events(self) -> None:
        """mautrix leaves through its own API (leave_room); the owner says later-1.
        get_messages forward from a token taken while joined stops at the leave."""
        user, room = self.joined_room()

        async def body() -> None:
            client = ClientAPI(
                UserID(user.user_id), base_url=f"http://127.0.0.1:{self.hs.client_port}"
            )
            try:
                await client.login(password=password(user), store_access_token=True)
                token = SyncToken((await client.sync(timeout=0))["next_batch"])
                self.say(room, "before-1")
                await client.leave_room(RoomID(room))
                self.say(room, "later-1")
                page = await client.get_messages(
                    RoomID(room), PaginationDirection.FORWARD, from_token=token, limit=100
                )
                labels = [getattr(e.content, "body", None) for e in page.events]
                self.assertIn("before-1", labels)
                self.assertNotIn("later-1", labels)
            finally:
                await client.api.session.close()

        asyncio.run(asyncio.wait_for(body(), CLIENT_TIMEOUT))
