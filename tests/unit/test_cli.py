"""The offline CLI, in-process, against synthetic SQLite databases (no Synapse process).

Each test builds a database holding the module's tables (from schema.MIGRATIONS)
and a chain sealed exactly as the store seals it, writes a homeserver.yaml
pointing at it, and calls ``cli.main`` with stdout and stderr captured. The
integration suite (tests/integration/test_cli.py) runs the same CLI as a
subprocess against a real Synapse's database.
"""

import argparse
import builtins
import io
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from signedjson.key import (
    encode_signing_key_base64,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget import cli
from matrix_leave_forget.audit.checkpoint import CHECKPOINT_EVENT_TYPE, make_checkpoint
from matrix_leave_forget.audit.log import STORED_COLUMNS, select_audit_txn
from matrix_leave_forget.cli.rooms import receipt_rows
from matrix_leave_forget.retention.state import LISTINGS
from tests.support.chain import make_chain
from tests.unit.cli_helpers import ORIGIN, CliTestCase, Tty, create_database, insert_entry


class ConfigErrorTest(CliTestCase):
    """Every operator mistake is one line on stderr and exit status 2, never a traceback."""

    def test_missing_config_file(self) -> None:
        """A config path that does not exist is a one-line error, exit 2."""
        self.config_path = os.path.join(self.dir, "nope.yaml")
        self.assertCliError(["verify"], f"cannot read config {self.config_path}")

    def test_invalid_yaml(self) -> None:
        """Broken YAML is a one-line error naming the file and line, exit 2."""
        with open(self.config_path, "w") as f:
            f.write("server_name: example.org\ndatabase: [unclosed\n")
        self.assertCliError(["log"], f"{self.config_path} is not valid YAML")
        self.assertCliError(["log"], "line 3")

    def test_yaml_that_is_not_a_mapping(self) -> None:
        """A YAML list where a homeserver.yaml mapping belongs is refused, exit 2."""
        with open(self.config_path, "w") as f:
            f.write("- just\n- a list\n")
        self.assertCliError(["log"], "must hold a YAML mapping")

    def test_unsupported_database(self) -> None:
        """A database driver Synapse does not support is named in the error, exit 2."""
        self.write_config(database={"name": "mysql", "args": {}})
        self.assertCliError(["rooms"], "Unsupported database type 'mysql'")

    def test_no_database_configured(self) -> None:
        """A config without database settings is refused, exit 2."""
        self.write_config(database=None)
        self.assertCliError(["rooms"], "no database is configured")

    def test_missing_sqlite_file(self) -> None:
        """A database path that does not exist is reported, never created."""
        self.assertCliError(["log"], f"SQLite database {self.db_path} does not exist")
        self.assertFalse(os.path.exists(self.db_path))

    def test_database_without_the_module_tables(self) -> None:
        """A Synapse database the module never ran on is a clear error, exit 2."""
        sqlite3.connect(self.db_path).execute(
            "CREATE TABLE rooms (room_id TEXT)"
        ).connection.close()
        self.assertCliError(["verify"], "has no matrix-leave-forget tables")

    def test_unreachable_postgres(self) -> None:
        """A PostgreSQL server that refuses connections is a one-line database error, exit 2."""
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            from twisted.trial.unittest import SkipTest

            raise SkipTest("psycopg2 is not installed")
        self.write_config(
            database={
                "name": "psycopg2",
                "args": {"host": "127.0.0.1", "port": 1, "user": "x", "database": "x", "cp_min": 1},
            }
        )
        self.assertCliError(["log"], "cannot connect to PostgreSQL database x on 127.0.0.1:1 as x")

    def test_missing_signing_key_only_matters_to_verify(self) -> None:
        """Without the signing key file, verify fails cleanly (exit 2) but log still works."""
        self.chain(2)
        os.unlink(self.key_path)
        self.assertCliError(["verify"], "cannot read signing key")
        self.assertIn(self.key_path, self.run_cli("verify")[2])
        code, out, _ = self.run_cli("log")
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 3)

    def test_config_before_or_after_the_command(self) -> None:
        """-c/--config works before or after the command, both places add up,
        and without it the usage error names it."""
        self.chain(2)
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(cli.main(["log", "-c", self.config_path]), 0, err.getvalue())
        self.assertEqual(len(out.getvalue().splitlines()), 3)
        # A split config: the second file overrides the first's database.
        other = os.path.join(self.dir, "other.yaml")
        with open(other, "w") as f:
            yaml.safe_dump({"database": {"name": "sqlite3", "args": {"database": "/nope.db"}}}, f)
        code, _, err_text = self.run_cli("log", "--config", other)
        self.assertEqual(code, 2)
        self.assertIn("/nope.db does not exist", err_text)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as caught:
            cli.main(["rooms"])
        self.assertEqual(caught.exception.code, 2)
        self.assertIn("the following arguments are required: -c/--config", err.getvalue())

    def test_file_that_is_not_a_database(self) -> None:
        """A database path naming another kind of file says which file and why."""
        with open(self.db_path, "wb") as f:
            f.write(b"not sqlite at all, but long enough to be read as a header" * 4)
        self.assertCliError(
            ["log"], f"cannot open SQLite database {self.db_path}: file is not a database"
        )

    def test_unreadable_database_names_path_permission_and_fix(self) -> None:
        """A database file the CLI may not read names the path, the permission
        and the fix (as root every file is readable, so the refusal is simulated)."""
        self.chain(1)
        real_access = os.access

        def access(path: Any, mode: int, **kw: Any) -> bool:
            return False if path == self.db_path else real_access(path, mode, **kw)

        def connect(*args: Any, **kw: Any) -> Any:
            raise sqlite3.OperationalError("unable to open database file")

        self.patch(cli.database.os, "access", access)
        self.patch(cli.database.sqlite3, "connect", connect)
        code, _, err = self.run_cli("rooms")
        self.assertEqual(code, 2)
        for part in (self.db_path, "unable to open database file", "permission denied", "sudo -u"):
            self.assertIn(part, err)

    def test_unreadable_signing_key_suggests_verify_key(self) -> None:
        """A signing key verify may not read names the path and the cause, and
        suggests --verify-key (the public key is enough to verify)."""
        self.chain(1)

        real_open = builtins.open
        refusing = [True]

        def refuse(path: Any, *args: Any, **kw: Any) -> Any:
            if refusing[0] and path == self.key_path:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kw)

        self.patch(builtins, "open", refuse)
        code, _, err = self.run_cli("verify")
        self.assertEqual(code, 2)
        for part in (self.key_path, "permission denied", "--verify-key", "example.org/_matrix/key"):
            self.assertIn(part, err)
        refusing[0] = False
        os.unlink(self.key_path)
        os.mkdir(self.key_path)
        self.assertCliError(["verify"], f"cannot read signing key {self.key_path}: is a directory")
        self.assertIn("--verify-key", self.run_cli("verify")[2])
        os.rmdir(self.key_path)
        with open(self.key_path, "w") as f:
            f.write("garbage\n")
        self.assertCliError(["verify"], f"cannot parse signing key {self.key_path}")
        self.assertIn("--verify-key", self.run_cli("verify")[2])

    def test_usage_errors_exit_2(self) -> None:
        """Bad arguments (unknown state, bad timestamp, bad verify key) exit 2 without traceback."""
        self.chain(1)
        for argv in (
            ["rooms", "--state", "nonsense"],
            ["log", "--since", "yesterday"],
            ["log", "--limit", "-1"],
            [],
        ):
            code, out, err = self.run_cli(*argv)
            self.assertEqual(code, 2, argv)
            self.assertNotIn("Traceback", err)
        self.assertCliError(["verify", "--verify-key", "garbage"], "not a verify key")


