"""GDPR erasure on a real Synapse: an erased user's free text leaves the audit log.

Bob has audit entries of every format: one of the first format and a group of
format 2, written directly into the database (as an older module wrote them,
signed with the server's key), then leaves and a refusal the module writes
itself in format 3. An admin deactivates him with ``erase: true``; afterwards
no table of the module holds any of his text, ``verify`` exits 0 reporting the
entries as erased, alice's reason and the admin's hold reason stay, and
hand-edits (a reason, an erased entry's room) are still caught.
"""

import os
from typing import Any, ClassVar

from signedjson.key import read_signing_keys

from matrix_leave_forget.audit.entry import (
    FORMAT_GROUP,
    chain_entry,
    reason_digest,
    seal_entry,
    sign_entry,
)
from matrix_leave_forget.audit.log import STORED_COLUMNS
from tests.integration.base import StoppedServerTestCase, SynapseTestCase
from tests.support import rawdb
from tests.support.harness import (
    SERVER_NAME,
    User,
    quote_room,
    run_cli,
    wait_until,
)
from tests.support.tamper import Tampering, tampered_config

ADMIN = "/_synapse/client/leave_forget/v1/admin"
# Bob's texts, one per format (and a refusal's long reason), and others' that stay.
BOB_TEXTS = {
    "f1": "format one: my new address is 12 Elm St",
    "f2": "format two: call me on 555-0100",
    "f2_refusal": "format two refusal " + "x" * 200,
    "f3": "format three: moving to Lisbon",
    "f3_refusal": "format three refusal, I live at 7 Oak Lane " + "y" * 200,
}
ALICE_TEXT = "alice stays: off to lunch"
HOLD_TEXT = "legal hold typed by the admin"


def insert_entry(hs: Any, entry: dict[str, Any]) -> None:
    import json

    values = [
        json.dumps(entry["signatures"], sort_keys=True) if c == "signatures" else entry.get(c)
        for c in STORED_COLUMNS
    ]
    rawdb.query(
        hs,
        f"INSERT INTO leave_forget_audit ({', '.join(STORED_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in STORED_COLUMNS)})",
        values,
    )


def write_old_format_entries(hs: Any, user: User) -> None:
    """Entries 1 (format 1) and 2-3 (a format 2 group) for user, as an older module wrote.

    Dated 2023, signed with the server's key, into an empty log.
    """
    with open(os.path.join(hs.workdir, "signing.key")) as f:
        key = read_signing_keys(f)[0]
    head = rawdb.query(hs, "SELECT count(*) FROM leave_forget_audit")[0][0]
    assert head == 0, head

    def fields(seq: int, prev: str, reason: str, outcome: str = "ok") -> dict[str, Any]:
        return {
            "seq": seq,
            "ts": 1_700_000_000_000 + seq,
            "origin": SERVER_NAME,
            "instance": "master",
            "action": "leave",
            "user_id": user.user_id,
            "room_id": f"!old{seq}:{SERVER_NAME}",
            "reason": reason,
            "event_id": None,
            "device_id": user.device_id,
            "outcome": outcome,
            "prev_hash": prev,
        }

    first = seal_entry(fields(1, "", BOB_TEXTS["f1"]), SERVER_NAME, key)
    second = chain_entry({**fields(2, first["hash"], BOB_TEXTS["f2"]), "format": FORMAT_GROUP})
    size, digest = reason_digest(BOB_TEXTS["f2_refusal"])
    third = chain_entry(
        {
            **fields(3, second["hash"], BOB_TEXTS["f2_refusal"][:128], "M_FORBIDDEN"),
            "format": FORMAT_GROUP,
            "reason_bytes": size,
            "reason_sha256": digest,
        }
    )
    sign_entry(third, SERVER_NAME, key)
    for entry in (first, second, third):
        insert_entry(hs, entry)


