"""The façade over Synapse's handlers, HTTP plumbing, identity and tables."""

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

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

# Why: unmatched paths under the intercepted /_matrix node must answer exactly
# like Synapse's placeholder node does (404 M_UNRECOGNIZED, CORS headers).
from synapse.http.server import UnrecognizedRequestResource
from synapse.module_api import LoggingTransaction, ModuleApi, Requester

# Why: PUT /leave/{txnId} must replay like Synapse's servlets do (same key:
# path + user + device), and ModuleApi exposes no transaction cache.
from synapse.rest.client.transactions import HttpTransactionCache
from twisted.web.resource import Resource

from matrix_leave_forget._synapse.listeners import port_key, site_of
from matrix_leave_forget._synapse.sql import LIVE_SQL

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)


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
        txn_id: str | None,
        content: dict[str, Any] | None,
    ) -> str | None:
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

    def extra_leave_content_keys(self) -> tuple[str, ...]:
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

    def listener_roots(self) -> list[Resource]:
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
                if site_of(getattr(reader, "factory", None)) is not None
            ]
            listeners = self._hs.config.worker.worker_listeners
            order = {
                getattr(listener, "port", None) or getattr(listener, "path", None): index
                for index, listener in enumerate(listeners)
                if listener.type == "http"
            }
            ports.sort(key=lambda port: order.get(port_key(port), len(order)))
        roots: list[Resource] = []
        for port in ports:
            root = getattr(site_of(getattr(port, "factory", None)), "resource", None)
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
    # Why: the admin API's room detail and "abandoned" listing (and the CLI's)
    # are questions about Synapse's schema that no ModuleApi answers. (Who
    # still has a room, for a forget or a purge, is _synapse/forget.py's.)

    @staticmethod
    def local_memberships_txn(txn: LoggingTransaction, room_id: str) -> list[tuple[str, str, bool]]:
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
    def abandoned_rooms_txn(
        txn: LoggingTransaction, after: str, limit: int, paramstyle: str = "?"
    ) -> list[str]:
        """Rooms that local users were in but none of them still joins, is invited or knocks.

        Args:
            paramstyle: ``?`` for Synapse's LoggingTransaction (which converts
                it); the offline CLI passes ``%s`` on a raw psycopg2 cursor.
        """
        sql = f"""
            SELECT room_id FROM local_current_membership
            WHERE room_id > ?
            GROUP BY room_id
            HAVING SUM(CASE WHEN membership IN ({LIVE_SQL}) THEN 1 ELSE 0 END) = 0
            ORDER BY room_id
            LIMIT ?
            """
        engine = getattr(txn, "database_engine", None)
        if paramstyle == "%s" or (engine is not None and "psycopg" in engine.module.__name__):
            # Walk local_current_membership's room_id index in order and stop
            # at `limit` rooms. PostgreSQL otherwise hashes the whole table
            # when its estimates favour it (docs/benchmarks.md §2, "rooms
            # abandoned"); this lasts to the end of the transaction.
            txn.execute("SET LOCAL enable_hashagg = off")
        txn.execute(sql.replace("?", paramstyle), (after, limit))
        return [str(r[0]) for r in txn.fetchall()]