class TimestampRangeTest(CliTestCase):
    """Absurd times in rows or options: a clear rendering or a one-line usage error."""

    def assertUsageError(self, argv: Sequence[str], option: str, message: str) -> None:
        """Exit 2, no output, argparse's usage and one error line naming ``option``."""
        code, out, err = self.run_cli(*argv)
        self.assertEqual(code, 2, err)
        self.assertEqual(out, "")
        self.assertNotIn("Traceback", err)
        last = err.splitlines()[-1]
        self.assertIn(f"error: argument {option}: ", last)
        self.assertIn(message, last)

    def test_out_of_range_times_and_numbers_are_usage_errors(self) -> None:
        """--since/--until beyond 64 bits or before 1970, and --from/--limit/--newest
        beyond 64 bits, name the option (they reached the driver: a traceback)."""
        self.chain(2)
        for option in ("--since", "--until"):
            for value in ("99999999999999999999999", str(2**63), "1969-12-31T23:59:59Z"):
                for command in ("log", "export"):
                    self.assertUsageError([command, option, value], option, "out of range")
            # Other scripts' digits are not milliseconds.
            self.assertUsageError(["log", option, "\u0661\u0662"], option, "not a timestamp")
        for argv, option in (
            (["log", "--from", str(2**63)], "--from"),
            (["log", "--limit", str(2**63)], "--limit"),
            (["log", "--newest", str(2**63)], "--newest"),
            (["export", "--from", str(2**63)], "--from"),
            (["rooms", "--limit", str(2**63)], "--limit"),
        ):
            self.assertUsageError(argv, option, f"must be at most {2**63 - 1}")

    def test_the_bounds_themselves_are_accepted(self) -> None:
        """0 and 2**63-1 ms are valid --since/--until values, like the admin API's."""
        self.chain(2)
        code, out, err = self.run_cli("log", "--json", "--since", "0", "--until", str(2**63 - 1))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([e["seq"] for e in json.loads(out)["entries"]], [1, 2])
        code, out, _ = self.run_cli("log", "--json", "--since", str(2**63 - 1), "--newest", "1")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["entries"], [])

    def test_absurd_row_times_render_raw(self) -> None:
        """An edited row's ts beyond year 9999 or before 1970 shows as its number in the
        table; JSON keeps the raw value."""
        self.chain(3)
        self.tamper("UPDATE leave_forget_audit SET ts = ? WHERE seq = 1", 10**18)
        self.tamper("UPDATE leave_forget_audit SET ts = ? WHERE seq = 2", -1)
        code, out, err = self.run_cli("log")
        self.assertEqual((code, err), (0, ""))
        times = [line.split()[1] for line in out.splitlines()[1:]]
        self.assertEqual(times, [f"{10**18}", "-1", "2023-11-14T22:13:23.000Z"])
        self.assertIn(f"{10**18} ms", out)
        self.assertIn("-1 ms", out)
        code, out, _ = self.run_cli("log", "--json")
        self.assertEqual([e["ts"] for e in json.loads(out)["entries"]][:2], [10**18, -1])


