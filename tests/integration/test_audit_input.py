"""No input loses an audit entry, and refused requests cannot grow the log without bound.

Through the real API of a real Synapse (SQLite or PostgreSQL, from
``MLF_TEST_DATABASE``): reasons holding U+0000 (which PostgreSQL text cannot
store) and lone surrogates (which neither engine can store as UTF-8) are
recorded in a documented reversible encoding and the chain still verifies;
a guest's flood of refused leaves with 200 KB reasons writes a bounded log.
"""

import json
import re
import time
from typing import Any, ClassVar

from signedjson.key import read_signing_keys

from matrix_leave_forget.audit.checkpoint import (
    CHECKPOINT_EVENT_TYPE,
    check_checkpoint,
    checked_heads,
)
from matrix_leave_forget.audit.entry import (
    unescape_entry,
    verify_chain,
    verify_keys_from_signing_key,
)
from matrix_leave_forget.audit.log import STORED_COLUMNS, row_to_entry
from matrix_leave_forget.audit.refusals import REFUSED_REASON_PREFIX_CHARS
from tests.integration.base import SynapseTestCase
from tests.support import rawdb
from tests.support.harness import (
    SERVER_NAME,
    User,
    quote_room,
    run_cli,
    wait_until,
)

ADMIN = "/_synapse/client/leave_forget/v1/admin"

# Reasons Synapse puts in a leave event that a database column cannot take as-is
# (PostgreSQL text refuses U+0000), and their neighbours. A lone surrogate
# cannot be in an event at all: Synapse itself answers such a leave 500 and
# does not leave, so it is tested on refused leaves and holds below.
LEAVE_REASONS = [
    "before\u0000after",
    "pair \U0001f600 and NUL \u0000",
    "\u0000" * 50,
    "control \u0001\u001f\u007f and separators \u2028\u2029",
]


class AuditTestCase(SynapseTestCase):
    """One Synapse for the class; helpers to read its whole audit log."""

    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}
    admin: ClassVar[User]

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        super().setUpClass()
        cls.admin = cls.hs.register(f"admin{time.monotonic_ns()}", admin=True)

    def entries(self, **filters: str) -> list[dict[str, Any]]:
        """Audit entries from the admin API, in seq order, every page."""
        out: list[dict[str, Any]] = []
        after = 0
        query = "".join(f"&{k}={quote_room(v)}" for k, v in filters.items())
        while True:
            page = self.hs.client(
                "GET",
                f"{ADMIN}/audit?from={after}&limit=1000{query}",
                token=self.admin.access_token,
            )
            self.assertEqual(page.status, 200, page.raw[:300])
            out += page.body["entries"]
            if "next_from" not in page.body:
                return out
            after = page.body["next_from"]

    def assert_chain_verifies(self) -> None:
        """The whole log verifies, in process and with the offline CLI."""
        entries = self.entries()
        with open(f"{self.hs.workdir}/signing.key") as f:
            keys = verify_keys_from_signing_key(read_signing_keys(f)[0])
        result = verify_chain(entries, SERVER_NAME, keys)
        self.assertTrue(result.ok, result)
        self.assertEqual(result.checked, len(entries))
        proc = run_cli(self.hs.config_path, "--json", "verify")
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertEqual(json.loads(proc.stdout)["checked"], len(entries))


