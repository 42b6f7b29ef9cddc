"""Rooms a user left, was kicked or banned from, forgot and rejoined, and the read paths.

Shared by tests/integration/test_history*.py. One
:class:`World` is one Synapse with one set of scenario rooms, built in four
phases so that every room has the same shape and the tokens taken between the
phases mean the same thing in every room:

1. ``owner`` creates the room (``private_chat``, the visibility under test),
   sends ``early``, invites ``member`` who joins. Then ``member``'s devices
   take their tokens: device A a ``/sync`` ``next_batch`` (``token_before``),
   device B a ``/sync`` ``next_batch`` (``since_before``, the device that goes
   offline) and a simplified sliding sync ``pos`` (``pos_before``). Then
   ``before-1`` (owner), ``before-2`` (member, who also sends a read receipt),
   a thread ``root`` with ``thread-before`` and a reaction ``react-before``.
2. ``member`` departs (leave, kick or ban); then ``after-1``, ``thread-after``
   (in the thread), ``react-after`` (on the root), a new topic ``topic-after``
   and ``after-2``.
3. In the ``forgotten*`` stages, ``member`` forgets the room.
4. In the ``*rejoined`` stages, ``member`` is unbanned if banned, invited again,
   joins, and the owner sends ``rejoin-1``.

Every event the test sends carries its label in ``content["mlf.label"]``;
other events are labelled ``type:state_key:membership``, with ``#n`` for the
n-th repeat. ``stranger`` never joins any room. The read paths are in
tests/integration/history_probes.py.
"""

from __future__ import annotations

import itertools
import json
import threading
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attr

from tests.support import rawdb
from tests.support.harness import (
    ListeningProcess,
    Response,
    SynapseProcess,
    User,
    quote_room,
    wait_until,
)

KINDS = ("leave", "kick", "ban")
VISIBILITIES = ("shared", "invited", "joined", "world_readable")
STAGES = ("left", "forgotten", "rejoined", "forgotten_rejoined")
LABEL = "mlf.label"
SEARCH_WORD = "mlfword"
BIG_LIMIT = 200  # more than any scenario room holds: one page answers everything
SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
SLIDING_BODY = {
    "conn_id": "mlf-initial",
    "lists": {
        "all": {
            "ranges": [[0, 499]],
            "timeline_limit": 50,
            "required_state": [["*", "*"]],
        }
    },
}
# The offline device's own sliding sync connection (a new connection would reset its pos).
SLIDING_OFFLINE_BODY = {**SLIDING_BODY, "conn_id": "mlf-offline"}
INCLUDE_LEAVE = {"room": {"include_leave": True}}
# A filter of the kind clients send: lazy-loaded members, a small timeline.
LAZY_FILTER = {
    "room": {
        "include_leave": True,
        "state": {"lazy_load_members": True},
        "timeline": {"limit": 5},
    }
}


_txn = itertools.count(1)


def c_path(path: str) -> str:
    return "/_matrix/client/v3" + path


def qs(**params: Any) -> str:
    return urllib.parse.urlencode(
        {k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()}
    )


@attr.s(auto_attribs=True)
class Member:
    """A user who departs from scenario rooms: device A, the offline device B, their tokens.

    Each stage has a member of its own, so that one stage's rooms do not
    change what another's /sync answers hold.
    """

    user: User
    device_b: User
    tokens: dict[str, str] = attr.Factory(dict)


@attr.s(auto_attribs=True)
class Room:
    """One scenario room, as built on one server."""

    kind: str
    visibility: str
    stage: str
    member: Member
    room_id: str = ""
    ids: dict[str, str] = attr.Factory(dict)  # label -> event id (labels the test sent)
    labels: dict[str, str] = attr.Factory(dict)  # event id -> label (every event)
    order: list[str] = attr.Factory(list)  # labels in timeline order
    departure: str = ""  # label of member's departure event
    after: tuple[str, ...] = ()  # labels of the events sent after the departure

    @property
    def key(self) -> str:
        return f"{self.kind}_{self.visibility}_{self.stage}"

    @property
    def forgotten_now(self) -> bool:
        return self.stage == "forgotten"

    @property
    def departed_now(self) -> bool:
        return self.stage in ("left", "forgotten")


