"""The optional entry fields (via, actor, event_ts) keep old chains verifying.

An entry without them must hash exactly as before they existed; one with them
must have them covered by its hash, so editing them is caught.
"""

import hashlib
import json
from typing import Any

from canonicaljson import encode_canonical_json
from signedjson.key import generate_signing_key
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from matrix_leave_forget.audit.entry import (
    ENTRY_FIELDS,
    GENESIS_HASH,
    entry_hash,
    seal_entry,
    verify_chain,
    verify_keys_from_signing_key,
)
from matrix_leave_forget.audit.log import STORED_COLUMNS, row_to_entry

ORIGIN = "test.local"


def fields(seq: int, prev_hash: str, **extra: Any) -> dict[str, Any]:
    base = {
        "seq": seq,
        "ts": 1_700_000_000_000 + seq,
        "origin": ORIGIN,
        "instance": "master",
        "action": "leave",
        "user_id": "@bob:test.local",
        "room_id": "!room:test.local",
        "reason": None,
        "event_id": f"$event{seq}",
        "device_id": None,
        "outcome": "ok",
        "prev_hash": prev_hash,
    }
    return {**base, **extra}


class OptionalFieldsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = generate_signing_key("a")
        self.keys = verify_keys_from_signing_key(self.key)

    def test_entry_without_them_hashes_as_the_first_format(self) -> None:
        """No via/actor/event_ts (or all null): the hash is the first format's."""
        legacy = fields(1, GENESIS_HASH)
        first_format = encode_base64(
            hashlib.sha256(encode_canonical_json({k: legacy[k] for k in ENTRY_FIELDS})).digest()
        )
        self.assertEqual(entry_hash(legacy), first_format)
        self.assertEqual(entry_hash({**legacy, "via": None, "actor": None}), first_format)

    def test_they_are_hashed_and_a_mixed_chain_verifies(self) -> None:
        """A chain of old-style and new-style entries verifies; editing via, actor
        or event_ts of a new entry is caught."""
        old = seal_entry(fields(1, GENESIS_HASH), ORIGIN, self.key)
        new = seal_entry(
            fields(2, old["hash"], via="kick", actor="@alice:test.local", event_ts=5),
            ORIGIN,
            self.key,
        )
        self.assertEqual(
            (new["via"], new["actor"], new["event_ts"]), ("kick", "@alice:test.local", 5)
        )
        self.assertNotIn("via", old)
        self.assertTrue(verify_chain([old, new], ORIGIN, self.keys).ok)
        for name, value in (("via", "client"), ("actor", "@mallory:test.local"), ("event_ts", 6)):
            edited = {**new, name: value}
            result = verify_chain([old, edited], ORIGIN, self.keys)
            self.assertEqual(result.bad_seq, 2, name)

    def test_rows_read_back_verify(self) -> None:
        """Stored rows (null columns for absent fields) read back as the sealed entries."""
        old = seal_entry(fields(1, GENESIS_HASH), ORIGIN, self.key)
        new = seal_entry(fields(2, old["hash"], via="api"), ORIGIN, self.key)
        rows = [
            [json.dumps(e["signatures"]) if c == "signatures" else e.get(c) for c in STORED_COLUMNS]
            for e in (old, new)
        ]
        entries = [row_to_entry(r) for r in rows]
        self.assertEqual(entries, [old, new])
        self.assertTrue(verify_chain(entries, ORIGIN, self.keys).ok)