class AnyReasonTests(AuditTestCase):
    """Reasons with NUL and lone surrogates: a leave and its entry, never one without the other."""

    def test_leave_with_any_reason_is_recorded_exactly(self) -> None:
        """Each reason with NUL on a real leave (done by Synapse) has its entry, and the
        entry's reason decodes to exactly what the client sent (PostgreSQL lost it)."""
        user = self.hs.register(f"nul{time.monotonic_ns()}")
        sent: dict[str, str] = {}
        for reason in LEAVE_REASONS:
            room_id = self.hs.create_room(self.admin, preset="public_chat")
            self.assertEqual(self.hs.membership(user, room_id, "join").status, 200)
            resp = self.via_module(
                "POST", room_id, "leave", {"reason": reason}, token=user.access_token
            )
            self.assertEqual(resp.status, 200, resp.raw[:300])
            sent[room_id] = reason
        entries = [unescape_entry(e) for e in self.entries(user_id=user.user_id)]
        self.assertEqual({e["room_id"]: e["reason"] for e in entries}, sent)
        # Each is the leave Synapse did (so start-up reconciliation finds it recorded).
        self.assertEqual({(e["action"], e["outcome"]) for e in entries}, {("leave", "ok")})
        self.assertTrue(all(e["event_id"] for e in entries))
        self.assertTrue(any(e.get("escaped") for e in self.entries(user_id=user.user_id)))
        for entry in self.entries(user_id=user.user_id):
            # Stored form: ASCII-safe, no NUL, marked.
            self.assertNotIn("\u0000", json.dumps(entry, ensure_ascii=False))
        self.assert_chain_verifies()

    def test_refused_leave_with_any_reason_is_recorded(self) -> None:
        """A refused leave (unknown room, 404) with NUL in its reason is recorded, decodable."""
        user = self.hs.register(f"refusednul{time.monotonic_ns()}")
        room_id = f"!unknown{time.monotonic_ns()}:{SERVER_NAME}"
        resp = self.via_module(
            "POST", room_id, "leave", {"reason": "no\u0000such\ud800room"}, token=user.access_token
        )
        self.assertEqual(resp.status, 404, resp.raw[:300])
        (entry,) = self.entries(user_id=user.user_id)
        self.assertEqual(entry["outcome"], "M_UNKNOWN")
        self.assertEqual(unescape_entry(entry)["reason"], "no\u0000such\ud800room")
        self.assert_chain_verifies()

    def test_hold_with_any_reason_is_kept_and_shown_as_given(self) -> None:
        """An admin hold whose reason holds NUL and a lone surrogate is placed, audited, and
        shown back exactly by the admin API."""
        room_id = self.hs.create_room(self.admin)
        reason = "legal\u0000hold \ud800"
        resp = self.hs.client(
            "PUT",
            f"{ADMIN}/rooms/{quote_room(room_id)}/hold",
            {"reason": reason},
            token=self.admin.access_token,
        )
        self.assertEqual(resp.status, 200, resp.raw[:300])
        detail = self.hs.client(
            "GET", f"{ADMIN}/rooms/{quote_room(room_id)}", token=self.admin.access_token
        )
        self.assertEqual(detail.status, 200, detail.raw[:300])
        self.assertEqual(detail.body["hold"]["reason"], reason)
        (entry,) = [e for e in self.entries(room_id=room_id) if e["action"] == "hold"]
        self.assertEqual(unescape_entry(entry)["reason"], reason)
        self.assert_chain_verifies()


class GrowthBoundTests(AuditTestCase):
    """The issue's flood: a guest, 100 leaves of made-up rooms, 200 KB reasons each."""

    def test_guest_flood_of_refusals_writes_a_bounded_log(self) -> None:
        """100 × 404 as before; the log gains at most the budget's 10 entries, each with a
        128-character reason prefix plus the whole reason's size and SHA-256, instead of
        100 entries of up to 64 KiB each (+5.8 MB); the other 90 are counted in a metric,
        and carried by the guest's next entry once the budget refills."""
        guest = self.hs.register_guest()
        reason = "A" * (200 * 1024 - 100)
        statuses = []
        for i in range(100):
            resp = self.via_module(
                "POST",
                f"!madeup{i}x{time.monotonic_ns()}:{SERVER_NAME}",
                "leave",
                {"reason": reason},
                token=guest.access_token,
            )
            statuses.append(resp.status)
        self.assertEqual(statuses, [404] * 100)
        entries = self.entries(user_id=guest.user_id)
        self.assertEqual(len(entries), 10)
        size = sum(len(json.dumps(e)) for e in entries)
        self.assertLess(size, 10 * 1024, "the 10 entries together stay under 10 KB")
        for entry in entries:
            self.assertEqual(entry["reason"], "A" * REFUSED_REASON_PREFIX_CHARS)
            self.assertEqual(entry["reason_bytes"], len(reason))
            self.assertEqual(len(entry["reason_sha256"]), 43)
        metrics = self.hs.metrics()
        match = re.search(
            r"^synapse_leave_forget_audit_refusals_suppressed_total\{[^}]*\} (\S+)$", metrics, re.M
        )
        self.assertIsNotNone(match, metrics[-2000:])
        assert match is not None
        self.assertEqual(float(match.group(1)), 90.0)
        self.assert_chain_verifies()