def wait_for_background_updates(hs: SynapseProcess) -> None:
    """Wait until Synapse has run the background updates a fresh database starts with.

    Until they are done Synapse takes other code paths (simplified sliding sync
    its "fallback" room lists, which answer 500 to a ``pos`` from before a
    forget); a server in service has long finished them.
    """

    def pending() -> int:
        return int(rawdb.query(hs, "SELECT count(*) FROM background_updates")[0][0])

    wait_until(lambda: pending() == 0, timeout=120, what="Synapse's background updates")


class World:
    """One server's scenario rooms and users, and the read paths on them."""

    def __init__(
        self,
        hs: SynapseProcess,
        rooms: Sequence[tuple[str, str, str]],
        read_via: ListeningProcess | None = None,
    ) -> None:
        self.hs = hs
        # Where the reads go: the main process, or a worker of its deployment.
        self.reader = read_via or hs
        self.owner = hs.register("owner")
        self.members = {}
        for stage in sorted({s for _, _, s in rooms}):
            user = hs.register(stage.replace("_", ""))
            self.members[stage] = Member(user, hs.login(user))
        self.stranger = hs.register("stranger")
        self.rooms = [Room(k, v, s, self.members[s]) for k, v, s in rooms]
        self._memo: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    # -- building ---------------------------------------------------------

    def ok(self, resp: Response, what: str) -> Response:
        if resp.status != 200:
            raise RuntimeError(f"{what}: {resp.status} {resp.body}")
        return resp

    def send(self, user: User, room: Room, label: str, content: dict[str, Any]) -> str:
        content = {**content, LABEL: label}
        resp = self.hs.client(
            "PUT",
            c_path(
                f"/rooms/{quote_room(room.room_id)}/send/"
                f"{content.pop('_type', 'm.room.message')}/t{next(_txn)}"
            ),
            content,
            token=user.access_token,
        )
        room.ids[label] = self.ok(resp, f"send {label}").body["event_id"]
        return room.ids[label]

    def text(self, user: User, room: Room, label: str) -> str:
        return self.send(
            user,
            room,
            label,
            {
                "msgtype": "m.text",
                "body": f"{label} {SEARCH_WORD} member",
                "m.mentions": {"user_ids": [room.member.user.user_id]},
            },
        )

    def phase1(self, room: Room) -> None:
        hs, owner = self.hs, self.owner
        room.room_id = hs.create_room(
            owner,
            preset="private_chat",
            initial_state=[
                {
                    "type": "m.room.history_visibility",
                    "state_key": "",
                    "content": {"history_visibility": room.visibility},
                }
            ],
        )
        self.text(owner, room, "early")
        uid = room.member.user.user_id
        self.ok(hs.membership(owner, room.room_id, "invite", {"user_id": uid}), "invite")
        self.ok(hs.membership(room.member.user, room.room_id, "join"), "join")

    def phase1b(self, room: Room) -> None:
        hs, owner = self.hs, self.owner
        self.text(owner, room, "before-1")
        self.text(room.member.user, room, "before-2")
        root = self.text(owner, room, "root")
        self.send(
            owner,
            room,
            "thread-before",
            {
                "msgtype": "m.text",
                "body": f"thread-before {SEARCH_WORD}",
                "m.relates_to": {"rel_type": "m.thread", "event_id": root},
            },
        )
        self.send(
            owner,
            room,
            "react-before",
            {
                "_type": "m.reaction",
                "m.relates_to": {"rel_type": "m.annotation", "event_id": root, "key": "b"},
            },
        )
        self.ok(
            hs.client(
                "POST",
                c_path(f"/rooms/{quote_room(room.room_id)}/receipt/m.read/{room.ids['before-1']}"),
                {},
                token=room.member.user.access_token,
            ),
            "receipt",
        )

    def phase2(self, room: Room) -> None:
        hs, owner, uid = self.hs, self.owner, room.member.user.user_id
        if room.kind == "leave":
            self.ok(hs.membership(room.member.user, room.room_id, "leave"), "leave")
        else:
            self.ok(hs.membership(owner, room.room_id, room.kind, {"user_id": uid}), room.kind)
        self.text(owner, room, "after-1")
        root = room.ids["root"]
        self.send(
            owner,
            room,
            "thread-after",
            {
                "msgtype": "m.text",
                "body": f"thread-after {SEARCH_WORD}",
                "m.relates_to": {"rel_type": "m.thread", "event_id": root},
            },
        )
        self.send(
            owner,
            room,
            "react-after",
            {
                "_type": "m.reaction",
                "m.relates_to": {"rel_type": "m.annotation", "event_id": root, "key": "a"},
            },
        )
        resp = hs.client(
            "PUT",
            c_path(f"/rooms/{quote_room(room.room_id)}/state/m.room.topic/"),
            {"topic": "topic-after", LABEL: "topic-after"},
            token=owner.access_token,
        )
        room.ids["topic-after"] = self.ok(resp, "topic").body["event_id"]
        self.text(owner, room, "after-2")

    def phase3(self, room: Room) -> None:
        if room.stage.startswith("forgotten"):
            self.ok(self.forget(room.member.user, room.room_id), "forget")

    def forget(self, user: User, room_id: str) -> Response:
        return self.hs.client(
            "POST", c_path(f"/rooms/{quote_room(room_id)}/forget"), {}, token=user.access_token
        )

    def phase4(self, room: Room) -> None:
        if not room.stage.endswith("rejoined"):
            return
        hs, uid = self.hs, room.member.user.user_id
        if room.kind == "ban":
            self.ok(hs.membership(self.owner, room.room_id, "unban", {"user_id": uid}), "unban")
        self.ok(hs.membership(self.owner, room.room_id, "invite", {"user_id": uid}), "reinvite")
        self.ok(hs.membership(room.member.user, room.room_id, "join"), "rejoin")
        self.text(self.owner, room, "rejoin-1")

    def label_events(self, room: Room) -> None:
        """Label every event of the room from the owner's (always joined) timeline."""
        resp = self.ok(
            self.hs.client(
                "GET",
                c_path(f"/rooms/{quote_room(room.room_id)}/messages?dir=f&limit=1000"),
                token=self.owner.access_token,
            ),
            "owner's timeline",
        )
        seen: dict[str, int] = {}
        departed = False
        after: list[str] = []
        for event in resp.body["chunk"]:
            content = event.get("content", {})
            label = content.get(LABEL) or (
                f"{event['type']}:{event.get('state_key', '')}:{content.get('membership', '')}"
            )
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}#{seen[label]}"
            room.labels[event["event_id"]] = label
            room.order.append(label)
            if departed:
                after.append(label)
            if (
                not departed
                and event["type"] == "m.room.member"
                and event.get("state_key") == room.member.user.user_id
                and content.get("membership") in ("leave", "ban")
            ):
                departed = True
                room.departure = label
        room.after = tuple(after)

    def build(self, threads: int = 4, wait: bool = True) -> None:
        """All four phases on every room, the devices' tokens between phases 1 and 2.

        With ``wait``, first wait for Synapse's background updates (needed by
        the sliding sync cells only).
        """
        if wait:
            wait_for_background_updates(self.hs)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(self.phase1, self.rooms))
            for member in self.members.values():
                member.tokens["token_before"] = self.sync_token(member.user)
                member.tokens["since_before"] = self.sync_token(member.device_b)
                member.tokens["pos_before"] = self.ok(
                    self.hs.client(
                        "POST",
                        SLIDING_SYNC + "?timeout=0",
                        SLIDING_OFFLINE_BODY,
                        token=member.device_b.access_token,
                    ),
                    "sliding sync",
                ).body["pos"]
            for phase in (self.phase1b, self.phase2, self.phase3, self.phase4, self.label_events):
                list(pool.map(phase, self.rooms))
        token_after = self.sync_token(self.owner)
        for member in self.members.values():
            member.tokens["token_after"] = token_after

    def sync_token(self, user: User) -> str:
        resp = self.hs.client(
            "GET",
            c_path("/sync?timeout=0&" + qs(filter={"room": {"timeline": {"limit": 1}}})),
            token=user.access_token,
        )
        return str(self.ok(resp, "sync").body["next_batch"])

    def room(self, key: str) -> Room:
        for room in self.rooms:
            if room.key == key:
                return room
        raise KeyError(key)

    # -- reading ----------------------------------------------------------

    def get(self, user: User, path: str, body: Any = None, method: str = "GET") -> Response:
        """A read, memoised (the world does not change once built)."""
        key = (user.access_token, method, path, json.dumps(body))
        with self._lock:
            if key in self._memo:
                return self._memo[key]  # type: ignore[no-any-return]
        resp = self.reader.client(method, path, body, token=user.access_token)
        with self._lock:
            self._memo[key] = resp
        return resp


def all_rooms() -> list[tuple[str, str, str]]:
    return [(k, v, s) for k in KINDS for v in VISIBILITIES for s in STAGES]