class ConfigReadingTest(CliTestCase):
    """homeserver.yaml is read as Synapse reads it; the database only ever read."""

    def test_split_config_directory(self) -> None:
        """-c DIR reads every *.yaml in it, later files overriding earlier ones, as Synapse does."""
        self.chain(2)
        os.unlink(self.config_path)
        confd = os.path.join(self.dir, "conf.d")
        os.makedirs(confd)
        with open(os.path.join(confd, "00-base.yaml"), "w") as f:
            yaml.safe_dump({"server_name": "wrong.org", "signing_key_path": self.key_path}, f)
        with open(os.path.join(confd, "10-db.yaml"), "w") as f:
            yaml.safe_dump(
                {"server_name": ORIGIN, "database": {"args": {"database": self.db_path}}}, f
            )
        self.config_path = confd
        code, out, err = self.run_cli("verify")
        self.assertEqual(code, 0, out + err)

    def test_databases_section_picks_the_main_store(self) -> None:
        """With `databases:`, the entry holding the main data store is the one read."""
        self.chain(2)
        self.write_config(
            database=None,
            databases={
                "state_db": {
                    "name": "psycopg2",
                    "data_stores": ["state"],
                    "args": {"host": "/nonexistent"},
                },
                "main_db": {
                    "name": "sqlite3",
                    "data_stores": ["main"],
                    "args": {"database": self.db_path},
                },
            },
        )
        self.assertEqual(self.run_cli("verify")[0], 0)

    def test_legacy_database_path(self) -> None:
        """The legacy top-level ``database_path`` names the SQLite file, as in Synapse."""
        self.chain(2)
        self.write_config(database=None, database_path=self.db_path)
        self.assertEqual(self.run_cli("verify")[0], 0)

    def test_both_database_and_database_path_read_what_synapse_reads(self) -> None:
        """With both keys, the CLI opens the file Synapse's own config reader picks
        (``database``: Synapse ignores ``database_path`` then, with a warning)."""
        self.chain(2)
        self.write_config(database_path=self.db_path + ".unused")
        self.assertEqual(self.run_cli("verify")[0], 0)

    def test_default_signing_key_path_beside_the_config(self) -> None:
        """Without signing_key_path, the key is <config dir>/<server_name>.signing.key."""
        self.chain(2)
        os.rename(self.key_path, os.path.join(self.dir, f"{ORIGIN}.signing.key"))
        self.write_config(signing_key_path=None)
        self.assertEqual(self.run_cli("verify")[0], 0)

    def test_inline_signing_key(self) -> None:
        """A signing key given inline (`signing_key:`) is used as Synapse uses it."""
        self.chain(2)
        inline = f"ed25519 a1 {encode_signing_key_base64(self.key)}"
        self.write_config(signing_key=inline, signing_key_path="/nonexistent")
        self.assertEqual(self.run_cli("verify")[0], 0)

    def test_old_signing_keys_verify_entries_from_before_a_rotation(self) -> None:
        """Entries signed by a key since rotated verify when it is listed in old_signing_keys
        and they are older than its expired_ts; signed by it after that time, they fail
        (the issue's case: a chain re-signed with a key retired long ago verified OK)."""
        old_key = generate_signing_key("old")
        entries = self.chain(3, key=old_key)
        code, out, _ = self.run_cli("verify")
        self.assertEqual(code, 1)
        self.assertIn("FAILED at entry 1: bad signature: no signature by example.org", out)
        old_b64 = encode_verify_key_base64(get_verify_key(old_key))
        self.write_config(
            old_signing_keys={"ed25519:old": {"key": old_b64, "expired_ts": entries[-1]["ts"] + 1}}
        )
        code, out, _ = self.run_cli("verify")
        self.assertEqual(code, 0, out)
        self.assertIn("(ed25519:a1, ed25519:old)", out)
        self.write_config(old_signing_keys={"ed25519:old": {"key": old_b64, "expired_ts": 0}})
        code, out, _ = self.run_cli("verify")
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 1: bad signature: signed by ed25519:old, which expired", out)

    def test_expect_head(self) -> None:
        """--expect-head SEQ:HASH passes on a chain holding that head, fails on one cut below
        it or with another hash there, and refuses a malformed head (exit 2)."""
        entries = self.chain(5)
        head = f"5:{entries[-1]['hash']}"
        code, out, _ = self.run_cli("verify", "--expect-head", head)
        self.assertEqual(code, 0, out)
        self.assertIn("Every expected head is in the chain", out)
        code, out, _ = self.run_cli("verify", "--expect-head", f"4:{entries[-1]['hash']}")
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 4: hash differs from the expected head", out)
        self.tamper("DELETE FROM leave_forget_audit WHERE seq > 3")
        self.assertEqual(self.run_cli("verify")[0], 0)  # the prefix alone is a valid chain
        code, out, _ = self.run_cli("verify", "--expect-head", head)
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED at entry 4: the chain ends at entry 3", out)
        self.assertIn("truncated", out)
        code, _, err = self.run_cli("verify", "--expect-head", "five")
        self.assertEqual(code, 2)
        self.assertIn("SEQ:HASH", err)

    def test_checkpoints_file(self) -> None:
        """--checkpoints FILE: the chain is checked against every valid checkpoint in it;
        a forged one is reported on stderr and ignored."""
        entries = self.chain(5)
        path = os.path.join(self.dir, "checkpoints.jsonl")
        with open(path, "w") as f:
            good = make_checkpoint(ORIGIN, 5, entries[-1]["hash"], 1, self.key)
            f.write(json.dumps({"type": CHECKPOINT_EVENT_TYPE, "content": good}) + "\n")
            f.write(json.dumps({**good, "seq": 2}) + "\n")
        code, out, err = self.run_cli("--json", "verify", "--checkpoints", path)
        self.assertEqual(code, 0, out)
        report = json.loads(out)
        self.assertEqual((report["checkpoints"], report["checkpoints_rejected"]), (1, 1))
        self.assertIn("ignoring a checkpoint", err)
        self.tamper("DELETE FROM leave_forget_audit WHERE seq = 5")
        code, out, _ = self.run_cli("verify", "--checkpoints", path)
        self.assertEqual(code, 1, out)
        self.assertIn("truncated", out)

    def test_database_is_opened_read_only(self) -> None:
        """The CLI's connection cannot write, and a run leaves the database file unchanged."""
        self.chain(3)
        with open(self.db_path, "rb") as f:
            before = f.read()
        db = cli.open_database(cli.load_config([self.config_path]))
        try:
            with self.assertRaises(sqlite3.OperationalError):
                db.cursor().execute("DELETE FROM leave_forget_audit")
        finally:
            db.close()
        for argv in (["verify"], ["log"], ["rooms"], ["export"]):
            self.assertEqual(self.run_cli(*argv)[0], 0)
        with open(self.db_path, "rb") as f:
            self.assertEqual(f.read(), before)


