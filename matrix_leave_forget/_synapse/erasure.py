"""Which users Synapse has erased (GDPR erasure)."""

from collections.abc import Sequence

from synapse.module_api import LoggingTransaction


def erased_users_with_text_txn(
    txn: LoggingTransaction, actions: Sequence[str], after: str, limit: int
) -> list[str]:
    """Users Synapse has erased whose audit entries still hold free text, after ``after``
    in user id order.

    Why: ModuleApi says when a user is deactivated
    (on_user_deactivation_status_changed) but not whether they were erased,
    and has no reader for it; Synapse records an erasure in its
    ``erased_users`` table (DeactivateAccountHandler, before that callback
    runs; the same table since long before the oldest supported Synapse).
    ``actions``: the entries' actions whose text erasure removes.
    Reading it also catches erasures made while the module was not loaded
    or on a process that crashed before erasing.
    """
    in_actions = ", ".join("?" for _ in actions)
    pending = (
        f"a.text_erased IS NULL AND a.action IN ({in_actions}) "
        "AND (a.reason IS NOT NULL OR a.reason_sha256 IS NOT NULL)"
    )
    txn.execute(
        "SELECT e.user_id FROM erased_users AS e WHERE e.user_id > ? AND (EXISTS ("
        f" SELECT 1 FROM leave_forget_audit AS a WHERE a.user_id = e.user_id AND {pending}"
        ") OR EXISTS ("
        f" SELECT 1 FROM leave_forget_audit AS a WHERE a.actor = e.user_id AND {pending}"
        ")) ORDER BY e.user_id LIMIT ?",
        (after, *actions, *actions, limit),
    )
    return [str(row[0]) for row in txn.fetchall()]
