"""Audit chains for the tests of verification: a valid one, and one rewritten as a forger would."""

import json
from typing import Any

from signedjson.types import SigningKey

from matrix_leave_forget.audit.entry import (
    ACTION_ERASE,
    GENESIS_HASH,
    erasure_claim,
    seal_entries,
    seal_entry,
)


def make_chain(
    count: int,
    signing_key: SigningKey,
    origin: str = "example.org",
    start_ts: int = 1_700_000_000_000,
) -> list[dict[str, Any]]:
    """A valid chain of ``count`` entries, varied enough that every field matters."""
    entries: list[dict[str, Any]] = []
    prev = GENESIS_HASH
    for seq in range(1, count + 1):
        action = ("leave", "forget", "purge", "hold")[seq % 4]
        entry = seal_entry(
            {
                "seq": seq,
                "ts": start_ts + seq * 1000,
                "origin": origin,
                "instance": "master",
                "action": action,
                "user_id": f"@user{seq % 3}:{origin}",
                "room_id": f"!room{seq % 2}:{origin}",
                "reason": f"reason {seq}" if action == "leave" else None,
                "event_id": f"$event{seq}" if action == "leave" else None,
                "device_id": "DEVICE" if action in ("leave", "forget") else None,
                "outcome": "ok",
                "prev_hash": prev,
            },
            origin,
            signing_key,
        )
        entries.append(entry)
        prev = entry["hash"]
    return entries


def reseal_from(
    entries: list[dict[str, Any]], index: int, signing_key: SigningKey, origin: str = "example.org"
) -> None:
    """Recompute hashes and signatures from ``index`` on, as a forger rebuilding the chain would."""
    for i in range(index, len(entries)):
        fields = dict(entries[i])
        fields["prev_hash"] = entries[i - 1]["hash"] if i else GENESIS_HASH
        entries[i] = seal_entry(fields, origin, signing_key)


def erase_texts(
    chain: list[dict[str, Any]], seqs: list[int], key: SigningKey, origin: str = "example.org"
) -> None:
    """What AuditLog.erase_text_txn does to the rows: a signed erase entry, then the
    text deleted from each erased entry."""
    claims = [erasure_claim(chain[s - 1]) for s in seqs]
    record = {
        "ts": 1_700_000_000_000,
        "origin": origin,
        "instance": "master",
        "user_id": "@alice:example.org",
        "reason": None,
        "action": ACTION_ERASE,
        "outcome": "erased_user",
        "room_id": None,
        "event_id": None,
        "device_id": None,
        "erasure": json.dumps(claims),
    }
    seq = chain[-1]["seq"] if chain else 0
    prev = chain[-1]["hash"] if chain else GENESIS_HASH
    chain += seal_entries([record], seq, prev, origin, key)
    for s in seqs:
        entry = chain[s - 1]
        for name in ("reason_sha256", "text_salt"):
            entry.pop(name, None)
        entry["reason"] = None
        entry["text_erased"] = 1
