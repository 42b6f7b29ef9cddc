"""The offline CLI against the database of a real Synapse running the module.

Audit entries are produced the real way (leave and forget through the module's
listener); the CLI then runs as a subprocess, as an operator would run it, with
the homeserver.yaml the harness wrote. Tampering is done on copies of the
database (SQLite backup or PostgreSQL template), one copy per case, each with
its own copied homeserver.yaml.
"""

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, ClassVar

from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    read_signing_keys,
)

from matrix_leave_forget.audit.entry import ENTRY_FIELDS, text_commitment
from matrix_leave_forget.audit.log import AUDIT_COLUMNS, STORED_COLUMNS
from tests.integration.base import StoppedServerTestCase
from tests.support.chain import reseal_from
from tests.support.harness import (
    SERVER_NAME,
    Response,
    User,
    quote_room,
    run_cli,
)
from tests.support.tamper import Tampering, tampered_config

ADMIN = "/_synapse/client/leave_forget/v1/admin"


class CliTest(StoppedServerTestCase):
    """The CLI reads, exports and verifies what the module really wrote."""

    MODE = "listener"
    MODULE_CONFIG = {"forget_rate_limit": None}

    alice: ClassVar[User]
    bob: ClassVar[User]
    room: ClassVar[str]
    lonely_room: ClassVar[str]
    live_verify: ClassVar["subprocess.CompletedProcess[str]"]
    admin_export: ClassVar[bytes]
    admin_audit: ClassVar[dict[str, Any]]
    admin_forgotten: ClassVar[dict[str, Any]]

    @classmethod
    def prepare(cls) -> None:
        cls._make_history()
        # What the admin API says while Synapse runs, to compare the offline
        # CLI against; and one CLI run beside the live writer.
        cls.admin_export = cls._admin("/audit/export").raw
        cls.admin_audit = cls._admin("/audit?limit=1000").body
        cls.admin_forgotten = cls._admin("/rooms?state=forgotten").body
        cls.live_verify = cls.cli(cls.hs.config_path, "--json", "verify")

    @classmethod
    def _make_history(cls) -> None:
        """Six audit entries: a refused forget, leaves (with reasons) and forgets."""
        hs = cls.hs
        cls.alice = hs.register("alice", admin=True)
        cls.bob = hs.register("bob")
        cls.room = hs.create_room(cls.alice, preset="public_chat")
        assert hs.membership(cls.bob, cls.room, "join").status == 200
        steps = [
            (cls.bob, cls.room, "forget", {}, 400),  # still joined: refused, audited
            (cls.alice, cls.room, "leave", {"reason": "moving on"}, 200),
            (cls.bob, cls.room, "leave", {}, 200),
            (cls.alice, cls.room, "forget", {}, 200),
            (cls.bob, cls.room, "forget", {}, 200),  # the last local user: room forgotten
        ]
        cls.lonely_room = hs.create_room(cls.alice)
        steps.append((cls.alice, cls.lonely_room, "leave", {"reason": "bye"}, 200))
        for user, room_id, action, body, status in steps:
            resp = hs.module(
                "POST",
                f"/_matrix/client/v3/rooms/{quote_room(room_id)}/{action}",
                body,
                token=user.access_token,
            )
            assert resp.status == status, (action, user.user_id, resp.status, resp.body)

    @classmethod
    def _admin(cls, path: str) -> Response:
        resp = cls.hs.module("GET", ADMIN + path, token=cls.alice.access_token)
        assert resp.status == 200, (path, resp.status, resp.raw)
        return resp

    @staticmethod
    def cli(config_path: str, *args: str) -> "subprocess.CompletedProcess[str]":
        """Run ``matrix-leave-forget -c config_path args...`` as its own process."""
        return run_cli(config_path, *args)

    def run_ok(self, *args: str, config_path: str = "") -> str:
        """Run the CLI, insist on exit 0 and no traceback, and return its stdout."""
        proc = self.cli(config_path or self.hs.config_path, *args)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        return proc.stdout

    def entries(self) -> list[dict[str, Any]]:
        """Every audit entry, as the CLI lists them."""
        return list(json.loads(self.run_ok("log", "--json", "--limit", "0"))["entries"])

    # -- copies of the database to tamper with ---------------------------------

    def tampered_config(self, tampering: Tampering) -> str:
        """A homeserver.yaml pointing at a fresh copy of the database with ``tampering`` applied."""
        return tampered_config(self.hs, tampering, self.addCleanup)

    def assertVerifyFails(self, config_path: str, seq: int, problem: str, checked: int) -> None:
        """verify exits 1, naming entry ``seq`` and ``problem``, after ``checked`` good entries."""
        proc = self.cli(config_path, "verify")
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        self.assertIn(f"FAILED at entry {seq}: {problem}", proc.stdout)
        good = (
            "1 audit entry before it is valid"
            if checked == 1
            else f"{checked} audit entries before it are valid"
        )
        self.assertIn(good, proc.stdout)

    # -- reading the real log ----------------------------------------------------

    def test_verify_passes_on_the_real_log(self) -> None:
        """verify exits 0 on the log the module wrote, counting every entry and naming the head."""
        out = self.run_ok("verify")
        head = self.admin_audit["entries"][-1]["hash"]
        self.assertIn("OK: 6 audit entries checked", out)
        self.assertIn(f"by {SERVER_NAME} (ed25519:a_test) is valid", out)
        self.assertIn(f"Head: 6:{head}", out)

    def test_verify_runs_beside_a_live_synapse(self) -> None:
        """verify reads the database read-only while Synapse is running and writing it."""
        self.assertEqual(self.live_verify.returncode, 0, self.live_verify.stderr)
        report = json.loads(self.live_verify.stdout)
        self.assertEqual((report["ok"], report["checked"]), (True, 6))
        self.assertEqual(report["head_hash"], self.admin_audit["entries"][-1]["hash"])

    def test_log_json_lists_the_entries_as_the_admin_api(self) -> None:
        """log --json returns every entry, identical to the admin API's audit listing."""
        entries = self.entries()
        self.assertEqual(entries, self.admin_audit["entries"])
        self.assertEqual([e["seq"] for e in entries], [1, 2, 3, 4, 5, 6])
        self.assertEqual(
            [(e["user_id"], e["action"]) for e in entries],
            [
                (self.bob.user_id, "forget"),
                (self.alice.user_id, "leave"),
                (self.bob.user_id, "leave"),
                (self.alice.user_id, "forget"),
                (self.bob.user_id, "forget"),
                (self.alice.user_id, "leave"),
            ],
        )
        self.assertEqual(entries[0]["outcome"], "M_UNKNOWN")
        self.assertEqual(entries[1]["reason"], "moving on")
        # Every column; of the optional ones, the format marker (set on every new
        # entry), the served leave's via (docs/audit.md "Routes") and, for its
        # reason, the commitment and its salt (docs/audit.md "Erasure").
        self.assertEqual(
            set(entries[1]), {*AUDIT_COLUMNS, "format", "via", "text_commitment", "text_salt"}
        )

    def test_log_json_paginates_like_the_admin_api(self) -> None:
        """log --limit N --json gives next_from, and --from continues where it stopped."""
        first = json.loads(self.run_ok("--json", "log", "--limit", "4"))
        self.assertEqual([e["seq"] for e in first["entries"]], [1, 2, 3, 4])
        self.assertEqual(first["next_from"], 4)
        rest = json.loads(self.run_ok("log", "--json", "--limit", "4", "--from", "4"))
        self.assertEqual([e["seq"] for e in rest["entries"]], [5, 6])
        self.assertNotIn("next_from", rest)

    def test_log_table_filters_by_user(self) -> None:
        """log --user shows that user's entries only, as an aligned table with readable times."""
        out = self.run_ok("log", "--user", self.bob.user_id)
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[:6], ["SEQ", "TIME", "ACTION", "OUTCOME", "USER", "ROOM"])
        self.assertEqual([line.split()[0] for line in lines[1:]], ["1", "3", "5"])
        # Aligned: the USER column starts at the same offset on every line.
        offsets = {line.index(self.bob.user_id) for line in lines[1:]}
        self.assertEqual(offsets, {lines[0].index("USER")})
        self.assertRegex(lines[1].split()[1], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_log_filters_by_room_and_time(self) -> None:
        """--room, --since and --until select the same entries as the admin API filters would."""
        entries = self.admin_audit["entries"]
        by_room = json.loads(self.run_ok("log", "--json", "--room", self.lonely_room))
        self.assertEqual([e["seq"] for e in by_room["entries"]], [6])
        since, until = entries[1]["ts"], entries[4]["ts"]
        window = json.loads(
            self.run_ok("log", "--json", "--since", str(since), "--until", str(until))
        )
        expected = [e["seq"] for e in entries if since <= e["ts"] < until]
        self.assertEqual([e["seq"] for e in window["entries"]], expected)

    def test_log_csv_has_every_column(self) -> None:
        """log --csv has a header of every audit column and one parseable row per entry."""
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO(self.run_ok("log", "--csv"))))
        self.assertEqual(len(rows), 6)
        self.assertEqual(list(rows[0]), list(STORED_COLUMNS))
        self.assertEqual(rows[1]["reason"], "moving on")
        self.assertEqual(rows[1]["hash"], self.admin_audit["entries"][1]["hash"])
        self.assertIn(SERVER_NAME, json.loads(rows[1]["signatures"]))

    def test_export_writes_json_lines_identical_to_the_admin_export(self) -> None:
        """export -o FILE writes one JSON entry per line, byte for byte the admin API's export."""
        workdir = tempfile.mkdtemp(prefix="mlf-cli-export-")
        self.addCleanup(shutil.rmtree, workdir, ignore_errors=True)
        target = os.path.join(workdir, "audit.jsonl")
        proc = self.cli(self.hs.config_path, "export", "-o", target)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(f"exported 6 entries to {target}", proc.stderr)
        with open(target, "rb") as f:
            exported = f.read()
        self.assertEqual(exported, self.admin_export)
        lines = exported.decode().splitlines()
        self.assertEqual([json.loads(line) for line in lines], self.admin_audit["entries"])
        self.assertEqual(lines[0], json.dumps(self.admin_audit["entries"][0], sort_keys=True))
        # Nothing but the export is left in the directory (no temporary file).
        self.assertEqual(os.listdir(workdir), ["audit.jsonl"])

    def test_export_to_stdout_with_filters(self) -> None:
        """export without -o writes to stdout, honouring the same filters as log."""
        out = self.run_ok("export", "--user", self.alice.user_id, "--room", self.room)
        self.assertEqual([json.loads(line)["seq"] for line in out.splitlines()], [2, 4])

    def test_rooms_forgotten_lists_the_room_everyone_forgot(self) -> None:
        """rooms --state forgotten lists the room every local user forgot, as the admin API does."""
        listing = json.loads(self.run_ok("rooms", "--state", "forgotten", "--json"))
        self.assertEqual(listing, self.admin_forgotten)
        self.assertEqual([r["room_id"] for r in listing["rooms"]], [self.room])
        self.assertEqual(listing["rooms"][0]["state"], "forgotten")
        table = self.run_ok("rooms").splitlines()
        self.assertEqual(table[0].split()[:2], ["ROOM", "STATE"])
        self.assertEqual(table[1].split()[:2], [self.room, "forgotten"])

    def test_rooms_abandoned_includes_a_room_left_but_not_forgotten(self) -> None:
        """rooms --state abandoned reads Synapse's own tables: both rooms no local user is in."""
        listing = json.loads(self.run_ok("rooms", "--state", "abandoned", "--json"))
        self.assertEqual(
            [r["room_id"] for r in listing["rooms"]], sorted([self.room, self.lonely_room])
        )
        self.assertIn("No rooms in state purged.", self.run_ok("rooms", "--state", "purged"))

    # -- verifying with only the public key ----------------------------------------

    def _public_key(self) -> str:
        """The server's public key as /_matrix/key/v2/server publishes it."""
        with open(os.path.join(self.hs.workdir, "signing.key")) as f:
            (key,) = read_signing_keys(f)
        return f"ed25519:{key.version} {encode_verify_key_base64(get_verify_key(key))}"

    def test_verify_key_with_the_right_public_key_passes(self) -> None:
        """A third party holding only the server's public key verifies the log."""
        out = self.run_ok("verify", "--verify-key", self._public_key())
        self.assertIn("OK: 6 audit entries checked", out)

    def test_verify_key_with_another_key_fails(self) -> None:
        """A different public key under the same key id fails at entry 1 with a bad signature."""
        other = get_verify_key(generate_signing_key("a_test"))
        proc = self.cli(
            self.hs.config_path,
            "verify",
            "--verify-key",
            f"ed25519:a_test {encode_verify_key_base64(other)}",
        )
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("FAILED at entry 1: bad signature", proc.stdout)

    # -- tampering -----------------------------------------------------------------

    def test_edited_reason_is_caught(self) -> None:
        """Editing a reason in the database fails verify at that entry."""
        config = self.tampered_config(
            [("UPDATE leave_forget_audit SET reason = ? WHERE seq = ?", ("rewritten", 2))]
        )
        # The entry's hash covers the reason's commitment (format 3, docs/audit.md "Erasure").
        self.assertVerifyFails(config, 2, "free text does not match its commitment", checked=1)
        proc = self.cli(config, "verify", "--json")
        self.assertEqual(proc.returncode, 1, proc.stderr)
        report = json.loads(proc.stdout)
        self.assertEqual((report["ok"], report["bad_seq"], report["checked"]), (False, 2, 1))
        self.assertIn("the row was edited", report["problem"])

    def test_deleted_row_is_caught(self) -> None:
        """Deleting a middle row fails verify at the next entry, which says which one is missing."""
        config = self.tampered_config([("DELETE FROM leave_forget_audit WHERE seq = ?", (3,))])
        self.assertVerifyFails(config, 4, "expected entry 3 but found entry 4", checked=2)

    def test_swapped_rows_are_caught(self) -> None:
        """Swapping two rows' seq (reordering history) fails verify at the lower of the two."""
        config = self.tampered_config(
            [
                ("UPDATE leave_forget_audit SET seq = ? WHERE seq = ?", (-1, 3)),
                ("UPDATE leave_forget_audit SET seq = ? WHERE seq = ?", (3, 4)),
                ("UPDATE leave_forget_audit SET seq = ? WHERE seq = ?", (4, -1)),
            ]
        )
        self.assertVerifyFails(
            config, 3, "prev_hash does not match the previous entry's hash", checked=2
        )

    def test_rebuilt_chain_without_the_key_is_caught(self) -> None:
        """An edit with every later hash recomputed, signed by another key, fails on signature."""
        entries = self.entries()
        entries[1]["reason"] = "rewritten"
        # The forger recomputes the reason's commitment too (the salt is in the row).
        entries[1]["text_commitment"] = text_commitment(entries[1]["text_salt"], entries[1])
        reseal_from(entries, 1, generate_signing_key("a_test"), origin=SERVER_NAME)
        columns = [*ENTRY_FIELDS, "text_commitment", "hash", "signatures"]
        statements = [
            (
                f"UPDATE leave_forget_audit SET {', '.join(f'{c} = ?' for c in columns)} "
                "WHERE seq = ?",
                [
                    *(entry[c] for c in ENTRY_FIELDS),
                    entry.get("text_commitment"),
                    entry["hash"],
                    json.dumps(entry["signatures"], sort_keys=True),
                    entry["seq"],
                ],
            )
            for entry in entries[1:]
        ]
        config = self.tampered_config(statements)
        self.assertVerifyFails(config, 2, "bad signature", checked=1)
        # Every hash link of the rebuilt chain is consistent: only signatures betray it.
        self.assertIn(
            "rewritten",
            json.loads(self.run_ok("log", "--json", "--from", "1", config_path=config))["entries"][
                0
            ]["reason"],
        )

    def test_untampered_copy_still_verifies(self) -> None:
        """The copy mechanism itself changes nothing: an untouched copy verifies."""
        config = self.tampered_config([])
        self.assertIn("OK: 6 audit entries checked", self.run_ok("verify", config_path=config))
