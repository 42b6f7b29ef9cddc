"""The reference model of the history promises: which events a user may see.

A pure function of a room's events (in stream order, as any member who was
joined throughout reads them) and of when the user forgot the room. It states
the rule of docs/history.md ("The rule") independently of the guard's code, so
that the adversarial suite (tests/integration/test_history_sequences.py,
scripts/history_sequences.py) can check answers against it:

* the spec's history visibility, per event: world_readable at the event
  (anyone); the user joined at the event; ``shared`` and the user joined at
  any point after the event; ``invited`` and the user invited at the event;
* the departure: the first leave, kick or ban after the user's last join; no
  event after it, unless world_readable at the event (a never-member may see
  those too);
* the forget: from the forget until the user joins again, only what a
  never-member may see (world_readable at the event).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MEMBER = "m.room.member"
HISTORY_VISIBILITY = "m.room.history_visibility"
DEPARTED = ("leave", "ban")
# Least to most restrictive, as Synapse orders them for a visibility change.
_PRIORITY = ("world_readable", "shared", "invited", "joined")


def _visibility(content: Any) -> str:
    value = content.get("history_visibility") if isinstance(content, dict) else None
    return value if value in _PRIORITY else "shared"


def visible_events(
    events: Sequence[dict[str, Any]], user_id: str, forgotten_after: str | None = None
) -> set[str]:
    """The ids of the events user_id may see now.

    Args:
        events: The room's events, in stream order (client format: ``event_id``,
            ``type``, ``state_key``, ``content``).
        user_id: The reader.
        forgotten_after: The id of the latest event of the room when the user
            forgot it, or None if they never did.

    Returns:
        The visible event ids. The user's own membership events are included
        from their first join on (a user sees their own membership changes).
    """
    visibility = "shared"
    memberships: list[str | None] = []  # the user's membership after each event
    at_event: list[str] = []  # the history visibility that applies to each event
    membership: str | None = None
    forgot_at: int | None = None
    for index, event in enumerate(events):
        if event.get("type") == HISTORY_VISIBILITY and event.get("state_key") == "":
            new = _visibility(event.get("content"))
            # The change itself is seen under the less restrictive of old and new.
            at_event.append(min(visibility, new, key=_PRIORITY.index))
            visibility = new
        else:
            at_event.append(visibility)
        if event.get("type") == MEMBER and event.get("state_key") == user_id:
            membership = (event.get("content") or {}).get("membership")
        memberships.append(membership)
        if event.get("event_id") == forgotten_after:
            forgot_at = index
    joins = [i for i, m in enumerate(memberships) if m == "join" and _is_own(events[i], user_id)]
    last_join = joins[-1] if joins else None
    departure = None
    if last_join is not None:
        departure = next(
            (
                i
                for i in range(last_join + 1, len(events))
                if _is_own(events[i], user_id) and memberships[i] in DEPARTED
            ),
            None,
        )
    forgotten = forgot_at is not None and (last_join is None or last_join < forgot_at)
    seen: set[str] = set()
    for index, event in enumerate(events):
        event_id = event["event_id"]
        if at_event[index] == "world_readable":
            seen.add(event_id)
        elif forgotten or last_join is None:
            continue
        elif departure is not None and index > departure:
            continue
        elif _is_own(event, user_id) and index >= joins[0]:
            seen.add(event_id)
        elif memberships[index] == "join":
            seen.add(event_id)
        elif at_event[index] == "shared" and any(j > index for j in joins):
            seen.add(event_id)
        elif at_event[index] == "invited" and memberships[index] == "invite":
            seen.add(event_id)
    return seen


def _is_own(event: dict[str, Any], user_id: str) -> bool:
    return event.get("type") == MEMBER and event.get("state_key") == user_id
