"""The membership handler: the rules of leave and forget.

The HTTP resource authenticates and parses; this handler decides. It has
Synapse create, sign, persist and federate the ``m.room.member`` event through
the same room-member handler as Synapse's own servlet, forgets through Synapse
so that its caches and sync stay right, and records what happened in the
retention store.
"""

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attr
from synapse.module_api import LoggingTransaction, ModuleApi, Requester
from synapse.module_api.errors import Codes, SynapseError

from matrix_leave_forget import metrics
from matrix_leave_forget._synapse.forget import FORGET_REFUSED, SynapseForgets
from matrix_leave_forget._synapse.routes import SynapseRoutes
from matrix_leave_forget._synapse.sql import LIVE_MEMBERSHIPS, is_postgres
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


@attr.s(auto_attribs=True, eq=False)
class _ServedLeave:
    """A leave this process's endpoint is serving."""

    requester: Requester
    reason: str | None
    # The leave event whose entry was written with it (record_in_persist_txn),
    # set once that transaction committed.
    recorded_event_id: str | None = None


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
        # (user_id, room_id) -> leaves this process's endpoint is serving: it
        # records them itself, with the device.
        self._serving: dict[tuple[str, str], list[_ServedLeave]] = {}
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
        served = _ServedLeave(requester, reason)
        self._serving.setdefault(key, []).append(served)
        try:
            try:
                event_id = await self._internals.leave(requester, room_id, txn_id, content)
            except SynapseError as error:
                await self._record_failure(requester, "leave", room_id, reason, error)
                raise
            if event_id is None or served.recorded_event_id != event_id:
                await self._record(requester, _leave_fields(room_id, reason, event_id))
        finally:
            self._serving[key].remove(served)
            if not self._serving[key]:
                del self._serving[key]
        return event_id

    def record_in_persist_txn(self, txn: LoggingTransaction, events: Sequence[Any]) -> None:
        """Write the entries of served leaves in the transaction that persists their events.

        Runs on Synapse's database thread, inside its transaction
        (``_synapse.persist_hook``), once per batch of events: each leave this
        process's endpoint is serving gets its entry (with the device, ``via
        api``) in the same commit as its event. The endpoint then answers
        without a record transaction of its own; any leave not written here
        (its entry failed, or several requests served one user's leave of a
        room at once) is recorded by the endpoint as before. Never raises:
        Synapse's transaction is not to fail for the log's sake.

        On PostgreSQL the chain's lock cannot be taken here (it must be a
        transaction's first statement, so that the snapshot sees the head), so
        this writes optimistically, and only while this process serves no
        other leave: the head read may be stale if another writer appended
        since the transaction began, and the entry's ``seq`` (the primary key)
        then collides with that writer's; the savepoint undoes it and the
        endpoint records the leave apart. The chain never forks.
        """
        postgres = is_postgres(txn)
        if postgres and len(self._serving) != 1:
            return  # leaves overlap: the group commit shares their records
        try:
            claimed: list[tuple[_ServedLeave, Any]] = []
            for event in events:
                served = self._served_leave_of(event)
                # One entry per request, should a batch hold two of its events.
                if served is not None and not any(served is s for s, _ in claimed):
                    claimed.append((served, event))
            if not claimed:
                return
            # All the entries or none: a chain must not end on an unsigned
            # entry of a group that was half written.
            txn.execute("SAVEPOINT leave_forget_record")
            try:
                if not postgres:
                    self._store.audit.lock_chain_txn(txn)
                self._store.audit.append_many_txn(
                    txn,
                    [
                        _by_requester(
                            served.requester,
                            _leave_fields(event.room_id, served.reason, event.event_id),
                        )
                        for served, event in claimed
                    ],
                )
            except Exception:
                txn.execute("ROLLBACK TO SAVEPOINT leave_forget_record")
                raise
            finally:
                txn.execute("RELEASE SAVEPOINT leave_forget_record")
        except txn.database_engine.module.Error as error:
            # On PostgreSQL, another writer appended first (see above).
            logger.info("Leaves not recorded with their events (%s): recording them apart", error)
            return
        except Exception:
            logger.exception("Could not record leaves with their events; recording them apart")
            return

        def committed() -> None:
            for served, event in claimed:
                served.recorded_event_id = event.event_id

        txn.call_after(committed)

    def _served_leave_of(self, event: Any) -> _ServedLeave | None:
        """The served leave an event is, if exactly one request is serving it."""
        if event.type != "m.room.member" or event.state_key != event.sender:
            return None
        if event.content.get("membership") != "leave":
            return None
        # A copy: the reactor thread adds and removes served leaves meanwhile.
        served = list(self._serving.get((event.sender, event.room_id)) or ())
        if len(served) != 1 or served[0].recorded_event_id is not None:
            return None
        return served[0]

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
        fields = _by_requester(requester, fields)
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


def _by_requester(requester: Requester, fields: AuditFields) -> AuditFields:
    """fields as the requester's: their user id and the device they asked from."""
    return attr.evolve(fields, user_id=requester.user.to_string(), device_id=requester.device_id)


def _leave_fields(room_id: str, reason: str | None, event_id: str | None) -> AuditFields:
    return AuditFields(
        action="leave",
        outcome="ok",
        room_id=room_id,
        reason=reason,
        event_id=event_id,
        via=VIA_API,
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
