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
from typing import Any, ClassVar, Dict, List

from signedjson.key import read_signing_keys

from matrix_leave_forget.audit import unescape_entry, verify_chain, verify_keys_from_signing_key
from matrix_leave_forget.refusals import REFUSED_REASON_PREFIX_CHARS
from tests.integration.base import SynapseTestCase
from tests.integration.harness import SERVER_NAME, User, quote_room, run_cli

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

    MODULE_CONFIG: ClassVar[Dict[str, Any]] = {"forget_rate_limit": None}
    admin: ClassVar[User]

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        super().setUpClass()
        cls.admin = cls.hs.register(f"admin{time.monotonic_ns()}", admin=True)

    def entries(self, **filters: str) -> List[Dict[str, Any]]:
        """Audit entries from the admin API, in seq order, every page."""
        out: List[Dict[str, Any]] = []
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
        sent: Dict[str, str] = {}
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
