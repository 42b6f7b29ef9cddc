"""Who left which room, and where: the lookups behind the history guard.

Every check starts with a per-user set that Synapse already caches (joined rooms,
forgotten rooms), so that a user who never left a room costs one cache hit per
request; only a read of a room the user is not joined to looks further.

A process that does not serve forget (a worker: Synapse serves it on the main
process only) hears of one through replication, a few milliseconds after the
client got its 200, and until then its cached forgotten set is out of date. There
the set is trusted only for answers naming no room outside it and outside the
user's joined rooms (a room a user forgot is one they are not joined to); an
answer naming such a room is checked against the forgotten rooms read from the
database.
"""

from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

import attr
from synapse.module_api import ModuleApi

if TYPE_CHECKING:
    from matrix_leave_forget._synapse.history import HistoryInternals

# Memberships that mean the user was in the room and is no longer.
DEPARTED = ("leave", "ban")
# Memberships that ask to be let in (again): a knock, or an invite not yet answered.
PENDING = ("knock", "invite")
_HISTORY_VISIBILITY = "m.room.history_visibility"


@attr.s(frozen=True, auto_attribs=True)
class Departure:
    """How a local user's last stay in a room ended: their first leave, kick or ban after it.

    Attributes:
        event_id: The user's m.room.member event (leave, kick or ban).
        stream_ordering: That event's position in the room event stream;
            events after it were sent after the user left.
        forgotten: Whether the user has forgotten the room since (and not
            joined again: a knock, an invite or an unban does not lift it).
    """

    event_id: str
    stream_ordering: int
    forgotten: bool
    # The user's membership now if it is a knock or an invite made after the
    # departure (pending: the user is not in the room and sees only what any
    # knocker or invitee sees); else None.
    pending: str | None = None


# (membership, event id, stream position, forgotten flag) of one membership event.
MembershipRow = tuple[str, str, int, bool]


def departure_from(history: Sequence[MembershipRow]) -> Departure | None:
    """The departure a membership history (oldest first) ends in, or None.

    The departure is the first leave, kick or ban after the user's last join:
    what follows it without a join (a knock and its rescinding, an invite and
    its rejection, an unban, another leave or ban) does not move it, since the
    user saw nothing of the room meanwhile. None if the user is joined (their
    latest membership is the join) or never joined: those read as natively.

    The forget holds until the user joins again: Synapse sets the ``forgotten``
    flag on every membership row of the user in the room, the departure's
    included, and a new membership (a knock, an invite) adds a row without it,
    which clears Synapse's own "forgotten" but not the departure's flag.
    """
    last_join = None
    for index, (membership, _, _, _) in enumerate(history):
        if membership == "join":
            last_join = index
    if last_join is None:
        return None
    for membership, event_id, stream_ordering, forgotten in history[last_join + 1 :]:
        if membership in DEPARTED:
            latest = history[-1][0]
            pending = latest if latest in PENDING else None
            return Departure(event_id, stream_ordering, forgotten, pending)
    return None