class ErasureTest(StoppedServerTestCase):
    """An admin's GDPR erasure of bob, whose entries span formats 1, 2 and 3."""

    MODE = "intercept"
    MODULE_CONFIG = {"forget_rate_limit": None}

    alice: ClassVar[User]
    bob: ClassVar[User]
    module_tables: ClassVar[list[str]]
    verify_after: ClassVar[Any]
    entries_after: ClassVar[list[dict[str, Any]]]

    # Tampering with copies of the stopped server's database (test_cli's helpers).
    def tampered_config(self, tampering: Tampering) -> str:
        return tampered_config(self.hs, tampering, self.addCleanup)

    @classmethod
    def prepare(cls) -> None:
        hs = cls.hs
        cls.alice = hs.register("alice", admin=True)
        cls.bob = hs.register("bob")
        write_old_format_entries(cls.hs, cls.bob)
        room = hs.create_room(cls.alice, preset="public_chat")
        assert hs.membership(cls.bob, room, "join").status == 200
        for user, action, body, status in [
            (cls.bob, "leave", {"reason": BOB_TEXTS["f3"]}, 200),
            # Not in the room any more: refused, recorded with the reason's prefix and hash.
            (cls.bob, "leave", {"reason": BOB_TEXTS["f3_refusal"]}, 403),
            (cls.alice, "leave", {"reason": ALICE_TEXT}, 200),
        ]:
            resp = hs.client(
                "POST",
                f"/_matrix/client/v3/rooms/{quote_room(room)}/{action}",
                body,
                token=user.access_token,
            )
            assert resp.status == status, (action, resp.status, resp.body)
        resp = hs.client(
            "PUT",
            f"{ADMIN}/rooms/{quote_room(room)}/hold",
            {"reason": HOLD_TEXT},
            token=cls.alice.access_token,
        )
        assert resp.status == 200, resp.body
        before = cls._bob_text_rows()
        assert before >= 5, before
        resp = hs.client(
            "POST",
            f"/_synapse/admin/v1/deactivate/{cls.bob.user_id}",
            {"erase": True},
            token=cls.alice.access_token,
        )
        assert resp.status == 200, resp.body
        wait_until(lambda: cls._bob_text_rows() == 0, timeout=30, what="bob's text erased")
        cls.module_tables = [
            str(r[0])
            for r in rawdb.query(
                hs,
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'leave_forget%'"
                if hs.pg_database is None
                else "SELECT tablename FROM pg_tables WHERE tablename LIKE 'leave_forget%'",
            )
        ]
        cls.entries_after = [
            dict(zip(STORED_COLUMNS, row, strict=True))
            for row in rawdb.query(
                hs, f"SELECT {', '.join(STORED_COLUMNS)} FROM leave_forget_audit ORDER BY seq"
            )
        ]
        cls.verify_after = run_cli(hs.config_path, "verify")

    @classmethod
    def _bob_text_rows(cls) -> int:
        return int(
            rawdb.query(
                cls.hs,
                "SELECT count(*) FROM leave_forget_audit WHERE user_id = ? "
                "AND (reason IS NOT NULL OR reason_sha256 IS NOT NULL)",
                (cls.bob.user_id,),
            )[0][0]
        )

    def test_no_text_of_bob_in_any_module_table(self) -> None:
        """Every column of every module table is free of bob's texts (whole, prefix or hash)."""
        self.assertIn("leave_forget_audit", self.module_tables)
        self.assertIn("leave_forget_holds", self.module_tables)
        needles = [*BOB_TEXTS.values()]
        needles += [reason_digest(BOB_TEXTS[k])[1] for k in ("f2_refusal", "f3_refusal")]
        for table in self.module_tables:
            text = repr(rawdb.query(self.hs, f"SELECT * FROM {table}"))
            for needle in needles:
                self.assertNotIn(needle[:40], text, (table, needle))

    def test_bobs_entries_keep_who_where_when_how_and_outcome(self) -> None:
        """Bob's five entries are marked erased and keep who, which room, when and outcome."""
        bobs = [e for e in self.entries_after if e["user_id"] == self.bob.user_id]
        erased = [e for e in bobs if e["action"] in ("leave", "forget") and e["text_erased"]]
        self.assertEqual(len(erased), 5, bobs)
        self.assertEqual([e["format"] for e in erased], [None, FORMAT_GROUP, FORMAT_GROUP, 3, 3])
        self.assertEqual(
            [e["outcome"] for e in erased], ["ok", "ok", "M_FORBIDDEN", "ok", "M_FORBIDDEN"]
        )
        for entry in erased:
            self.assertIsNone(entry["reason"])
            self.assertIsNotNone(entry["room_id"])
            self.assertIsNotNone(entry["ts"])
        records = [e for e in self.entries_after if e["action"] == "erase"]
        self.assertEqual(len(records), 1)
        self.assertEqual(
            (records[0]["user_id"], records[0]["outcome"]), (self.bob.user_id, "erased_user")
        )

    def test_others_text_stays(self) -> None:
        """Alice's leave reason and the admin's hold reason are kept."""
        reasons = [e["reason"] for e in self.entries_after]
        self.assertIn(ALICE_TEXT, reasons)
        self.assertIn(HOLD_TEXT, reasons)
        holds = rawdb.query(self.hs, "SELECT reason FROM leave_forget_holds")
        self.assertEqual(holds, [(HOLD_TEXT,)])

    def test_verify_passes_and_reports_the_erasure(self) -> None:
        """verify exits 0 after the erasure and says the five entries' text was erased."""
        proc = self.verify_after
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn("5 audit entries: free text erased", proc.stdout)

    def test_hand_edits_are_still_caught(self) -> None:
        """A reason edited (format 3), a reason put back, or an erased entry's room edited fails."""
        alice_seq = next(e["seq"] for e in self.entries_after if e["reason"] == ALICE_TEXT)
        cases = [
            ("UPDATE leave_forget_audit SET reason = 'edited' WHERE seq = ?", alice_seq),
            ("UPDATE leave_forget_audit SET reason = 'put back' WHERE seq = ?", 1),
            ("UPDATE leave_forget_audit SET room_id = '!other:x' WHERE seq = ?", 2),
            (
                "UPDATE leave_forget_audit SET reason = NULL, text_erased = 1 WHERE seq = ?",
                alice_seq,
            ),
        ]
        for sql, seq in cases:
            with self.subTest(sql=sql):
                config = self.tampered_config([(sql, (seq,))])
                proc = run_cli(config, "verify")
                self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
                self.assertIn(f"FAILED at entry {seq}:", proc.stdout)


