"""matrix-leave-forget: Synapse's Room Leaving API with an audit log and room retention.

Load it in ``homeserver.yaml``::

    modules:
      - module: matrix_leave_forget.LeaveForgetModule
        config: {}
"""

import logging
from typing import Any

from synapse.module_api import ModuleApi, make_deferred_yieldable
from synapse.module_api.errors import ConfigError
from twisted.internet import defer

from matrix_leave_forget import metrics
from matrix_leave_forget._synapse.capabilities import forget_on_leave_settings
from matrix_leave_forget._synapse.contexts import (
    on_new_event_is_safe,
    run_in_background_process,
)
from matrix_leave_forget._synapse.history import HistoryInternals
from matrix_leave_forget._synapse.internals import SynapseInternals
from matrix_leave_forget._synapse.new_events import observe_new_events
from matrix_leave_forget._synapse.persist_hook import observe_persist_txn
from matrix_leave_forget._synapse.routes import SynapseRoutes
from matrix_leave_forget.audit.checkpoint import Checkpointer
from matrix_leave_forget.audit.erasure import TextEraser
from matrix_leave_forget.config import (
    MEDIA_DELETE,
    MOUNT_INTERCEPT,
    LeaveForgetConfig,
    describe_config,
    parse_config,
)
from matrix_leave_forget.db.media import MediaRefStore
from matrix_leave_forget.history.departures import DepartureLookup
from matrix_leave_forget.history.guard import HistoryGuard
from matrix_leave_forget.http.admin import AdminResource
from matrix_leave_forget.http.capabilities import CapabilitiesRewrite
from matrix_leave_forget.http.client import (
    ROOMS_PREFIXES,
    InterceptingMatrixResource,
    LeaveForgetServlet,
    MatrixNode,
)
from matrix_leave_forget.http.paths import ADMIN_PREFIX
from matrix_leave_forget.media.index import INTERVAL_MS as MEDIA_INDEX_INTERVAL_MS
from matrix_leave_forget.media.index import MediaIndexer
from matrix_leave_forget.media.reaper import INTERVAL_MS as MEDIA_REAPER_INTERVAL_MS
from matrix_leave_forget.media.reaper import MediaReaper
from matrix_leave_forget.membership.handler import MembershipHandler
from matrix_leave_forget.membership.observer import RouteObserver
from matrix_leave_forget.membership.reconcile import Reconciler
from matrix_leave_forget.retention.state import why_not_abandoned_many_txn
from matrix_leave_forget.retention.store import RetentionStore
from matrix_leave_forget.retention.sweeper import RetentionSweeper

__version__ = "0.1.0"
__all__ = ["LeaveForgetModule", "__version__"]

logger = logging.getLogger(__name__)

# How often erased users' and expired free text is looked for (besides right
# after each deactivation).
_ERASE_INTERVAL_MS = 60 * 1000