class VerifyTest(CliTestCase):
    """verify: reports, streaming, robustness against mangled rows, keys, progress."""

    def test_verify_ok(self) -> None:
        """verify exits 0 on a good chain and prints the count and the head, SEQ:HASH."""
        entries = self.chain(5)
        code, out, err = self.run_cli("verify")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("OK: 5 audit entries checked", out)
        self.assertIn(f"Head: 5:{entries[-1]['hash']}", out)

    def test_verify_messages_count_in_good_english(self) -> None:
        """One entry is 'entry', not 'entries', in both the success and the failure message."""
        self.chain(2)
        self.assertIn("OK: 2 audit entries checked", self.run_cli("verify")[1])
        self.tamper("UPDATE leave_forget_audit SET reason = 'x' WHERE seq = 2")
        out = self.run_cli("verify")[1]
        self.assertIn("1 audit entry before it is valid; last good head: 1:", out)
        self.tamper("DELETE FROM leave_forget_audit WHERE seq = 2")
        self.assertIn("OK: 1 audit entry checked", self.run_cli("verify")[1])

    def test_verify_empty_log(self) -> None:
        """An empty audit log verifies (nothing to contradict it)."""
        self.chain(0)
        code, out, _ = self.run_cli("verify")
        self.assertEqual(code, 0)
        self.assertIn("OK: 0 audit entries checked", out)
        self.assertIn("Head: (empty log)", out)

    def test_verify_json_and_csv_before_or_after_the_command(self) -> None:
        """--json and --csv work as global flags or after the subcommand, with the same report."""
        entries = self.chain(3)
        for argv in (["--json", "verify"], ["verify", "--json"]):
            code, out, _ = self.run_cli(*argv)
            self.assertEqual(code, 0)
            report = json.loads(out)
            self.assertEqual(
                report,
                {
                    "ok": True,
                    "checked": 3,
                    "head_hash": entries[-1]["hash"],
                    "bad_seq": None,
                    "problem": None,
                    "origin": ORIGIN,
                    "key_ids": ["ed25519:a1"],
                    "head_seq": 3,
                    "expected_heads": 0,
                    "heads_matched": 0,
                    "erased": 0,
                    "checkpoints": 0,
                    "checkpoints_rejected": 0,
                    "since_seq": None,
                },
            )
        code, out, _ = self.run_cli("--csv", "verify")
        self.assertEqual(
            out.splitlines(),
            [
                "ok,checked,head_hash,bad_seq,problem,origin,key_ids,head_seq,"
                "expected_heads,heads_matched,erased,checkpoints,checkpoints_rejected,since_seq",
                f'true,3,{entries[-1]["hash"]},,,{ORIGIN},"[""ed25519:a1""]",3,0,0,0,0,0,',
            ],
        )

    def test_verify_streams_in_batches(self) -> None:
        """verify pages through the log (keyset by seq) and still finds a bad entry late in it."""
        self.patch(cli.verify, "BATCH", 3)
        entries = self.chain(10)
        fetched: list[int] = []
        real_select = select_audit_txn

        def spy(*args: Any, **kwargs: Any) -> Any:
            fetched.append(kwargs["limit"])
            return real_select(*args, **kwargs)

        self.patch(cli.verify, "select_audit_txn", spy)
        self.assertEqual(self.run_cli("verify")[0], 0)
        self.assertEqual(fetched, [3, 3, 3, 3])  # never the whole table at once
        self.tamper("UPDATE leave_forget_audit SET reason = 'x' WHERE seq = 8")
        code, out, _ = self.run_cli("verify")
        self.assertEqual(code, 1)
        self.assertIn("FAILED at entry 8: contents do not match the stored hash", out)
        self.assertIn(
            f"7 audit entries before it are valid; last good head: 7:{entries[6]['hash']}", out
        )

    def test_unreadable_row_is_named(self) -> None:
        """A row whose signatures are not JSON is named by seq (exit 1), after the rows before."""
        self.patch(cli.verify, "BATCH", 3)
        self.chain(8)
        self.tamper("UPDATE leave_forget_audit SET signatures = 'not json' WHERE seq = 5")
        code, out, err = self.run_cli("verify")
        self.assertEqual(code, 1, err)
        self.assertIn("FAILED at entry 5: the row cannot be read", out)
        self.assertIn("4 audit entries before it are valid", out)

    def test_mangled_signatures_are_a_failure_not_a_crash(self) -> None:
        """Signatures edited into valid JSON of the wrong shape fail verify at that seq."""
        self.chain(4)
        self.tamper("UPDATE leave_forget_audit SET signatures = '[]' WHERE seq = 3")
        code, out, err = self.run_cli("verify")
        self.assertEqual(code, 1)
        self.assertIn("FAILED at entry 3: bad signature", out)
        self.assertNotIn("Traceback", err)

    def test_verify_key_instead_of_the_signing_key(self) -> None:
        """--verify-key verifies with a public key alone; the signing key file is not read."""
        self.chain(3)
        public = f"ed25519:a1 {encode_verify_key_base64(get_verify_key(self.key))}"
        os.unlink(self.key_path)
        self.assertEqual(self.run_cli("verify", "--verify-key", public)[0], 0)
        other = f"ed25519:a1 {encode_verify_key_base64(get_verify_key(generate_signing_key('a1')))}"
        code, out, _ = self.run_cli("verify", "--verify-key", other)
        self.assertEqual(code, 1)
        self.assertIn("FAILED at entry 1: bad signature", out)
        # One plain line: no Python class name (it printed nacl's exception class).
        self.assertNotIn("<class", out)
        self.assertNotIn("nacl", out)

    def test_progress_only_when_stderr_is_a_terminal(self) -> None:
        """A person at a terminal sees \\r progress on stderr; a pipe gets none; stdout is clean."""
        self.patch(cli.Progress, "INTERVAL", 0.0)
        self.chain(5)
        code, out, err = self.run_cli("verify")
        self.assertEqual((code, err), (0, ""))
        tty = Tty()
        code, tty_out, _ = self.run_cli("verify", stderr=tty)
        self.assertEqual(code, 0)
        self.assertEqual(tty_out, out)
        drawn = tty.getvalue()
        self.assertIn("\rVerifying: 5 entries [", drawn)
        self.assertIn("100%", drawn)
        self.assertTrue(drawn.endswith("\r\x1b[K"), repr(drawn))


