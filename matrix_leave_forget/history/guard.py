"""The history guard: keeps the spec's leave and forget promises on client read paths.

In ``mount: intercept`` every client request passes the module's ``/_matrix``
node. For the requests Synapse routes to one of the :data:`SERVLETS` (its own
routing decision, see ``_synapse/routing.py``) the guard lets Synapse answer
as usual but holds the answer back (:func:`capture`); when Synapse
finishes it, the guard checks it against the user's departures and releases it
unchanged (the usual case, byte for byte), sanitised, or replaced by what
Synapse answers a user who was never in the room. Filtering the answer on its
way out also covers answers Synapse serves from its caches (see docs/history.md).
"""

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import attr
from synapse.module_api import ModuleApi

from matrix_leave_forget._synapse.contexts import run_in_request_context
from matrix_leave_forget._synapse.responses import hold_response, send_response
from matrix_leave_forget._synapse.routing import watch_routing
from matrix_leave_forget.history.departures import DEPARTED, DepartureLookup
from matrix_leave_forget.history.json_codec import decode, encode
from matrix_leave_forget.history.later_events import (
    carried_ids,
    hide_later,
    is_later,
    later_events,
    scrub_carried,
)
from matrix_leave_forget.history.sync import SyncGuard, may_change, rooms_named_by

logger = logging.getLogger(__name__)

# What the guard sends instead of Synapse's answer: (status, body).
Replacement = tuple[int, bytes]

_READS = ("GET", "HEAD")

# The servlets whose answers the guard checks (Synapse's class names, the same
# on Synapse 1.98 and 1.163; the sliding-sync one is absent on 1.98): family and,
# for room reads, the endpoint. tests/unit/test_history_guard.py checks that each
# is registered in the installed Synapse.
SERVLETS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "RoomMessageListRestServlet": ("room", "messages", _READS),
    "RoomEventContextServlet": ("room", "context", _READS),
    "RoomEventServlet": ("room", "event", _READS),
    "RelationPaginationServlet": ("room", "relations", _READS),
    "ThreadsServlet": ("room", "threads", _READS),
    "RoomInitialSyncRestServlet": ("room", "initial_sync", _READS),
    "RoomMemberListRestServlet": ("room", "members", _READS),
    "EventRestServlet": ("legacy_event", "legacy_event", _READS),
    "SyncRestServlet": ("sync", None, _READS),
    "NotificationsServlet": ("notifications", None, _READS),
    "EventStreamRestServlet": ("events", None, _READS),
    "InitialSyncRestServlet": ("initial_sync", None, _READS),
    "SlidingSyncRestServlet": ("sliding_sync", None, ("POST",)),
}

# The lists of events in room reads' answers.
_LISTS = ("chunk", "events_before", "events_after", "state")

_NOT_IN_ROOM = "User {user_id} not in room {room_id}, and room previews are disabled"
# What Synapse 1.163.2 answers a user who was never in a (non world_readable)
# room on each guarded room path (measured; tests/integration/test_history_guard.py
# compares them with a live never-member on every run).
NEVER_MEMBER: dict[str, tuple[int, str, str]] = {
    "messages": (403, "M_FORBIDDEN", _NOT_IN_ROOM),
    "relations": (403, "M_FORBIDDEN", _NOT_IN_ROOM),
    "threads": (403, "M_FORBIDDEN", _NOT_IN_ROOM),
    "context": (403, "M_FORBIDDEN", "You don't have permission to access that event."),
    "event": (404, "M_NOT_FOUND", "Event not found."),
    "legacy_event": (403, "M_FORBIDDEN", "You don't have permission to access that event."),
    "initial_sync": (403, "M_FORBIDDEN", _NOT_IN_ROOM),
    "members": (403, "M_FORBIDDEN", _NOT_IN_ROOM),
}
# /members?at=<token>: Synapse checks the state at the token, not the membership.
_NOT_AT_TOKEN = "User {user_id} not allowed to view events in room {room_id} at token {token}"
# Room reads Synapse refuses a non-member unless the room is world_readable now.
_ROOM_CHECKED = ("messages", "relations", "threads", "members", "initial_sync")


