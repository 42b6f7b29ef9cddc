"""The erasure receipt: what a purge erased and what it kept, in its signed audit entry.

An operator answering a data subject points at one entry: the room's
``purge``/``purged`` entry, whose ``receipt`` (hashed and signed with the
chain) says how much of the room was erased and what stays, and why
(docs/retention.md "The erasure receipt").
"""

import json
from collections.abc import Mapping
from typing import Any

# Rows of Synapse's tables that keep the purged room's bare id, and why
# (docs/retention.md "What a purge leaves").
KEPT_ROOM_ID_ROWS: Mapping[str, str] = {
    "current_state_delta_stream": "stream_positions",
    "room_tags_revisions": "stream_positions",
    "scheduled_tasks": "synapse_purge_task",
}

# What the module does with a purged room's media today: it keeps it (media
# deletion does not exist yet; the counts below are then 0).
MEDIA_POLICY_KEEP = "keep"


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
