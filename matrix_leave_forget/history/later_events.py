"""Events sent after a departure: finding them in an answer, carried ones included.

A former member must not see events sent after they left, neither as events of
their own nor carried inside earlier ones: ``unsigned.m.relations`` (a thread
summary's latest reply, an edit, references), ``unsigned.redacted_because`` and
``redacted_by`` (a later redaction of an earlier event), ``unsigned.replaces_state``
(with ``prev_content``/``prev_sender``). The guard fails closed on what it cannot
check: a carried event without an id (a filter's ``event_fields`` or
``event_format`` removed it), one the server does not know, a relation kind or
an ``unsigned`` structure it does not know are removed, never passed.
"""

from typing import Any

from matrix_leave_forget.history.departures import Departure, DepartureLookup

# unsigned keys whose values carry no other event (or, for prev_content and
# prev_sender, one that replaces_state names and that is checked through it).
_PLAIN_UNSIGNED = frozenset(
    {
        "age",
        "age_ts",
        "transaction_id",
        "membership",
        "prev_content",
        "prev_sender",
        # Stripped state shown with an invite or knock: state at that membership.
        "invite_room_state",
        "knock_room_state",
    }
)
_REPLACED_STATE = ("replaces_state", "prev_content", "prev_sender")
# unsigned keys naming another event by id.
_CARRIED_IDS = ("replaces_state", "redacted_by")
# What the legacy event format copies from unsigned to the event's top level.
_LEGACY_TOP_LEVEL = frozenset({"redacted_because", "replaces_state", "redacted_by"})


async def later_events(
    lookup: DepartureLookup, events: list[dict[str, Any]], departure: Departure
) -> set[str]:
    """The ids of events (carried ones too) that were sent after departure and
    that a never-member may not see (world_readable at the event: docs/history.md,
    "The rule").

    A carried event the server does not know (no stream position) counts as later.
    """
    top = {e["event_id"] for e in events if isinstance(e.get("event_id"), str)}
    carried = {i for event in events for i in carried_ids(event)}
    ids = top | carried
    if not ids:
        return set()
    positions = await lookup.stream_orderings(ids)
    later = {i for i, pos in positions.items() if pos > departure.stream_ordering}
    later |= carried - positions.keys()
    if later:
        # What anyone may see (world_readable at the event) is not hidden.
        later -= await lookup.never_member_sees(later)
    return later


async def hide_later(
    lookup: DepartureLookup, event_lists: list[list[Any]], departure: Departure
) -> bool:
    """Drop later events from each list (in place) and later carried events from the rest.

    Returns:
        Whether anything was dropped.
    """
    return (await hide_later_in_rooms(lookup, [(event_lists, departure)]))[0]


async def hide_later_in_rooms(
    lookup: DepartureLookup, rooms: list[tuple[list[list[Any]], Departure]]
) -> list[bool]:
    """hide_later for several rooms at once, each with its own departure.

    The same decisions as hide_later room by room, with one stream-position
    lookup and at most one visibility check for all the rooms together (a /sync
    with ``include_leave`` holds every room the user left).

    Returns:
        Whether anything was dropped, per room, in order.
    """
    per_room = []
    for event_lists, departure in rooms:
        events = [e for events in event_lists for e in events if isinstance(e, dict)]
        top = {e["event_id"] for e in events if isinstance(e.get("event_id"), str)}
        carried = {i for event in events for i in carried_ids(event)}
        per_room.append((event_lists, departure, top | carried, carried))
    ids = {i for _lists, _departure, room_ids, _carried in per_room for i in room_ids}
    positions = await lookup.stream_orderings(ids) if ids else {}
    later_by_room = []
    for _lists, departure, room_ids, carried in per_room:
        later = {i for i in room_ids if i in positions and positions[i] > departure.stream_ordering}
        later_by_room.append(later | (carried - positions.keys()))
    candidates = set().union(*later_by_room)
    if candidates:
        # What anyone may see (world_readable at the event) is not hidden.
        seen = await lookup.never_member_sees(candidates)
        later_by_room = [later - seen for later in later_by_room]
    changed_by_room = []
    for (event_lists, _departure, _ids, _carried), later in zip(
        per_room, later_by_room, strict=True
    ):
        changed = False
        for events in event_lists:
            kept = [e for e in events if not is_later(e, later)]
            changed |= len(kept) != len(events)
            events[:] = kept
            for event in events:
                if isinstance(event, dict):
                    changed |= scrub_carried(event, later)
        changed_by_room.append(changed)
    return changed_by_room


def _unsigned(event: Any) -> dict[str, Any]:
    unsigned = event.get("unsigned") if isinstance(event, dict) else None
    return unsigned if isinstance(unsigned, dict) else {}


