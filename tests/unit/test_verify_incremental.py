"""``verify`` from a head checked earlier: O(new entries), and still catches tampering.

``--since SEQ:HASH`` (a head an earlier verify printed), ``--head-file`` (the
same, kept between cron runs) and ``--from-checkpoint`` (the newest signed
checkpoint) check that the chain still holds that head, then only the entries
after it. Every test builds a SQLite file as the store writes it (group-sealed
entries, one signature per group) and runs the CLI in process.
"""

import json
import os
from typing import Any

from matrix_leave_forget import cli
from matrix_leave_forget.audit.checkpoint import make_checkpoint
from matrix_leave_forget.audit.entry import seal_entries
from matrix_leave_forget.audit.log import select_audit_txn
from tests.unit.cli_helpers import ORIGIN, ChainStoreTestCase, group_chain


class IncrementalVerifyTest(ChainStoreTestCase):
    def spy_reads(self) -> list[int]:
        """The after_seq of every page verify reads."""
        reads: list[int] = []
        real = select_audit_txn

        def spy(*args: Any, **kwargs: Any) -> Any:
            reads.append(kwargs["after_seq"])
            return real(*args, **kwargs)

        self.patch(cli.verify, "select_audit_txn", spy)
        return reads

    def test_only_new_entries_are_read(self) -> None:
        """From head 12 of 20 entries: entries 13 to 20 are checked and nothing before
        the head is read (one look-up of the head itself); the new head is printed."""
        entries = group_chain(20, self.key)
        self.store(entries)
        reads = self.spy_reads()
        code, out, err = self.run_cli("verify", "--since", self.head(entries, 12))
        self.assertEqual(code, 0, out + err)
        self.assertIn("OK: 8 audit entries after the recorded head 12 checked", out)
        self.assertIn(f"Head: {self.head(entries, 20)}", out)
        self.assertEqual(min(reads), 11)  # the head's own row
        self.assertEqual(reads[1], 12)  # then from the entry after it
        code, out, _ = self.run_cli("--json", "verify", "--since", self.head(entries, 20))
        report = json.loads(out)
        self.assertEqual((code, report["checked"], report["head_seq"]), (0, 0, 20))
        self.assertEqual(report["since_seq"], 20)

    def test_edit_after_the_head(self) -> None:
        """An entry edited after the recorded head fails at that entry."""
        entries = group_chain(20, self.key)
        self.store(entries)
        self.tamper("UPDATE leave_forget_audit SET reason = 'edited' WHERE seq = 18")
        code, out, _ = self.run_cli("verify", "--since", self.head(entries, 12))
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 18: free text does not match its commitment", out)
        # 13 to 16 are covered by 16's signature; 17 waits for 20's.
        self.assertIn("4 audit entries after the recorded head and before it are valid", out)
        self.assertIn(f"last good head: {self.head(entries, 16)}", out)

    def test_chain_resealed_from_before_the_head(self) -> None:
        """A chain rewritten from entry 5 and re-sealed with the server's own key (so every
        link and signature is valid) no longer holds the recorded head 12: it fails there."""
        entries = group_chain(20, self.key)
        # Entries 5 to 20 re-sealed after entry 4, with other reasons.
        more = seal_entries(
            [
                {k: e[k] for k in e if k not in ("seq", "prev_hash", "hash", "signatures")}
                | {"reason": "rewritten"}
                for e in entries[4:]
            ],
            4,
            entries[3]["hash"],
            ORIGIN,
            self.key,
        )
        self.store(entries[:4] + more)
        self.assertEqual(self.run_cli("verify")[0], 0)  # valid on its own
        code, out, _ = self.run_cli("verify", "--since", self.head(entries, 12))
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 12: the recorded head", out)
        self.assertIn("is not in the chain", out)

    def test_truncation_below_the_head(self) -> None:
        """Entries 10 to 20 deleted: the recorded head 12 is gone (truncated)."""
        entries = group_chain(20, self.key)
        self.store(entries)
        self.tamper("DELETE FROM leave_forget_audit WHERE seq >= 10")
        code, out, _ = self.run_cli("verify", "--since", self.head(entries, 12))
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 12: the chain has no entry 12", out)
        self.assertIn("truncated", out)

    def test_forged_heads(self) -> None:
        """A head that was never in the chain, one at an unsigned entry (verify only prints
        signed heads), and a head row whose signature is not the server's all fail."""
        entries = group_chain(20, self.key)
        self.store(entries)
        code, out, _ = self.run_cli("verify", "--since", f"12:{'A' * 43}")
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 12: the recorded head", out)
        # Entry 10 is in the middle of a group: unsigned, covered by entry 12's signature.
        self.assertEqual(entries[9]["signatures"], {})
        code, out, _ = self.run_cli("verify", "--since", self.head(entries, 10))
        self.assertEqual(code, 1, out)
        self.assertIn("is not a signed head", out)
        self.tamper(
            "UPDATE leave_forget_audit SET signatures = ? WHERE seq = 12",
            json.dumps({ORIGIN: {"ed25519:a1": "A" * 86}}),
        )
        code, out, _ = self.run_cli("verify", "--since", self.head(entries, 12))
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 12: bad signature", out)

    def test_expected_heads_before_the_start_are_looked_up(self) -> None:
        """An --expect-head before the start is still checked (one look-up), and fails
        when the chain has another hash there."""
        entries = group_chain(20, self.key)
        self.store(entries)
        since = self.head(entries, 16)
        ok = self.run_cli("verify", "--since", since, "--expect-head", self.head(entries, 8))
        self.assertEqual(ok[0], 0, ok[1])
        code, out, _ = self.run_cli("verify", "--since", since, "--expect-head", f"8:{'B' * 43}")
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 8: hash differs from the expected head", out)

    def test_head_file_for_cron(self) -> None:
        """--head-file: the first run checks everything and writes the head; the next
        runs check only what follows it; a failure leaves the file as it was."""
        path = os.path.join(self.dir, "head")
        # One chain, stored first up to its signed entry 12, then whole.
        longer = group_chain(20, self.key)
        entries = longer[:12]
        self.store(entries)
        code, out, _ = self.run_cli("verify", "--head-file", path)
        self.assertEqual(code, 0, out)
        self.assertIn("OK: 12 audit entries checked", out)
        with open(path) as f:
            self.assertEqual(f.read(), self.head(entries, 12) + "\n")
        self.store(longer)
        code, out, _ = self.run_cli("verify", "--head-file", path)
        self.assertEqual(code, 0, out)
        self.assertIn("OK: 8 audit entries after the recorded head 12 checked", out)
        with open(path) as f:
            self.assertEqual(f.read(), self.head(longer, 20) + "\n")
        self.tamper("UPDATE leave_forget_audit SET reason = 'x' WHERE seq = 3")
        self.assertEqual(self.run_cli("verify", "--head-file", path)[0], 0)  # before the head
        self.tamper("DELETE FROM leave_forget_audit WHERE seq = 20")
        code, out, _ = self.run_cli("verify", "--head-file", path)
        self.assertEqual(code, 1, out)
        with open(path) as f:
            self.assertEqual(f.read(), self.head(longer, 20) + "\n")
        with open(path, "w") as f:
            f.write("garbage\n")
        code, _, err = self.run_cli("verify", "--head-file", path)
        self.assertEqual(code, 2, err)
        self.assertIn("SEQ:HASH", err)

    def test_from_the_newest_valid_checkpoint(self) -> None:
        """--from-checkpoint starts at the newest checkpoint whose signature verifies
        (a forged newer one is ignored); with none, the whole chain is checked."""
        entries = group_chain(20, self.key)
        self.store(entries)
        path = os.path.join(self.dir, "checkpoints.jsonl")
        with open(path, "w") as f:
            for seq in (8, 16):
                checkpoint = make_checkpoint(ORIGIN, seq, entries[seq - 1]["hash"], 1, self.key)
                f.write(json.dumps(checkpoint) + "\n")
            forged = make_checkpoint(ORIGIN, 20, entries[19]["hash"], 1, self.key)
            f.write(json.dumps({**forged, "seq": 19}) + "\n")
        code, out, err = self.run_cli("verify", "--checkpoints", path, "--from-checkpoint")
        self.assertEqual(code, 0, out + err)
        self.assertIn("OK: 4 audit entries after the recorded head 16 checked", out)
        self.assertIn("ignoring a checkpoint", err)
        self.tamper("UPDATE leave_forget_audit SET reason = 'x' WHERE seq = 4")
        code, out, _ = self.run_cli("verify", "--checkpoints", path, "--from-checkpoint")
        # Checkpoint 8 is still checked (looked up), entry 4 is before both: not read.
        self.assertEqual(code, 0, out)
        code, out, err = self.run_cli("verify", "--from-checkpoint")
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 4", out)
        self.assertIn("no checkpoint verifies", err)
