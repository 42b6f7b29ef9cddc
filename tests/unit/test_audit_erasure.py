"""Erasing free text from the audit chain: formats 1, 2 and 3 still verify, edits are caught.

Pure functions, no Synapse: chains of every format are built here with a fresh
key, and erased the way ``AuditLog.erase_text_txn`` does (a signed ``erase``
entry recording each erased entry's seq, hash and erased digest, then the text
deleted).
"""

import copy
import json
from typing import Any

from signedjson.key import generate_signing_key
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.audit.entry import (
    FORMAT_COMMITTED,
    FORMAT_GROUP,
    GENESIS_HASH,
    VerifyResult,
    chain_entry,
    content_problem,
    entry_hash,
    erasure_claim,
    erasures_from_entries,
    escape_fields,
    seal_entries,
    seal_entry,
    sign_entry,
    text_commitment,
    unescape_entry,
    verify_chain,
    verify_keys_from_signing_key,
)
from tests.support.chain import erase_texts

ORIGIN = "example.org"
SECRET = "my new address is 12 Elm St"


def fields(seq: int, reason: str | None, user: str = "@alice:example.org") -> dict[str, Any]:
    """One leave's fields, as the store hands them to the sealing functions."""
    return {
        "ts": 1_700_000_000_000 + seq,
        "origin": ORIGIN,
        "instance": "master",
        "action": "leave",
        "user_id": user,
        "room_id": f"!room{seq}:{ORIGIN}",
        "reason": reason,
        "event_id": f"$event{seq}",
        "device_id": "DEV",
        "outcome": "ok",
    }


def append_format1(chain: list[dict[str, Any]], reason: str | None, key: SigningKey) -> None:
    """One entry of the first format: text hashed, its own signature."""
    seq = len(chain) + 1
    prev = chain[-1]["hash"] if chain else GENESIS_HASH
    chain.append(seal_entry({**fields(seq, reason), "seq": seq, "prev_hash": prev}, ORIGIN, key))


def append_format2(chain: list[dict[str, Any]], reasons: list[str | None], key: SigningKey) -> None:
    """A group as the module sealed it before format 3: text hashed, one signature."""
    for reason in reasons:
        seq = len(chain) + 1
        prev = chain[-1]["hash"] if chain else GENESIS_HASH
        chain.append(
            chain_entry(
                {**fields(seq, reason), "seq": seq, "prev_hash": prev, "format": FORMAT_GROUP}
            )
        )
    sign_entry(chain[-1], ORIGIN, key)


def append_format3(
    chain: list[dict[str, Any]], many: list[dict[str, Any]], key: SigningKey
) -> None:
    """A group as the module seals it now."""
    seq = chain[-1]["seq"] if chain else 0
    prev = chain[-1]["hash"] if chain else GENESIS_HASH
    chain += seal_entries(many, seq, prev, ORIGIN, key)


