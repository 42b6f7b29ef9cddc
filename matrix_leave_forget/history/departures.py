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

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

import attr
from synapse.module_api import ModuleApi

if TYPE_CHECKING:
    from matrix_leave_forget._synapse.history import HistoryInternals

# Memberships that mean the user was in the room and is no longer.
DEPARTED = ("leave", "ban")
_HISTORY_VISIBILITY = "m.room.history_visibility"


@attr.s(frozen=True, auto_attribs=True)
class Departure:
    """A local user's current leave or ban in a room.

    Attributes:
        event_id: The user's m.room.member event (leave, kick or ban).
        stream_ordering: That event's position in the room event stream;
            events after it were sent after the user left.
        forgotten: Whether the user has forgotten the room since.
    """

    event_id: str
    stream_ordering: int
    forgotten: bool


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
        """user_id's departure from room_id, or None if they are not departed from it.

        None for a joined user (one cache hit), and for one who was never in the
        room, is invited or knocks: those read the room exactly as natively.
        """
        if room_id in await self._internals.joined_rooms(user_id):
            return None
        membership, event_id = await self._internals.local_membership(user_id, room_id)
        if membership not in DEPARTED or event_id is None:
            return None
        positions = await self._internals.stream_orderings([event_id])
        if event_id not in positions:
            return None
        forgotten = room_id in await self.forgotten_rooms(user_id, lambda: {room_id})
        return Departure(event_id, positions[event_id], forgotten)

    async def world_readable(self, room_id: str) -> bool:
        """Whether anyone may read room_id's history (then nothing is hidden)."""
        state = await self._api.get_room_state(room_id, [(_HISTORY_VISIBILITY, "")])
        event = state.get((_HISTORY_VISIBILITY, ""))
        return event is not None and event.content.get("history_visibility") == "world_readable"

    async def stream_orderings(self, event_ids: Iterable[str]) -> dict[str, int]:
        """Stream positions of the given events (unknown ones left out)."""
        return await self._internals.stream_orderings(event_ids)

    async def token_position(self, token: str) -> int | None:
        """The room-stream position of a sync token, or None if unparseable."""
        return await self._internals.token_position(token)