def _id(event: Any) -> str | None:
    """event's id if event is an object with a string event_id."""
    event_id = event.get("event_id") if isinstance(event, dict) else None
    return event_id if isinstance(event_id, str) else None


def carried_ids(event: dict[str, Any]) -> list[str]:
    """The ids of the events event carries in ``unsigned``, recursively, as scrub_carried
    reads them."""
    ids: list[str] = []
    unsigned = _unsigned(event)
    for holder in (unsigned, event):
        ids.extend(holder[key] for key in _CARRIED_IDS if isinstance(holder.get(key), str))
    relations = unsigned.get("m.relations")
    relations = relations if isinstance(relations, dict) else {}
    thread = relations.get("m.thread")
    reference = relations.get("m.reference")
    chunk = reference.get("chunk") if isinstance(reference, dict) else None
    carried = [
        unsigned.get("redacted_because"),
        event.get("redacted_because"),
        thread.get("latest_event") if isinstance(thread, dict) else None,
        relations.get("m.replace"),
        *(chunk if isinstance(chunk, list) else ()),
    ]
    for inner in carried:
        inner_id = _id(inner)
        if inner_id is not None:
            ids.append(inner_id)
            ids.extend(carried_ids(inner))
    return ids


def is_later(event: Any, later: set[str]) -> bool:
    return isinstance(event, dict) and event.get("event_id") in later


def _checked(event: Any, later: set[str]) -> bool:
    """Whether a carried event may pass: it has an id, and that id is not later."""
    event_id = _id(event)
    return event_id is not None and event_id not in later


def scrub_carried(event: dict[str, Any], later: set[str]) -> bool:
    """Remove from event's ``unsigned`` every carried event that is later or uncheckable.

    A thread summary whose latest reply is later is dropped whole: its count and
    latest reply would both tell of later events. A later redaction is removed
    (the event stays as Synapse serves it, redacted). A later ``replaces_state``
    takes ``prev_content`` and ``prev_sender`` with it.

    The legacy (v1) event format of ``/events/{id}``, ``/event`` and the
    ``/initialSync`` paths copies ``redacted_because``, ``replaces_state`` and
    ``prev_content`` to the top level of the event: those are checked there too.

    Returns:
        Whether anything was removed.
    """
    changed = _scrub_keys(event, later, _LEGACY_TOP_LEVEL)
    if isinstance(event.get("unsigned"), dict):
        changed |= _scrub_keys(event["unsigned"], later, None)
    return changed


def _scrub_keys(holder: dict[str, Any], later: set[str], only: frozenset[str] | None) -> bool:
    """scrub_carried on one mapping: ``unsigned`` (only=None), or an event's top level
    (only the legacy copies of unsigned keys)."""
    changed = False
    for key in list(holder) if only is None else [k for k in holder if k in only]:
        if key not in holder:  # went with replaces_state
            continue
        value = holder[key]
        if key == "redacted_because":
            if _checked(value, later):
                changed |= scrub_carried(value, later)
                continue
        elif key == "m.relations":
            changed |= _scrub_relations(holder, later)
            continue
        elif key in _CARRIED_IDS:
            if isinstance(value, str) and value not in later:
                continue
            for name in _REPLACED_STATE if key == "replaces_state" else (key,):
                holder.pop(name, None)
            changed = True
            continue
        elif (
            only is not None
            or key in _PLAIN_UNSIGNED
            or not (
                isinstance(value, dict | list) or (isinstance(value, str) and value.startswith("$"))
            )
        ):
            continue
        # A later or id-less redaction, or a value of a shape the guard does not
        # know that may carry or name another event.
        del holder[key]
        changed = True
    return changed


def _scrub_relations(unsigned: dict[str, Any], later: set[str]) -> bool:
    relations = unsigned["m.relations"]
    if not isinstance(relations, dict):
        del unsigned["m.relations"]
        return True
    changed = False
    for kind in list(relations):
        bundle = relations[kind]
        keep = False
        if kind == "m.thread" and isinstance(bundle, dict):
            latest = bundle.get("latest_event")
            if isinstance(latest, dict) and _checked(latest, later):
                changed |= scrub_carried(latest, later)
                keep = True
        elif kind == "m.replace":
            if _checked(bundle, later):
                changed |= scrub_carried(bundle, later)
                keep = True
        elif kind == "m.reference" and isinstance(bundle, dict):
            chunk = bundle.get("chunk")
            if isinstance(chunk, list):
                kept = [r for r in chunk if _checked(r, later)]
                changed |= len(kept) != len(chunk)
                bundle["chunk"] = kept
                keep = bool(kept)
        if not keep:
            del relations[kind]
            changed = True
    if not relations:
        del unsigned["m.relations"]
    return changed