@attr.s(frozen=True, auto_attribs=True)
class Route:
    """A guarded read: its family, and for room paths the room and endpoint."""

    # "room", "legacy_event", "sync", "events", "sliding_sync" or "notifications"
    kind: str
    room_id: str | None = None
    endpoint: str | None = None


def route_for(method: bytes, servlet: str, groups: dict[str, str]) -> Route | None:
    """The guarded read a request is, from the servlet Synapse routed it to; None if none.

    Args:
        method: The request's method.
        servlet: The class name of the servlet Synapse chose.
        groups: The named groups of the path pattern that matched, raw.
    """
    found = SERVLETS.get(servlet)
    if found is None or method.decode("ascii", "replace") not in found[2]:
        return None
    kind, endpoint, _methods = found
    room_id = groups.get("room_id")
    if kind == "room":
        if not room_id:
            return None
        # As Synapse hands the groups to the servlet.
        return Route(kind, urllib.parse.unquote(room_id), endpoint)
    return Route(kind, endpoint=endpoint)


def error_body(errcode: str, error: str) -> bytes:
    """A Matrix error body, encoded as Synapse encodes one."""
    return json.dumps(
        {"errcode": errcode, "error": error}, sort_keys=True, separators=(",", ":")
    ).encode()


def arg(request: Any, name: bytes) -> str | None:
    values = (getattr(request, "args", None) or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else None


class HistoryGuard:
    """Routes each guarded read's answer to the check of its family.

    Args:
        api: The module API.
        lookup: The departure lookups.
    """

    def __init__(self, api: ModuleApi, lookup: DepartureLookup) -> None:
        self._api = api
        self._lookup = lookup
        self._rooms = RoomReadGuard(lookup)
        self._initial_sync = InitialSyncGuard(lookup)
        self._sync = SyncGuard(lookup)

    def watch_routing(self, client_resource: Any) -> bool:
        """Hold back the answers of client_resource's guarded reads, as Synapse routes them.

        Returns:
            False if client_resource's routing cannot be watched.
        """
        return watch_routing(client_resource, self._routed)

    def _routed(self, request: Any, servlet: str, groups: dict[str, str]) -> None:
        """Synapse routed request to servlet: hold back the answer if it is a guarded read."""
        try:
            route = route_for(request.method, servlet, groups)
        except (AttributeError, TypeError):
            return
        if route is not None:
            capture(
                request,
                lambda code, body: self._passes_now(request, route, code, body),
                lambda code, body: self._check(request, route, code, body),
            )

    def _passes_now(self, request: Any, route: Route, code: int, body: bytes) -> bool:
        """Whether the answer certainly passes unchanged, from Synapse's caches alone.

        The usual case (a joined room's read, a /sync with no forgotten room in
        it) is decided here, synchronously, without the asynchronous check.
        """
        user_id = _reader(request, code, body)
        if user_id is None:
            return True
        if route.kind == "room":
            return route.room_id is not None and self._lookup.joined_now(user_id, route.room_id)
        if route.kind == "legacy_event":
            return False
        if route.kind == "initial_sync":
            # Without archived=true it lists joined and invited rooms only.
            return arg(request, b"archived") != "true"
        named = rooms_named_by(body)
        forgotten = self._lookup.forgotten_rooms_now(user_id, named)
        if forgotten is None or may_change(route.kind, body, forgotten, named):
            return False
        # Sliding sync can name a room the user departed from (room_subscriptions).
        return route.kind != "sliding_sync" or all(
            self._lookup.joined_now(user_id, room_id) for room_id in named()
        )

    async def _check(
        self, request: Any, route: Route, code: int, body: bytes
    ) -> Replacement | None:
        user_id = _reader(request, code, body)
        if user_id is None:
            return None
        if route.kind == "room":
            assert route.room_id is not None and route.endpoint is not None
            return await self._rooms.check(request, user_id, route.room_id, route.endpoint, body)
        if route.kind == "legacy_event":
            data = decode(body)
            room_id = data.get("room_id") if isinstance(data, dict) else None
            if not isinstance(room_id, str):
                return None
            return await self._rooms.check(request, user_id, room_id, "legacy_event", body)
        if route.kind == "sync":
            return await self._sync.check_sync(request, user_id, body)
        if route.kind == "events":
            return await self._sync.check_event_stream(user_id, body)
        if route.kind == "sliding_sync":
            return await self._sync.check_sliding_sync(request, user_id, body)
        if route.kind == "initial_sync":
            return await self._initial_sync.check(user_id, body)
        return await self._sync.check_notifications(user_id, body)


def _reader(request: Any, code: int, body: bytes) -> str | None:
    """The user whose answer is to be checked; None when it passes as it is.

    Only successful answers can carry history: errors, and answers to requests
    with no authenticated user, pass as they are.
    """
    requester = getattr(request, "requester", None)
    if requester is None or code != 200 or not body:
        return None
    return str(requester.user.to_string())


def capture(
    request: Any,
    passes_now: Callable[[int, bytes], bool],
    check: Callable[[int, bytes], Awaitable[Replacement | None]],
) -> None:
    """Hold back what Synapse writes to request until check has seen it.

    ``passes_now`` is asked first, synchronously: when it says the answer
    passes unchanged, the answer goes out at once, as Synapse finished it.
    """

    def finished(body: bytes) -> None:
        if passes_now(request.code, body):
            send_response(request, body)
            return
        run_in_request_context(request, lambda: _release(request, body, check))

    hold_response(request, finished)


async def _release(
    request: Any, body: bytes, check: Callable[[int, bytes], Awaitable[Replacement | None]]
) -> None:
    try:
        replacement = await check(request.code, body)
    except Exception:
        # Fail closed: an answer that could not be checked is not sent.
        logger.exception("History guard could not check %r", request)
        replacement = (500, error_body("M_UNKNOWN", "Internal server error"))
    if replacement is not None:
        code, body = replacement
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
    send_response(request, body)


class RoomReadGuard:
    """/messages, /context, /event, /relations, /threads, /members and room /initialSync.

    After forget the answer is what a never-member gets; after leave, kick or
    ban (not forgotten), events sent after the departure are left out unless
    they were world_readable (docs/history.md, "The rule"), carried ones too.
    """

    def __init__(self, lookup: DepartureLookup) -> None:
        self._lookup = lookup

    async def check(
        self, request: Any, user_id: str, room_id: str, endpoint: str, body: bytes
    ) -> Replacement | None:
        departure = await self._lookup.departure(user_id, room_id)
        if departure is None:
            return None
        if departure.forgotten:
            return await self._as_never_member(request, user_id, room_id, endpoint, body)
        data = decode(body)
        if not isinstance(data, dict):
            return None
        return self._scrubbed(
            request,
            user_id,
            room_id,
            endpoint,
            data,
            await later_events(self._lookup, _top_events(data), departure),
        )

    async def _as_never_member(
        self, request: Any, user_id: str, room_id: str, endpoint: str, body: bytes
    ) -> Replacement | None:
        """What Synapse answers a user who was never in the room, from the user's answer.

        Room-level reads are refused unless the room is world_readable now; what
        is then served, and what /context and /event serve, is the events
        world_readable at the event.
        """
        status, errcode, error = NEVER_MEMBER[endpoint]
        refusal = status, error_body(errcode, error.format(user_id=user_id, room_id=room_id))
        at = arg(request, b"at") if endpoint == "members" else None
        if at is not None:
            visible, token = await self._lookup.state_visible_to_never_member(room_id, at)
            if not visible:
                text = _NOT_AT_TOKEN.format(user_id=user_id, room_id=room_id, token=token)
                return 403, error_body("M_FORBIDDEN", text)
            return None
        if endpoint in _ROOM_CHECKED and not await self._lookup.world_readable(room_id):
            return refusal
        if endpoint == "members":
            return None
        data = decode(body)
        if not isinstance(data, dict):
            return refusal
        # The state Synapse adds to /context is not filtered for a never-member either.
        state = data.get("state")
        in_state = {id(e) for e in state} if isinstance(state, list) else set()
        events = [e for e in _top_events(data) if id(e) not in in_state]
        ids = {e["event_id"] for e in events if isinstance(e.get("event_id"), str)}
        ids |= {i for event in events for i in carried_ids(event)}
        hidden = ids - await self._lookup.never_member_sees(ids)
        return self._scrubbed(request, user_id, room_id, endpoint, data, hidden)

    @staticmethod
    def _scrubbed(
        request: Any,
        user_id: str,
        room_id: str,
        endpoint: str,
        data: dict[str, Any],
        later: set[str],
    ) -> Replacement | None:
        """data without the events in later, top-level or carried (None: unchanged)."""
        single = endpoint in ("event", "legacy_event")
        if (single or endpoint == "context") and data.get("event_id", _event_id(data)) in later:
            status, errcode, error = NEVER_MEMBER[endpoint]
            return status, error_body(errcode, error.format(user_id=user_id, room_id=room_id))
        dropped = False
        changed = False
        for events in _event_lists(data):
            kept = [e for e in events if not is_later(e, later)]
            dropped |= events is not data.get("state") and len(kept) != len(events)
            changed |= len(kept) != len(events)
            events[:] = kept
        for event in _top_events(data):
            changed |= scrub_carried(event, later)
        if not changed:
            return None
        # Forward paging past the departure would only find later events.
        if dropped and arg(request, b"dir") == "f":
            data.pop("end", None)
            data.pop("next_batch", None)
        return 200, encode(data)


class InitialSyncGuard:
    """The global /initialSync: with ``archived=true`` it lists the rooms the user left.

    Synapse lists forgotten rooms there too, with their history: they are left
    out. A left room's messages end at the departure (Synapse's clamp); what they
    carry from later is removed as on the room reads.
    """

    def __init__(self, lookup: DepartureLookup) -> None:
        self._lookup = lookup

    async def check(self, user_id: str, body: bytes) -> Replacement | None:
        data = decode(body)
        rooms = data.get("rooms") if isinstance(data, dict) else None
        if not isinstance(rooms, list):
            return None
        kept: list[Any] = []
        changed = False
        for entry in rooms:
            room_id = entry.get("room_id") if isinstance(entry, dict) else None
            if not isinstance(room_id, str) or entry.get("membership") not in DEPARTED:
                kept.append(entry)
                continue
            departure = await self._lookup.departure(user_id, room_id)
            if departure is None:
                kept.append(entry)
                continue
            if departure.forgotten:
                changed = True
                continue
            kept.append(entry)
            changed |= await hide_later(self._lookup, _event_lists(entry), departure)
        if not changed:
            return None
        data["rooms"] = kept
        return 200, encode(data)


def _event_lists(data: dict[str, Any]) -> list[list[Any]]:
    """The lists of events of a room read's answer (room /initialSync: its messages too)."""
    lists = [data[key] for key in _LISTS if isinstance(data.get(key), list)]
    messages = data.get("messages")
    if isinstance(messages, dict) and isinstance(messages.get("chunk"), list):
        lists.append(messages["chunk"])
    return lists


def _event_id(data: dict[str, Any]) -> str | None:
    event = data.get("event")
    return event.get("event_id") if isinstance(event, dict) else None


def _top_events(data: dict[str, Any]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    if "event_id" in data and "type" in data:
        events.append(data)
    for key in ("event", "original_event"):
        if isinstance(data.get(key), dict):
            events.append(data[key])
    for events_list in _event_lists(data):
        events.extend(e for e in events_list if isinstance(e, dict))
    return events
