"""``verify --jobs N``: chunks checked by worker processes give the one-pass answer.

The chain is cut into chunks that end on signed entries; each worker checks
its chunk from the stored ``prev_hash`` of its first entry, and the main
process joins the chunks (seq + 1, prev_hash = the previous chunk's head).
Each test tampers with a chain of 60 group-sealed entries (chunks of 8 here)
and checks that the parallel report is the one-pass report, field for field,
and that the parallel path really ran.
"""

import json
import sqlite3
from typing import Any

from matrix_leave_forget import cli
from matrix_leave_forget.audit.entry import verify_keys_from_signing_key
from matrix_leave_forget.audit.log import STORED_COLUMNS
from matrix_leave_forget.cli.database import max_seq, open_postgres
from matrix_leave_forget.db.schema import MIGRATIONS
from tests.support.chain import erase_texts
from tests.unit.cli_helpers import ORIGIN, ChainStoreTestCase, CliTestCase, group_chain
from tests.unit.db_helpers import postgres_or_skip

COUNT = 60


class ParallelVerifyTest(ChainStoreTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.patch(cli.verify, "CHUNK", 8)
        self.patch(cli.verify, "PARALLEL_FROM", 2)
        self.entries = group_chain(COUNT, self.key)
        self.store(self.entries)

    def reports(self, *argv: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The --json reports of one pass and of two workers (which must have run)."""
        code1, out1, err1 = self.run_cli("--json", "verify", "--jobs", "1", *argv)
        calls: list[int] = []
        real = cli.verify._verify_parallel

        def spy(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return real(*args, **kwargs)

        self.patch(cli.verify, "_verify_parallel", spy)
        code2, out2, err2 = self.run_cli("--json", "verify", "--jobs", "2", *argv)
        self.assertEqual(calls, [1], "the parallel check did not run")
        self.assertEqual(code1, code2, out1 + err1 + out2 + err2)
        one, two = json.loads(out1), json.loads(out2)
        self.assertEqual(one, two)
        return one, two

    def test_valid_chain(self) -> None:
        """A valid chain with expected heads in several chunks: same count, head and
        heads matched."""
        one, _ = self.reports(
            "--expect-head",
            self.head(self.entries, 12),
            "--expect-head",
            self.head(self.entries, 60),
        )
        self.assertEqual((one["ok"], one["checked"], one["heads_matched"]), (True, 60, 2))

    def test_each_tampering_reported_as_one_pass_does(self) -> None:
        """Edits inside a chunk, at a chunk's last (signed) entry and at its first, a
        deleted first or last row of a chunk, a broken prev_hash at a chunk's start,
        a forged signature, a row that does not decode and a seq gap: each fails at
        the same entry with the same problem and last good head."""
        cases = [
            ("UPDATE leave_forget_audit SET reason = 'edited' WHERE seq = 10", 10),
            ("UPDATE leave_forget_audit SET reason = 'edited' WHERE seq = 16", 16),
            ("UPDATE leave_forget_audit SET reason = 'edited' WHERE seq = 17", 17),
            ("DELETE FROM leave_forget_audit WHERE seq = 17", 18),
            ("DELETE FROM leave_forget_audit WHERE seq = 24", 25),
            ("UPDATE leave_forget_audit SET prev_hash = 'x' WHERE seq = 17", 17),
            ("UPDATE leave_forget_audit SET signatures = '{\"x\": {}}' WHERE seq = 24", 21),
            ("UPDATE leave_forget_audit SET signatures = 'not json' WHERE seq = 25", 25),
            ("UPDATE leave_forget_audit SET seq = 1033 WHERE seq = 33", 34),
        ]
        for sql, bad_seq in cases:
            self.store(self.entries)
            self.tamper(sql)
            one, _ = self.reports()
            self.assertEqual((one["ok"], one["bad_seq"]), (False, bad_seq), sql)

    def test_unsigned_entry_where_a_chunk_would_end(self) -> None:
        """An entry stored without its signature (covered by the next signed one, so
        still valid) is not a chunk's end: the chain verifies in parallel as in one pass."""
        self.tamper("UPDATE leave_forget_audit SET signatures = '{}' WHERE seq = 8")
        one, _ = self.reports()
        self.assertEqual((one["ok"], one["checked"]), (True, 60))

    def test_truncation_and_forged_heads(self) -> None:
        """A chain cut before an expected head, and a head whose hash is not the chain's,
        are reported as in one pass."""
        self.tamper("DELETE FROM leave_forget_audit WHERE seq > 44")
        one, _ = self.reports("--expect-head", self.head(self.entries, 60))
        self.assertIn("truncated", one["problem"])
        one, _ = self.reports("--expect-head", f"30:{'A' * 43}")
        self.assertEqual((one["ok"], one["bad_seq"]), (False, 30))

    def test_incremental(self) -> None:
        """From a recorded head, the entries after it are checked in chunks too: an edit
        after the head fails at the same entry."""
        one, _ = self.reports("--since", self.head(self.entries, 12))
        self.assertEqual((one["ok"], one["checked"]), (True, 48))
        self.tamper("UPDATE leave_forget_audit SET reason = 'edited' WHERE seq = 41")
        one, _ = self.reports("--since", self.head(self.entries, 12))
        self.assertEqual((one["ok"], one["bad_seq"]), (False, 41))


class PostgresParallelVerifyTest(CliTestCase):
    def setUp(self) -> None:
        super().setUp()
        psycopg2 = postgres_or_skip()
        from tests.support.harness import (
            create_pg_database,
            drop_pg_database,
            pg_connect_args,
        )

        name = create_pg_database()
        self.addCleanup(drop_pg_database, name)
        self.args = {k: v for k, v in pg_connect_args(name).items() if not k.startswith("cp_")}
        self.entries = group_chain(COUNT, self.key)
        conn = psycopg2.connect(**self.args)
        cur = conn.cursor()
        for migration in MIGRATIONS:
            for statement in migration:
                cur.execute(statement)
        cur.executemany(
            f"INSERT INTO leave_forget_audit ({', '.join(STORED_COLUMNS)}) "
            f"VALUES ({', '.join('%s' for _ in STORED_COLUMNS)})",
            [
                [
                    json.dumps(e["signatures"]) if c == "signatures" else e.get(c)
                    for c in STORED_COLUMNS
                ]
                for e in self.entries
            ],
        )
        conn.commit()
        self.conn = conn
        self.addCleanup(conn.close)
        self.patch(cli.verify, "CHUNK", 8)
        self.patch(cli.verify, "PARALLEL_FROM", 2)

    def verify(self, jobs: int, edit_after_start: str | None = None) -> Any:
        db = open_postgres(self.args)
        self.addCleanup(db.close)
        max_seq(db)  # the read transaction's snapshot is taken here
        if edit_after_start is not None:
            self.conn.cursor().execute(edit_after_start)
            self.conn.commit()
        return cli.verify.verify_database(
            db, ORIGIN, verify_keys_from_signing_key(self.key), None, jobs=jobs
        )

    def test_workers_read_the_main_snapshot(self) -> None:
        """Two workers give the one-pass result on PostgreSQL, and read the snapshot of
        the main connection: an edit committed after it started is not seen by them
        (it is by the next run), as it is not by a one-pass check."""
        self.assertEqual(self.verify(2), self.verify(1))
        self.assertTrue(self.verify(1).ok)
        edit = "UPDATE leave_forget_audit SET reason = 'edited' WHERE seq = 41"
        self.assertTrue(self.verify(2, edit).ok)
        after = self.verify(2)
        self.assertEqual((after.bad_seq, after), (41, self.verify(1)))


class ParallelErasureTest(ChainStoreTestCase):
    """Erased entries in early chunks, their erasure record in the last one."""

    def setUp(self) -> None:
        super().setUp()
        self.patch(cli.verify, "CHUNK", 8)
        self.patch(cli.verify, "PARALLEL_FROM", 2)
        self.entries = group_chain(COUNT, self.key)
        erase_texts(self.entries, [10, 30], self.key)
        self.store(self.entries)

    reports = ParallelVerifyTest.reports

    def test_erased_entries_verify_as_erased(self) -> None:
        """Both passes accept the erased entries of other chunks and count them."""
        one, _ = self.reports()
        self.assertEqual((one["ok"], one["checked"], one["erased"]), (True, COUNT + 1, 2))

    def test_lost_erasure_record_is_reported(self) -> None:
        """Without its erasure record (the chain cut before it), an erased entry fails
        in both passes, at the same entry."""
        conn = sqlite3.connect(self.db_path)
        conn.execute("DELETE FROM leave_forget_audit WHERE seq = ?", (COUNT + 1,))
        conn.commit()
        conn.close()
        one, _ = self.reports()
        self.assertEqual((one["ok"], one["bad_seq"]), (False, 10))