class DepartureLookup:
    """Answers "did this user leave this room, when, and did they forget it".

    Args:
        api: The module API (room state).
        internals: Synapse's cached membership lookups.
        forgets_elsewhere: Whether forgets are served by another process, so
            that this one's caches hear of them late (a worker).
    """

    def __init__(
        self, api: ModuleApi, internals: "HistoryInternals", forgets_elsewhere: bool = False
    ) -> None:
        self._api = api
        self._internals = internals
        self._forgets_elsewhere = forgets_elsewhere

    async def forgotten_rooms(
        self, user_id: str, named: Callable[[], AbstractSet[str]]
    ) -> AbstractSet[str]:
        """The rooms user_id forgot, as far as an answer naming the rooms named() goes.

        Synapse's cached set, unless this process hears of forgets late and
        named() holds a room that set and the user's joined rooms leave
        unexplained: then the set read from the database.
        """
        forgotten = await self._internals.forgotten_rooms(user_id)
        if not self._forgets_elsewhere:
            return forgotten
        unexplained = named() - forgotten
        if not unexplained or unexplained <= await self._internals.joined_rooms(user_id):
            return forgotten
        return await self._internals.forgotten_rooms_from_database(user_id)

    async def joined_rooms(self, user_id: str) -> AbstractSet[str]:
        """The rooms user_id is joined to (Synapse's cache)."""
        return await self._internals.joined_rooms(user_id)

    def joined_rooms_now(self, user_id: str) -> AbstractSet[str] | None:
        """joined_rooms if Synapse's cache holds it, without waiting; else None."""
        return self._internals.joined_rooms_now(user_id)

    def joined_now(self, user_id: str, room_id: str) -> bool:
        """True if Synapse's cache already says user_id is joined to room_id."""
        rooms = self._internals.joined_rooms_now(user_id)
        return rooms is not None and room_id in rooms

    def forgotten_rooms_now(
        self, user_id: str, named: Callable[[], AbstractSet[str]]
    ) -> AbstractSet[str] | None:
        """forgotten_rooms if Synapse's caches answer it without waiting (None: ask it)."""
        forgotten = self._internals.forgotten_rooms_now(user_id)
        if forgotten is None or not self._forgets_elsewhere:
            return forgotten
        joined = self._internals.joined_rooms_now(user_id)
        if joined is None or not named() <= forgotten | joined:
            return None
        return forgotten

    async def departure(self, user_id: str, room_id: str) -> Departure | None:
        """user_id's departure from room_id (see departure_from), or None.

        None for a joined user (one cache hit), for one who never joined the room
        (invited, knocking, a rejected invite: those read as natively) and for
        one with no membership in it (one cached row). Otherwise the user's
        membership history in the room is read from the database (one indexed
        query), which also keeps a forget made on another process current.
        """
        if room_id in await self._internals.joined_rooms(user_id):
            return None
        membership, _ = await self._internals.local_membership(user_id, room_id)
        if membership is None or membership == "join":
            return None
        return departure_from(await self._internals.membership_history(user_id, room_id))

    async def departures(
        self, user_id: str, room_ids: Iterable[str]
    ) -> dict[str, Departure | None]:
        """departure() for each of room_ids, with one database transaction for all.

        The rooms the user is joined to (Synapse's cache) have none; the others'
        current memberships and histories are read together, in IN lists of a
        bounded size, so that an answer naming many rooms the user left (an
        initial /sync with ``include_leave``) costs one transaction, not two
        queries per room.
        """
        rooms = set(room_ids)
        found: dict[str, Departure | None] = dict.fromkeys(rooms)
        if not rooms:
            return found
        asked = rooms - await self._internals.joined_rooms(user_id)
        if not asked:
            return found
        for room_id, (membership, history) in (
            await self._internals.membership_histories(user_id, asked)
        ).items():
            if room_id in found and membership is not None and membership != "join":
                found[room_id] = departure_from(history)
        return found

    async def never_member_sees(self, event_ids: Iterable[str]) -> AbstractSet[str]:
        """The events a user who was never in the room may see (world_readable at each)."""
        return await self._internals.never_member_sees(event_ids)

    async def state_visible_to_never_member(self, room_id: str, token: str) -> tuple[bool, str]:
        """Whether a never-member may see the room's state at a /members ``at`` token,
        and the token as Synapse spells it in its refusal."""
        return await self._internals.state_visible_to_never_member(room_id, token)

    async def world_readable(self, room_id: str) -> bool:
        """Whether the room's current history visibility is world_readable.

        What Synapse asks before it serves a room read (/messages, /members...)
        to a non-member; which events such a reader then gets is never_member_sees.
        """
        state = await self._api.get_room_state(room_id, [(_HISTORY_VISIBILITY, "")])
        event = state.get((_HISTORY_VISIBILITY, ""))
        return event is not None and event.content.get("history_visibility") == "world_readable"

    async def stream_orderings(self, event_ids: Iterable[str]) -> dict[str, int]:
        """Stream positions of the given events (unknown ones left out)."""
        return await self._internals.stream_orderings(event_ids)

    async def token_position(self, token: str) -> int | None:
        """The room-stream position of a sync token, or None if unparseable."""
        return await self._internals.token_position(token)
