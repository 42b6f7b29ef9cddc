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
from synapse.types.state import StateFilter

from matrix_leave_forget._synapse.sql import IN_LIST_MAX

# Why: what a never-member may see is Synapse's visibility rule; newer Synapse
# versions renamed the function (and wrap each event), 1.98 has the old name.
try:
    from synapse.visibility import filter_and_transform_events_for_client as _filter_events

    _WRAPPED = True
except ImportError:  # Synapse before the rename
    from synapse.visibility import (  # type: ignore[attr-defined,no-redef]
        filter_events_for_client as _filter_events,
    )

    _WRAPPED = False

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

_HISTORY_VISIBILITY = "m.room.history_visibility"


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
        # A space is not allowed in a localpart: no account can be this user.
        self._never_member = f"@mlf never-member:{self._hs.hostname}"

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

    async def membership_history(
        self, user_id: str, room_id: str
    ) -> list[tuple[str, str, int, bool]]:
        """Every membership user_id had in room_id, oldest first.

        Returns:
            (membership, event id, stream position, forgotten) per membership event.

        Why: the guard needs the user's whole membership history in the room
        (the departure is the first leave or ban after the last join, and the
        forget is the flag Synapse's forget sets on that row), and Synapse
        offers only the current membership. ``room_memberships`` keeps one row
        per membership event with the ``forgotten`` flag, indexed by user.
        """

        def txn_fn(txn: Any) -> list[tuple[str, str, int, bool]]:
            txn.execute(
                "SELECT m.membership, m.event_id, e.stream_ordering, m.forgotten"
                " FROM room_memberships AS m INNER JOIN events AS e USING (event_id)"
                " WHERE m.user_id = ? AND m.room_id = ? AND NOT e.outlier"
                " ORDER BY e.stream_ordering",
                (user_id, room_id),
            )
            return [(str(m), str(e), int(s), bool(f)) for m, e, s, f in txn]

        rows: list[tuple[str, str, int, bool]] = await self._store.db_pool.runInteraction(
            "leave_forget_membership_history", txn_fn
        )
        return rows

    async def membership_histories(
        self, user_id: str, room_ids: Iterable[str]
    ) -> dict[str, tuple[str | None, list[tuple[str, str, int, bool]]]]:
        """local_membership and membership_history of user_id in each of room_ids, together.

        Returns:
            Per room: the current local membership (None if none) and every
            membership event, oldest first, as membership_history gives them.
            Rooms without a current local membership have no entry.

        Why: as membership_history; one transaction, with IN lists of at most
        ``IN_LIST_MAX`` rooms, instead of two queries per room (a /sync with
        ``include_leave`` names every room the user left).
        """
        rooms = sorted(set(room_ids))

        def txn_fn(
            txn: Any,
        ) -> dict[str, tuple[str | None, list[tuple[str, str, int, bool]]]]:
            found: dict[str, tuple[str | None, list[tuple[str, str, int, bool]]]] = {}
            for start in range(0, len(rooms), IN_LIST_MAX):
                chunk = rooms[start : start + IN_LIST_MAX]
                marks = ", ".join("?" for _ in chunk)
                txn.execute(
                    "SELECT room_id, membership FROM local_current_membership"
                    f" WHERE user_id = ? AND room_id IN ({marks})",
                    (user_id, *chunk),
                )
                for room_id, membership in txn.fetchall():
                    found[str(room_id)] = (str(membership) if membership else None, [])
                txn.execute(
                    "SELECT m.room_id, m.membership, m.event_id, e.stream_ordering, m.forgotten"
                    " FROM room_memberships AS m INNER JOIN events AS e USING (event_id)"
                    f" WHERE m.user_id = ? AND m.room_id IN ({marks}) AND NOT e.outlier"
                    " ORDER BY e.stream_ordering",
                    (user_id, *chunk),
                )
                for room_id, m, e, s, f in txn.fetchall():
                    if str(room_id) in found:
                        found[str(room_id)][1].append((str(m), str(e), int(s), bool(f)))
            return found

        if not rooms:
            return {}
        found: dict[
            str, tuple[str | None, list[tuple[str, str, int, bool]]]
        ] = await self._store.db_pool.runInteraction("leave_forget_membership_histories", txn_fn)
        return found

    async def never_member_sees(self, events: Iterable[str]) -> AbstractSet[str]:
        """The events among the given ids that a user who was never in the room may see.

        Why: that is Synapse's own visibility check (history visibility at each
        event, the boundary rule for a visibility change), which ModuleApi does
        not expose; it is asked for a user id no account can have, so that no
        membership, ignore list or admin setting of a real user takes part.
        """
        ids = list(set(events))
        if not ids:
            return frozenset()
        loaded = await self._store.get_events_as_list(ids)
        storage = self._hs.get_storage_controllers()
        allowed: list[Any] = await _filter_events(
            storage, self._never_member, loaded, is_peeking=True
        )
        return {(a.event if _WRAPPED else a).event_id for a in allowed}

    async def state_visible_to_never_member(self, room_id: str, token: str) -> tuple[bool, str]:
        """Whether a never-member may see room_id's state at a /members ``at`` token.

        Returns:
            The answer, and the token as Synapse writes it in its refusal.

        Why: Synapse decides this from the history visibility in the state at
        the room's last event before the token (``_user_can_see_state_at_event``,
        not exposed); the refusal's text names the parsed StreamToken.
        """
        try:
            parsed = await StreamToken.from_string(self._store, token)
        except Exception:
            return False, token
        # The same query; Synapse 1.98 names it without "_id".
        last_event_before = (
            getattr(
                self._store,
                "get_last_event_id_in_room_before_stream_ordering",
                None,
            )
            or self._store.get_last_event_in_room_before_stream_ordering
        )
        last = await last_event_before(room_id, end_token=parsed.room_key)
        if last is None:
            return False, str(parsed)
        state = await self._hs.get_storage_controllers().state.get_state_for_event(
            last, StateFilter.from_types([(_HISTORY_VISIBILITY, "")])
        )
        event = state.get((_HISTORY_VISIBILITY, ""))
        visibility = event.content.get("history_visibility") if event is not None else None
        return visibility == "world_readable", str(parsed)

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
