"""What the history guard needs from Synapse: cached lookups and tokens."""

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from synapse.module_api import ModuleApi

# Why: /sync ``since`` and sliding-sync ``pos`` are Synapse's own stream
# tokens; the history guard compares them with a departure's position.
from synapse.types import StreamToken

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# History guard (issue 9): what the read-path guards need from Synapse.
# ---------------------------------------------------------------------------


class HistoryInternals:
    """Synapse's cached membership lookups and token parsing, for the history guard.

    Args:
        api: The module API handed to the module by Synapse.
    """

    def __init__(self, api: ModuleApi) -> None:
        # Why: ModuleApi exposes neither the main datastore's cached membership
        # queries nor stream tokens; they hang off the HomeServer object.
        self._hs: HomeServer = api._hs
        # Any: mypy sees Synapse's @cached methods as unbound descriptors.
        self._store: Any = self._hs.get_datastores().main
        self._forgotten_rooms_uncached: Callable[..., Awaitable[AbstractSet[str]]] = (
            inspect.getattr_static(type(self._store), "get_forgotten_rooms_for_user").orig
        )

    async def joined_rooms(self, user_id: str) -> AbstractSet[str]:
        """The rooms user_id is joined to.

        Why: Synapse's ``get_rooms_for_user`` is cached per user and kept
        current by its own invalidation; ModuleApi only offers an uncached query.
        """
        rooms: AbstractSet[str] = await self._store.get_rooms_for_user(user_id)
        return rooms

    def joined_rooms_now(self, user_id: str) -> AbstractSet[str] | None:
        """joined_rooms if Synapse's cache holds the answer, without waiting; else None.

        Why: the guard's pre-check runs in ``request.finish``, synchronously;
        a cache hit there spares the request a trip through a new logcontext
        and the reactor (see history_guard.capture).
        """
        rooms: AbstractSet[str] | None = self._store.get_rooms_for_user.cache.get_immediate(
            user_id, None, update_metrics=False
        )
        return rooms

    def forgotten_rooms_now(self, user_id: str) -> AbstractSet[str] | None:
        """forgotten_rooms if Synapse's cache holds the answer, without waiting; else None.

        Why: as joined_rooms_now.
        """
        rooms: AbstractSet[str] | None = (
            self._store.get_forgotten_rooms_for_user.cache.get_immediate(
                user_id, None, update_metrics=False
            )
        )
        return rooms

    async def forgotten_rooms(self, user_id: str) -> AbstractSet[str]:
        """The rooms user_id has forgotten (and not rejoined since).

        Why: Synapse's ``get_forgotten_rooms_for_user`` is cached per user and
        invalidated by forget and by every membership change; no ModuleApi equivalent.
        """
        rooms: AbstractSet[str] = await self._store.get_forgotten_rooms_for_user(user_id)
        return rooms

    async def forgotten_rooms_from_database(self, user_id: str) -> AbstractSet[str]:
        """forgotten_rooms read from the database, past the cache (nothing is cached).

        Why: on a worker the cache hears of a forget made on the main process
        through replication, after the client had its 200; Synapse's own query
        (the function under its ``@cached``, taken from the descriptor so that
        no cache is consulted or filled) keeps "forgotten" meaning what it means
        to Synapse.
        """
        rooms: AbstractSet[str] = await self._forgotten_rooms_uncached(self._store, user_id)
        return rooms

    async def local_membership(self, user_id: str, room_id: str) -> tuple[str | None, str | None]:
        """A local user's current membership in room_id and its event id (None, None if none).

        Why: ModuleApi has no single-row lookup of local_current_membership.
        """
        membership, event_id = await self._store.get_local_current_membership_for_user_in_room(
            user_id, room_id
        )
        return membership, event_id

    async def stream_orderings(self, event_ids: Iterable[str]) -> dict[str, int]:
        """Each known event's position in the room event stream (outliers left out).

        Why: the position is internal metadata, not part of the client event;
        Synapse's event cache answers this without a query for recent events.
        """
        events = await self._store.get_events(list(set(event_ids)), allow_rejected=True)
        positions: dict[str, int] = {}
        for event_id, event in events.items():
            ordering = event.internal_metadata.stream_ordering
            if ordering is not None and not event.internal_metadata.is_outlier():
                positions[event_id] = int(ordering)
        return positions

    async def token_position(self, token: str) -> int | None:
        """The room-stream position of a /sync ``since`` or a sliding-sync ``pos``.

        Returns None when the token cannot be parsed (Synapse answers it with an error).

        Why: sync tokens are Synapse's internal StreamToken format, and its own
        parser resolves multi-writer positions.
        """
        # Sliding sync positions are "<connection position>/<stream token>".
        stream_token = token.split("/", 1)[1] if "/" in token else token
        try:
            parsed = await StreamToken.from_string(self._store, stream_token)
        except Exception:
            return None
        return int(parsed.room_key.stream)
