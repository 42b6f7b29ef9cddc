"""The one place where matrix-leave-forget reaches past Synapse's public ModuleApi.

Everything else in the package uses ``synapse.module_api`` only. Each reach
below says why the public API is not enough, so that a Synapse upgrade that
breaks one of them breaks it here, visibly, and nowhere else.
"""

import inspect
import json
import logging
import os
import re
import sys
from typing import (
    TYPE_CHECKING,
    AbstractSet,
    Any,
    Awaitable,
    Callable,
    Dict,
    Iterable,
    List,
    Optional,
    Sequence,
    Set,
    Tuple,
)

import attr
from signedjson.types import SigningKey

# Why: the room-member handler is the code path of Synapse's own
# /rooms/{roomId}/leave and /forget servlets. ModuleApi.update_room_membership
# would add displayname/avatar to the event and drop the requester's device and
# guest marker, so it is not the same leave.
from synapse.api.errors import ShadowBanError

# Why: Synapse's own limiter honours per-user overrides set through the admin
# API and exempts application services exactly as the native endpoints do;
# ModuleApi exposes no limiter.
from synapse.api.ratelimiting import Ratelimiter
from synapse.config.ratelimiting import RatelimitSettings

# Why: ModuleApi.delete_room schedules Synapse's purge task under these names
# and offers no way to follow it; the sweep reads the tasks to know.
from synapse.handlers.pagination import (
    PURGE_ROOM_ACTION_NAME,
    SHUTDOWN_AND_PURGE_ROOM_ACTION_NAME,
)

# Why: unmatched paths under the intercepted /_matrix node must answer exactly
# like Synapse's placeholder node does (404 M_UNRECOGNIZED, CORS headers).
from synapse.http.server import UnrecognizedRequestResource

# Why: the audit log's group commit wakes callers that wait in other requests'
# logcontexts; Synapse's rules say to fire their deferreds in the sentinel
# context, and ModuleApi exposes no way to enter it.
from synapse.logging.context import PreserveLoggingContext, run_in_background
from synapse.module_api import LoggingTransaction, ModuleApi, Requester

# Why: PUT /leave/{txnId} must replay like Synapse's servlets do (same key:
# path + user + device), and ModuleApi exposes no transaction cache.
from synapse.rest.client.transactions import HttpTransactionCache

# Why: /sync ``since`` and sliding-sync ``pos`` are Synapse's own stream
# tokens; the history guard compares them with a departure's position.
from synapse.types import StreamToken
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import Site

from matrix_leave_forget.schema import is_postgres
from matrix_leave_forget.statements import StatementBatch

if TYPE_CHECKING:
    from synapse.server import HomeServer
    from typing_extensions import LiteralString

logger = logging.getLogger(__name__)

# Room ids per IN (...) list: well under SQLite's oldest variable limit (999).
_IN_LIST_MAX = 500


def run_in_background_process(
    api: ModuleApi, desc: "LiteralString", func: Callable[[], Awaitable[None]]
) -> None:
    """Start func as a Synapse background process (its own logcontext and metrics).

    Why: ModuleApi.run_as_background_process is newer than the oldest supported
    Synapse, where only the module-level function exists (newer Synapses log a
    deprecation warning on every call of that one).
    """
    method = getattr(api, "run_as_background_process", None)
    if method is not None:
        method(desc, func)
    else:  # pragma: no cover - Synapse before ModuleApi.run_as_background_process
        from synapse.module_api import run_as_background_process

        run_as_background_process(desc, func)


def wake(deferreds: "List[defer.Deferred[None]]") -> None:
    """Fire deferreds that other logcontexts wait on (through make_deferred_yieldable)."""
    with PreserveLoggingContext():
        for deferred in deferreds:
            deferred.callback(None)


