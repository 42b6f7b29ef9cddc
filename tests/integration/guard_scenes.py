"""The history guard's test scenes: a room bob departed from, and the class that builds them.

Shared by the history guard's test modules (test_history_guard, test_history_adversarial).
"""

import itertools
import json
import urllib.parse
from typing import Any, ClassVar

import attr

from tests.integration.base import SynapseTestCase
from tests.support.harness import Response, User, quote_room

BASE_CONFIG: dict[str, Any] = {"bcrypt_rounds": 4}
SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
SLIDING_BODY = {
    "lists": {"all": {"ranges": [[0, 50]], "timeline_limit": 10, "required_state": [["*", "*"]]}}
}
INCLUDE_LEAVE = urllib.parse.quote(json.dumps({"room": {"include_leave": True}}))

names = itertools.count(1)


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


@attr.s(auto_attribs=True)
class Scene:
    """A room alice created, bob joined, and from which bob departed."""

    room_id: str
    alice: User
    bob: User
    bob_other: User  # bob's second device, which synced before anything happened
    since: str  # bob_other's /sync token from before the messages
    before: str  # a message sent while bob was joined (a thread root)
    reply_before: str  # a thread reply sent while bob was joined
    departure: str  # bob's leave, kick or ban event
    pre_token: str  # a /messages token taken while bob was joined
    pos: str | None = None  # bob_other's sliding-sync pos from before the messages
    stream_from: str = ""  # bob's legacy /events token from before the messages
    after: str = ""  # a message sent after bob departed
    reply_after: str = ""  # a thread reply sent after bob departed


class HistoryGuardTestCase(SynapseTestCase):
    """Shared scene building for the history guard tests."""

    MODULE_CONFIG: ClassVar[dict[str, Any]] = {}
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = BASE_CONFIG
    carol: ClassVar[User]

    def setUp(self) -> None:
        super().setUp()
        if "carol" not in type(self).__dict__:
            type(self).carol = self.hs.register(f"carol{next(names)}")

    def get(self, user: User, path: str, method: str = "GET", body: Any = None) -> Response:
        return self.hs.client(method, path, body, token=user.access_token)

    def ok(self, resp: Response, what: str) -> Response:
        if resp.status != 200:
            raise AssertionError(f"{what}: {resp.status} {resp.raw[:300]!r}")
        return resp

    def send(self, user: User, room_id: str, body: str, relates_to: str | None = None) -> str:
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if relates_to:
            content["m.relates_to"] = {"rel_type": "m.thread", "event_id": relates_to}
        path = f"/_matrix/client/v3/rooms/{quote_room(room_id)}/send/m.room.message/{body}"
        return str(self.ok(self.get(user, path, "PUT", content), f"send {body}").body["event_id"])

    def scene(
        self, kind: str = "leave", visibility: str = "shared", sliding: bool = False
    ) -> Scene:
        """alice's room; bob joins, reads, departs (leave/kick/ban); alice writes on."""
        n = next(names)
        alice = self.hs.register(f"alice{n}")
        bob = self.hs.register(f"bob{n}")
        bob_other = self.hs.login(bob)
        room_id = self.hs.create_room(
            alice,
            preset="private_chat",
            initial_state=[
                {
                    "type": "m.room.history_visibility",
                    "state_key": "",
                    "content": {"history_visibility": visibility},
                }
            ],
        )
        self.ok(self.hs.membership(alice, room_id, "invite", {"user_id": bob.user_id}), "invite")
        self.ok(self.hs.membership(bob, room_id, "join"), "join")
        since = self.ok(self.get(bob_other, "/_matrix/client/v3/sync?timeout=0"), "sync")
        pos = self.ok(self.sliding_sync(bob_other), "sliding").body["pos"] if sliding else None
        stream = self.ok(self.get(bob, "/_matrix/client/v3/events?timeout=0"), "events")
        before = self.send(alice, room_id, f"before{n}")
        reply_before = self.send(alice, room_id, f"replybefore{n}", relates_to=before)
        pre_token = self.ok(self.messages(bob, room_id, "dir=b&limit=1"), "messages").body["start"]
        if kind == "leave":
            self.ok(self.hs.membership(bob, room_id, "leave"), "leave")
        else:
            self.ok(self.hs.membership(alice, room_id, kind, {"user_id": bob.user_id}), kind)
        # The departure is the room's latest event at this point.
        latest = self.ok(self.messages(alice, room_id, "dir=b&limit=1"), "latest").body
        departure = latest["chunk"][0]["event_id"]
        scene = Scene(
            room_id,
            alice,
            bob,
            bob_other,
            since.body["next_batch"],
            before,
            reply_before,
            departure,
            pre_token,
            pos,
            stream.body["end"],
        )
        scene.after = self.send(alice, room_id, f"after{n}")
        scene.reply_after = self.send(alice, room_id, f"replyafter{n}", relates_to=before)
        return scene

    def room_path(self, room_id: str, tail: str, version: str = "v3") -> str:
        return f"/_matrix/client/{version}/rooms/{quote_room(room_id)}/{tail}"

    def messages(self, user: User, room_id: str, query: str) -> Response:
        return self.get(user, self.room_path(room_id, f"messages?{query}"))

    def forget(self, scene: Scene) -> None:
        self.ok(self.get(scene.bob, self.room_path(scene.room_id, "forget"), "POST", {}), "forget")

    def read_paths(self, scene: Scene) -> dict[str, str]:
        """Every guarded room read, as a client would issue it."""
        room, before = scene.room_id, q(scene.before)
        return {
            "messages f": self.room_path(room, "messages?dir=f&limit=50"),
            "messages b": self.room_path(room, "messages?dir=b&limit=50"),
            "context": self.room_path(room, f"context/{before}?limit=10"),
            "event": self.room_path(room, f"event/{before}"),
            "relations": self.room_path(room, f"relations/{before}", "v1"),
            "relations thread": self.room_path(room, f"relations/{before}/m.thread", "v1"),
            "threads": self.room_path(room, "threads", "v1"),
        }

    def ids(self, events: list[dict[str, Any]]) -> list[str]:
        return [e["event_id"] for e in events]

    def sliding_sync(self, user: User, pos: str | None = None) -> Response:
        query = "?timeout=0" + (f"&pos={q(pos)}" if pos else "")
        return self.get(user, SLIDING_SYNC + query, "POST", SLIDING_BODY)
