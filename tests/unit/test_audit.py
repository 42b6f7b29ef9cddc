"""The audit chain: sealing entries, and verification catching every kind of tampering.

Pure functions, no Synapse process: chains are generated here with a fresh
signing key, exactly as the store seals them (``seal_entry`` with ``prev_hash``
set to the previous entry's hash).
"""

import copy
from typing import Any, Dict, List, Optional

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64, encode_base64

from matrix_leave_forget.audit import (
    ENTRY_FIELDS,
    GENESIS_HASH,
    entry_hash,
    iter_verify,
    parse_verify_key,
    seal_entry,
    verify_chain,
    verify_key_id,
    verify_keys_from_signing_key,
)

ORIGIN = "example.org"


def make_chain(
    count: int,
    signing_key: SigningKey,
    origin: str = ORIGIN,
    start_ts: int = 1_700_000_000_000,
) -> List[Dict[str, Any]]:
    """A valid chain of ``count`` entries, varied enough that every field matters."""
    entries: List[Dict[str, Any]] = []
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
    entries: List[Dict[str, Any]], index: int, signing_key: SigningKey, origin: str = ORIGIN
) -> None:
    """Recompute hashes and signatures from ``index`` on, as a forger rebuilding the chain would."""
    for i in range(index, len(entries)):
        fields = dict(entries[i])
        fields["prev_hash"] = entries[i - 1]["hash"] if i else GENESIS_HASH
        entries[i] = seal_entry(fields, origin, signing_key)


