"""The erasure receipt: what a purge erased and what it kept, in its signed audit entry.

An operator answering a data subject points at one entry: the room's
``purge``/``purged`` entry, whose ``receipt`` (hashed and signed with the
chain) says how much of the room was erased and what stays, and why
(docs/retention.md "The erasure receipt"). Its media, decided after the
purge and deleted after a grace, is recorded in a later entry of its own
(``purge``/``media_deleted``); :func:`purge_receipt_view_txn` shows both.
"""

import json
from collections.abc import Mapping
from typing import Any

from matrix_leave_forget.audit.log import purge_entry_txn, purge_receipt_txn
from matrix_leave_forget.db.media import ROOM_REPORTED, ROOM_WAITING, media_room_status_txn

# Rows of Synapse's tables that keep the purged room's bare id, and why
# (docs/retention.md "What a purge leaves").
KEPT_ROOM_ID_ROWS: Mapping[str, str] = {
    "current_state_delta_stream": "stream_positions",
    "room_tags_revisions": "stream_positions",
    "scheduled_tasks": "synapse_purge_task",
}

# The purge receipt's media policy when none is given: the media is kept.
MEDIA_POLICY_KEEP = "keep"

# The outcome of the entry that records a purged room's media, after its grace.
OUTCOME_MEDIA_DELETED = "media_deleted"

# purge_receipt.media.state (docs/retention.md "The erasure receipt").
MEDIA_PENDING = "pending"  # not decided yet, or media still due for deletion
MEDIA_RECORDED = "recorded"  # the media_deleted entry is written
MEDIA_NOTHING = "no_media"  # settled, no entry: no media Synapse held, not encrypted


def build_receipt(
    events: int | None,
    state_groups: int | None,
    leftovers: Mapping[str, int],
    media: Mapping[str, int] | None = None,
    media_policy: str = MEDIA_POLICY_KEEP,
) -> dict[str, Any]:
    """The receipt of one purge.

    Args:
        events: The room's events just before the purge (None: not counted,
            e.g. a purge requested before this module version).
        state_groups: Its state groups, likewise.
        leftovers: Rows the module cleared after Synapse's purge, by table.
        media: Media erased and kept, by counter (``local_items``,
            ``local_bytes``, ``remote_items``, ``remote_bytes``,
            ``kept_referenced_elsewhere``, ``kept_encrypted_room``); 0 each
            when not given.
        media_policy: ``keep`` (media is not deleted with the room).
    """
    counters = (
        "local_items",
        "local_bytes",
        "remote_items",
        "remote_bytes",
        "kept_referenced_elsewhere",
        "kept_encrypted_room",
    )
    return {
        "events": events,
        "state_groups": state_groups,
        "media": {"policy": media_policy, **{c: int((media or {}).get(c, 0)) for c in counters}},
        "leftovers_cleared": dict(sorted(leftovers.items())),
        "kept": dict(KEPT_ROOM_ID_ROWS),
    }


def encode_receipt(receipt: Mapping[str, Any]) -> str:
    """The receipt as stored in the entry: compact JSON with sorted keys."""
    return json.dumps(receipt, sort_keys=True, separators=(",", ":"))


def decode_receipt(text: str | None) -> dict[str, Any] | None:
    """A stored receipt back as an object (None if absent or unreadable)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def receipt_view(entry: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A purged entry (audit.log.purge_receipt_txn) as the admin API and the CLI show it.

    ``seq`` and ``hash`` name the signed entry; ``receipt`` is None on a
    purge recorded before receipts existed.
    """
    if entry is None:
        return None
    return {
        "seq": entry["seq"],
        "ts": entry["ts"],
        "hash": entry["hash"],
        "receipt": decode_receipt(entry["receipt"]),
    }


def media_view(
    status: tuple[str, int, int | None] | None, entry: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Where a purged room's media stands, beside its purge receipt.

    Args:
        status: ``db.media.media_room_status_txn``'s answer (None: the purge
            decides no media).
        entry: The room's ``purge``/``media_deleted`` entry after its purge, if written.

    Returns:
        None when the purge decides no media; else ``state``: ``recorded``
        (with the entry's ``seq``, ``ts``, ``hash`` and ``receipt``),
        ``pending`` (``due``: media still due for deletion, None while
        undecided; ``due_at``: when the last of them is) or ``no_media``.
    """
    if entry is not None:
        return {"state": MEDIA_RECORDED, **(receipt_view(entry) or {})}
    if status is None:
        return None
    state, due, due_at = status
    if state == ROOM_REPORTED:
        return {"state": MEDIA_NOTHING}
    if state == ROOM_WAITING:
        return {"state": MEDIA_PENDING, "due": None, "due_at": None}
    return {"state": MEDIA_PENDING, "due": due, "due_at": due_at}


def purge_receipt_view_txn(txn: Any, room_id: str, paramstyle: str = "?") -> dict[str, Any] | None:
    """The room's purge receipt (:func:`receipt_view`) with ``media``: :func:`media_view`.

    One read of the purge entry, the media entry written after it and the
    media's state; shared by the admin API and the CLI (``paramstyle``: see
    audit.log.select_audit_txn). None if no purge is recorded.
    """
    view = receipt_view(purge_receipt_txn(txn, room_id, paramstyle))
    if view is None:
        return None
    entry = purge_entry_txn(txn, room_id, OUTCOME_MEDIA_DELETED, view["seq"], paramstyle)
    status = media_room_status_txn(txn, room_id, paramstyle) if entry is None else None
    return {**view, "media": media_view(status, entry)}
