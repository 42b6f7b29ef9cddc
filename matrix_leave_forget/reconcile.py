"""Start-up reconciliation: make the audit log and retention state agree with Synapse.

A leave or forget is performed by Synapse first and recorded by the module
right after. A crash (SIGKILL, power loss) between the two leaves Synapse ahead
of the module. At start-up, on the process that runs background tasks, the
reconciler brings back what can be known:

* rooms Synapse shows forgotten by every local user, with no retention state,
  are marked forgotten (the purge clock starts now) with a ``forget`` entry of
  outcome ``recovered``;
* leave events local users sent since shortly before the newest audit entry,
  missing from the log, are recorded as ``leave`` entries of outcome
  ``recovered`` with their event id and reason.

What cannot be known is reported, not invented: which user's forget was lost
(Synapse keeps no forget time or device), and the device of a recovered leave.
"""

import logging
from typing import TYPE_CHECKING, Dict, Optional

from synapse.module_api import ModuleApi

from matrix_leave_forget.config import RetentionConfig
from matrix_leave_forget.handler import MembershipHandler
from matrix_leave_forget.store import RetentionStore

if TYPE_CHECKING:
    from matrix_leave_forget._synapse import SynapseInternals

logger = logging.getLogger(__name__)

# Requests in flight at a crash started at most this long before the newest entry.
RECOVERY_MARGIN_MS = 5 * 60 * 1000
# Bound on the rows one start-up looks at; the rest is reported.
RECOVERY_LIMIT = 10_000


class Reconciler:
    """Brings the module's records up to what Synapse did.

    Args:
        api: The module API.
        retention: The retention settings (the period for recovered rooms).
        store: The retention store.
        handler: Source of the "forgotten by every local user" check.
        internals: Reads Synapse's tables.
    """

    def __init__(
        self,
        api: ModuleApi,
        retention: RetentionConfig,
        store: RetentionStore,
        handler: MembershipHandler,
        internals: "SynapseInternals",
    ) -> None:
        self._api = api
        self._retention = retention
        self._store = store
        self._handler = handler
        self._internals = internals

    async def run(self) -> Dict[str, int]:
        """Reconcile once; returns counts of what was recovered, for logs and tests."""
        counts = {"forgotten_rooms": 0, "leaves": 0}
        last_ts: Optional[int] = await self._store.last_audit_ts()
        if last_ts is not None:
            leaves = await self._api.run_db_interaction(
                "leave_forget_recent_self_leaves",
                self._internals.self_leaves_since_txn,
                last_ts - RECOVERY_MARGIN_MS,
                self._api.server_name,
                RECOVERY_LIMIT,
            )
            for event_id, room_id, user_id, _, reason in leaves:
                if await self._store.record_recovered_leave(event_id, room_id, user_id, reason):
                    counts["leaves"] += 1
            if len(leaves) == RECOVERY_LIMIT:
                logger.warning(
                    "More than %d leaves to reconcile; the rest are not in the audit log",
                    RECOVERY_LIMIT,
                )
        rooms = await self._api.run_db_interaction(
            "leave_forget_forgotten_by_all",
            self._internals.forgotten_by_all_rooms_txn,
            RECOVERY_LIMIT,
        )
        for room_id in rooms:
            if await self._store.record_recovered_forgotten(
                room_id, self._handler.why_not_forgotten_txn, self._retention.period_ms
            ):
                counts["forgotten_rooms"] += 1
        if any(counts.values()):
            logger.warning(
                "Reconciled with Synapse at start-up: %d room(s) forgotten by every local "
                "user had no retention state; %d leave(s) were missing from the audit log "
                "(recorded with outcome 'recovered'; their devices, and who forgot which "
                "room when, cannot be recovered)",
                counts["forgotten_rooms"],
                counts["leaves"],
            )
        return counts
