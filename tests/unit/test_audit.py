"""The audit chain: sealing entries, and verification catching every kind of tampering.

Pure functions, no Synapse process: chains are generated here with a fresh
signing key, exactly as the store seals them (``seal_entry`` with ``prev_hash``
set to the previous entry's hash).
"""

import copy
import io
import json
from typing import Any

from signedjson.key import encode_verify_key_base64, generate_signing_key, get_verify_key
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64, encode_base64

from matrix_leave_forget.audit.checkpoint import (
    CHECKPOINT_EVENT_TYPE,
    check_checkpoint,
    checked_heads,
    make_checkpoint,
    read_checkpoints,
)
from matrix_leave_forget.audit.entry import (
    ENTRY_FIELDS,
    FORMAT_COMMITTED,
    FORMAT_GROUP,
    GENESIS_HASH,
    entry_hash,
    escape_fields,
    iter_verify,
    parse_head,
    parse_old_signing_keys,
    parse_verify_key,
    seal_entries,
    seal_entry,
    unescape_entry,
    verify_chain,
    verify_key_id,
    verify_keys_from_signing_key,
)
from matrix_leave_forget.audit.refusals import (
    REFUSED_REASON_PREFIX_CHARS,
    RefusalBudget,
    refused_reason,
)
from tests.support.chain import make_chain, reseal_from

ORIGIN = "example.org"