class CheckpointTests(AuditTestCase):
    """Signed checkpoints of the head, sent into a room the operator names."""

    room_id: ClassVar[str]

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        super().setUpClass()
        # The operator's checkpoint room, then the module told about it.
        cls.room_id = cls.hs.create_room(cls.admin, preset="private_chat")
        cls.hs.stop()
        cls.hs.reconfigure(
            module_config={
                **cls.hs.module_config,
                "audit": {
                    "checkpoint_room": cls.room_id,
                    "checkpoint_sender": cls.admin.user_id,
                    "checkpoint_interval": "100ms",
                },
            }
        )
        cls.hs.start()

    def checkpoints(self) -> list[dict[str, Any]]:
        """The checkpoint events' contents in the room, oldest first."""
        resp = self.hs.client(
            "GET",
            f"/_matrix/client/v3/rooms/{quote_room(self.room_id)}/messages?dir=b&limit=1000",
            token=self.admin.access_token,
        )
        self.assertEqual(resp.status, 200, resp.raw[:300])
        return [
            e["content"] for e in reversed(resp.body["chunk"]) if e["type"] == CHECKPOINT_EVENT_TYPE
        ]

    def keys(self) -> dict[str, Any]:
        with open(f"{self.hs.workdir}/signing.key") as f:
            return verify_keys_from_signing_key(read_signing_keys(f)[0])

    def test_head_is_checkpointed_into_the_room_and_the_log(self) -> None:
        """After a leave, a checkpoint of the new head (seq and hash, signed by the
        server) appears in the room and in Synapse's log."""
        user = self.hs.register(f"cp{time.monotonic_ns()}")
        room_id = self.hs.create_room(self.admin, preset="public_chat")
        self.assertEqual(self.hs.membership(user, room_id, "join").status, 200)
        resp = self.via_module("POST", room_id, "leave", {}, token=user.access_token)
        self.assertEqual(resp.status, 200, resp.raw[:300])
        entries = self.entries()
        head = (entries[-1]["seq"], entries[-1]["hash"])
        latest = wait_until(
            lambda: [c for c in self.checkpoints() if (c["seq"], c["hash"]) == head],
            what="a checkpoint of the head in the room",
        )[-1]
        self.assertEqual(check_checkpoint(latest, SERVER_NAME, self.keys()), head)
        self.assertIn(f'"hash":"{head[1]}"', self.hs.log_text())
        forged = {**latest, "seq": latest["seq"] + 1}
        with self.assertRaises(ValueError):
            check_checkpoint(forged, SERVER_NAME, self.keys())

    def test_truncation_below_a_checkpoint_is_detected(self) -> None:
        """The issue's case: the newest entries deleted from the database. The prefix
        left is a valid chain on its own; against the room's checkpoints it fails as
        truncated. (Last test of the class: it leaves the log truncated.)"""
        user = self.hs.register(f"trunc{time.monotonic_ns()}")
        for _ in range(3):
            room_id = self.hs.create_room(self.admin, preset="public_chat")
            self.assertEqual(self.hs.membership(user, room_id, "join").status, 200)
            resp = self.via_module("POST", room_id, "leave", {}, token=user.access_token)
            self.assertEqual(resp.status, 200, resp.raw[:300])
        head_seq = self.entries()[-1]["seq"]
        wait_until(
            lambda: any(c["seq"] == head_seq for c in self.checkpoints()),
            what="a checkpoint of the head",
        )
        heads, problems = checked_heads(self.checkpoints(), SERVER_NAME, self.keys())
        self.assertEqual(problems, [])
        cli = ("--json", "verify", "--checkpoint-room", self.room_id)
        proc = run_cli(self.hs.config_path, *cli)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertGreaterEqual(json.loads(proc.stdout)["heads_matched"], 1)
        self.hs.stop()
        rawdb.query(self.hs, "DELETE FROM leave_forget_audit WHERE seq > ?", (head_seq - 2,))
        rows = rawdb.query(self.hs, f"SELECT {', '.join(STORED_COLUMNS)} FROM leave_forget_audit")
        entries = sorted((row_to_entry(r) for r in rows), key=lambda e: int(e["seq"]))
        self.assertTrue(verify_chain(entries, SERVER_NAME, self.keys()).ok)
        result = verify_chain(entries, SERVER_NAME, self.keys(), None, heads)
        self.assertFalse(result.ok)
        self.assertIn("truncated", result.problem or "")
        self.assertEqual(result.bad_seq, head_seq - 1)
        # The offline CLI, reading the room's checkpoint events from the same database.
        proc = run_cli(self.hs.config_path, *cli)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn("truncated", json.loads(proc.stdout)["problem"])
        self.hs.start()
