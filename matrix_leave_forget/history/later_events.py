"""Events sent after a departure: finding them in an answer, bundled ones included.

A former member must not see events sent after they left, neither as events of
their own nor bundled into earlier ones (``unsigned.m.relations``: a thread
summary's latest reply, an edit, references).
"""

from typing import Any

from matrix_leave_forget.history.departures import Departure, DepartureLookup


async def later_events(
    lookup: DepartureLookup, events: list[dict[str, Any]], departure: Departure
) -> set[str]:
    """The ids of events (bundled ones too) that were sent after departure."""
    ids = {i for event in events for i in ids_with_bundled(event)}
    if not ids:
        return set()
    positions = await lookup.stream_orderings(ids)
    return {i for i, pos in positions.items() if pos > departure.stream_ordering}


async def hide_later(
    lookup: DepartureLookup, event_lists: list[list[Any]], departure: Departure
) -> bool:
    """Drop later events from each list (in place) and later bundles from the rest.

    Events world_readable at the event are kept: a never-member may see them too.

    Returns:
        Whether anything was dropped.
    """
    events = [e for events in event_lists for e in events if isinstance(e, dict)]
    later = await later_events(lookup, events, departure)
    if later:
        # What anyone may see (world_readable at the event) is not hidden.
        later -= await lookup.never_member_sees(later)
    if not later:
        return False
    for events in event_lists:
        events[:] = [e for e in events if not is_later(e, later)]
        for event in events:
            if isinstance(event, dict):
                scrub_aggregations(event, later)
    return True


def _bundled(event: dict[str, Any]) -> dict[str, Any]:
    relations = (event.get("unsigned") or {}).get("m.relations")
    return relations if isinstance(relations, dict) else {}


def ids_with_bundled(event: dict[str, Any]) -> list[str]:
    ids = [event["event_id"]] if isinstance(event.get("event_id"), str) else []
    relations = _bundled(event)
    thread = relations.get("m.thread")
    if isinstance(thread, dict) and isinstance(thread.get("latest_event"), dict):
        ids.extend(ids_with_bundled(thread["latest_event"]))
    replace = relations.get("m.replace")
    if isinstance(replace, dict) and isinstance(replace.get("event_id"), str):
        ids.append(replace["event_id"])
    reference = relations.get("m.reference")
    if isinstance(reference, dict) and isinstance(reference.get("chunk"), list):
        ids.extend(
            r["event_id"] for r in reference["chunk"] if isinstance(r, dict) and "event_id" in r
        )
    return ids


def is_later(event: Any, later: set[str]) -> bool:
    return isinstance(event, dict) and event.get("event_id") in later


def scrub_aggregations(event: dict[str, Any], later: set[str]) -> None:
    """Drop bundled relations that were sent after the departure.

    A thread summary whose latest reply is later is dropped whole: its count
    and latest reply would both tell of later events.
    """
    relations = _bundled(event)
    if not relations:
        return
    thread = relations.get("m.thread")
    if isinstance(thread, dict) and any(
        i in later for i in ids_with_bundled(thread.get("latest_event") or {})
    ):
        del relations["m.thread"]
    replace = relations.get("m.replace")
    if isinstance(replace, dict) and replace.get("event_id") in later:
        del relations["m.replace"]
    reference = relations.get("m.reference")
    if isinstance(reference, dict) and isinstance(reference.get("chunk"), list):
        reference["chunk"] = [r for r in reference["chunk"] if not is_later(r, later)]
        if not reference["chunk"]:
            del relations["m.reference"]
    if not relations:
        del event["unsigned"]["m.relations"]