class ErasureTest(SynchronousTestCase):
    """A chain of formats 1, 2 and 3 whose reasons are erased."""

    def setUp(self) -> None:
        self.key = generate_signing_key("k1")
        self.keys = verify_keys_from_signing_key(self.key)
        self.chain: list[dict[str, Any]] = []
        append_format1(self.chain, SECRET + " (1)", self.key)  # 1
        append_format1(self.chain, None, self.key)  # 2
        append_format2(self.chain, [SECRET + " (2)", "short"], self.key)  # 3, 4
        append_format3(
            self.chain,
            [
                fields(5, SECRET + " (3)"),
                {**fields(6, "no"), "reason_bytes": 300, "reason_sha256": "abc"},
                fields(7, None),
            ],
            self.key,
        )  # 5, 6, 7

    def verify(self, chain: list[dict[str, Any]] | None = None) -> VerifyResult:
        chain = self.chain if chain is None else chain
        return verify_chain(chain, ORIGIN, self.keys, erasures=erasures_from_entries(chain))

    def test_format3_hash_commits_to_text_without_holding_it(self) -> None:
        """A format 3 entry's hash covers a salted commitment to its text, not the text."""
        entry = self.chain[4]
        self.assertEqual(entry["format"], FORMAT_COMMITTED)
        self.assertEqual(entry["reason"], SECRET + " (3)")
        self.assertEqual(entry["text_commitment"], text_commitment(entry["text_salt"], entry))
        edited = {**entry, "reason": "anything else"}
        # The hash does not change with the text: the commitment binds it.
        self.assertEqual(entry_hash(edited), entry["hash"])
        self.assertIn("commitment", content_problem(edited, {}) or "")
        # Two entries with the same short reason commit differently (salted).
        a, b = seal_entries([fields(1, "no"), fields(1, "no")], 0, GENESIS_HASH, ORIGIN, self.key)
        self.assertNotEqual(a["text_commitment"], b["text_commitment"])
        # An entry without text has no commitment and no salt.
        self.assertNotIn("text_commitment", self.chain[6])
        self.assertNotIn("text_salt", self.chain[6])

    def test_chain_verifies_before_erasure(self) -> None:
        """The mixed chain verifies and reports nothing erased."""
        result = self.verify()
        self.assertTrue(result.ok, result)
        self.assertEqual((result.checked, result.erased), (7, 0))

    def test_erased_text_of_every_format_verifies_as_erased(self) -> None:
        """Erasing entries of formats 1, 2 and 3 leaves no text and a chain that verifies."""
        erase_texts(self.chain, [1, 3, 4, 5, 6], self.key)
        text = json.dumps(self.chain)
        for gone in ("Elm St", '"short"', '"abc"', '"no"'):
            self.assertNotIn(gone, text)
        result = self.verify()
        self.assertTrue(result.ok, result)
        self.assertEqual((result.checked, result.erased), (8, 5))
        # Who, which room, when and the outcome are still there.
        self.assertEqual(self.chain[0]["user_id"], "@alice:example.org")
        self.assertEqual(self.chain[0]["room_id"], "!room1:example.org")
        self.assertEqual(self.chain[5]["reason_bytes"], 300)

    def test_text_removed_without_an_erasure_record_is_caught(self) -> None:
        """Deleting a reason and marking the row erased, with no erase entry, is tampering."""
        for seq in (1, 3, 5):
            with self.subTest(seq=seq):
                chain = copy.deepcopy(self.chain)
                chain[seq - 1]["reason"] = None
                chain[seq - 1].pop("text_salt", None)
                chain[seq - 1]["text_erased"] = 1
                result = self.verify(chain)
                self.assertEqual(result.bad_seq, seq, result)
                self.assertIn("without an erasure record", result.problem or "")

    def test_text_removed_unmarked_is_caught(self) -> None:
        """Deleting a format 3 reason without marking the row fails the commitment."""
        chain = copy.deepcopy(self.chain)
        chain[4]["reason"] = None
        result = self.verify(chain)
        self.assertEqual(result.bad_seq, 5, result)
        self.assertIn("commitment", result.problem or "")

    def test_edited_reason_is_caught_in_every_format(self) -> None:
        """An edited reason fails: formats 1 and 2 by the hash, format 3 by the commitment."""
        for seq, word in ((1, "hash"), (3, "hash"), (5, "commitment")):
            with self.subTest(seq=seq):
                chain = copy.deepcopy(self.chain)
                chain[seq - 1]["reason"] = "edited"
                result = self.verify(chain)
                self.assertEqual(result.bad_seq, seq, result)
                self.assertIn(word, result.problem or "")

    def test_edited_reason_of_an_unerased_entry_is_caught_after_an_erasure(self) -> None:
        """Once some entries are erased, an edit to another entry's reason is still caught."""
        erase_texts(self.chain, [1, 5], self.key)
        self.chain[3]["reason"] = "edited"
        result = self.verify()
        self.assertEqual(result.bad_seq, 4, result)

    def test_edit_of_an_erased_entrys_other_fields_is_caught(self) -> None:
        """After erasure, editing the room of an erased entry fails against its record."""
        erase_texts(self.chain, [1, 3, 5], self.key)
        for seq in (1, 3, 5):
            with self.subTest(seq=seq):
                chain = copy.deepcopy(self.chain)
                chain[seq - 1]["room_id"] = "!elsewhere:example.org"
                result = self.verify(chain)
                self.assertEqual(result.bad_seq, seq, result)

    def test_erasure_record_must_be_in_the_chain(self) -> None:
        """A chain cut before the erase entry fails at the erased entry; an edited record fails."""
        erase_texts(self.chain, [1], self.key)
        erasures = erasures_from_entries(self.chain)
        result = verify_chain(self.chain[:7], ORIGIN, self.keys, erasures=erasures)
        self.assertEqual(result.bad_seq, 1, result)
        self.assertIn("not in the chain", result.problem or "")
        self.chain[7]["erasure"] = json.dumps([[2, self.chain[1]["hash"], "x"]])
        self.assertFalse(self.verify().ok)

    def test_erasures_given_must_match_the_chains_records(self) -> None:
        """A claim handed to verify that the chain's erase entry does not hold fails there."""
        erase_texts(self.chain, [1], self.key)
        # Entry 4's reason deleted, with a made-up claim naming the genuine erase entry 8.
        erasures = erasures_from_entries(self.chain)
        chain = copy.deepcopy(self.chain)
        digest = erasure_claim(chain[3])[2]
        chain[3]["reason"], chain[3]["text_erased"] = None, 1
        erasures[4] = (8, chain[3]["hash"], digest)
        result = verify_chain(chain, ORIGIN, self.keys, erasures=erasures)
        self.assertEqual(result.bad_seq, 8, result)
        self.assertIn("fewer entries", result.problem or "")

    def test_erased_entry_still_holding_text_is_caught(self) -> None:
        """Text written back into an erased entry is not accepted as erased."""
        erase_texts(self.chain, [3], self.key)
        self.chain[2]["reason"] = "put back"
        result = self.verify()
        self.assertEqual(result.bad_seq, 3)
        self.assertIn("still holds free text", result.problem or "")

    def test_escaped_reason_commits_and_erases(self) -> None:
        """A reason stored escaped (NUL) is committed in its stored form, and erases cleanly."""
        chain: list[dict[str, Any]] = []
        append_format3(chain, [escape_fields(fields(1, "a\x00b"))], self.key)
        self.assertEqual(unescape_entry(chain[0])["reason"], "a\x00b")
        self.assertTrue(self.verify(chain).ok)
        erase_texts(chain, [1], self.key)
        self.assertIsNone(unescape_entry(chain[0])["reason"])
        result = self.verify(chain)
        self.assertTrue(result.ok, result)
        self.assertEqual(result.erased, 1)
