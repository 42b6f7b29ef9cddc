"""The history guard's checks for answers that span rooms: /sync, sliding sync, /notifications.

Forgotten rooms are taken out of the answer. A device whose ``since``/``pos``
predates the user's departure still gets the room once, reduced to the user's
own departure event, so that it stops showing the user as joined
(docs/history.md, "Other devices").
"""

import functools
import json
import re
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from matrix_leave_forget.history.departures import DEPARTED, DepartureLookup
from matrix_leave_forget.history.json_codec import decode, encode
from matrix_leave_forget.history.later_events import hide_later, later_events, scrub_carried

Replacement = tuple[int, bytes]
_MEMBER = "m.room.member"
# Cheap tests on the encoded answer before parsing it (false positives only
# cost a parse): a /sync "leave" section; events carried inside others.
_LEAVE_SECTION = b'"leave":{'
_CARRIED = (b'"redacted_because"', b'"redacted_by"', b'"m.relations"')
# Every JSON string in the answer that starts with "!": a superset of the room ids
# it names, as keys ("rooms", extensions) or values ("room_id", list "room_ids").
# In valid JSON a match cannot start at a string's closing quote (one is never
# followed by "!"); one that starts at an escaped quote inside a string ends where
# that string ends, so no string is missed.
_BANG_STRING = re.compile(rb'"(![^"\\]*(?:\\.[^"\\]*)*)"')


def named_rooms(body: bytes) -> AbstractSet[str]:
    """Every string of body that starts with "!", unescaped: the rooms body may name.

    One regex pass instead of a parse; strings with escapes (rare in room ids)
    are decoded one by one.
    """
    named = set()
    for raw in _BANG_STRING.findall(body):
        if b"\\" in raw:
            try:
                named.add(json.loads(b'"' + raw + b'"'))
                continue
            except ValueError:
                pass
        named.add(raw.decode("utf-8", "replace"))
    return named


def rooms_named_by(body: bytes) -> Callable[[], AbstractSet[str]]:
    """named_rooms(body), scanned on the first call only: the lookups and may_change
    of one check share the scan."""
    return functools.cache(lambda: named_rooms(body))


def _may_mention(named: Callable[[], AbstractSet[str]], forgotten: AbstractSet[str]) -> bool:
    """Whether the answer may name a room of forgotten (False only when it certainly does not)."""
    return bool(forgotten) and not named().isdisjoint(forgotten)


def may_change(
    kind: str, body: bytes, forgotten: AbstractSet[str], named: Callable[[], AbstractSet[str]]
) -> bool:
    """Whether the answer of a read of kind may need a change (False only when certainly not).

    Without forgotten rooms in the answer only a /sync "leave" section, or an
    event carried inside another in /events or /notifications, can tell of
    events the user may not see (sliding sync: a room the user is not joined
    to, which the caller checks with the joined rooms).
    """
    if kind == "sync" and _LEAVE_SECTION in body:
        return True
    if kind in ("events", "notifications") and any(marker in body for marker in _CARRIED):
        # An event of a room the user left may carry a later one.
        return True
    return _may_mention(named, forgotten)