class AuditChainTest(SynchronousTestCase):
    """A six-entry chain signed with a fresh key, and every way of tampering with it."""

    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.keys = verify_keys_from_signing_key(self.key)
        self.chain = make_chain(6, self.key)

    def assertFailsAt(
        self,
        entries: list[dict[str, Any]],
        seq: int,
        problem: str,
        checked: int,
        keys: Any | None = None,
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
        consumed: list[int] = []

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


def group_fields(seq: int, origin: str = ORIGIN, ts: int = 1_700_000_000_000) -> dict[str, Any]:
    """The fields of one entry, as the store hands them to seal_entries."""
    return {
        "ts": ts + seq * 1000,
        "origin": origin,
        "instance": "master",
        "action": "purge",
        "user_id": None,
        "room_id": f"!room{seq}:{origin}",
        "reason": None,
        "event_id": None,
        "device_id": None,
        "outcome": "started",
    }


def make_group_chain(
    sizes: list[int], signing_key: SigningKey, first: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """A chain continuing ``first`` with groups of the given sizes, each sealed by seal_entries."""
    chain = list(first or [])
    for size in sizes:
        seq = chain[-1]["seq"] if chain else 0
        prev = chain[-1]["hash"] if chain else GENESIS_HASH
        chain += seal_entries(
            [group_fields(seq + i + 1) for i in range(size)], seq, prev, ORIGIN, signing_key
        )
    return chain


class GroupSealTest(SynchronousTestCase):
    """Entries sealed per group: one signature per group, and old chains still verify."""

    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.keys = verify_keys_from_signing_key(self.key)

    def test_group_chain_signs_only_each_groups_last_entry(self) -> None:
        """Groups of 3, 1 and 4: only entries 3, 4 and 8 are signed, and the chain verifies."""
        chain = make_group_chain([3, 1, 4], self.key)
        self.assertEqual([e["seq"] for e in chain if e["signatures"]], [3, 4, 8])
        self.assertTrue(all(e["format"] == FORMAT_COMMITTED for e in chain))
        result = verify_chain(chain, ORIGIN, self.keys)
        self.assertTrue(result.ok, result)
        self.assertEqual((result.checked, result.head_hash), (8, chain[-1]["hash"]))

    def test_old_format_then_group_format_verifies(self) -> None:
        """A log written per entry before the upgrade and per group after it verifies whole."""
        chain = make_group_chain([5, 2], self.key, first=make_chain(4, self.key))
        self.assertNotIn("format", chain[0])
        self.assertTrue(verify_chain(chain, ORIGIN, self.keys).ok)

    def test_old_format_entry_without_signature_fails(self) -> None:
        """An entry of the first format must be signed itself: the format marker is hashed."""
        chain = make_chain(4, self.key)
        chain[1]["signatures"] = {}
        result = verify_chain(chain, ORIGIN, self.keys)
        self.assertEqual(result.bad_seq, 2)
        self.assertIn("no signature by", result.problem or "")

    def test_adding_the_format_marker_to_an_old_entry_breaks_its_hash(self) -> None:
        """Turning an old entry into a 'may be unsigned' one changes its hash: caught there."""
        chain = make_chain(4, self.key)
        chain[1]["format"] = FORMAT_GROUP
        chain[1]["signatures"] = {}
        self.assertEqual(verify_chain(chain, ORIGIN, self.keys).bad_seq, 2)

    def test_unsigned_tail_fails(self) -> None:
        """A chain cut inside a group (its signed last entry gone) ends unsigned: fails there."""
        chain = make_group_chain([3, 4], self.key)[:6]
        result = verify_chain(chain, ORIGIN, self.keys)
        self.assertEqual(result.bad_seq, 4, result)
        self.assertIn("not covered by any signature", result.problem or "")
        self.assertEqual((result.checked, result.head_hash), (3, chain[2]["hash"]))

    def test_edit_inside_a_group_rehashed_fails_at_the_covering_signature(self) -> None:
        """Editing an unsigned entry and rehashing the rest of its group (no key) fails.

        The failure is reported at the group's first entry: the signature that
        fails covers entries 1 to 4, and cannot say which of them was edited.
        """
        chain = make_group_chain([4], self.key)
        chain[1]["room_id"] = "!other:example.org"
        for i in range(1, 4):
            chain[i]["prev_hash"] = chain[i - 1]["hash"]
            chain[i]["hash"] = entry_hash(chain[i])
        result = verify_chain(chain, ORIGIN, self.keys)
        self.assertEqual(result.bad_seq, 1, result)
        self.assertIn("bad signature", result.problem or "")
        self.assertIn("to cover entries 1 to 4", result.problem or "")
        self.assertEqual(result.checked, 0)

    def test_edit_inside_a_group_fails_at_that_entry(self) -> None:
        """An edit of an unsigned entry, not rehashed, is caught at the entry itself."""
        chain = make_group_chain([4], self.key)
        chain[1]["room_id"] = "!other:example.org"
        self.assertEqual(verify_chain(chain, ORIGIN, self.keys).bad_seq, 2)

    def test_progress_is_reported_per_signed_entry(self) -> None:
        """iter_verify yields when a signature covers entries, with every covered entry counted."""
        chain = make_group_chain([3, 2], self.key)
        results = list(iter_verify(iter(chain), ORIGIN, self.keys))
        self.assertEqual([r.checked for r in results], [3, 5])


class KeyExpiryTest(SynchronousTestCase):
    """Synapse's old_signing_keys and their expired_ts: a retired key signs nothing newer."""

    def setUp(self) -> None:
        self.old = generate_signing_key("old")
        self.new = generate_signing_key("new")
        self.keys = {
            **verify_keys_from_signing_key(self.old),
            **verify_keys_from_signing_key(self.new),
        }

    def test_chain_rewritten_with_expired_key_fails(self) -> None:
        """The issue's case: entries after the old key's expiry re-signed with it fail."""
        chain = make_chain(6, self.old)
        expired_ts = chain[2]["ts"] + 1  # the key was retired after entry 3
        reseal_from(chain, 3, self.old)  # as a forger with the old key would
        self.assertTrue(verify_chain(chain, ORIGIN, self.keys).ok)  # the old behaviour
        result = verify_chain(chain, ORIGIN, self.keys, {"ed25519:old": expired_ts})
        self.assertEqual(result.bad_seq, 4, result)
        self.assertIn("expired at", result.problem or "")
        self.assertEqual(result.checked, 3)

    def test_rotation_at_expiry_verifies(self) -> None:
        """Entries before the expiry signed by the old key, after it by the new: valid."""
        chain = make_chain(3, self.old)
        expired_ts = chain[-1]["ts"] + 1
        for seq in range(4, 7):
            fields = dict(make_chain(6, self.new)[seq - 1])
            fields["prev_hash"] = chain[-1]["hash"]
            chain.append(seal_entry(fields, ORIGIN, self.new))
        result = verify_chain(chain, ORIGIN, self.keys, {"ed25519:old": expired_ts})
        self.assertTrue(result.ok, result)

    def test_backdated_entry_after_a_newer_one_still_fails(self) -> None:
        """The chain's time is the newest ts so far: a backdated re-signed entry fails too."""
        chain = make_chain(6, self.old)
        expired_ts = chain[2]["ts"] + 1
        chain[4]["ts"] = 1  # looks old, but entry 4 already reached past the expiry
        reseal_from(chain, 3, self.old)
        result = verify_chain(chain, ORIGIN, self.keys, {"ed25519:old": expired_ts})
        self.assertEqual(result.bad_seq, 4, result)

    def test_group_signature_after_expiry_fails_for_the_whole_group(self) -> None:
        """A group whose covering signature is by an expired key fails at the group's start."""
        chain = make_group_chain([2], self.new)
        chain = make_group_chain([3], self.old, first=chain)
        result = verify_chain(chain, ORIGIN, self.keys, {"ed25519:old": chain[2]["ts"]})
        self.assertEqual(result.bad_seq, 3, result)
        self.assertEqual(result.checked, 2)

    def test_parse_old_signing_keys_as_synapse_writes_them(self) -> None:
        """homeserver.yaml's old_signing_keys give the verify keys and their expiry."""
        old_b64 = encode_verify_key_base64(get_verify_key(self.old))
        keys, expiry = parse_old_signing_keys({"ed25519:old": {"key": old_b64, "expired_ts": 1234}})
        self.assertEqual(bytes(keys["ed25519:old"]), bytes(get_verify_key(self.old)))
        self.assertEqual(expiry, {"ed25519:old": 1234})
        for bad in (
            {"ed25519:old": {"key": "***"}},
            {"ed25519:old": {"key": old_b64, "expired_ts": "soon"}},
            {"ed25519:old": "x"},
            ["ed25519:old"],
        ):
            with self.assertRaises(ValueError, msg=repr(bad)):
                parse_old_signing_keys(bad)


class ExpectedHeadTest(SynchronousTestCase):
    """verify against a head recorded earlier (--expect-head SEQ:HASH, checkpoints)."""

    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.keys = verify_keys_from_signing_key(self.key)
        self.chain = make_chain(6, self.key)

    def test_recorded_head_found(self) -> None:
        """A head recorded at entry 4 is found in the longer chain of today."""
        result = verify_chain(self.chain, ORIGIN, self.keys, None, [(4, self.chain[3]["hash"])])
        self.assertTrue(result.ok, result)
        self.assertEqual(result.heads_matched, 1)

    def test_truncation_below_the_recorded_head_fails(self) -> None:
        """The issue's case: the newest entries cut; the prefix is valid but the head is missing."""
        head = (6, self.chain[5]["hash"])
        self.assertTrue(verify_chain(self.chain[:4], ORIGIN, self.keys).ok)
        result = verify_chain(self.chain[:4], ORIGIN, self.keys, None, [head])
        self.assertFalse(result.ok)
        self.assertEqual(result.bad_seq, 5)
        self.assertIn("truncated", result.problem or "")

    def test_rewritten_chain_with_other_hash_at_seq_fails(self) -> None:
        """A chain rebuilt with the key (valid) but another hash at the recorded seq fails there."""
        head = (4, self.chain[3]["hash"])
        self.chain[1]["reason"] = "rewritten"
        reseal_from(self.chain, 1, self.key)
        result = verify_chain(self.chain, ORIGIN, self.keys, None, [head])
        self.assertEqual(result.bad_seq, 4)
        self.assertIn("differs from the expected head", result.problem or "")

    def test_parse_head(self) -> None:
        """SEQ:HASH parses; anything else is a ValueError showing the expected form."""
        self.assertEqual(parse_head(" 12:abc+/ "), (12, "abc+/"))
        for text in ("", "12", ":abc", "0:abc", "-1:abc", "x:abc", "12:"):
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_head(text)
            self.assertIn("SEQ:HASH", str(caught.exception))


class AnyTextTest(SynchronousTestCase):
    """Client text neither database can store (NUL, lone surrogates), escaped reversibly."""

    def setUp(self) -> None:
        self.key = generate_signing_key("k1")

    def test_escaped_fields_round_trip_and_verify(self) -> None:
        """NUL, a lone surrogate and other control characters come back exactly, and verify."""
        texts = ["a\x00b", "\ud800", "x\udfff\x00", "\x01\x7f\u2028", "é😀", ""]
        chain: list[dict[str, Any]] = []
        for text in texts:
            fields = escape_fields({**group_fields(len(chain) + 1), "reason": text})
            chain += seal_entries(
                [fields],
                len(chain),
                chain[-1]["hash"] if chain else GENESIS_HASH,
                ORIGIN,
                self.key,
            )
        self.assertTrue(verify_chain(chain, ORIGIN, verify_keys_from_signing_key(self.key)).ok)
        self.assertEqual([unescape_entry(e)["reason"] for e in chain], texts)
        # Only what cannot be stored as-is is escaped; the rest stays readable.
        self.assertEqual(
            [e.get("escaped") for e in chain], ["reason", "reason", "reason", None, None, None]
        )
        for entry in chain:
            entry["reason"].encode("utf-8")  # storable on both engines
            self.assertNotIn("\x00", entry["reason"])

    def test_escaped_marker_is_hashed(self) -> None:
        """Dropping the escaped marker (passing escaped text off as literal) breaks the hash."""
        fields = escape_fields({**group_fields(1), "reason": "\x00"})
        (entry,) = seal_entries([fields], 0, GENESIS_HASH, ORIGIN, self.key)
        del entry["escaped"]
        self.assertEqual(
            verify_chain([entry], ORIGIN, verify_keys_from_signing_key(self.key)).bad_seq, 1
        )


class RefusalTest(SynchronousTestCase):
    """What a refused request may write: a reason prefix, and a per-user budget."""

    def test_short_reason_kept_whole(self) -> None:
        """A reason up to the prefix length is kept as it is, with no size or hash."""
        reason = "r" * REFUSED_REASON_PREFIX_CHARS
        self.assertEqual(refused_reason(reason), (reason, None, None))
        self.assertEqual(refused_reason(None), (None, None, None))

    def test_long_reason_keeps_prefix_size_and_hash(self) -> None:
        """A 200 KB reason keeps 128 characters, its byte size and its SHA-256."""
        import hashlib

        reason = "é" * 100_000 + "\ud800"
        prefix, size, digest = refused_reason(reason)
        self.assertEqual(prefix, "é" * REFUSED_REASON_PREFIX_CHARS)
        data = reason.encode("utf-8", "surrogatepass")
        self.assertEqual(size, len(data))
        self.assertEqual(digest, encode_base64(hashlib.sha256(data).digest()))

    def test_budget_per_user_then_refill_carries_the_suppressed_count(self) -> None:
        """10 entries at once per user; then refusals are counted; the next entry says how many."""
        now = [0.0]
        counted: list[int] = []
        budget = RefusalBudget(1 / 60, 10, lambda: counted.append(1), clock=lambda: now[0])
        self.assertEqual([budget.take("@a:x") for _ in range(10)], [0] * 10)
        self.assertEqual([budget.take("@a:x") for _ in range(90)], [None] * 90)
        self.assertEqual(len(counted), 90)
        self.assertEqual(budget.take("@b:x"), 0)  # another user has their own budget
        now[0] += 59
        self.assertIsNone(budget.take("@a:x"))
        now[0] += 2
        self.assertEqual(budget.take("@a:x"), 91)
        self.assertIsNone(budget.take("@a:x"))

    def test_budget_forgets_idle_users(self) -> None:
        """Users whose bucket is full again are dropped once many are tracked (bounded memory)."""
        now = [0.0]
        budget = RefusalBudget(1.0, 2, clock=lambda: now[0])
        for i in range(10_000):
            budget.take(f"@u{i}:x")
        now[0] += 10
        budget.take("@new:x")
        self.assertEqual(len(budget._buckets), 1)


class CheckpointTest(SynchronousTestCase):
    """Signed checkpoints of the head, and reading them back from a room export."""

    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.keys = verify_keys_from_signing_key(self.key)
        self.chain = make_chain(6, self.key)

    def test_checkpoint_round_trip_and_forgeries(self) -> None:
        """A checkpoint verifies to its head; any edit, another origin or key fails."""
        checkpoint = make_checkpoint(ORIGIN, 6, self.chain[5]["hash"], 1000, self.key)
        self.assertEqual(
            check_checkpoint(checkpoint, ORIGIN, self.keys), (6, self.chain[5]["hash"])
        )
        for edit in ({"seq": 7}, {"hash": "x"}, {"ts": 1}, {"origin": "evil.org"}):
            with self.assertRaises(ValueError, msg=repr(edit)):
                check_checkpoint({**checkpoint, **edit}, ORIGIN, self.keys)
        other = verify_keys_from_signing_key(generate_signing_key("k1"))
        with self.assertRaises(ValueError):
            check_checkpoint(checkpoint, ORIGIN, other)
        with self.assertRaises(ValueError):
            check_checkpoint({"seq": 1}, ORIGIN, self.keys)

    def test_checkpoint_by_expired_key_is_rejected(self) -> None:
        """A checkpoint taken after its key's expiry (old_signing_keys) proves nothing."""
        checkpoint = make_checkpoint(ORIGIN, 6, self.chain[5]["hash"], 5000, self.key)
        self.assertEqual(
            check_checkpoint(checkpoint, ORIGIN, self.keys, {"ed25519:k1": 5001})[0], 6
        )
        with self.assertRaises(ValueError):
            check_checkpoint(checkpoint, ORIGIN, self.keys, {"ed25519:k1": 5000})

    def test_room_export_detects_truncation(self) -> None:
        """Checkpoints read from an export of the room's events (JSON lines) catch a cut
        tail; invalid ones are reported and ignored, not trusted."""
        events = [
            {
                "type": CHECKPOINT_EVENT_TYPE,
                "content": make_checkpoint(ORIGIN, seq, self.chain[seq - 1]["hash"], seq, self.key),
            }
            for seq in (2, 5)
        ]
        events.append({"type": CHECKPOINT_EVENT_TYPE, "content": {"seq": 6, "hash": "forged"}})
        lines = "\n".join(json.dumps(e) for e in events) + "\n\n"
        heads, problems = checked_heads(read_checkpoints(io.StringIO(lines)), ORIGIN, self.keys)
        self.assertEqual([h[0] for h in heads], [2, 5])
        self.assertEqual(len(problems), 1)
        self.assertTrue(verify_chain(self.chain, ORIGIN, self.keys, None, heads).ok)
        result = verify_chain(self.chain[:4], ORIGIN, self.keys, None, heads)
        self.assertEqual(result.bad_seq, 5)
        self.assertIn("truncated", result.problem or "")
        with self.assertRaises(ValueError):
            read_checkpoints(io.StringIO("[1]\n"))
