"""The membership handler: the rules of leave and forget.

The HTTP resource authenticates and parses; this handler decides. It has
Synapse create, sign, persist and federate the ``m.room.member`` event through
the same room-member handler as Synapse's own servlet, forgets through Synapse
so that its caches and sync stay right, and records what happened in the
retention store.
"""

import logging
from typing import TYPE_CHECKING, Any

import attr
from synapse.module_api import ModuleApi, Requester
from synapse.module_api.errors import Codes, SynapseError

from matrix_leave_forget import metrics
from matrix_leave_forget._synapse.forget import FORGET_REFUSED, SynapseForgets
from matrix_leave_forget._synapse.routes import SynapseRoutes
from matrix_leave_forget._synapse.sql import LIVE_MEMBERSHIPS
from matrix_leave_forget.audit.entry import VIA_API
from matrix_leave_forget.audit.log import AuditFields
from matrix_leave_forget.audit.refusals import RefusalBudget, refused_reason
from matrix_leave_forget.config import LeaveForgetConfig, is_valid_room_id
from matrix_leave_forget.membership.forget_writer import ForgetRequest, ForgetWriter
from matrix_leave_forget.metrics import refusals_suppressed_total
from matrix_leave_forget.retention.store import RetentionStore
from matrix_leave_forget.timestamps import iso8601

if TYPE_CHECKING:
    from matrix_leave_forget._synapse.internals import SynapseInternals

logger = logging.getLogger(__name__)


