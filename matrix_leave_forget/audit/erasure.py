"""Erasing users' free text from the audit log (docs/audit.md "Erasure").

When Synapse erases a user (GDPR erasure: deactivation with ``erase``), the
free text of their entries — leave reasons, refused requests' reason
prefixes — is deleted, keeping who, which room, when, how and the outcome.
With ``audit.text_retention`` set, free text older than that goes too. Each
erasure appends a signed ``erase`` entry recording what it erased, so the
chain still verifies and an edit that is not an erasure is still caught.
"""

import logging
from collections.abc import Callable

from synapse.module_api import LoggingTransaction, ModuleApi

from matrix_leave_forget._synapse.erasure import erased_users_with_text_txn
from matrix_leave_forget.audit.log import (
    ERASABLE_ACTIONS,
    ERASE_BATCH,
    ERASED_TEXT_RETENTION,
    ERASED_USER,
    AuditLog,
)
from matrix_leave_forget.timestamps import now_ms

logger = logging.getLogger(__name__)

# Erased users looked up per transaction.
_USERS_PER_PASS = 100


class TextEraser:
    """Erases free text from the audit log: of erased users, and past text_retention.

    Args:
        api: The module API.
        audit: The audit log.
        text_retention_ms: How long free text is kept, or None.
    """

    def __init__(self, api: ModuleApi, audit: AuditLog, text_retention_ms: int | None) -> None:
        self._api = api
        self._audit = audit
        self._text_retention_ms = text_retention_ms
        self._running = False
        self._again = False

    async def on_user_deactivation_status_changed(
        self, user_id: str, by_admin: bool, deactivated: bool
    ) -> None:
        """Synapse's callback: after a deactivation, erase the user's text if Synapse erased them.

        Synapse records the erasure before it calls back, so the pass finds it.
        """
        if deactivated:
            await self.run()

    async def run(self) -> int:
        """Erase every erased user's remaining free text, then text past retention.

        Returns:
            How many entries had their text erased.
        """
        if self._running:
            # A deactivation during a pass: its user may be past the pass's
            # listing; the running pass goes round once more.
            self._again = True
            return 0
        self._running = True
        try:
            erased = 0
            while True:
                self._again = False
                erased += await self._pass()
                if not self._again:
                    return erased
        finally:
            self._running = False

    async def _pass(self) -> int:
        """One pass over erased users, then over text past retention."""
        erased = 0
        after = ""
        while True:
            users = await self._api.run_db_interaction(
                "leave_forget_erased_users",
                erased_users_with_text_txn,
                ERASABLE_ACTIONS,
                after,
                _USERS_PER_PASS,
            )
            for user_id in users:
                count = await self._erase_all(
                    self._user_entries(user_id),
                    ERASED_USER,
                    user_id,
                )
                logger.info("Erased the free text of %d audit entries of %s", count, user_id)
                erased += count
            if len(users) < _USERS_PER_PASS:
                break
            after = users[-1]
        if self._text_retention_ms is not None:
            before = now_ms() - self._text_retention_ms
            count = await self._erase_all(
                lambda txn: self._audit.old_text_seqs_txn(txn, before, ERASE_BATCH),
                ERASED_TEXT_RETENTION,
                None,
            )
            if count:
                logger.info("Erased the free text of %d audit entries (text_retention)", count)
            erased += count
        return erased

    def _user_entries(self, user_id: str) -> Callable[[LoggingTransaction], list[int]]:
        return lambda txn: self._audit.user_text_seqs_txn(txn, user_id, ERASE_BATCH)

    async def _erase_all(
        self,
        select: Callable[[LoggingTransaction], list[int]],
        outcome: str,
        user_id: str | None,
    ) -> int:
        """Erase, ERASE_BATCH entries per transaction, until ``select`` finds none."""
        total = 0
        while True:

            def txn_fn(txn: LoggingTransaction) -> tuple[int, int]:
                seqs = select(txn)
                return len(seqs), self._audit.erase_text_txn(txn, seqs, outcome, user_id)

            found, erased = await self._audit.run_locked("leave_forget_erase_text", txn_fn)
            total += erased
            # Entries that could not be erased (tampered with) are found again: stop.
            if found < ERASE_BATCH or erased < found:
                return total