class TextRetentionTest(SynapseTestCase):
    """audit.text_retention: free text older than the period is erased, newer text stays."""

    MODULE_CONFIG = {"forget_rate_limit": None, "audit": {"text_retention": "1d"}}

    def test_old_text_erased_new_text_kept_chain_verifies(self) -> None:
        """After a restart, the 2023 entries (formats 1, 2) lose their text, today's keeps it."""
        hs = self.hs
        alice = hs.register("alice", admin=True)
        write_old_format_entries(hs, alice)
        room = hs.create_room(alice)
        resp = hs.client(
            "POST",
            f"/_matrix/client/v3/rooms/{quote_room(room)}/leave",
            {"reason": ALICE_TEXT},
            token=alice.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        # The erasure pass runs at start-up (and every minute).
        hs.stop()
        hs.start()

        def erased() -> list[tuple[Any, ...]]:
            return rawdb.query(
                hs, "SELECT seq FROM leave_forget_audit WHERE text_erased IS NOT NULL ORDER BY seq"
            )

        wait_until(lambda: erased() == [(1,), (2,), (3,)], timeout=30, what="old text erased")
        rows = rawdb.query(
            hs, "SELECT action, outcome, reason FROM leave_forget_audit ORDER BY seq"
        )
        self.assertIn(("leave", "ok", ALICE_TEXT), rows)
        self.assertIn(("erase", "text_retention", None), rows)
        self.assertNotIn("Elm St", repr(rows))
        proc = run_cli(hs.config_path, "verify")
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn("3 audit entries: free text erased", proc.stdout)