class SynapseInternals:
    """Synapse internals that matrix-leave-forget needs, behind one façade.

    Args:
        api: The module API handed to the module by Synapse.
    """

    def __init__(self, api: ModuleApi) -> None:
        # Why: ModuleApi has no accessor for the handlers, the signing key or
        # the listening ports; they all hang off the HomeServer object.
        self._hs: HomeServer = api._hs
        self._api = api

    # -- membership ------------------------------------------------------

    async def leave(
        self,
        requester: Requester,
        room_id: str,
        txn_id: Optional[str],
        content: Optional[Dict[str, Any]],
    ) -> Optional[str]:
        """Leave (or reject an invite, or rescind a knock) as Synapse's servlet does.

        Returns:
            The event id of the new membership event, or None when Synapse
            answered without sending one (a shadow-banned user, which Synapse
            pretends succeeded).
        """
        handler = self._hs.get_room_member_handler()
        try:
            event_id, _ = await handler.update_membership(
                requester=requester,
                target=requester.user,
                room_id=room_id,
                action="leave",
                txn_id=txn_id,
                content=content,
            )
        except ShadowBanError:
            return None
        return event_id

    # -- HTTP plumbing ---------------------------------------------------

    def new_transaction_cache(self) -> HttpTransactionCache:
        return HttpTransactionCache(self._hs)

    def new_ratelimiter(self, name: str, per_second: float, burst_count: int) -> Ratelimiter:
        return Ratelimiter(
            store=self._hs.get_datastores().main,
            clock=self._hs.get_clock(),
            cfg=RatelimitSettings(key=name, per_second=per_second, burst_count=burst_count),
        )

    async def purge_task_status(self, room_id: str) -> Tuple[Optional[str], Optional[str]]:
        """The state of Synapse's latest purge task for room_id, and its error.

        Returns ("active", None) while a purge is scheduled or running,
        ("failed", error), ("complete", None), or (None, None) if Synapse has no
        purge task for the room (never asked, or forgotten across a restart).

        Why: ModuleApi.delete_room starts a purge but offers no way to follow it.
        """
        tasks = await self._hs.get_task_scheduler().get_tasks(
            actions=[PURGE_ROOM_ACTION_NAME, SHUTDOWN_AND_PURGE_ROOM_ACTION_NAME],
            resource_id=room_id,
        )
        if not tasks:
            return None, None
        latest = max(tasks, key=lambda task: task.timestamp)
        status = str(getattr(latest.status, "value", latest.status))
        if status in ("active", "scheduled"):
            return "active", None
        return status, latest.error

    def extra_leave_content_keys(self) -> Tuple[str, ...]:
        """Request-body keys Synapse's own leave copies into the event besides ``reason``.

        Why: these follow experimental features switched on in Synapse's config,
        which ModuleApi does not expose.
        """
        experimental = getattr(self._hs.config, "experimental", None)
        if getattr(experimental, "msc4293_enabled", False):
            return ("org.matrix.msc4293.redact_events",)
        return ()

    def unrecognized_resource(self) -> Resource:
        return UnrecognizedRequestResource()

    def listener_roots(self) -> List[Resource]:
        """The root resource of each HTTP listener of this process, in config order.

        Why: interception relies on Synapse's create_resource_tree handing the
        existing /_matrix children to a module resource at /_matrix; only the
        live sites show whether that happened. The main process records its
        ports in _listening_services; a generic worker does not, so there the
        listening ports are taken from the reactor and put in config order.
        """
        ports = list(self._hs._listening_services)
        if self._api.worker_app is not None:
            ports = [
                reader
                # Every reactor Synapse runs on is an IReactorFDSet.
                for reader in self._hs.get_reactor().getReaders()  # type: ignore[attr-defined]
                if _site_of(getattr(reader, "factory", None)) is not None
            ]
            listeners = self._hs.config.worker.worker_listeners
            order = {
                getattr(listener, "port", None) or getattr(listener, "path", None): index
                for index, listener in enumerate(listeners)
                if listener.type == "http"
            }
            ports.sort(key=lambda port: order.get(_port_key(port), len(order)))
        roots: List[Resource] = []
        for port in ports:
            root = getattr(_site_of(getattr(port, "factory", None)), "resource", None)
            if isinstance(root, Resource) and all(root is not r for r in roots):
                roots.append(root)
        return roots

    def fatal(self, message: str) -> None:
        """Stop this Synapse process, as Synapse itself does on a start-up error.

        Why: the module's start-up checks run after Synapse's start-up code has
        returned, where an exception would only be logged.
        """
        logger.critical("matrix-leave-forget cannot run: %s", message)
        print(f"matrix-leave-forget cannot run: {message}", file=sys.__stderr__, flush=True)
        os._exit(1)

    # -- identity --------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        """The homeserver's signing key: Synapse offers no module API to sign."""
        return self._hs.signing_key

    @property
    def instance_name(self) -> str:
        return self._hs.get_instance_name()

    # -- Synapse's tables ------------------------------------------------
    # Why: "has every local user forgotten this room" and "does the room still
    # exist" are questions about Synapse's schema that no ModuleApi answers
    # inside a transaction. They run inside the module's own transactions so
    # that the decision and its record are atomic.

    @staticmethod
    def local_memberships_txn(txn: LoggingTransaction, room_id: str) -> List[Tuple[str, str, bool]]:
        """Each local user's current membership in room_id and whether they forgot it."""
        txn.execute(
            """
            SELECT lcm.user_id, lcm.membership, COALESCE(rm.forgotten, 0)
            FROM local_current_membership AS lcm
            LEFT JOIN room_memberships AS rm USING (room_id, event_id)
            WHERE lcm.room_id = ?
            """,
            (room_id,),
        )
        return [(str(u), str(m), bool(f)) for u, m, f in txn.fetchall()]

    @staticmethod
    def forget_reads_txn(
        txn: LoggingTransaction, pairs: Sequence[Tuple[str, str]], live: Sequence[str]
    ) -> Tuple[Dict[Tuple[str, str], str], Set[str]]:
        """What a group of forgets needs to know, in one statement per chunk.

        Args:
            pairs: The (user_id, room_id) pairs about to be forgotten.
            live: The memberships that still hold a room (join, invite, knock).

        Returns:
            Each pair's current local membership (pairs without one are absent),
            and the rooms of those pairs that no local member *outside*
            ``pairs`` still has (a ``live`` membership, or one not forgotten).
            Such a room is forgotten by every local user once the group's own
            forgets are written, if none of them is refused. Asking this
            before the group's writes, in the same transaction, spares a
            statement after them: the answer cannot differ, as the group's
            writes touch only its own pairs. (A room with a row in
            local_current_membership is one Synapse has: its purge deletes
            both in one transaction.)
        """
        memberships: Dict[Tuple[str, str], str] = {}
        unremembered: Set[str] = set()
        unique = sorted(set(pairs))
        # Four arguments per pair (looked up, and left out of "someone else").
        for start in range(0, len(unique), _IN_LIST_MAX // 4):
            chunk = unique[start : start + _IN_LIST_MAX // 4]
            rooms = {room_id for _, room_id in chunk}
            group = [pair for pair in unique if pair[1] in rooms]
            txn.execute(
                "SELECT m.user_id, m.room_id, m.membership, "
                "NOT EXISTS (SELECT 1 FROM local_current_membership AS o "
                "LEFT JOIN room_memberships AS rm ON rm.event_id = o.event_id "
                "WHERE o.room_id = m.room_id AND NOT ("
                + " OR ".join("(o.user_id = ? AND o.room_id = ?)" for _ in group)
                + f") AND (o.membership IN ({', '.join('?' for _ in live)}) "
                "OR COALESCE(rm.forgotten, 0) = 0)) "
                "FROM local_current_membership AS m WHERE "
                + " OR ".join("(m.user_id = ? AND m.room_id = ?)" for _ in chunk),
                [
                    *(value for pair in group for value in pair),
                    *live,
                    *(value for pair in chunk for value in pair),
                ],
            )
            for user_id, room_id, membership, no_one_else in txn:
                memberships[(str(user_id), str(room_id))] = str(membership)
                if no_one_else:
                    unremembered.add(str(room_id))
        return memberships, unremembered

    @staticmethod
    def remembering_members_txn(
        txn: LoggingTransaction, room_ids: Sequence[str], live: Sequence[str]
    ) -> Tuple[Set[str], Set[str], Dict[str, Tuple[str, str]]]:
        """A local member who still has each room (live memberships first), set-based.

        Returns:
            The rooms Synapse knows, the rooms with local members, and for each
            room a local member who still has it (live memberships first).
        """
        known: Set[str] = set()
        with_members: Set[str] = set()
        members: Dict[str, Tuple[str, str]] = {}
        postgres = "psycopg" in txn.database_engine.module.__name__
        for start in range(0, len(room_ids), _IN_LIST_MAX):
            chunk = list(room_ids[start : start + _IN_LIST_MAX])
            args: List[Any]
            if postgres:
                # A join with the unnested ids probes the indexes once per
                # room; with "= ANY(...)" PostgreSQL prefers scanning the
                # whole table (measured: 2x slower at 10^5 rooms).
                source, args = "unnest(?::text[]) AS ids (room_id) JOIN", [chunk]
                where = "TRUE"
                on_ids = " ON {alias}.room_id = ids.room_id"
            else:
                source, args = "", chunk
                where = "{alias}.room_id IN (" + ", ".join("?" for _ in chunk) + ")"
                on_ids = ""
            txn.execute(
                f"SELECT r.room_id FROM {source} rooms AS r{on_ids.format(alias='r')} "
                f"WHERE {where.format(alias='r')}",
                args,
            )
            known.update(str(r[0]) for r in txn.fetchall())
            # Every local member of the chunk's rooms (these are rooms their
            # members forgot: a few rows each).
            txn.execute(
                "SELECT lcm.room_id, lcm.user_id, lcm.membership, COALESCE(rm.forgotten, 0) "
                f"FROM {source} local_current_membership AS lcm{on_ids.format(alias='lcm')} "
                "LEFT JOIN room_memberships AS rm "
                "ON rm.event_id = lcm.event_id AND rm.room_id = lcm.room_id "
                f"WHERE {where.format(alias='lcm')}",
                args,
            )
            for room_id, user_id, membership, forgotten in txn.fetchall():
                room_id = str(room_id)
                with_members.add(room_id)
                if membership not in live and forgotten:
                    continue
                current = members.get(room_id)
                if current is None or (current[1] not in live and membership in live):
                    members[room_id] = (str(user_id), str(membership))
        return known, with_members, members

    @staticmethod
    def abandoned_rooms_txn(
        txn: LoggingTransaction, after: str, limit: int, paramstyle: str = "?"
    ) -> List[str]:
        """Rooms that local users were in but none of them still joins, is invited or knocks.

        Args:
            paramstyle: ``?`` for Synapse's LoggingTransaction (which converts
                it); the offline CLI passes ``%s`` on a raw psycopg2 cursor.
        """
        sql = """
            SELECT room_id FROM local_current_membership
            WHERE room_id > ?
            GROUP BY room_id
            HAVING SUM(CASE WHEN membership IN ('join', 'invite', 'knock') THEN 1 ELSE 0 END) = 0
            ORDER BY room_id
            LIMIT ?
            """
        engine = getattr(txn, "database_engine", None)
        if paramstyle == "%s" or (engine is not None and "psycopg" in engine.module.__name__):
            # Walk local_current_membership's room_id index in order and stop
            # at `limit` rooms. PostgreSQL otherwise hashes the whole table
            # when its estimates favour it (measured: 38-50 ms at 10^5 rows
            # instead of under 1 ms); this lasts to the end of the transaction.
            txn.execute("SET LOCAL enable_hashagg = off")
        txn.execute(sql.replace("?", paramstyle), (after, limit))
        return [str(r[0]) for r in txn.fetchall()]


# -- purge tasks (retention) ---------------------------------------------------
# Why: ModuleApi.delete_room schedules Synapse's purge task and returns nothing
# to follow it by; Synapse's TaskScheduler.get_tasks can filter by one room
# only, and scheduled_tasks has no index on resource_id, so following N rooms
# that way scans the table N times. One query through the status index reads
# the unfinished (and failed) purge tasks of every room in flight at once.

# Task states (synapse.types.TaskStatus values, the same from 1.98 to today).
TASK_ACTIVE_STATES = ("scheduled", "active")
TASK_FAILED = "failed"


@attr.s(frozen=True, auto_attribs=True)
class PurgeTaskView:
    """Where Synapse's purge of one room stands, as read in one transaction.

    Attributes:
        status: ``active`` (scheduled or running), ``failed``, or None when
            Synapse has no unfinished or failed purge task for the room.
        error: The failed task's error.
        task_ts: The task's last update (ms), to tell a failure from before a
            request from one after it.
        room_exists: Whether Synapse still has the room's row.
    """

    status: Optional[str]
    error: Optional[str]
    task_ts: Optional[int]
    room_exists: bool


def purge_tasks_txn(txn: LoggingTransaction, room_ids: Sequence[str]) -> Dict[str, PurgeTaskView]:
    """Synapse's purge state of each room in room_ids: two indexed queries per 500 rooms."""
    actions = (PURGE_ROOM_ACTION_NAME, SHUTDOWN_AND_PURGE_ROOM_ACTION_NAME)
    statuses = (*TASK_ACTIVE_STATES, TASK_FAILED)
    latest: Dict[str, Tuple[int, str, Optional[str]]] = {}
    exists: Set[str] = set()
    for start in range(0, len(room_ids), _IN_LIST_MAX):
        chunk = list(room_ids[start : start + _IN_LIST_MAX])
        marks = ", ".join("?" for _ in chunk)
        txn.execute(
            "SELECT resource_id, status, error, timestamp FROM scheduled_tasks "
            f"WHERE status IN (?, ?, ?) AND action IN (?, ?) AND resource_id IN ({marks})",
            (*statuses, *actions, *chunk),
        )
        for room_id, status, error, ts in txn.fetchall():
            room_id, ts = str(room_id), int(ts)
            # An unfinished task wins over an older failure of the same room.
            rank = (status != TASK_FAILED, ts)
            current = latest.get(room_id)
            if current is None or rank > (current[1] != TASK_FAILED, current[0]):
                latest[room_id] = (ts, str(status), error)
        txn.execute(f"SELECT room_id FROM rooms WHERE room_id IN ({marks})", chunk)
        exists.update(str(r[0]) for r in txn.fetchall())
    views: Dict[str, PurgeTaskView] = {}
    for room_id in room_ids:
        task = latest.get(room_id)
        if task is None:
            views[room_id] = PurgeTaskView(None, None, None, room_id in exists)
            continue
        ts, status, error = task
        views[room_id] = PurgeTaskView(
            "active" if status in TASK_ACTIVE_STATES else TASK_FAILED,
            None if status in TASK_ACTIVE_STATES else (str(error) if error else None),
            ts,
            room_id in exists,
        )
    return views


def _site_of(factory: Any) -> Optional[Site]:
    """The Site a listening port serves, through any wrapping factories.

    Why: a ``tls: true`` listener is a Twisted listenSSL port, whose factory is
    a TLSMemoryBIOFactory wrapping Synapse's Site (``wrappedFactory``); plain
    TCP and unix-socket ports hold the Site itself.
    """
    for _ in range(4):  # TLS is the only wrapper Synapse uses; allow a few.
        if factory is None or isinstance(factory, Site):
            return factory
        factory = getattr(factory, "wrappedFactory", None)
    return None


def _port_key(port: Any) -> Any:
    """What a listening port is configured by: its TCP port number or socket path."""
    host = port.getHost()
    key = getattr(host, "port", None) or getattr(host, "name", None)
    # A unix socket's address is bytes; the config names the path as a string.
    return os.fsdecode(key) if isinstance(key, bytes) else key


# -- the offline CLI: Synapse's own readers of homeserver.yaml -----------------
# Why: the CLI runs without a homeserver, so ModuleApi is not there; and it
# must pick exactly the database and the keys Synapse picks from the same
# config (``database`` vs ``databases`` vs ``database_path``, data_stores,
# the default signing key path, ``old_signing_keys``). Synapse's config
# sections do that; reading them here means the CLI cannot disagree with it.
# The whole HomeServerConfig is not loaded: it would create directories (the
# media store) and demand files the CLI does not need (TLS certificates, log
# config), which an operator's read-only account may not have.


def main_database_from_config(values: Dict[str, Any]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The driver name and connection args Synapse's main data store would use.

    Args:
        values: The merged top-level keys of homeserver.yaml (not modified).

    Returns:
        ``(name, args)``, or None if the config names no database.

    Raises:
        synapse.config.ConfigError: if Synapse would refuse the database settings.
    """
    import copy

    from synapse.config.database import DatabaseConfig
    from synapse.config.homeserver import HomeServerConfig

    section = DatabaseConfig(HomeServerConfig())
    section.read_config(copy.deepcopy(values))
    for database in section.databases:
        if "main" in database.databases:
            return str(database.config.get("name", "sqlite3")), dict(database.config["args"])
    return None


def signing_keys_from_config(
    values: Dict[str, Any], config_dir: str
) -> Tuple[str, List[SigningKey], Dict[str, Any]]:
    """The homeserver's signing keys and old verify keys, read as Synapse reads them.

    Args:
        values: The merged top-level keys of homeserver.yaml.
        config_dir: The directory of the last config file (for the default key path).

    Returns:
        Where the keys came from (for messages), the signing keys, and the
        ``old_signing_keys`` as verify keys by key id.

    Raises:
        synapse.config.ConfigError: if Synapse could not read them either.
    """
    from signedjson.key import read_signing_keys
    from synapse.config.homeserver import HomeServerConfig
    from synapse.config.key import KeyConfig

    section = KeyConfig(HomeServerConfig())
    if "signing_key" in values:
        where = "signing_key"
        keys = read_signing_keys([values["signing_key"]])
    else:
        path = values.get("signing_key_path") or os.path.join(
            config_dir, f"{values['server_name']}.signing.key"
        )
        where = os.path.abspath(str(path))
        keys = section.read_signing_keys(where, "signing_key")
    old = section.read_old_signing_keys(values.get("old_signing_keys"))
    return where, list(keys), dict(old)


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

    def joined_rooms_now(self, user_id: str) -> Optional[AbstractSet[str]]:
        """joined_rooms if Synapse's cache holds the answer, without waiting; else None.

        Why: the guard's pre-check runs in ``request.finish``, synchronously;
        a cache hit there spares the request a trip through a new logcontext
        and the reactor (see history_guard.capture).
        """
        rooms: Optional[AbstractSet[str]] = self._store.get_rooms_for_user.cache.get_immediate(
            user_id, None, update_metrics=False
        )
        return rooms

    def forgotten_rooms_now(self, user_id: str) -> Optional[AbstractSet[str]]:
        """forgotten_rooms if Synapse's cache holds the answer, without waiting; else None.

        Why: as joined_rooms_now.
        """
        rooms: Optional[AbstractSet[str]] = (
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

    async def local_membership(
        self, user_id: str, room_id: str
    ) -> Tuple[Optional[str], Optional[str]]:
        """A local user's current membership in room_id and its event id (None, None if none).

        Why: ModuleApi has no single-row lookup of local_current_membership.
        """
        membership, event_id = await self._store.get_local_current_membership_for_user_in_room(
            user_id, room_id
        )
        return membership, event_id

    async def stream_orderings(self, event_ids: Iterable[str]) -> Dict[str, int]:
        """Each known event's position in the room event stream (outliers left out).

        Why: the position is internal metadata, not part of the client event;
        Synapse's event cache answers this without a query for recent events.
        """
        events = await self._store.get_events(list(set(event_ids)), allow_rejected=True)
        positions: Dict[str, int] = {}
        for event_id, event in events.items():
            ordering = event.internal_metadata.stream_ordering
            if ordering is not None and not event.internal_metadata.is_outlier():
                positions[event_id] = int(ordering)
        return positions

    async def token_position(self, token: str) -> Optional[int]:
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


def run_in_request_context(request: Any, func: Callable[[], Awaitable[None]]) -> None:
    """Run func in request's logging context, as the code that handles request does.

    Why: the history guard releases a response from ``request.finish``, which
    Synapse may call from the reactor (its byte producer) outside the request's
    logcontext; database lookups must run inside one, and ModuleApi exposes
    neither the request's logcontext nor a way to enter it.
    """
    context = getattr(request, "logcontext", None)
    if context is None:
        run_in_background(func)
        return
    with PreserveLoggingContext(context):
        run_in_background(func)


# -- every route: forgets, departures and the events stream -----------------
# Why: Synapse forgets rooms on several routes besides the client API
# (deactivation, admin room deletion, forget_rooms_on_leave), all through
# RoomMemberHandler.forget, and no module callback observes a forget. The
# module takes that one method over so that every forget, whatever the route,
# is written with its audit entry and retention state in one transaction, the
# way Synapse's own forget writes its rows (tests/integration/test_audit_routes.py
# checks the two against each other on the oldest and newest Synapse).

# The membership of a requester who may not forget (as Synapse's handler refuses).
FORGET_REFUSED = "User %s in room %s"

# Synapse's background process that forgets rooms on leave (forget_rooms_on_leave).
_ROOM_FORGETTER_PROCESS = "room_forgetter"
# Synapse's background process that parts deactivated users.
_USER_PARTER_PROCESS = "user_parter_loop"

ForgetCallback = Callable[[str, str, bool], Awaitable[None]]


def forget_rows_txn(
    store: Any,
    txn: LoggingTransaction,
    pairs: Sequence[Tuple[str, str]],
    together: Optional[StatementBatch] = None,
) -> None:
    """Synapse's forget of each (user_id, room_id), inside the caller's transaction.

    The same rows and the same caches as Synapse's own forget, for many
    forgets at once (a group commit's): one UPDATE per pair and table and the
    cache invalidation stream's rows, sent in one round trip with the
    caller's own statements (``together``), instead of a dozen statements each.

    Why: RoomMemberWorkerStore.forget runs its own transaction; the audit
    entry must commit or fail with it. This mirrors its transaction function
    (1.98: room_memberships; newer: also sliding_sync_membership_snapshots and
    its cache), invalidating locally after commit and on other workers
    through the cache invalidation stream, as Synapse does
    (``_invalidate_cache_and_stream_bulk`` is the bulk form of the
    ``_invalidate_cache_and_stream`` its forget calls, since 1.98).
    """
    batch = together or StatementBatch()
    args = list(pairs)
    batch.add_each(
        "UPDATE room_memberships SET forgotten = 1 WHERE user_id = ? AND room_id = ?", args
    )
    snapshots = getattr(store, "get_sliding_sync_rooms_for_user_from_membership_snapshots", None)
    if snapshots is not None:
        batch.add_each(
            "UPDATE sliding_sync_membership_snapshots SET forgotten = 1 "
            "WHERE user_id = ? AND room_id = ?",
            args,
        )
    if pairs:
        users = sorted({(user_id,) for user_id, _ in pairs})
        invalidations: List[Tuple[Any, Sequence[Tuple[str, ...]]]] = [
            (store.did_forget, sorted(set(args))),
            (store.get_forgotten_rooms_for_user, users),
        ]
        if snapshots is not None:
            invalidations.append((snapshots, users))
        _invalidate_and_stream_txn(store, txn, invalidations, batch)
    batch.run(txn)


# Synapse's stream of cache invalidations for other workers (PostgreSQL only).
_CACHE_STREAM_INSERT = (
    "INSERT INTO cache_invalidation_stream_by_instance "
    "(stream_id, instance_name, cache_func, keys, invalidation_ts) VALUES (?, ?, ?, ?, ?)"
)


def _invalidate_and_stream_txn(
    store: Any,
    txn: LoggingTransaction,
    invalidations: Sequence[Tuple[Any, Sequence[Tuple[str, ...]]]],
    batch: StatementBatch,
) -> None:
    """Synapse's ``_invalidate_cache_and_stream_bulk`` for several caches at once.

    Each key is invalidated locally after commit; on PostgreSQL each also gets
    its row in the cache invalidation stream, which other workers follow. The
    rows of every cache share one stream-id allocation and one INSERT, added
    to ``batch`` (sent with the forget's own writes).

    Why: Synapse's helper takes two round trips per cache on PostgreSQL (ids,
    then insert) and a forget invalidates three caches: six of a lone
    forget's round trips, now one. The rows, the local invalidation and the
    replication poke are what the helper writes (1.98 and newer;
    tests/integration/test_audit_routes.py compares the stream rows of a
    module forget with Synapse's own).
    """
    if not is_postgres(txn):
        for cache_func, keys in invalidations:
            store._invalidate_cache_and_stream_bulk(txn, cache_func, keys)
        return
    for cache_func, keys in invalidations:
        for key in keys:
            txn.call_after(cache_func.invalidate, key)
    rows = [(cache_func.__name__, key) for cache_func, keys in invalidations for key in keys]
    stream_ids = store._cache_id_gen.get_next_mult_txn(txn, len(rows))
    ts = store.hs.get_clock().time_msec()
    txn.call_after(store.hs.get_notifier().on_new_replication_data)
    batch.add_each(
        _CACHE_STREAM_INSERT,
        [
            # A list, which psycopg2 sends as the text[] the column is.
            (stream_id, store._instance_name, name, list(key), ts)
            for stream_id, (name, key) in zip(stream_ids, rows, strict=True)
        ],
    )


def current_route() -> Tuple[Optional[str], Optional[str]]:
    """(method, path) of the client request this code runs for, and the background process.

    Returns:
        ``(request, None)`` with ``request`` as ``"PUT /_matrix/client/..."`` when
        running for an HTTP request, ``(None, name)`` in a background process,
        ``(None, None)`` when neither is known.

    Why: Synapse notifies modules of a new event (on_new_event) in the
    logcontext of the request or background process that created it, and the
    module API gives no other way to tell a state-API leave from a self-kick,
    or Synapse's own forget-on-leave from a client's forget.
    """
    from synapse.logging.context import current_context

    context: Any = current_context()
    request = getattr(context, "request", None)
    if request is not None:
        return f"{request.method} {request.url}", None
    name = getattr(context, "name", None)
    return None, str(name) if name else None


def current_requester() -> Optional[str]:
    """The user id that authenticated the request this code runs for, if any.

    Why: on_user_deactivation_status_changed says an admin deactivated the
    user, not which admin; the request's logcontext knows.
    """
    from synapse.logging.context import current_context

    request = getattr(current_context(), "request", None)
    requester = getattr(request, "requester", None)
    return str(requester) if requester else None


def on_new_event_is_safe() -> bool:
    """Whether this Synapse can run an on_new_event callback without breaking remote joins.

    Why: from Synapse 1.76 to 1.102, registering any on_new_event callback
    deadlocks every join of a remote room: the callback's state lookup waits
    for the full state of the partial-state room being joined
    (element-hq/synapse#16973, fixed in 1.103). The module then reads
    departures from the events stream instead (reconcile.py).
    """
    from synapse import __version__

    match = re.match(r"(\d+)\.(\d+)", __version__)
    return match is None or (int(match.group(1)), int(match.group(2))) >= (1, 103)


def in_background_process(name: Optional[str], process: str) -> bool:
    return name is not None and name.startswith(process)


def in_room_forgetter(name: Optional[str]) -> bool:
    return in_background_process(name, _ROOM_FORGETTER_PROCESS)


def in_user_parter(name: Optional[str]) -> bool:
    return in_background_process(name, _USER_PARTER_PROCESS)


class SynapseRoutes:
    """What the module needs to see every route of leave and forget.

    Args:
        api: The module API handed to the module by Synapse.
    """

    def __init__(self, api: ModuleApi) -> None:
        self._hs: HomeServer = api._hs
        self._api = api

    @property
    def store(self) -> Any:
        return self._hs.get_datastores().main

    def take_over_forget(self, callback: ForgetCallback) -> None:
        """Route every call of Synapse's RoomMemberHandler.forget to callback.

        callback(user_id, room_id, schedule_purge) must do what Synapse's
        forget does (refuse a member, forget, schedule Synapse's own purge).

        Why: see the section comment; handlers hold the room-member handler
        object itself, so replacing the method on that one object reaches
        every caller.
        """
        handler = self._hs.get_room_member_handler()

        async def forget(user: Any, room_id: str, do_not_schedule_purge: bool = False) -> None:
            await callback(user.to_string(), room_id, not do_not_schedule_purge)

        handler.forget = forget  # type: ignore[method-assign]

    def forget_on_leave(self) -> bool:
        """Whether Synapse's own ``forget_rooms_on_leave`` is on (ModuleApi has no config)."""
        return bool(getattr(getattr(self._hs.config, "room", None), "forget_on_leave", False))

    async def schedule_forgotten_purge(self, room_id: str) -> None:
        """Schedule Synapse's own purge as its forget does, when the room is forgotten by all.

        Why: Synapse's handler does this after its forget transaction; the
        module's forget replaces that handler method.
        """
        period = getattr(self._hs.config.server, "forgotten_room_retention_period", None)
        if period and await self.store.is_locally_forgotten_room(room_id):
            await self._hs.get_task_scheduler().schedule_task(
                PURGE_ROOM_ACTION_NAME,
                resource_id=room_id,
                timestamp=self._hs.get_clock().time_msec() + period,
            )

    @staticmethod
    def user_departing_txn(txn: LoggingTransaction, user_id: str) -> bool:
        """Whether user_id is deactivated or being parted from its rooms by deactivation."""
        txn.execute("SELECT deactivated FROM users WHERE name = ?", (user_id,))
        row = txn.fetchone()
        if row is not None and row[0]:
            return True
        txn.execute("SELECT 1 FROM users_pending_deactivation WHERE user_id = ?", (user_id,))
        return txn.fetchone() is not None

    @staticmethod
    def max_stream_ordering_txn(txn: LoggingTransaction) -> int:
        """The newest position of Synapse's events stream (0 on an empty server)."""
        txn.execute("SELECT COALESCE(MAX(stream_ordering), 0) FROM events")
        row = txn.fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def current_departure_txn(
        txn: LoggingTransaction, room_id: str, user_id: str
    ) -> Optional[Tuple[int, str, str, str, str, str, int, Optional[str]]]:
        """The leave or ban event that is user_id's current membership of room_id, if any.

        Returns:
            A row as departures_txn returns them.
        """
        txn.execute(
            """
            SELECT e.stream_ordering, e.event_id, e.room_id, rm.user_id, rm.sender,
                rm.membership, e.origin_server_ts, ej.json
            FROM local_current_membership AS lcm
            JOIN events AS e ON e.event_id = lcm.event_id
            JOIN room_memberships AS rm ON rm.event_id = lcm.event_id
            JOIN event_json AS ej ON ej.event_id = lcm.event_id
            WHERE lcm.room_id = ? AND lcm.user_id = ? AND lcm.membership IN ('leave', 'ban')
            """,
            (room_id, user_id),
        )
        rows = _departure_rows(txn.fetchall())
        return rows[0] if rows else None

    @staticmethod
    def departures_txn(
        txn: LoggingTransaction, after: int, upto: int, server_name: str, limit: int
    ) -> List[Tuple[int, str, str, str, str, str, int, Optional[str]]]:
        """Leave and ban events of local users in the events stream range (after, upto].

        Reads a range of the events stream through its stream_ordering index,
        so the cost follows the events in the range, not the memberships.

        Returns:
            (stream_ordering, event_id, room_id, user_id, sender, membership,
            origin_server_ts, reason), in stream order, at most ``limit``.
        """
        txn.execute(
            """
            SELECT e.stream_ordering, e.event_id, e.room_id, rm.user_id, rm.sender,
                rm.membership, e.origin_server_ts, ej.json
            FROM events AS e
            JOIN room_memberships AS rm ON rm.event_id = e.event_id
            JOIN event_json AS ej ON ej.event_id = e.event_id
            WHERE e.stream_ordering > ? AND e.stream_ordering <= ?
                AND e.type = 'm.room.member' AND rm.membership IN ('leave', 'ban')
                AND rm.user_id LIKE ?
                AND NOT EXISTS (SELECT 1 FROM rejections AS r WHERE r.event_id = e.event_id)
            ORDER BY e.stream_ordering
            LIMIT ?
            """,
            (after, upto, "%:" + server_name, limit),
        )
        return _departure_rows(txn.fetchall())


def _departure_rows(fetched: Any) -> List[Tuple[int, str, str, str, str, str, int, Optional[str]]]:
    """(stream_ordering, event_id, room_id, user_id, sender, membership, ts, reason) rows,
    from rows whose last column is the event's JSON."""
    rows = []
    for pos, event_id, room_id, user_id, sender, membership, ts, event_json in fetched:
        try:
            reason = json.loads(event_json).get("content", {}).get("reason")
        except (ValueError, AttributeError):
            reason = None
        rows.append(
            (
                int(pos),
                str(event_id),
                str(room_id),
                str(user_id),
                str(sender),
                str(membership),
                int(ts),
                reason if isinstance(reason, str) else None,
            )
        )
    return rows