class AuditChainTest(SynchronousTestCase):
    """A six-entry chain signed with a fresh key, and every way of tampering with it."""

    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.keys = verify_keys_from_signing_key(self.key)
        self.chain = make_chain(6, self.key)

    def assertFailsAt(
        self,
        entries: List[Dict[str, Any]],
        seq: int,
        problem: str,
        checked: int,
        keys: Optional[Any] = None,
    ) -> None:
        """Verification fails at ``seq`` for ``problem``, after ``checked`` good entries."""
        result = verify_chain(entries, ORIGIN, keys if keys is not None else self.keys)
        self.assertFalse(result.ok, result)
        self.assertEqual(result.bad_seq, seq, result)
        self.assertIn(problem, result.problem or "")
        self.assertEqual(result.checked, checked, result)
        # The head reported is the last good entry's, for the operator to compare.
        self.assertEqual(
            result.head_hash, entries[checked - 1]["hash"] if checked else GENESIS_HASH
        )

    # -- a valid chain -------------------------------------------------------

    def test_valid_chain_verifies(self) -> None:
        """A chain sealed by seal_entry verifies, and reports its length and last hash."""
        result = verify_chain(self.chain, ORIGIN, self.keys)
        self.assertTrue(result.ok)
        self.assertEqual(result.checked, 6)
        self.assertEqual(result.head_hash, self.chain[-1]["hash"])
        self.assertIsNone(result.problem)

    def test_empty_chain_verifies(self) -> None:
        """An empty log is valid, with zero entries and the genesis hash as its head."""
        result = verify_chain([], ORIGIN, self.keys)
        self.assertTrue(result.ok)
        self.assertEqual((result.checked, result.head_hash), (0, GENESIS_HASH))

    def test_iter_verify_reports_progress_per_entry(self) -> None:
        """iter_verify yields a result per good entry, so a caller can stream and show progress."""
        results = list(iter_verify(iter(self.chain), ORIGIN, self.keys))
        self.assertEqual([r.checked for r in results], [1, 2, 3, 4, 5, 6])
        self.assertEqual([r.head_hash for r in results], [e["hash"] for e in self.chain])

    def test_iter_verify_stops_at_first_bad_entry(self) -> None:
        """iter_verify consumes no entry after the first bad one (a streamed log stops early)."""
        self.chain[2]["reason"] = "edited"
        consumed: List[int] = []

        def entries() -> Any:
            for entry in self.chain:
                consumed.append(entry["seq"])
                yield entry

        results = list(iter_verify(entries(), ORIGIN, self.keys))
        self.assertEqual(results[-1].bad_seq, 3)
        self.assertEqual(consumed, [1, 2, 3])

    def test_seal_entry_hash_covers_fields_not_hash_or_signatures(self) -> None:
        """The stored hash is entry_hash of the fields; hash and signatures are outside it."""
        entry = self.chain[0]
        self.assertEqual(entry["hash"], entry_hash(entry))
        stripped = {k: entry[k] for k in ENTRY_FIELDS}
        self.assertEqual(entry_hash(stripped), entry["hash"])
        self.assertEqual(list(entry["signatures"]), [ORIGIN])
        self.assertEqual(list(entry["signatures"][ORIGIN]), ["ed25519:k1"])

    # -- tampering -----------------------------------------------------------

    def test_edited_field_fails_at_that_entry(self) -> None:
        """Editing any hashed field of entry 3 (bar seq/prev_hash) is reported at entry 3."""
        edits = {
            "ts": 1,
            "origin": "evil.org",
            "instance": "worker9",
            "action": "unhold",
            "user_id": "@mallory:example.org",
            "room_id": "!other:example.org",
            "reason": "a different reason",
            "event_id": "$forged",
            "device_id": "OTHER",
            "outcome": "M_FORBIDDEN",
        }
        self.assertEqual(set(edits), set(ENTRY_FIELDS) - {"seq", "prev_hash"})
        for field, value in edits.items():
            self.assertNotEqual(self.chain[2][field], value, field)
            chain = copy.deepcopy(self.chain)
            chain[2][field] = value
            result = verify_chain(chain, ORIGIN, self.keys)
            self.assertEqual(result.bad_seq, 3, f"edit of {field}: {result}")
            self.assertIn("the row was edited", result.problem or "", field)
            self.assertEqual(result.checked, 2)
            self.assertEqual(result.head_hash, self.chain[1]["hash"])

    def test_edited_prev_hash_fails_at_that_entry(self) -> None:
        """Pointing an entry's prev_hash elsewhere breaks the link at that entry."""
        self.chain[3]["prev_hash"] = self.chain[1]["hash"]
        self.assertFailsAt(self.chain, 4, "prev_hash does not match", checked=3)

    def test_edited_then_rehashed_chain_fails_on_signature(self) -> None:
        """A forger who edits entry 3 and rebuilds every later hash is caught by the signature."""
        self.chain[2]["reason"] = "rewritten history"
        forger = generate_signing_key("k1")  # same key id, different key
        reseal_from(self.chain, 2, forger)
        self.assertFailsAt(self.chain, 3, "bad signature", checked=2)

    def test_rehashed_without_resigning_fails_on_signature(self) -> None:
        """Rehashing an edited entry but keeping its old signature fails on the signature."""
        self.chain[2]["reason"] = "edited"
        self.chain[2]["hash"] = entry_hash(self.chain[2])
        self.assertFailsAt(self.chain, 3, "bad signature", checked=2)

    def test_deleted_middle_row_fails_at_the_gap(self) -> None:
        """Deleting entry 3 makes entry 4 the first bad one, and the report says 3 was expected."""
        del self.chain[2]
        self.assertFailsAt(self.chain, 4, "expected entry 3 but found entry 4", checked=2)

    def test_deleted_first_row_fails_at_the_start(self) -> None:
        """Deleting entry 1 is caught at once: the log must start at seq 1."""
        del self.chain[0]
        self.assertFailsAt(self.chain, 2, "expected entry 1 but found entry 2", checked=0)

    def test_deleted_and_renumbered_fails_at_the_gap(self) -> None:
        """Deleting entry 3 and renumbering the rest to close the gap fails at the new entry 3."""
        del self.chain[2]
        for entry in self.chain[2:]:
            entry["seq"] -= 1
        self.assertFailsAt(self.chain, 3, "prev_hash does not match", checked=2)

    def test_swapped_rows_fail_at_the_first_out_of_order(self) -> None:
        """Two rows delivered in swapped order fail at the first one out of place."""
        self.chain[2], self.chain[3] = self.chain[3], self.chain[2]
        self.assertFailsAt(self.chain, 4, "expected entry 3 but found entry 4", checked=2)

    def test_swapped_seq_values_fail_at_the_lower_seq(self) -> None:
        """Swapping two rows' seq numbers (seq stays contiguous) fails at the lower seq."""
        self.chain[2]["seq"], self.chain[3]["seq"] = 4, 3
        self.chain[2], self.chain[3] = self.chain[3], self.chain[2]
        self.assertEqual([e["seq"] for e in self.chain], [1, 2, 3, 4, 5, 6])
        self.assertFailsAt(self.chain, 3, "prev_hash does not match", checked=2)

    def test_inserted_row_fails_at_the_insertion(self) -> None:
        """A row inserted with a duplicate seq is caught where it is inserted."""
        extra = copy.deepcopy(self.chain[1])
        extra["reason"] = "inserted"
        self.chain.insert(2, extra)
        self.assertFailsAt(self.chain, 2, "expected entry 3 but found entry 2", checked=2)

    def test_first_entry_must_start_from_genesis(self) -> None:
        """A chain whose first entry points at some earlier hash is not a complete log."""
        self.chain[0]["prev_hash"] = "c29tZXRoaW5n"
        self.assertFailsAt(self.chain, 1, "prev_hash does not match", checked=0)

    def test_truncated_tail_changes_the_head_hash(self) -> None:
        """Dropping the newest entries leaves a valid chain, but with another head hash.

        The chain alone cannot see a cut tail; the head hash printed by verify
        is what an operator anchors elsewhere to detect it.
        """
        result = verify_chain(self.chain[:-2], ORIGIN, self.keys)
        self.assertTrue(result.ok)
        self.assertEqual(result.checked, 4)
        self.assertNotEqual(result.head_hash, self.chain[-1]["hash"])

    # -- keys and signatures -------------------------------------------------

    def test_wrong_key_with_same_id_fails_at_first_entry(self) -> None:
        """Verifying with another key that claims the same key id fails at entry 1."""
        other = verify_keys_from_signing_key(generate_signing_key("k1"))
        self.assertFailsAt(self.chain, 1, "bad signature", checked=0, keys=other)

    def test_unknown_key_id_fails_at_first_entry(self) -> None:
        """Verifying with a key of another id reports that no known key signed the entry."""
        other = verify_keys_from_signing_key(generate_signing_key("k2"))
        self.assertFailsAt(
            self.chain, 1, "no signature by example.org with a known key", checked=0, keys=other
        )

    def test_wrong_origin_fails_at_first_entry(self) -> None:
        """Entries are only accepted when signed by the origin being verified."""
        result = verify_chain(self.chain, "other.org", self.keys)
        self.assertEqual(result.bad_seq, 1)
        self.assertIn("no signature by other.org", result.problem or "")

    def test_bad_signature_fails_at_that_entry(self) -> None:
        """A corrupted signature on entry 4 is reported at entry 4, after 3 good entries."""
        raw = bytearray(decode_base64(self.chain[3]["signatures"][ORIGIN]["ed25519:k1"]))
        raw[0] ^= 0xFF
        self.chain[3]["signatures"][ORIGIN]["ed25519:k1"] = encode_base64(bytes(raw))
        self.assertFailsAt(self.chain, 4, "bad signature", checked=3)

    def test_missing_signature_fails_at_that_entry(self) -> None:
        """An entry whose signatures were stripped is reported as unsigned."""
        self.chain[4]["signatures"] = {}
        self.assertFailsAt(self.chain, 5, "no signature by example.org", checked=4)

    def test_signature_from_another_entry_fails(self) -> None:
        """A signature copied from another entry does not cover this entry's hash and seq."""
        self.chain[4]["signatures"] = copy.deepcopy(self.chain[3]["signatures"])
        self.assertFailsAt(self.chain, 5, "bad signature", checked=4)

    def test_rotated_keys_verify_with_both_keys(self) -> None:
        """After a key rotation a chain signed partly by each key verifies when both are known."""
        new_key = generate_signing_key("k2")
        chain = self.chain[:3]
        for seq in range(4, 7):
            fields = dict(self.chain[seq - 1])
            fields["prev_hash"] = chain[-1]["hash"]
            chain.append(seal_entry(fields, ORIGIN, new_key))
        both = {**self.keys, **verify_keys_from_signing_key(new_key)}
        self.assertTrue(verify_chain(chain, ORIGIN, both).ok)
        self.assertFailsAt(chain, 4, "with a known key", checked=3, keys=self.keys)

    # -- parse_verify_key ----------------------------------------------------

    def test_parse_verify_key_round_trip(self) -> None:
        """'ed25519:<version> <base64>' parses back to the same key, which then verifies."""
        verify_key = get_verify_key(self.key)
        text = f"{verify_key_id(self.key)} {encode_verify_key_base64(verify_key)}"
        parsed = parse_verify_key(text)
        self.assertEqual(list(parsed), ["ed25519:k1"])
        key = parsed["ed25519:k1"]
        self.assertEqual(bytes(key), bytes(verify_key))
        self.assertEqual((key.alg, key.version), ("ed25519", "k1"))
        self.assertEqual(f"{key.alg}:{key.version} {encode_verify_key_base64(key)}", text)
        self.assertTrue(verify_chain(self.chain, ORIGIN, parsed).ok)

    def test_parse_verify_key_tolerates_surrounding_whitespace(self) -> None:
        """Extra spaces or a trailing newline (as pasted from a shell) do not matter."""
        verify_key = get_verify_key(self.key)
        text = f"  ed25519:k1   {encode_verify_key_base64(verify_key)}\n"
        self.assertEqual(bytes(parse_verify_key(text)["ed25519:k1"]), bytes(verify_key))

    def test_parse_verify_key_rejects_malformed_text(self) -> None:
        """Anything but 'ed25519:<version> <base64 of 32 bytes>' is a ValueError naming it."""
        good_b64 = encode_verify_key_base64(get_verify_key(self.key))
        for text in (
            "",
            "ed25519:k1",
            good_b64,
            f"ed25519:k1 {good_b64} extra",
            f"ed25519k1 {good_b64}",
            f"curve25519:k1 {good_b64}",
            "ed25519:k1 not*base64",
            "ed25519:k1 AAAA",
        ):
            with self.assertRaises(ValueError, msg=repr(text)) as caught:
                parse_verify_key(text)
            self.assertIn("ed25519:<version> <base64>", str(caught.exception))