class LogAndExportTest(CliTestCase):
    """log and export: formats, filters, paging."""

    def test_log_table(self) -> None:
        """log prints an aligned table with ISO times and every column, empty
        cells as "-" (columns used to vanish when empty, shifting the rest)."""
        self.chain(4)
        code, out, _ = self.run_cli("log", "--room", f"!room1:{ORIGIN}")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        header = ["SEQ", "TIME", "ACTION", "OUTCOME", "USER", "ROOM", "DEVICE", "EVENT", "REASON"]
        self.assertEqual(lines[0].split(), header)
        self.assertTrue(all(len(line.split()) == len(header) for line in lines), out)
        self.assertEqual(lines[1].split()[-2:], ["-", "-"])
        self.assertEqual([line.split()[0] for line in lines[1:]], ["1", "3"])
        self.assertEqual(lines[1].split()[1], "2023-11-14T22:13:21.000Z")

    def test_log_table_escapes_terminal_control_characters(self) -> None:
        """A reason with escape sequences or bidi overrides is shown escaped, never interpreted."""
        entries = make_chain(2, self.key)
        entries[1]["reason"] = "bye\x1b[2J\u202eevil\n"
        create_database(self.db_path, entries)
        code, out, _ = self.run_cli("log")
        self.assertEqual(code, 0)
        self.assertIn("bye\\x1b[2J\\u202eevil\\n", out)
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\u202e", out)
        code, out, _ = self.run_cli("log", "--json")
        self.assertEqual(json.loads(out)["entries"][1]["reason"], "bye\x1b[2J\u202eevil\n")

    def test_log_limit_and_paging_hint(self) -> None:
        """--limit stops early; the table says on stderr how to continue, JSON gives next_from."""
        self.chain(5)
        code, out, err = self.run_cli("log", "--limit", "2")
        self.assertEqual(len(out.splitlines()), 3)
        self.assertIn("continue with --from 2", err)
        code, out, err = self.run_cli("log", "--json", "--limit", "2", "--from", "2")
        self.assertEqual(json.loads(out)["next_from"], 4)
        self.assertEqual(err, "")
        code, out, _ = self.run_cli("log", "--json", "--limit", "0")
        self.assertEqual(len(json.loads(out)["entries"]), 5)

    def test_log_newest(self) -> None:
        """--newest N shows the newest N matching entries, oldest of them first
        (as tail does), with the filters applied before counting."""
        self.chain(7)
        code, out, _ = self.run_cli("log", "--newest", "3", "--json")
        self.assertEqual(code, 0)
        self.assertEqual([e["seq"] for e in json.loads(out)["entries"]], [5, 6, 7])
        code, out, _ = self.run_cli("log", "--newest", "2", "--room", f"!room1:{ORIGIN}")
        self.assertEqual([line.split()[0] for line in out.splitlines()[1:]], ["5", "7"])
        code, out, _ = self.run_cli("log", "--newest", "50", "--json")
        self.assertEqual(len(json.loads(out)["entries"]), 7)
        self.assertEqual(self.run_cli("log", "--newest", "0")[0], 2)
        self.assertEqual(self.run_cli("log", "--newest", "2", "--limit", "3")[0], 2)

    def test_log_follow(self) -> None:
        """--follow prints the entries there are, then each one written later
        (a new read transaction per poll), table rows without a new header."""
        entries = make_chain(5, self.key)
        create_database(self.db_path, entries[:3])
        polls: list[int] = []

        def sleep(seconds: float) -> None:
            polls.append(1)
            if len(polls) == 1:
                conn = sqlite3.connect(self.db_path)
                for entry in entries[3:]:
                    insert_entry(conn, entry)
                conn.commit()
                conn.close()
            elif len(polls) % 3 == 0:
                raise KeyboardInterrupt

        self.patch(cli.commands.time, "sleep", sleep)
        code, out, err = self.run_cli("log", "--follow")
        self.assertEqual(code, 130, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[0], "SEQ")
        self.assertEqual([line.split()[0] for line in lines[1:]], ["1", "2", "3", "4", "5"])
        code, out, _ = self.run_cli("log", "--follow", "--json", "--newest", "1")
        self.assertEqual([json.loads(line)["seq"] for line in out.splitlines()], [5])

    def test_log_follow_keeps_columns_under_the_headings(self) -> None:
        """Rows --follow prints later (longer outcome, user, room and event ids)
        start each column where the first table's heading does."""
        entries = make_chain(5, self.key)
        create_database(self.db_path, entries[:2])
        for entry in entries[2:]:
            entry.update(
                outcome="M_LIMIT_EXCEEDED",
                user_id="@a-longer-user-name:example.org",
                room_id="!AbCdEfGhIjKlMnOpQr:example.org",
                event_id="$" + "x" * 43,
                device_id="LONGDEVICE",
            )
        polls: list[int] = []

        def sleep(seconds: float) -> None:
            polls.append(1)
            if len(polls) == 1:
                conn = sqlite3.connect(self.db_path)
                for entry in entries[2:]:
                    insert_entry(conn, entry)
                conn.commit()
                conn.close()
            elif len(polls) == 3:
                raise KeyboardInterrupt

        self.patch(cli.commands.time, "sleep", sleep)
        code, out, err = self.run_cli("log", "--follow")
        self.assertEqual(code, 130, err)
        header, *rows = out.splitlines()
        self.assertEqual(len(rows), 5)
        starts = [header.index(h) for h in header.split()]
        for row in rows:
            for start in starts[1:]:
                self.assertEqual(row[start - 2 : start], "  ", (row, start))
                self.assertNotEqual(row[start], " ", (row, start))
        # With nothing to show yet, the headings still come first.
        os.unlink(self.db_path)
        create_database(self.db_path, [])
        polls.clear()
        code, out, _ = self.run_cli("log", "--follow")
        self.assertEqual(out.splitlines()[0].split()[:2], ["SEQ", "TIME"])

    def test_help_shows_every_default(self) -> None:
        """Every option with a default says it in --help (rooms --state's forgotten,
        log --from's 0, the table output...)."""

        def actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
            found = []
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        found += [(f"{name} {n}", a) for n, a in actions(sub)]
                else:
                    found.append(("", action))
            return found

        checked = 0
        for where, action in actions(cli.build_parser()):
            if action.default in (None, False, argparse.SUPPRESS) or action.help in (
                None,
                argparse.SUPPRESS,
            ):
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            checked += 1
            self.assertIn("default", action.help or "", f"{where} {action.option_strings}")
        self.assertGreaterEqual(checked, 5)

    def test_help_is_plain_text(self) -> None:
        """--help of every command is plain text: no reStructuredText ``quotes``."""
        for command in ("rooms", "log", "export", "verify"):
            code, out, _ = self.run_cli(command, "--help")
            self.assertEqual(code, 0)
            self.assertNotIn("``", out, command)
            self.assertIn("usage:", out)

    def test_log_time_filters_accept_iso_dates(self) -> None:
        """--since/--until take milliseconds or ISO 8601 (UTC unless an offset is given)."""
        entries = self.chain(5)  # ts = 1700000000000 + seq * 1000
        code, out, _ = self.run_cli(
            "log", "--json", "--since", "2023-11-14T22:13:22Z", "--until", str(entries[3]["ts"])
        )
        self.assertEqual([e["seq"] for e in json.loads(out)["entries"]], [2, 3])

    def test_export_json_lines_to_a_file(self) -> None:
        """export -o writes one sort_keys JSON entry per line and reports the count on stderr."""
        entries = self.chain(4)
        target = os.path.join(self.dir, "out.jsonl")
        code, out, err = self.run_cli("export", "-o", target)
        self.assertEqual((code, out), (0, ""))
        self.assertIn(f"exported 4 entries to {target}", err)
        with open(target) as f:
            self.assertEqual(
                f.read(), "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
            )

    def test_export_csv_to_stdout(self) -> None:
        """export --csv streams CSV with every audit column."""
        self.chain(3)
        code, out, _ = self.run_cli("export", "--csv", "--user", f"@user1:{ORIGIN}")
        lines = out.splitlines()
        self.assertEqual(lines[0], ",".join(STORED_COLUMNS))
        self.assertEqual([line.split(",")[0] for line in lines[1:]], ["1"])

    def test_export_into_a_missing_directory(self) -> None:
        """An export target that cannot be created is a one-line error, exit 2."""
        self.chain(1)
        self.assertCliError(
            ["export", "-o", os.path.join(self.dir, "missing", "out.jsonl")], "cannot write"
        )