def _arg(request: Any, name: bytes) -> str | None:
    values = (getattr(request, "args", None) or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _departure_events(events: Any, user_id: str) -> list[dict[str, Any]]:
    """The user's own leave/kick/ban membership events among events, in order."""
    if not isinstance(events, list):
        return []
    return [
        e
        for e in events
        if isinstance(e, dict)
        and e.get("type") == _MEMBER
        and e.get("state_key") == user_id
        and (e.get("content") or {}).get("membership") in DEPARTED
    ]


class SyncGuard:
    """Takes forgotten rooms out of /sync, sliding sync and /notifications answers.

    Args:
        lookup: The departure lookups.
    """

    def __init__(self, lookup: DepartureLookup) -> None:
        self._lookup = lookup

    async def _departed_since(self, user_id: str, room_id: str, position: int | None) -> bool:
        """Whether the user left room_id after the sync position (their device missed it)."""
        if position is None:
            return False
        departure = await self._lookup.departure(user_id, room_id)
        return departure is not None and departure.stream_ordering > position

    async def _position(self, token: str | None) -> int | None:
        return await self._lookup.token_position(token) if token else None

    async def check_sync(self, request: Any, user_id: str, body: bytes) -> Replacement | None:
        """/sync v3: forgotten rooms leave every section; left rooms show nothing later.

        A device whose ``since`` predates the departure from a forgotten room gets
        the stub instead. A room in ``leave`` that is not forgotten keeps Synapse's
        timeline, which ends at the departure, but loses bundled relations sent later.
        """
        named = rooms_named_by(body)
        forgotten = await self._lookup.forgotten_rooms(user_id, named)
        if not may_change("sync", body, forgotten, named):
            return None
        data = decode(body)
        rooms = data.get("rooms") if isinstance(data, dict) else None
        if not isinstance(rooms, dict):
            return None
        hits = [
            (section, room_id)
            for section, entries in rooms.items()
            if isinstance(entries, dict)
            for room_id in entries
            if room_id in forgotten
        ]
        changed = bool(hits)
        if hits:
            position = await self._position(_arg(request, b"since"))
            for section, room_id in hits:
                entry = rooms[section].pop(room_id)
                if section == "leave" and await self._departed_since(user_id, room_id, position):
                    rooms[section][room_id] = self._sync_stub(entry, user_id)
        left: dict[str, Any] = rooms["leave"] if isinstance(rooms.get("leave"), dict) else {}
        for room_id, entry in list(left.items()):
            if room_id not in forgotten and isinstance(entry, dict):
                lists = [
                    section["events"]
                    for section in entry.values()
                    if isinstance(section, dict) and isinstance(section.get("events"), list)
                ]
                hidden = await self._hide_later(user_id, room_id, lists)
                if hidden is None:
                    # Forgotten, then a knock or an invite cleared Synapse's flag.
                    position = await self._position(_arg(request, b"since"))
                    del left[room_id]
                    if await self._departed_since(user_id, room_id, position):
                        left[room_id] = self._sync_stub(entry, user_id)
                changed |= hidden is not False
        if not changed:
            return None
        for section in [s for s, entries in rooms.items() if entries == {}]:
            # Synapse leaves empty sections out.
            del rooms[section]
        return 200, encode(data)

    async def _hide_later(self, user_id: str, room_id: str, lists: list[list[Any]]) -> bool | None:
        """Drop what was sent after user_id left room_id from lists (carried ones included).

        Returns:
            Whether anything was dropped; None if the user forgot the room and has
            not joined it since (a knock or an invite after the forget clears
            Synapse's forgotten flag, not the guard's): then the whole room goes.
        """
        departure = await self._lookup.departure(user_id, room_id)
        if departure is None:
            return False
        if departure.forgotten:
            return None
        return await hide_later(self._lookup, lists, departure)

    @staticmethod
    def _sync_stub(entry: dict[str, Any], user_id: str) -> dict[str, Any]:
        """The room as a device that missed the departure gets it: the departure event only."""
        timeline: dict[str, Any] = (
            entry["timeline"] if isinstance(entry.get("timeline"), dict) else {}
        )
        state: dict[str, Any] = entry["state"] if isinstance(entry.get("state"), dict) else {}
        found = _departure_events(timeline.get("events"), user_id) or _departure_events(
            state.get("events"), user_id
        )
        stub: dict[str, Any] = {}
        for key, value in entry.items():
            if key == "timeline":
                stub[key] = {"events": found[-1:], "limited": True}
                if "prev_batch" in timeline:
                    stub[key]["prev_batch"] = timeline["prev_batch"]
            elif isinstance(value, dict) and "events" in value:
                stub[key] = {"events": []}
        return stub

    async def check_sliding_sync(
        self, request: Any, user_id: str, body: bytes
    ) -> Replacement | None:
        """Simplified sliding sync: the same rule as /sync, in its shapes.

        A room the user departed from (a ``room_subscriptions`` entry can name one)
        shows nothing sent after the departure, and no receipts or typing: those
        extensions' sections of departed rooms are removed (they tell of the room now).
        """
        named = rooms_named_by(body)
        forgotten = await self._lookup.forgotten_rooms(user_id, named)
        if not may_change("sliding_sync", body, forgotten, named) and all(
            self._lookup.joined_now(user_id, room_id) for room_id in named()
        ):
            return None
        data = decode(body)
        if not isinstance(data, dict):
            return None
        rooms: dict[str, Any] = data["rooms"] if isinstance(data.get("rooms"), dict) else {}
        listed = {
            room_id
            for entry in (data.get("lists") or {}).values()
            if isinstance(entry, dict)
            for op in entry.get("ops") or []
            if isinstance(op, dict)
            for room_id in op.get("room_ids") or []
        }
        extensions = data.get("extensions")
        sections = [
            (name, ext["rooms"])
            for name, ext in (extensions.items() if isinstance(extensions, dict) else ())
            if isinstance(ext, dict) and isinstance(ext.get("rooms"), dict)
        ]
        extension_rooms = {room_id for _name, per_room in sections for room_id in per_room}
        hits = (set(rooms) | listed | extension_rooms) & set(forgotten)
        changed = bool(hits)
        # Rooms the user left but did not forget: nothing sent after the departure.
        departed = set()
        for room_id in (set(rooms) | extension_rooms) - hits:
            if await self._departed(user_id, room_id):
                departed.add(room_id)
        for room_id in departed:
            entry = rooms.get(room_id)
            if isinstance(entry, dict):
                lists = [
                    entry[key]
                    for key in ("timeline", "required_state")
                    if isinstance(entry.get(key), list)
                ]
                hidden = await self._hide_later(user_id, room_id, lists)
                if hidden is None:
                    hits.add(room_id)
                changed |= hidden is not False
        for name, per_room in sections:
            # A departed room's own account data is the user's; the rest
            # (receipts, typing, anything newer) tells of the room now.
            for room_id in departed - {r for r in per_room if name == "account_data"}:
                if per_room.pop(room_id, None) is not None:
                    changed = True
        if not changed:
            return None
        position = await self._position(_arg(request, b"pos"))
        stubbed = set()
        for room_id in hits:
            entry = rooms.pop(room_id, None)
            if entry is not None and await self._departed_since(user_id, room_id, position):
                rooms[room_id] = self._sliding_stub(entry, user_id)
                stubbed.add(room_id)
        dropped = hits - stubbed
        for entry in (data.get("lists") or {}).values():
            if not isinstance(entry, dict):
                continue
            removed = 0
            for op in entry.get("ops") or []:
                if isinstance(op, dict) and isinstance(op.get("room_ids"), list):
                    kept = [r for r in op["room_ids"] if r not in dropped]
                    removed += len(op["room_ids"]) - len(kept)
                    op["room_ids"] = kept
            if removed and isinstance(entry.get("count"), int):
                entry["count"] = max(0, entry["count"] - removed)
        for _name, per_room in sections:
            for room_id in hits:
                per_room.pop(room_id, None)
        return 200, encode(data)

    async def _departed(self, user_id: str, room_id: str) -> bool:
        """Whether user_id departed from room_id: its reads are guarded."""
        return await self._lookup.departure(user_id, room_id) is not None

    @staticmethod
    def _sliding_stub(entry: dict[str, Any], user_id: str) -> dict[str, Any]:
        """The departure event in the timeline and as the only required state; no room details."""
        found = _departure_events(entry.get("timeline"), user_id) or _departure_events(
            entry.get("required_state"), user_id
        )
        stub: dict[str, Any] = {"timeline": found[-1:], "limited": True}
        if "required_state" in entry:
            stub["required_state"] = _departure_events(entry.get("required_state"), user_id)[-1:]
        for key in ("initial", "prev_batch", "membership"):
            if key in entry:
                stub[key] = entry[key]
        return stub

    async def check_event_stream(self, user_id: str, body: bytes) -> Replacement | None:
        """The legacy /events stream: of a forgotten room only the user's departure passes;
        events of a room the user departed from carry nothing from later."""
        named = rooms_named_by(body)
        forgotten = await self._lookup.forgotten_rooms(user_id, named)
        if not may_change("events", body, forgotten, named):
            return None
        data = decode(body)
        chunk = data.get("chunk") if isinstance(data, dict) else None
        if not isinstance(chunk, list):
            return None
        kept = [
            e
            for e in chunk
            if not (isinstance(e, dict) and e.get("room_id") in forgotten)
            or _departure_events([e], user_id)
        ]
        changed = len(kept) != len(chunk)
        pairs = [(e.get("room_id"), e) for e in kept if isinstance(e, dict)]
        changed |= await self._scrub_departed(user_id, pairs, forgotten)
        if not changed:
            return None
        data["chunk"] = kept
        return 200, encode(data)

    async def check_notifications(self, user_id: str, body: bytes) -> Replacement | None:
        """/notifications: forgotten rooms' notifications are left out; those of a room
        the user departed from carry nothing from later."""
        named = rooms_named_by(body)
        forgotten = await self._lookup.forgotten_rooms(user_id, named)
        if not may_change("notifications", body, forgotten, named):
            return None
        data = decode(body)
        notifications = data.get("notifications") if isinstance(data, dict) else None
        if not isinstance(notifications, list):
            return None
        kept = [
            n for n in notifications if not (isinstance(n, dict) and n.get("room_id") in forgotten)
        ]
        changed = len(kept) != len(notifications)
        pairs = [
            (n.get("room_id"), n["event"])
            for n in kept
            if isinstance(n, dict) and isinstance(n.get("event"), dict)
        ]
        changed |= await self._scrub_departed(user_id, pairs, forgotten)
        if not changed:
            return None
        data["notifications"] = kept
        return 200, encode(data)

    async def _scrub_departed(
        self, user_id: str, pairs: list[tuple[Any, dict[str, Any]]], forgotten: AbstractSet[str]
    ) -> bool:
        """Remove what the events of rooms user_id departed from carry from later (in place).

        The events themselves stay: the stream and the notifications of a room
        end at the user's departure.
        """
        by_room: dict[str, list[dict[str, Any]]] = {}
        for room_id, event in pairs:
            if isinstance(room_id, str) and room_id not in forgotten:
                by_room.setdefault(room_id, []).append(event)
        changed = False
        for room_id, events in by_room.items():
            departure = await self._lookup.departure(user_id, room_id)
            if departure is None:
                continue
            later = await later_events(self._lookup, events, departure)
            for event in events:
                changed |= scrub_carried(event, later)
        return changed