class LeaveForgetModule:
    """The Synapse module: wires config, store, handler, sweeper and resources.

    Args:
        config: Parsed by :meth:`parse_config`.
        api: Synapse's module API.
    """

    def __init__(self, config: LeaveForgetConfig, api: ModuleApi) -> None:
        self._config = config
        self._api = api
        metrics.initialise(api.server_name, purges=api.should_run_background_tasks())
        self._internals = SynapseInternals(api)
        self.store = RetentionStore(
            api, api.server_name, self._internals.instance_name, self._internals.signing_key
        )
        self._routes = SynapseRoutes(api)
        self.handler = MembershipHandler(api, config, self._internals, self.store, self._routes)
        # A served leave's entry commits with its event, in the transaction
        # that persists it (_synapse/persist_hook.py).
        if observe_persist_txn(api, self.handler.record_in_persist_txn):
            logger.info("Leaves served here are recorded in the transactions of their events")
        # What the rooms' events reference, and purged rooms' media deleted
        # (docs/retention.md "Media").
        self.media_index = MediaIndexer(api, MediaRefStore(api))
        # The index runs only where media is deleted (dry runs too: they show
        # what would be): nothing else reads it.
        self._indexing_media = config.retention.media == MEDIA_DELETE
        self.media_reaper = MediaReaper(api, config.retention, self.media_index, self.store.audit)
        self.sweeper = RetentionSweeper(api, config.retention, self.store, self.media_reaper)
        # Every route of leave and forget, not only the module's endpoints
        # (docs/audit.md "Routes").
        self._ready = _StartupGate()
        self.routes = RouteObserver(api, self.handler, self.store, self._ready.wait)
        live_events = on_new_event_is_safe()
        self.reconciler = Reconciler(
            api, self.store, self._routes, None if live_events else self.routes.stream_route
        )
        self._routes.take_over_forget(self.routes.synapse_forget)
        api.register_third_party_rules_callbacks(
            check_can_shutdown_room=self.routes.check_can_shutdown_room,
            on_user_deactivation_status_changed=self.routes.on_user_deactivation_status_changed,
        )
        # Synapse erases a user (GDPR) before it calls back on the deactivation.
        self.eraser = TextEraser(api, self.store.audit, config.audit.text_retention_ms)
        api.register_third_party_rules_callbacks(
            on_user_deactivation_status_changed=self._erase_after_deactivation
        )
        if live_events and api.should_run_background_tasks():
            # Every event reaches this process (persisted here, or through
            # replication); elsewhere observing would only cost an event
            # lookup per event.
            observe_new_events(api, self.routes.on_new_event)
        audit = config.audit
        if audit.checkpoint_sender is not None and not api.is_mine(audit.checkpoint_sender):
            raise ConfigError(
                "must be a local user (one joined to checkpoint_room)",
                ("audit", "checkpoint_sender"),
            )
        self.checkpointer = Checkpointer(
            api,
            api.server_name,
            self._internals.signing_key,
            self.store.audit.head,
            audit.checkpoint_room,
            audit.checkpoint_sender,
        )
        logger.info("matrix-leave-forget %s: %s", __version__, describe_config(config))

        servlet = LeaveForgetServlet(api, self.handler, self._internals, self._ready.wait)
        self._servlet = servlet
        self._intercept: InterceptingMatrixResource | None = None
        self._history_guard: HistoryGuard | None = None
        self._capabilities: CapabilitiesRewrite | None = None
        if config.history_guard and config.mount == MOUNT_INTERCEPT:
            # Synapse serves forget on the main process only; a worker hears of one late.
            lookup = DepartureLookup(
                api, HistoryInternals(api), forgets_elsewhere=api.worker_app is not None
            )
            self._history_guard = HistoryGuard(api, lookup)
        if config.mount == MOUNT_INTERCEPT:
            self._intercept = InterceptingMatrixResource(
                servlet, self._internals.unrecognized_resource()
            )
            self._intercept.guard_reads(self._history_guard)
            if self.media_reaper.enabled:
                self._intercept.watch_media_reads(self._media_read)
            self._capabilities = CapabilitiesRewrite(forget_on_leave_settings(api))
            self._intercept.rewrite_capabilities(self._capabilities)
            api.register_web_resource("/_matrix", self._intercept)
        else:
            for prefix in ROOMS_PREFIXES:
                api.register_web_resource(prefix, servlet)
        api.register_web_resource(
            ADMIN_PREFIX,
            AdminResource(
                api,
                self.store,
                config.retention,
                self._internals,
                self._ready.wait,
                sweeper=self.sweeper,
                abandoned_check=why_not_abandoned_many_txn,
                media_index=self.media_index if self._indexing_media else None,
                media_reaper=self.media_reaper,
            ),
        )
        # Listeners start right after modules are loaded; check them then.
        api.delayed_background_call(0, self._after_start, desc="leave_forget_start")

    @staticmethod
    def parse_config(config: Any) -> LeaveForgetConfig:
        """Parse the module's ``config:`` block; raises ConfigError naming a bad key."""
        return parse_config(config)

    async def _after_start(self) -> None:
        if self._intercept is not None:
            problems = self._check_intercept(self._intercept)
            if problems:
                self._internals.fatal(
                    "mount: intercept is not in place: "
                    + "; ".join(problems)
                    + ". Use mount: listener (docs/mounting.md) with this Synapse."
                )
                return
        else:
            self._check_listener()
            if self._config.history_guard:
                logger.warning(
                    "history_guard cannot be kept with mount: listener: client reads "
                    "(/sync, /messages, /context, /event, /notifications...) go from the "
                    "reverse proxy to Synapse without passing the module, so a user who "
                    "left or forgot a room can still read its history as Synapse allows "
                    "(docs/history.md). Use mount: intercept to keep it."
                )
        try:
            version = await self.store.setup(self._routes.max_stream_ordering_txn)
        except Exception as exc:
            logger.exception("Schema setup failed")
            self._internals.fatal(f"could not create or upgrade its tables: {exc}")
            return
        logger.info("matrix-leave-forget schema at version %d", version)
        self._ready.open()
        # Sweeps start only now: the first one must find the module's tables.
        self._api.looping_background_call(
            self.sweeper.sweep, self._config.retention.sweep_interval_ms, desc="leave_forget_sweep"
        )
        if self._routes.forget_on_leave():
            logger.warning(
                "forget_rooms_on_leave is on: Synapse forgets every room a local user "
                "leaves (or is kicked or banned from). Each such forget is in the audit "
                "log (via forget_on_leave) and starts the room's retention period once "
                "every local user has forgotten it."
            )
        # Checkpoints from the background-tasks process only: one writer.
        self._api.looping_background_call(
            self.checkpointer.run,
            self._config.audit.checkpoint_interval_ms,
            desc="leave_forget_audit_checkpoint",
        )
        if self._api.should_run_background_tasks():
            await self.reconciler.run()
            self._api.looping_background_call(
                self.reconciler.tick, self.reconciler.interval_ms, desc="leave_forget_catch_up"
            )
            await self.checkpointer.run()
            # Erasures made while the module was not running, text past retention.
            self._api.looping_background_call(
                self.eraser.run, _ERASE_INTERVAL_MS, desc="leave_forget_erase_text"
            )
            await self.eraser.run()
            if self._indexing_media:
                self._api.looping_background_call(
                    self.media_index.tick,
                    MEDIA_INDEX_INTERVAL_MS,
                    desc="leave_forget_media_index",
                )
            self._api.looping_background_call(
                self.media_reaper.tick, MEDIA_REAPER_INTERVAL_MS, desc="leave_forget_media_reaper"
            )
        elif self.media_reaper.deletes_here:
            # A media-repository worker: the media store is here, so purged
            # rooms' media is deleted here; the background-tasks process
            # decides it and writes the entries (docs/workers.md "Media").
            logger.info("Deleting purged rooms' media on this process (it holds the media store)")
            self._api.looping_background_call(
                self.media_reaper.delete_tick,
                MEDIA_REAPER_INTERVAL_MS,
                desc="leave_forget_media_delete",
                run_on_all_instances=True,
            )

    async def _erase_after_deactivation(
        self, user_id: str, by_admin: bool, deactivated: bool
    ) -> None:
        await self._ready.wait()
        await self.eraser.on_user_deactivation_status_changed(user_id, by_admin, deactivated)

    def _check_listener(self) -> None:
        """Warn when no listener of this process can reach the module's resources."""
        reachable = 0
        for root in self._internals.listener_roots():
            node: Any = root
            for segment in (b"_matrix", b"client", b"v3", b"rooms"):
                # Below a leaf (Synapse's client API is one) children are unreachable.
                if node is None or getattr(node, "isLeaf", False):
                    node = None
                    break
                node = node.children.get(segment)
            reachable += node is self._servlet
        if reachable:
            logger.info("Serving leave and forget on %d listener(s)", reachable)
        else:
            logger.error(
                "mount: listener, but no listener of this process reaches the module: "
                "add an http listener with 'resources: []' and route leave and forget "
                "to it (docs/mounting.md)"
            )

    def _media_read(self, origin: str, media_id: str) -> None:
        """A download or thumbnail request: cancels the medium's pending deletion (if any)."""
        run_in_background_process(
            self._api,
            "leave_forget_media_read",
            lambda: self.media_reaper.on_media_read(origin, media_id),
        )

    def _check_intercept(self, intercept: InterceptingMatrixResource) -> list[str]:
        roots = self._internals.listener_roots()
        problems = intercept.install(roots)
        intercepted = 0
        for root in roots:
            node = root.children.get(b"_matrix")
            if isinstance(node, MatrixNode) and self.media_reaper.enabled:
                node.watch_media_reads(self._media_read)
            client = getattr(node, "children", {}).get(b"client")
            if client is None:
                continue
            if node is intercept or not isinstance(node, MatrixNode):
                problems.append(f"a listener serves the client API through {node!r}")
            elif not node.guard_reads(self._history_guard):
                problems.append(
                    f"the history guard cannot see how {client!r} routes client requests"
                )
            else:
                node.rewrite_capabilities(self._capabilities)
                intercepted += 1
        logger.info("Intercepting leave and forget on %d client listener(s)", intercepted)
        return problems


class _StartupGate:
    """Holds requests until the schema is ready (a few milliseconds after start)."""

    def __init__(self) -> None:
        self._open = False
        self._waiters: list[defer.Deferred[None]] = []

    def open(self) -> None:
        self._open = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def wait(self) -> None:
        if not self._open:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            await make_deferred_yieldable(waiter)
