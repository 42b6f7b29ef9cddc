"""Membership sequences against a real Synapse, checked against the reference model.

One case is: a room (join rule ``knock``) with a history-visibility schedule;
``bob`` joins, ``alice`` writes ``pre``, then a sequence of membership changes
of bob's (leave, kick, ban, unban, knock, rescind, invite, reject, rejoin),
with a message of alice's after each (``post1``...). Optionally bob forgets
the room right after his first departure. Then bob reads the room on every
path and each answer is checked against tests/history_model.py:

* no answer holds an event the model says bob may not see (a leak): after a
  forget, anything but what a never-member may see; otherwise anything sent
  after the departure that was not world_readable (up to the departure, and
  while joined, the answer is Synapse's own visibility, which the module keeps);
* while the forget holds (and the room is not world_readable now), the room
  reads Synapse refuses a never-member are refused bob with the same status;
* after a rejoin, the history the model gives him is there (Complement's
  "Can re-join room if re-invited" expects ``pre``).

Shared by the sampled CI module (tests/integration/test_history_sequences.py)
and the full run (scripts/history_sequences.py).
"""

from __future__ import annotations

import itertools
import json
import random
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

import attr

from tests.history_model import visible_events
from tests.support.harness import (
    ListeningProcess,
    Response,
    SynapseProcess,
    User,
    quote_room,
    wait_until,
)

OPS = ("leave", "kick", "ban", "unban", "knock", "rescind", "invite", "reject", "rejoin")
# bob's membership after each op, from the memberships it may follow.
_TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "leave": (("join",), "leave"),
    "kick": (("join",), "leave"),
    "ban": (("join", "leave", "invite", "knock"), "ban"),
    "unban": (("ban",), "leave"),
    "knock": (("leave",), "knock"),
    "rescind": (("knock",), "leave"),
    "invite": (("leave", "knock"), "invite"),
    "reject": (("invite",), "leave"),
    "rejoin": (("invite",), "join"),
}
# History visibility schedules: (initial, changed to before the sequence, changed to after it).
SCHEDULES: dict[str, tuple[str, str | None, str | None]] = {
    "shared": ("shared", None, None),
    "invited": ("invited", None, None),
    "joined": ("joined", None, None),
    "world_readable": ("world_readable", None, None),
    "shared>world_readable": ("shared", None, "world_readable"),
    "world_readable>shared": ("world_readable", "shared", None),
}
_SLIDING_SYNC = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=0"
_SLIDING_BODY = {
    "lists": {"all": {"ranges": [[0, 99]], "timeline_limit": 50, "required_state": [["*", "*"]]}}
}
_LABEL = "mlf.label"
_INCLUDE_LEAVE = urllib.parse.quote(json.dumps({"room": {"include_leave": True}}))


def sequences(max_length: int = 4) -> list[tuple[str, ...]]:
    """Every order of OPS up to max_length that Synapse accepts from a joined bob."""
    found = []
    for length in range(1, max_length + 1):
        for ops in itertools.product(OPS, repeat=length):
            state = "join"
            for op in ops:
                before, after = _TRANSITIONS[op]
                if state not in before:
                    break
                state = after
            else:
                found.append(ops)
    return found


@attr.s(frozen=True, auto_attribs=True)
class Case:
    ops: tuple[str, ...]
    schedule: str
    forget: bool

    @property
    def name(self) -> str:
        return f"{'+'.join(self.ops)}/{self.schedule}/{'forgotten' if self.forget else 'kept'}"


def all_cases() -> list[Case]:
    """The full product: every sequence × schedule × forgotten or not."""
    return [
        Case(ops, schedule, forget)
        for ops in sequences()
        for schedule in SCHEDULES
        for forget in (False, True)
    ]


# The cases issue 17 names, always part of the sample.
NAMED = [
    Case(("leave", "knock"), "shared", True),
    Case(("leave", "knock", "rescind"), "shared", True),
    Case(("ban", "unban"), "shared", False),
    Case(("leave", "invite"), "shared", True),
    Case(("leave", "invite", "reject"), "shared", True),
    Case(("leave", "invite", "rejoin"), "shared", True),
    Case(("leave",), "shared>world_readable", True),
    Case(("kick", "invite", "rejoin", "leave"), "shared", True),
]