class MembershipHandler:
    """Performs leave and forget for a requester and records them.

    Args:
        api: The module API.
        config: The module configuration.
        internals: The façade over Synapse internals.
        store: The retention store.
        routes: Synapse's purge scheduling after a forget.
    """

    def __init__(
        self,
        api: ModuleApi,
        config: LeaveForgetConfig,
        internals: "SynapseInternals",
        store: RetentionStore,
        routes: SynapseRoutes,
    ) -> None:
        self._api = api
        self._config = config
        self._internals = internals
        self._store = store
        self._routes = routes
        # (user_id, room_id) of leaves this process's endpoint is serving: it
        # records them itself, with the device.
        self._serving: dict[tuple[str, str], int] = {}
        limit = config.forget_rate_limit
        self._forget_limiter = (
            internals.new_ratelimiter(
                "matrix_leave_forget.forget", limit.per_second, limit.burst_count
            )
            if limit is not None
            else None
        )
        self._forgets = ForgetWriter(api, store, SynapseForgets(api), config.retention.period_ms)
        budget = config.audit.refusal_budget
        suppressed = refusals_suppressed_total.labels(server_name=api.server_name)
        self._refusal_budget = RefusalBudget(
            budget.per_second, budget.burst_count, on_suppressed=suppressed.inc
        )

    async def leave(
        self,
        requester: Requester,
        room_id: str,
        reason: str | None,
        txn_id: str | None = None,
        extra_content: dict[str, Any] | None = None,
    ) -> str | None:
        """Leave room_id, reject an invite to it or rescind a knock on it.

        Args:
            requester: Who is leaving, with their device.
            room_id: The room, already percent-decoded.
            reason: The ``reason`` for the membership event, if any.
            txn_id: The client's transaction id for ``PUT .../leave/{txnId}``.
            extra_content: Further content keys Synapse itself would copy from
                the request body (experimental MSC4293 ``redact_events``).

        Returns:
            The new membership event's id (None if Synapse sent none).

        Raises:
            SynapseError: exactly as Synapse's own endpoint would.
        """
        content: dict[str, Any] | None = {"reason": reason} if reason is not None else None
        if extra_content:
            content = {**(content or {}), **extra_content}
        key = (requester.user.to_string(), room_id)
        self._serving[key] = self._serving.get(key, 0) + 1
        try:
            try:
                event_id = await self._internals.leave(requester, room_id, txn_id, content)
            except SynapseError as error:
                await self._record_failure(requester, "leave", room_id, reason, error)
                raise
            await self._record(
                requester,
                AuditFields(
                    action="leave",
                    outcome="ok",
                    room_id=room_id,
                    reason=reason,
                    event_id=event_id,
                    via=VIA_API,
                ),
            )
        finally:
            self._serving[key] -= 1
            if not self._serving[key]:
                del self._serving[key]
        return event_id

    async def forget(self, requester: Requester, room_id: str) -> None:
        """Forget room_id for the requester, who must have left it (or been kicked or banned).

        Raises:
            SynapseError: 400 ``M_UNKNOWN`` while the user is still in the room (as
                Synapse), 429 when the per-user forget limit is exceeded, 404
                ``M_UNRECOGNIZED`` on a worker (as Synapse, which serves forget
                on the main process only).
        """
        if self._api.worker_app is not None:
            # Synapse registers its own forget servlet on the main process only
            # and answers 404 M_UNRECOGNIZED on a worker; say why as well.
            raise SynapseError(
                404,
                "forget is served by Synapse's main process only: route "
                "/rooms/{roomId}/forget there",
                Codes.UNRECOGNIZED,
            )
        if self._forget_limiter is not None:
            await self._forget_limiter.ratelimit(requester)
        user_id = requester.user.to_string()
        try:
            await self.forget_as(
                user_id,
                room_id,
                via=VIA_API,
                device_id=requester.device_id,
                schedule_purge=True,
                # As for refusals, a garbage room id is not worth a row.
                record_noop=is_valid_room_id(room_id),
            )
        except SynapseError as error:
            await self._record_failure(requester, "forget", room_id, None, error)
            raise

    async def forget_as(
        self,
        user_id: str,
        room_id: str,
        via: str,
        actor: str | None = None,
        device_id: str | None = None,
        schedule_purge: bool = True,
        record_noop: bool = True,
    ) -> None:
        """Forget room_id for a local user, whatever the route, with its entry, atomically.

        Synapse's forget rows, the audit entry and the retention state are one
        transaction; then, as Synapse's own forget, its purge is scheduled if
        ``forgotten_room_retention_period`` is set (never for a room the user
        had no membership in).

        Raises:
            SynapseError: 400 ``M_UNKNOWN`` while the user is still in the room
                (joined, invited or knocking), as Synapse.
        """
        result = await self._forgets.forget(
            ForgetRequest(
                AuditFields(
                    action="forget",
                    outcome="ok",
                    user_id=user_id,
                    room_id=room_id,
                    device_id=device_id,
                    via=via,
                    actor=actor,
                ),
                refuse=LIVE_MEMBERSHIPS,
                record_noop=record_noop,
            )
        )
        if result.refused:
            raise SynapseError(400, FORGET_REFUSED % (user_id, room_id))
        if result.room is not None:
            logger.info(
                "Room %s is now forgotten by every local user (purge due at %s)",
                room_id,
                "never" if result.room.purge_due_at is None else iso8601(result.room.purge_due_at),
            )
        if schedule_purge and result.membership is not None:
            await self._routes.schedule_forgotten_purge(room_id)

    def is_serving(self, user_id: str, room_id: str) -> bool:
        """Whether this process's endpoint is serving user_id's leave of room_id now."""
        return (user_id, room_id) in self._serving

    async def _record(self, requester: Requester, fields: AuditFields) -> None:
        # A reason is kept whole (a successful action's is in its event
        # already); the store escapes what an engine cannot hold
        # (audit/entry.py escape_fields), a refusal's is cut by refused_reason.
        fields = attr.evolve(
            fields,
            user_id=requester.user.to_string(),
            device_id=requester.device_id,
        )
        try:
            await self._store.audit.append(fields)
        except Exception:
            logger.exception("Could not record %s of %s", fields.action, fields.room_id)
            metrics.audit_write_failures_total.labels(self._api.server_name, fields.action).inc()

    async def _record_failure(
        self,
        requester: Requester,
        action: str,
        room_id: str,
        reason: str | None,
        error: SynapseError,
    ) -> None:
        """Record a refused request within the user's refusal budget (docs/audit.md).

        The entry keeps a prefix of the reason with the whole reason's size and
        hash; past the budget the refusal is counted, and the user's next
        refusal entry says how many were not appended.
        """
        # Garbage room ids are not worth a row each; a well-formed one is.
        if not self._config.audit_failures or not is_valid_room_id(room_id):
            return
        suppressed = self._refusal_budget.take(requester.user.to_string())
        if suppressed is None:
            return
        prefix, size, digest = refused_reason(reason)
        await self._record(
            requester,
            AuditFields(
                action=action,
                outcome=client_errcode(error),
                room_id=room_id,
                reason=prefix,
                reason_bytes=size,
                reason_sha256=digest,
                suppressed=suppressed or None,
            ),
        )


def client_errcode(error: SynapseError) -> str:
    """The errcode the client is sent for error.

    Not always ``error.errcode``: Synapse's UnstableSpecAuthError (e.g. leaving a
    room one is not in) keeps an unstable code there, ORG.MATRIX.MSC3848.NOT_JOINED,
    and sends the stable one (M_FORBIDDEN).
    """
    try:
        code = error.error_dict(None).get("errcode") or error.errcode
    except Exception:
        code = error.errcode
    # Codes is a str Enum: its value is what goes on the wire.
    return str(getattr(code, "value", code))
