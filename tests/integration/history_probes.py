"""The read paths of issue 9 on a :class:`~tests.integration.history.World`, and the native table.

A read path's answer is reduced to an :class:`Outcome`: status, errcode and
the labels of the room's events it contains (so answers from two servers,
with different event ids, compare). :func:`read` runs one of :data:`PROBES`
as the room's departed ``member``, its ``owner`` (never left) or ``stranger``
(never a member: the one the spec cells are compared with).

``python -m tests.integration.history_probes`` builds the world on a native
Synapse (no module) and prints what each read path gives each kind of departed
user and a never-member (the table in the report on issue 9).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attr

from tests.integration.history import (
    BIG_LIMIT,
    INCLUDE_LEAVE,
    KINDS,
    LABEL,
    LAZY_FILTER,
    SEARCH_WORD,
    SLIDING_BODY,
    SLIDING_OFFLINE_BODY,
    SLIDING_SYNC,
    VISIBILITIES,
    Room,
    World,
    c_path,
    qs,
)
from tests.support.harness import (
    FAST_BACKGROUND_UPDATES,
    Response,
    SynapseProcess,
    User,
    quote_room,
)


@attr.s(auto_attribs=True, frozen=True)
class Outcome:
    """A read path's answer, reduced to what compares across servers.

    ``where`` is, for /sync and sliding sync, the section the room is in
    (``join``, ``leave``, ... or ``absent``) plus what the cells check
    (``limited``, prev_batch present); empty elsewhere. ``labels`` lists the
    labels of the room's events found in the answer, in order, and
    ``state_labels`` those in a sync's ``state`` / ``required_state``.
    """

    status: int
    errcode: str | None
    labels: tuple[str, ...]
    where: tuple[Any, ...] = ()
    state_labels: tuple[str, ...] = ()

    @property
    def error(self) -> tuple[int, str | None]:
        return (self.status, self.errcode)


@attr.s(auto_attribs=True, frozen=True)
class Reader:
    """Who reads: the user, the device that syncs with an old token, the tokens."""

    user: User
    device_b: User
    tokens: Mapping[str, str]


def walk_labels(body: Any, labels: Mapping[str, str], out: list[str]) -> None:
    """Append the label of every event of the room found in body.

    An event is a mapping with a known ``event_id``; its ``content`` is not
    searched (a relation names an event without disclosing it). A bare content
    (``GET /state/{type}``) counts by its ``mlf.label``.
    """
    if isinstance(body, Mapping):
        event_id = body.get("event_id")
        if isinstance(event_id, str) and event_id in labels:
            out.append(labels[event_id])
            for key, value in body.items():
                if key != "content":
                    walk_labels(value, labels, out)
            return
        if isinstance(body.get(LABEL), str) and "event_id" not in body:
            out.append(body[LABEL])
        for value in body.values():
            walk_labels(value, labels, out)
    elif isinstance(body, list):
        for value in body:
            walk_labels(value, labels, out)


def _outcome(resp: Response, room: Room, part: Any = None, ordered: bool = True) -> Outcome:
    """``ordered=False`` for answers that list state (or rank search results) in no
    fixed order: their labels are sorted."""
    out: list[str] = []
    walk_labels(resp.body if part is None else part, room.labels, out)
    return Outcome(resp.status, resp.errcode, tuple(out if ordered else sorted(out)))


def _room_path(room: Room, tail: str) -> str:
    return c_path(f"/rooms/{quote_room(room.room_id)}/{tail}")


def _messages(
    extra: Callable[[Mapping[str, str]], dict[str, str]], direction: str
) -> Callable[[World, Reader, Room], Outcome]:
    def probe(world: World, reader: Reader, room: Room) -> Outcome:
        params = {"dir": direction, "limit": str(BIG_LIMIT), **extra(reader.tokens)}
        return _outcome(world.get(reader.user, _room_path(room, "messages?" + qs(**params))), room)

    return probe


def _event_probe(
    tail: str, label: str, ordered: bool = True
) -> Callable[[World, Reader, Room], Outcome]:
    def probe(world: World, reader: Reader, room: Room) -> Outcome:
        path = _room_path(room, tail.format(quote_room(room.ids[label])))
        return _outcome(world.get(reader.user, path), room, ordered=ordered)

    return probe


def _legacy_event(label: str) -> Callable[[World, Reader, Room], Outcome]:
    """The deprecated ``GET /events/{eventId}`` (no room in the path)."""

    def probe(world: World, reader: Reader, room: Room) -> Outcome:
        path = f"/_matrix/client/r0/events/{quote_room(room.ids[label])}"
        return _outcome(world.get(reader.user, path), room)

    return probe


def _simple(
    tail: str, prefix: str = "", ordered: bool = True
) -> Callable[[World, Reader, Room], Outcome]:
    def probe(world: World, reader: Reader, room: Room) -> Outcome:
        path = _room_path(room, tail.format(root=quote_room(room.ids["root"])))
        if prefix:
            path = path.replace("/_matrix/client/v3/", prefix)
        return _outcome(world.get(reader.user, path), room, ordered=ordered)

    return probe


def _search(world: World, reader: Reader, room: Room) -> Outcome:
    body = {
        "search_categories": {
            "room_events": {"search_term": SEARCH_WORD, "filter": {"rooms": [room.room_id]}}
        }
    }
    return _outcome(world.get(reader.user, c_path("/search"), body, "POST"), room, ordered=False)


def _notifications(world: World, reader: Reader, room: Room) -> Outcome:
    resp = world.get(reader.user, c_path("/notifications?limit=1000"))
    part = None
    if resp.status == 200:
        # Synapse's notification of the member's own invite comes and goes from
        # one run to the next (the join follows the invite at once): left out.
        part = [
            n
            for n in resp.body["notifications"]
            if n.get("room_id") == room.room_id
            and (n.get("event") or {}).get("type") != "m.room.member"
        ]
    return _outcome(resp, room, part)


SECTIONS = ("join", "leave", "invite", "knock")


def sync_outcome(resp: Response, room: Room) -> Outcome:
    """Where the room is in a /sync answer, and the labels of its timeline and state."""
    if resp.status != 200:
        return Outcome(resp.status, resp.errcode, ())
    rooms = resp.body.get("rooms", {})
    for section in SECTIONS:
        entry = rooms.get(section, {}).get(room.room_id)
        if entry is None:
            continue
        timeline = entry.get("timeline", {})
        out: list[str] = []
        walk_labels(timeline.get("events", []), room.labels, out)
        state: list[str] = []
        walk_labels(entry.get("state", {}).get("events", []), room.labels, state)
        where = (section, bool(timeline.get("limited")), "prev_batch" in timeline)
        # Synapse lists state in no particular order.
        return Outcome(200, None, tuple(out), where, tuple(sorted(state)))
    return Outcome(200, None, (), ("absent",))


def _sync(
    since: str | None, sync_filter: dict[str, Any] | None, device_b: bool = False
) -> Callable[[World, Reader, Room], Outcome]:
    def probe(world: World, reader: Reader, room: Room) -> Outcome:
        user = reader.device_b if device_b else reader.user
        params: dict[str, Any] = {"timeout": 0}
        if since:
            params["since"] = reader.tokens[since]
        if sync_filter is not None:
            params["filter"] = sync_filter
        return sync_outcome(world.get(user, c_path("/sync?" + qs(**params))), room)

    return probe


def _prev_batch_paging(world: World, reader: Reader, room: Room) -> Outcome:
    """/messages backwards from the prev_batch an offline device's /sync gave for the room
    (a never-member, who gets no prev_batch, pages from the room's end instead)."""
    params = {"timeout": 0, "since": reader.tokens["since_before"], "filter": INCLUDE_LEAVE}
    resp = world.get(reader.device_b, c_path("/sync?" + qs(**params)))
    prev = None
    for section in SECTIONS:
        entry = resp.body.get("rooms", {}).get(section, {}).get(room.room_id)
        if entry:
            prev = entry.get("timeline", {}).get("prev_batch")
    query = {"dir": "b", "limit": str(BIG_LIMIT)}
    if prev:
        query["from"] = prev
    return _outcome(world.get(reader.user, _room_path(room, "messages?" + qs(**query))), room)


def _sliding(pos: str | None) -> Callable[[World, Reader, Room], Outcome]:
    def probe(world: World, reader: Reader, room: Room) -> Outcome:
        user = reader.device_b
        path = SLIDING_SYNC + "?timeout=0"
        if pos:
            path += "&pos=" + urllib.parse.quote(reader.tokens[pos])
        resp = world.get(user, path, SLIDING_OFFLINE_BODY if pos else SLIDING_BODY, "POST")
        if resp.status != 200:
            return Outcome(resp.status, resp.errcode, ())
        entry = resp.body.get("rooms", {}).get(room.room_id)
        if entry is None:
            return Outcome(200, None, (), ("absent",))
        out: list[str] = []
        walk_labels(entry.get("timeline", []), room.labels, out)
        state: list[str] = []
        walk_labels(entry.get("required_state", []), room.labels, state)
        return Outcome(
            200, None, tuple(out), ("present", bool(entry.get("limited"))), tuple(sorted(state))
        )

    return probe


def _tok(name: str) -> Callable[[Mapping[str, str]], dict[str, str]]:
    return lambda tokens: {"from": tokens[name]}


PROBES: dict[str, Callable[[World, Reader, Room], Outcome]] = {
    "messages_b": _messages(lambda w: {}, "b"),
    "messages_f": _messages(lambda w: {}, "f"),
    "messages_f_from_before": _messages(_tok("token_before"), "f"),
    "messages_f_from_before_to_after": _messages(
        lambda w: {"from": w["token_before"], "to": w["token_after"]}, "f"
    ),
    "messages_b_from_after": _messages(_tok("token_after"), "b"),
    "messages_b_to_before": _messages(lambda w: {"to": w["token_before"]}, "b"),
    "context_before": _event_probe("context/{}?limit=" + str(BIG_LIMIT), "before-1", False),
    "context_after": _event_probe("context/{}?limit=" + str(BIG_LIMIT), "after-1", False),
    "event_before": _event_probe("event/{}", "before-1"),
    "event_after": _event_probe("event/{}", "after-1"),
    "legacy_event_before": _legacy_event("before-1"),
    "legacy_event_after": _legacy_event("after-1"),
    "relations": _simple("relations/{root}", "/_matrix/client/v1/"),
    "threads": _simple("threads", "/_matrix/client/v1/"),
    "state": _simple("state", ordered=False),
    "state_topic": _simple("state/m.room.topic/"),
    "members": _simple("members", ordered=False),
    "joined_members": _simple("joined_members"),
    "initial_sync": _simple("initialSync", ordered=False),
    "search": _search,
    "notifications": _notifications,
    "prev_batch_paging": _prev_batch_paging,
    "sync_initial": _sync(None, None),
    "sync_initial_include_leave": _sync(None, INCLUDE_LEAVE),
    "sync_offline_device": _sync("since_before", None, device_b=True),
    "sync_offline_device_include_leave": _sync("since_before", INCLUDE_LEAVE, device_b=True),
    "sync_offline_device_lazy_filter": _sync("since_before", LAZY_FILTER, device_b=True),
    "sliding_sync_initial": _sliding(None),
    "sliding_sync_offline_device": _sliding("pos_before"),
}
SYNC_PROBES = frozenset(p for p in PROBES if p.startswith(("sync_", "sliding_")))


def read(world: World, name: str, who: str, room: Room) -> Outcome:
    """What read path ``name`` gives user ``who`` (owner/member/stranger) about room."""
    tokens = room.member.tokens
    if who == "member":
        reader = Reader(room.member.user, room.member.device_b, tokens)
    else:
        user = {"owner": world.owner, "stranger": world.stranger}[who]
        reader = Reader(user, user, tokens)
    return PROBES[name](world, reader, room)


def describe(outcome: Outcome, room: Room) -> str:
    """A short, human description of an outcome for the native table."""
    if outcome.status != 200:
        return f"{outcome.status} {outcome.errcode}"
    after = [label for label in outcome.labels if label in room.after]
    before = [label for label in outcome.labels if label not in room.after]
    bits = []
    if outcome.where:
        bits.append(str(outcome.where[0]))
        if outcome.where[0] == "absent":
            return "200, room absent"
    bits.append(f"{len(before)} earlier")
    if after:
        bits.append(f"**{len(after)} later**")
    if outcome.state_labels:
        bits.append(f"{len(outcome.state_labels)} state")
    return "200 " + ", ".join(bits)


def native_table(world: World, visibility: str = "shared") -> str:
    """Markdown: per read path, what a departed member gets before/after forget, and a stranger."""
    headers = ["read path"]
    cells: list[tuple[str, str]] = []
    for kind in KINDS:
        for stage in ("left", "forgotten"):
            headers.append(f"{kind}{' + forget' if stage == 'forgotten' else ''}")
            cells.append((kind, stage))
    headers.append("never a member")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name in PROBES:
        row = [f"`{name}`"]
        for kind, stage in cells:
            room = world.room(f"{kind}_{visibility}_{stage}")
            row.append(describe(read(world, name, "member", room), room))
        room = world.room(f"leave_{visibility}_left")
        row.append(describe(read(world, name, "stranger", room), room))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> None:
    hs = SynapseProcess(None, dict(FAST_BACKGROUND_UPDATES))  # native Synapse, no module
    hs.start()
    try:
        rooms = [(k, v, s) for k in KINDS for v in VISIBILITIES for s in ("left", "forgotten")]
        world = World(hs, rooms)
        world.build()
        import synapse

        print(f"Native Synapse {synapse.__version__}, database {hs.database}")
        for visibility in VISIBILITIES:
            print(f"\n### history_visibility: {visibility}\n")
            print(native_table(world, visibility))
    finally:
        hs.cleanup()


if __name__ == "__main__":
    main()