def sample(size: int, seed: int = 17) -> list[Case]:
    """NAMED plus a deterministic sample of the rest, size cases in all."""
    rest = [c for c in all_cases() if c not in NAMED]
    return NAMED + random.Random(seed).sample(rest, max(0, size - len(NAMED)))


@attr.s(auto_attribs=True)
class Outcome:
    """What one case found: leaks and other failures, per path."""

    case: Case
    failures: list[str] = attr.Factory(list)
    leaks: int = 0


class Runner:
    """Runs cases on one Synapse; ``carol`` (never in any room) is the never-member oracle."""

    def __init__(
        self, hs: SynapseProcess, prefix: str, reader: ListeningProcess | None = None
    ) -> None:
        self.hs = hs
        # Where bob and carol read (a worker, say); writes go to hs.
        self.reader = reader or hs
        self.prefix = prefix
        self._names = itertools.count(1)
        self.carol = hs.register(f"{prefix}carol")

    def call(self, user: User, method: str, path: str, body: Any = None) -> Response:
        return self.hs.client(method, path, body, token=user.access_token)

    def read(self, user: User, method: str, path: str, body: Any = None) -> Response:
        return self.reader.client(method, path, body, token=user.access_token)

    def ok(self, resp: Response, what: str) -> Response:
        if resp.status != 200:
            raise AssertionError(f"{what}: {resp.status} {resp.raw[:300]!r}")
        return resp

    def room(self, room_id: str, tail: str) -> str:
        return f"/_matrix/client/v3/rooms/{quote_room(room_id)}/{tail}"

    def say(self, alice: User, room_id: str, label: str) -> str:
        path = self.room(room_id, f"send/m.room.message/{label}")
        body = {"msgtype": "m.text", "body": label, _LABEL: label}
        return str(self.ok(self.call(alice, "PUT", path, body), f"send {label}").body["event_id"])

    def set_visibility(self, alice: User, room_id: str, visibility: str) -> None:
        path = self.room(room_id, "state/m.room.history_visibility/")
        self.ok(self.call(alice, "PUT", path, {"history_visibility": visibility}), "visibility")

    def op(self, op: str, alice: User, bob: User, room_id: str) -> None:
        who = {"user_id": bob.user_id}
        if op in ("leave", "rescind", "reject"):
            resp = self.hs.membership(bob, room_id, "leave")
        elif op in ("kick", "ban", "unban", "invite"):
            resp = self.hs.membership(alice, room_id, op, who)
        elif op == "knock":
            resp = self.hs.membership(bob, room_id, "knock", {"reason": "again"})
        else:
            resp = self.hs.membership(bob, room_id, "join")
        self.ok(resp, op)

    def run(self, case: Case) -> Outcome:
        n = next(self._names)
        alice = self.hs.register(f"{self.prefix}a{n}")
        bob = self.hs.register(f"{self.prefix}b{n}")
        initial, before, after = SCHEDULES[case.schedule]
        room_id = self.hs.create_room(
            alice,
            preset="private_chat",
            initial_state=[
                {
                    "type": "m.room.history_visibility",
                    "state_key": "",
                    "content": {"history_visibility": initial},
                },
                {"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}},
            ],
        )
        self.op("invite", alice, bob, room_id)
        self.op("rejoin", alice, bob, room_id)
        labels = {self.say(alice, room_id, "pre"): "pre"}
        if before is not None:
            self.set_visibility(alice, room_id, before)
            labels[self.say(alice, room_id, "pre2")] = "pre2"
        at_joined = self.ok(self.read(bob, "GET", "/_matrix/client/v3/sync?timeout=0"), "sync")
        forgotten_after = None
        for k, op in enumerate(case.ops, start=1):
            self.op(op, alice, bob, room_id)
            if case.forget and k == 1:
                self.ok(self.call(bob, "POST", self.room(room_id, "forget"), {}), "forget")
                forgotten_after = self.latest(alice, room_id)
            labels[self.say(alice, room_id, f"post{k}")] = f"post{k}"
        if after is not None:
            self.set_visibility(alice, room_id, after)
            labels[self.say(alice, room_id, "post-wr")] = "post-wr"
        at_end = self.ok(self.call(alice, "GET", "/_matrix/client/v3/sync?timeout=0"), "sync")
        events = self.events(alice, room_id)
        if self.reader is not self.hs:
            # Replication reaches the reader asynchronously: wait for the last event.
            last = self.room(room_id, "messages?dir=b&limit=1")
            wait_until(
                lambda: (
                    (r := self.read(alice, "GET", last)).status == 200
                    and r.body["chunk"][0]["event_id"] == events[-1]["event_id"]
                ),
                what="the reader catching up",
            )
        allowed = visible_events(events, bob.user_id, forgotten_after)
        outcome = Outcome(case)
        self.check(
            outcome, bob, room_id, events, allowed, labels, forgotten_after, at_joined, at_end
        )
        return outcome

    def latest(self, alice: User, room_id: str) -> str:
        resp = self.ok(self.call(alice, "GET", self.room(room_id, "messages?dir=b&limit=1")), "m")
        return str(resp.body["chunk"][0]["event_id"])

    def events(self, alice: User, room_id: str) -> list[dict[str, Any]]:
        """Every event of the room in stream order (alice was joined throughout)."""
        resp = self.call(alice, "GET", self.room(room_id, "messages?dir=f&limit=1000"))
        return list(self.ok(resp, "all events").body["chunk"])

    def reads(
        self, bob: User, room_id: str, labels: dict[str, str], at_joined: str, at_end: str
    ) -> Iterator[tuple[str, Response]]:
        room = room_id
        yield "messages b", self.read(bob, "GET", self.room(room, "messages?dir=b&limit=1000"))
        yield "messages f", self.read(bob, "GET", self.room(room, "messages?dir=f&limit=1000"))
        for event_id, label in labels.items():
            eid = urllib.parse.quote(event_id, safe="")
            ctx = self.read(bob, "GET", self.room(room, f"context/{eid}?limit=100"))
            yield f"context {label}", ctx
            yield f"event {label}", self.read(bob, "GET", self.room(room, f"event/{eid}"))
        for name, token in (("joined", at_joined), ("end", at_end)):
            tail = f"members?at={urllib.parse.quote(token, safe='')}"
            yield f"members at {name}", self.read(bob, "GET", self.room(room, tail))
        sync = f"/_matrix/client/v3/sync?timeout=0&filter={_INCLUDE_LEAVE}"
        yield "sync", self.read(bob, "GET", sync)
        yield "sliding sync", self.read(bob, "POST", _SLIDING_SYNC, _SLIDING_BODY)

    def check(
        self,
        outcome: Outcome,
        bob: User,
        room_id: str,
        events: Sequence[dict[str, Any]],
        allowed: set[str],
        labels: dict[str, str],
        forgotten_after: str | None,
        at_joined: Response,
        at_end: Response,
    ) -> None:
        known = {e["event_id"]: e for e in events}
        # The forget comes right after the first departure; a later rejoin lifts it.
        forgotten = forgotten_after is not None and "rejoin" not in outcome.case.ops[1:]
        world_readable_now = _current_visibility(events) == "world_readable"
        tokens = at_joined.body["next_batch"], at_end.body["next_batch"]
        never: dict[str, int] = {}

        def never_member(path: str) -> int | None:
            if not never:
                never.update((p, r.status) for p, r in self.reads(self.carol, room_id, {}, *tokens))
            return never.get(path)

        departed_at = _departure(events, bob.user_id)
        position = {e["event_id"]: i for i, e in enumerate(events)}
        for path, resp in self.reads(bob, room_id, labels, *tokens):
            seen, state = _event_ids(resp.body, room_id) if resp.status == 200 else (set(), set())
            # State sections are the state at a point, not history: only state sent
            # after the departure that the model hides counts. (After a forget,
            # /context of an event anyone may see carries the state at it, as a
            # never-member's does.)
            if not (forgotten and path.startswith("context")):
                seen |= {
                    e
                    for e in state
                    if e in position and departed_at is not None and position[e] > departed_at
                }
            if path.startswith("members"):
                # State at a point: whole, as a never-member gets it if the room was
                # world_readable there; otherwise only what was there at the departure.
                if never_member(path) == 200:
                    continue
                if forgotten:
                    allowed_here = set()
                else:
                    allowed_here = {
                        e["event_id"]
                        for i, e in enumerate(events)
                        if departed_at is None or i <= departed_at
                    }
            elif forgotten:
                allowed_here = allowed
            else:
                # Up to the departure (or while joined) the answer is Synapse's own
                # visibility; only what came after the departure is the guard's.
                allowed_here = allowed | {
                    e["event_id"]
                    for i, e in enumerate(events)
                    if departed_at is None or i <= departed_at
                }
            leaked = sorted(
                labels.get(e, f"{known[e]['type']}:{known[e].get('state_key')}")
                for e in seen
                if e in known and e not in allowed_here
            )
            if leaked:
                outcome.leaks += len(leaked)
                outcome.failures.append(f"{path}: {resp.status} shows {leaked}")
            if forgotten and path.startswith(("messages", "members")):
                if not (world_readable_now and path.startswith("messages")):
                    if resp.status != never_member(path):
                        outcome.failures.append(
                            f"{path}: {resp.status}, a never-member gets {never_member(path)}"
                        )
            if path == "messages b" and "rejoin" in outcome.case.ops[-1:]:
                wanted = {e for e in allowed if labels.get(e) == "pre"}
                if not wanted <= seen:
                    outcome.failures.append(f"{path}: {resp.status}, pre missing after rejoin")


def _is_join(event: dict[str, Any], user_id: str) -> bool:
    return (
        event.get("type") == "m.room.member"
        and event.get("state_key") == user_id
        and (event.get("content") or {}).get("membership") == "join"
    )


def _departure(events: Sequence[dict[str, Any]], user_id: str) -> int | None:
    """The index of the user's first leave or ban after their last join, if any."""
    own = [
        (i, (e.get("content") or {}).get("membership"))
        for i, e in enumerate(events)
        if e.get("type") == "m.room.member" and e.get("state_key") == user_id
    ]
    joins = [i for i, m in own if m == "join"]
    if not joins:
        return None
    return next((i for i, m in own if i > joins[-1] and m in ("leave", "ban")), None)


def _current_visibility(events: Sequence[dict[str, Any]]) -> str:
    visibility = "shared"
    for event in events:
        if event.get("type") == "m.room.history_visibility":
            visibility = (event.get("content") or {}).get("history_visibility", "shared")
    return visibility


def _event_ids(body: Any, room_id: str) -> tuple[set[str], set[str]]:
    """Every event id in an answer (bundles and ``unsigned`` included), and those
    in its ``state`` sections apart.

    In a /sync or sliding sync answer only the room's own entries count.
    """
    if isinstance(body, dict) and isinstance(body.get("rooms"), dict):
        if "lists" in body:  # sliding sync: rooms by id
            body = body["rooms"].get(room_id)
        else:
            sections = body["rooms"].values()
            body = [s.get(room_id) for s in sections if isinstance(s, dict)]
    found: set[str] = set()
    state: set[str] = set()

    def walk(value: Any, into: set[str]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("event_id", "redacts") and isinstance(item, str):
                    into.add(item)
                if key in ("invite_state", "knock_state", "stripped_state"):
                    # The stripped state of a pending invite or knock (the user's own
                    # membership included; Synapse 1.98 adds event ids there): not history.
                    continue
                walk(item, state if key in ("state", "required_state") else into)
        elif isinstance(value, list):
            for item in value:
                walk(item, into)

    walk(body, found)
    return found, state - found