class RoomsTest(CliTestCase):
    """rooms: each state listed as the admin API lists it."""

    def setUp(self) -> None:
        super().setUp()
        rooms = [
            (f"!a:{ORIGIN}", "forgotten", 1000, 5000, None, None, None, None, 1000),
            (f"!b:{ORIGIN}", "dry_run", 1000, 5000, 6000, None, None, None, 6000),
            (f"!c:{ORIGIN}", "forgotten", 2000, None, None, None, None, None, 2000),
            (f"!d:{ORIGIN}", "purged", 1000, 5000, 6000, 7000, None, None, 7000),
            (f"!e:{ORIGIN}", "active", 1000, None, None, None, 3000, "@x came back", 3000),
        ]
        holds = [(f"!h:{ORIGIN}", f"@admin:{ORIGIN}", "legal", 1000)]
        create_database(self.db_path, make_chain(1, self.key), rooms, holds)

    def listing(self, *argv: str) -> dict[str, Any]:
        """The JSON of ``rooms --json argv...``."""
        code, out, err = self.run_cli("rooms", "--json", *argv)
        self.assertEqual(code, 0, err)
        result: dict[str, Any] = json.loads(out)
        return result

    def test_states_as_the_admin_api(self) -> None:
        """Each --state lists the stored states the admin API's listing of that name covers."""
        ids = {s: [r["room_id"] for r in self.listing("--state", s)["rooms"]] for s in LISTINGS}
        self.assertEqual(
            ids,
            {
                "forgotten": [f"!a:{ORIGIN}", f"!b:{ORIGIN}", f"!c:{ORIGIN}"],
                "pending": [f"!a:{ORIGIN}", f"!c:{ORIGIN}"],
                "dry_run": [f"!b:{ORIGIN}"],
                "purged": [f"!d:{ORIGIN}"],
            },
        )
        self.assertEqual(self.listing()["state"], "forgotten")

    def test_paging(self) -> None:
        """--limit and --from page by room id, with next_from as in the admin API."""
        first = self.listing("--limit", "2")
        self.assertEqual(first["next_from"], f"!b:{ORIGIN}")
        rest = self.listing("--limit", "2", "--from", first["next_from"])
        self.assertEqual([r["room_id"] for r in rest["rooms"]], [f"!c:{ORIGIN}"])
        self.assertNotIn("next_from", rest)

    def test_held_merges_configured_holds(self) -> None:
        """--state held lists API holds and the module config's retention.holds."""
        self.write_config(
            modules=[
                {
                    "module": cli.MODULE_NAME,
                    "config": {"retention": {"holds": [f"!cfg:{ORIGIN}", f"!h:{ORIGIN}"]}},
                }
            ]
        )
        rooms = self.listing("--state", "held")["rooms"]
        self.assertEqual(
            rooms,
            [
                {
                    "room_id": f"!cfg:{ORIGIN}",
                    "held_by": "config",
                    "reason": None,
                    "created_at": None,
                },
                {
                    "room_id": f"!h:{ORIGIN}",
                    "held_by": f"@admin:{ORIGIN}",
                    "reason": "legal",
                    "created_at": 1000,
                },
            ],
        )

    def test_bad_module_config_is_reported(self) -> None:
        """A module config the module itself would reject is a one-line error for --state held."""
        self.write_config(
            modules=[{"module": cli.MODULE_NAME, "config": {"retention": {"holds": "nope"}}}]
        )
        self.assertCliError(["rooms", "--state", "held"], "module config retention.holds")

    def test_abandoned_reads_synapse_membership(self) -> None:
        """--state abandoned lists rooms where no local user joins, is invited or knocks."""
        conn = sqlite3.connect(self.db_path)
        conn.execute(
            "CREATE TABLE local_current_membership (room_id TEXT, user_id TEXT, "
            "event_id TEXT, membership TEXT)"
        )
        conn.executemany(
            "INSERT INTO local_current_membership VALUES (?, ?, ?, ?)",
            [
                ("!left:x", "@a:x", "$1", "leave"),
                ("!left:x", "@b:x", "$2", "ban"),
                ("!live:x", "@a:x", "$3", "leave"),
                ("!live:x", "@b:x", "$4", "invite"),
            ],
        )
        conn.commit()
        conn.close()
        self.assertEqual(self.listing("--state", "abandoned")["rooms"], [{"room_id": "!left:x"}])

    def test_table_and_csv(self) -> None:
        """The table shows readable times and every column (empty cells "-");
        CSV keeps every column raw."""
        code, out, _ = self.run_cli("rooms", "--state", "purged")
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[:3], ["ROOM", "STATE", "FORGOTTEN"])
        self.assertIn("CANCELLED", lines[0])
        self.assertEqual(lines[1].split()[6], "-")
        self.assertIn("1970-01-01T00:00:07.000Z", lines[1])
        code, out, _ = self.run_cli("rooms", "--csv", "--state", "purged")
        self.assertEqual(
            out.splitlines(),
            [
                "room_id,state,forgotten_at,purge_due_at,purge_started_at,purged_at,"
                "cancelled_at,updated_at,note",
                f"!d:{ORIGIN},purged,1000,5000,6000,7000,,7000,",
            ],
        )


