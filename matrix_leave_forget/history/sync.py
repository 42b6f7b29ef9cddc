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

from matrix_leave_forget.history.departures import DEPARTED, Departure, DepartureLookup
from matrix_leave_forget.history.json_codec import decode, encode
from matrix_leave_forget.history.later_events import (
    hide_later_in_rooms,
    later_events,
    scrub_carried,
)

Replacement = tuple[int, bytes]
_MEMBER = "m.room.member"
# Cheap tests on the encoded answer before parsing it (false positives only
# cost a parse): a /sync "leave" section; events carried inside others.
_LEAVE_SECTION = b'"leave":{'
_CARRIED = (b'"redacted_because"', b'"redacted_by"', b'"m.relations"')
# What Synapse's sliding sync gives a room the user knocked on or is invited to
# (1.163: its stripped state and room details, never a timeline or state).
_PENDING_KEYS = frozenset(
    {
        "invite_state",
        "name",
        "avatar",
        "bump_stamp",
        "initial",
        "notification_count",
        "highlight_count",
        "is_dm",
    }
)
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


def _departed_after(departure: Departure | None, position: int | None) -> bool:
    """Whether departure came after the sync position (the device missed it)."""
    return position is not None and departure is not None and departure.stream_ordering > position


class SyncGuard:
    """Takes forgotten rooms out of /sync, sliding sync and /notifications answers.

    Args:
        lookup: The departure lookups.
    """

    def __init__(self, lookup: DepartureLookup) -> None:
        self._lookup = lookup

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
        left: dict[str, Any] = rooms["leave"] if isinstance(rooms.get("leave"), dict) else {}
        kept_left = [
            room_id
            for room_id, entry in left.items()
            if room_id not in forgotten and isinstance(entry, dict)
        ]
        since = _arg(request, b"since")
        # Every departure this answer needs, in one lookup: the rooms in "leave"
        # (each is checked) and, for a device with a since, the forgotten ones there
        # (a stub if the device missed the departure).
        wanted = set(kept_left)
        if since and any(section == "leave" for section, _ in hits):
            wanted |= {room_id for section, room_id in hits if section == "leave"}
        departures = await self._lookup.departures(user_id, wanted) if wanted else {}
        positions: list[int | None] = []

        async def position() -> int | None:
            if not positions:
                positions.append(await self._position(since))
            return positions[0]

        changed = bool(hits)
        for section, room_id in hits:
            entry = rooms[section].pop(room_id)
            if section == "leave" and _departed_after(departures.get(room_id), await position()):
                rooms[section][room_id] = self._sync_stub(entry, user_id)
        to_hide: list[tuple[list[list[Any]], Departure]] = []
        for room_id in kept_left:
            entry = left[room_id]
            departure = departures.get(room_id)
            if departure is None:
                continue
            if departure.forgotten:
                # Forgotten, then a knock or an invite cleared Synapse's flag.
                del left[room_id]
                if _departed_after(departure, await position()):
                    left[room_id] = self._sync_stub(entry, user_id)
                changed = True
                continue
            lists = [
                section["events"]
                for section in entry.values()
                if isinstance(section, dict) and isinstance(section.get("events"), list)
            ]
            to_hide.append((lists, departure))
        if to_hide:
            changed |= any(await hide_later_in_rooms(self._lookup, to_hide))
        if not changed:
            return None
        for section in [s for s, entries in rooms.items() if entries == {}]:
            # Synapse leaves empty sections out.
            del rooms[section]
        return 200, encode(data)

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

        Every room the answer names (``rooms``, the lists' ``room_ids``, the
        extensions' per-room sections) is looked up, in one query:

        * a room the user forgot is removed from all of them (a device whose
          ``pos`` predates the departure gets the stub instead); if the user has
          knocked on it or been invited to it since, it is shown as to a knocker
          or invitee who was never in the room: listed, with Synapse's stripped
          state and room details, no timeline, no state, nothing but the user's
          own account data in the extensions;
        * a room the user departed from (a ``room_subscriptions`` entry can name
          one) shows nothing sent after the departure, and no receipts, typing or
          other extension data but the user's account data (they tell of the
          room now).
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
        lists = [e for e in (data.get("lists") or {}).values() if isinstance(e, dict)]
        listed = {
            room_id
            for entry in lists
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
        mentioned = set(rooms) | listed | extension_rooms
        departures = await self._lookup.departures(
            user_id, {r for r in mentioned if isinstance(r, str)}
        )
        # Forgotten and since knocked on or invited to: shown as to a never-member.
        pending = {
            room_id
            for room_id, d in departures.items()
            if d is not None and d.forgotten and d.pending and room_id not in forgotten
        }
        hits = (mentioned & set(forgotten)) | {
            room_id
            for room_id, d in departures.items()
            if d is not None and d.forgotten and room_id not in pending
        }
        changed = bool(hits)
        # Rooms the user left but did not forget: nothing sent after the departure.
        departed = {
            room_id for room_id, d in departures.items() if d is not None and not d.forgotten
        } - hits
        to_hide: list[tuple[list[list[Any]], Departure]] = []
        for room_id in departed:
            entry = rooms.get(room_id)
            departure = departures[room_id]
            if isinstance(entry, dict) and departure is not None:
                event_lists = [
                    entry[key]
                    for key in ("timeline", "required_state")
                    if isinstance(entry.get(key), list)
                ]
                to_hide.append((event_lists, departure))
        if to_hide:
            changed |= any(await hide_later_in_rooms(self._lookup, to_hide))
        for room_id in pending:
            entry = rooms.get(room_id)
            if isinstance(entry, dict):
                reduced = {k: v for k, v in entry.items() if k in _PENDING_KEYS}
                if reduced != entry:
                    rooms[room_id] = reduced
                    changed = True
            elif entry is not None:
                del rooms[room_id]
                changed = True
        for name, per_room in sections:
            # A departed room's own account data is the user's; the rest
            # (receipts, typing, sticky events, anything newer) tells of the room now.
            for room_id in (departed | pending) - {r for r in per_room if name == "account_data"}:
                if per_room.pop(room_id, None) is not None:
                    changed = True
        if not changed:
            return None
        position = await self._position(_arg(request, b"pos"))
        stubbed = set()
        for room_id in hits:
            entry = rooms.pop(room_id, None)
            if entry is not None and _departed_after(departures.get(room_id), position):
                rooms[room_id] = self._sliding_stub(entry, user_id)
                stubbed.add(room_id)
        dropped = hits - stubbed
        for entry in lists:
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