class HelpersTest(SynchronousTestCase):
    """Time parsing and formatting, and when progress is drawn."""

    def test_parse_timestamp(self) -> None:
        """Timestamps are milliseconds or ISO 8601; naive times are UTC; others are refused."""
        self.assertEqual(cli.parse_timestamp("1700000000000"), 1700000000000)
        self.assertEqual(cli.parse_timestamp("2023-11-14T22:13:20Z"), 1700000000000)
        self.assertEqual(cli.parse_timestamp("2023-11-14T22:13:20"), 1700000000000)
        self.assertEqual(cli.parse_timestamp("2023-11-14T23:13:20+01:00"), 1700000000000)
        self.assertEqual(cli.parse_timestamp("2023-11-14"), 1699920000000)
        with self.assertRaises(argparse.ArgumentTypeError):
            cli.parse_timestamp("last tuesday")

    def test_format_ts_round_trips_through_parse_timestamp(self) -> None:
        """What the table prints for a time can be pasted back into --since."""
        for ms in (0, 1700000000123, 1999999999999):
            self.assertEqual(cli.parse_timestamp(cli.format_ts(ms)), ms)
        self.assertEqual(cli.format_ts(None), "-")

    def test_progress_is_silent_off_a_terminal(self) -> None:
        """Progress writes nothing to a stream that is not a terminal."""
        self.assertFalse(cli.Progress.wanted(io.StringIO()))
        self.assertTrue(cli.Progress.wanted(Tty()))


class ReceiptRowsTest(SynchronousTestCase):
    """The receipt's text lines follow where the purged room's media stands."""

    def view(self, media: dict[str, Any] | None) -> dict[str, Any]:
        purge_media = {"policy": "delete", "local_items": 0, "remote_items": 0}
        return {"seq": 7, "ts": 0, "hash": "h", "receipt": {"media": purge_media}, "media": media}

    def rows(self, media: dict[str, Any] | None) -> dict[str, str]:
        return dict(receipt_rows("!r:x", self.view(media)))

    def test_pending_then_recorded(self) -> None:
        """Pending says what is due and when; recorded names the entry and shows its counts
        instead of the purge entry's zeros."""
        self.assertIn("not decided yet", self.rows({"state": "pending", "due": None})["media"])
        pending = self.rows({"state": "pending", "due": 2, "due_at": 0})
        self.assertEqual(
            pending["media"], "pending: 2 due for deletion, the last at 1970-01-01T00:00:00.000Z"
        )
        recorded = self.rows(
            {
                "state": "recorded",
                "seq": 9,
                "ts": 0,
                "hash": "m",
                "receipt": {"media": {"policy": "delete", "remote_items": 1, "remote_bytes": 5}},
            }
        )
        self.assertTrue(recorded["media"].startswith("entry 9:m "), recorded["media"])
        self.assertIn("remote 1 (5 bytes)", recorded["media erased"])
        self.assertIn("nothing to delete", self.rows({"state": "no_media"})["media"])
        self.assertIn("no media deletion", self.rows(None)["media"])
