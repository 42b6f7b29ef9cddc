"""Every admin API parameter and body either works or gets a clear 4xx, on either engine.

One Synapse for the class (SQLite, or PostgreSQL with ``MLF_TEST_DATABASE=postgres``).
First the inputs issue 11 found answering 500 (huge integers, lone surrogates,
NUL, 5 MB hold reasons), then hypothesis over every admin route's query
parameters and the hold body: no answer may be a 5xx, every error is a Matrix
error (``errcode`` + ``error``), every hold the API created is in the audit
log, and the audit chain still verifies afterwards.
"""

import json
import urllib.parse
from typing import Any, ClassVar

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from signedjson.key import read_signing_keys

from matrix_leave_forget.audit.entry import verify_chain, verify_keys_from_signing_key
from tests.integration.base import SynapseTestCase
from tests.support.harness import SERVER_NAME, Response, User, quote_room, request

ADMIN = "/_synapse/client/leave_forget/v1/admin"
HUGE = "99999999999999999999999"
ROOM = f"!input-tests:{SERVER_NAME}"
# Examples per fuzz test (reproducible: derandomized).
EXAMPLES = 150


class AdminInputTests(SynapseTestCase):
    MODE = "intercept"
    admin: ClassVar[User]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        if "admin" not in cls.__dict__:
            cls.admin = cls.hs.register("admin", admin=True)

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        return request(
            self.hs.client_port,
            method,
            ADMIN + path,
            body,
            raw_body=raw,
            token=self.admin.access_token,
        )

    def assert_matrix_error(self, resp: Response, status: int, errcode: str, what: str) -> None:
        self.assertEqual((resp.status, resp.errcode), (status, errcode), (what, resp.raw[:300]))
        self.assertIsInstance(resp.body.get("error"), str, what)

    def assert_chain_verifies(self) -> None:
        with open(self.hs.homeserver_config()["signing_key_path"]) as f:
            keys = verify_keys_from_signing_key(read_signing_keys(f)[0])
        entries: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.call("GET", f"/audit?from={after}&limit=1000").body
            entries.extend(page["entries"])
            if "next_from" not in page:
                break
            after = page["next_from"]
        result = verify_chain(entries, SERVER_NAME, keys)
        self.assertTrue(result.ok, f"{result.bad_seq}: {result.problem}")

    # -- what issue 11 found -------------------------------------------------

    def test_integers_beyond_64_bits(self) -> None:
        """since/until/from/limit beyond a 64-bit integer, on /audit and
        /audit/export, are 400 M_INVALID_PARAM naming the parameter (were 500:
        the database driver cannot bind them); 2^63-1 itself works."""
        for path, names in (
            ("/audit", ("since", "until", "from", "limit")),
            ("/audit/export", ("since", "until", "from")),  # every entry: no limit
        ):
            for name in names:
                resp = self.call("GET", f"{path}?{name}={HUGE}")
                self.assert_matrix_error(resp, 400, "M_INVALID_PARAM", f"{path} {name}")
                self.assertIn(name, resp.body["error"])
            for name in ("since", "until", "from"):
                resp = self.call("GET", f"{path}?{name}={2**63 - 1}")
                self.assertEqual(resp.status, 200, (path, name, resp.raw[:200]))

    def test_integers_of_any_length_get_the_bound(self) -> None:
        """However many digits (up to the 1024 of any argument), an integer past
        2^63-1 is told the bound, as the CLI tells it (over 30 digits it was
        "must be an integer"); leading zeros are the same integer, as in the CLI."""
        for value in ("9" * 31, "9" * 1024, "1" + "0" * 100):
            for path, name in (
                ("/audit", "since"),
                ("/audit", "until"),
                ("/audit", "from"),
                ("/audit/export", "since"),
                ("/audit/export", "from"),
                ("/rooms", "limit"),
                ("/audit", "limit"),
            ):
                resp = self.call("GET", f"{path}?{name}={value}")
                self.assert_matrix_error(resp, 400, "M_INVALID_PARAM", f"{path} {name}")
                self.assertIn(f"'{name}' must", resp.body["error"])
                self.assertNotIn("integer", resp.body["error"], (path, name))
            resp = self.call("GET", f"/audit?since=-{value[:1000]}")
            self.assert_matrix_error(resp, 400, "M_INVALID_PARAM", "negative")
            self.assertIn("must not be negative", resp.body["error"])
        resp = self.call("GET", "/audit?limit=" + "9" * 1025)
        self.assert_matrix_error(resp, 400, "M_INVALID_PARAM", "1025 digits")
        self.assertIn("too long", resp.body["error"])
        for name in ("since", "from"):
            resp = self.call("GET", f"/audit?{name}={'0' * 40}1")
            self.assertEqual(resp.status, 200, (name, resp.raw[:200]))
        resp = self.call("GET", f"/audit?limit={'0' * 40}1")
        self.assertEqual(resp.status, 200, resp.raw[:200])
        self.assertLessEqual(len(resp.body["entries"]), 1)

    def test_integers_in_other_spellings(self) -> None:
        """Spellings int() would take but are not plain integers are refused."""
        for value in ("1_000", " 5", "٣", "+5", "0x10", "1e3", ""):
            resp = self.call("GET", f"/audit?since={urllib.parse.quote(value)}")
            self.assert_matrix_error(resp, 400, "M_INVALID_PARAM", value)

    def test_nul_in_string_parameters(self) -> None:
        """A NUL in user_id/room_id/from/state is a 400 on both engines (PostgreSQL
        text cannot hold one: it was a 500 there)."""
        for path, name in (
            ("/audit", "user_id"),
            ("/audit", "room_id"),
            ("/audit/export", "user_id"),
            ("/rooms", "from"),
            ("/rooms", "state"),
        ):
            resp = self.call("GET", f"{path}?{name}=%40a%00b")
            self.assert_matrix_error(resp, 400, "M_INVALID_PARAM", f"{path} {name}")
        resp = self.call("GET", "/rooms/" + quote_room("!a\x00b:" + SERVER_NAME))
        self.assert_matrix_error(resp, 400, "M_INVALID_PARAM", "room id with NUL")

    def test_hold_reason_with_lone_surrogate_or_nul_is_kept(self) -> None:
        """A hold reason holding a lone surrogate ("\\ud800": valid JSON, not
        Unicode text) or a NUL was a 500 (both engines; NUL on PostgreSQL): now
        the hold is placed and its reason kept as given (escaped in storage,
        docs/audit.md), on both engines."""
        for index, raw in enumerate((b'{"reason": "a\\ud800"}', b'{"reason": "a\\u0000b"}')):
            room = f"!anytext{index}:{SERVER_NAME}"
            resp = self.call("PUT", f"/rooms/{quote_room(room)}/hold", raw=raw)
            self.assertEqual(resp.status, 200, resp.raw)
            hold = self.call("GET", f"/rooms/{quote_room(room)}").body["hold"]
            self.assertEqual(hold["reason"], json.loads(raw)["reason"])

    def test_hold_reason_is_bounded_like_leave_reasons(self) -> None:
        """A 5 MB hold reason is 413 M_TOO_LARGE (it went into the append-only
        audit log whole); 64 KiB, what leave reasons are kept to, is accepted."""
        resp = self.call("PUT", f"/rooms/{quote_room(ROOM)}/hold", {"reason": "x" * 5_000_000})
        self.assert_matrix_error(resp, 413, "M_TOO_LARGE", "5 MB")
        room = f"!bounded:{SERVER_NAME}"
        resp = self.call("PUT", f"/rooms/{quote_room(room)}/hold", {"reason": "é" * 32768})
        self.assertEqual(resp.status, 200, resp.raw[:200])
        hold = self.call("GET", f"/rooms/{quote_room(room)}").body["hold"]
        self.assertEqual(hold["reason"], "é" * 32768)
        self.assertEqual(self.call("DELETE", f"/rooms/{quote_room(room)}/hold").status, 200)

    # -- fuzzing -------------------------------------------------------------

    @staticmethod
    def _values() -> Any:
        return st.one_of(
            st.integers(min_value=-(10**30), max_value=10**30).map(str),
            st.text(max_size=40),
            st.binary(max_size=20).map(urllib.parse.quote_from_bytes),
            st.sampled_from(
                ["", HUGE, "-1", "0", "1000", "1001", "%00", "%FF", "forgotten", "held", ROOM]
            ),
        )

    def test_fuzz_query_parameters(self) -> None:
        """Every GET route with generated values for every parameter it reads
        (integers of any size, text, raw percent-encoded bytes): never a 5xx;
        every 4xx is a Matrix error; the export still ends in complete JSON lines."""
        paths = ["/audit", "/audit/export", "/rooms", "/rooms/" + quote_room(ROOM)]
        names = ["user_id", "room_id", "since", "until", "from", "limit", "state"]
        problems: list[str] = []

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            path=st.sampled_from(paths),
            params=st.dictionaries(st.sampled_from(names), self._values(), max_size=4),
        )
        def check(path: str, params: dict[str, str]) -> None:
            # A value with "%" keeps its escapes raw (bytes that are no UTF-8); what
            # else it holds is quoted, as no client sends control characters raw.
            query = "&".join(
                f"{name}={urllib.parse.quote(value, safe='%/' if '%' in value else '/')}"
                for name, value in params.items()
            )
            resp = self.call("GET", f"{path}?{query}")
            what = f"GET {path}?{query} -> {resp.status} {resp.raw[:120]!r}"
            if resp.status >= 500:
                problems.append(what)
            elif resp.status >= 400:
                if not (isinstance(resp.body, dict) and resp.errcode and "error" in resp.body):
                    problems.append("not a Matrix error: " + what)
            elif path.endswith("export"):
                for line in resp.raw.splitlines():
                    json.loads(line)

        check()
        self.assertEqual(problems, [])

    def test_fuzz_hold_bodies(self) -> None:
        """PUT …/hold with generated bodies (any JSON, reasons of any text
        including lone surrogates, NUL and oversized ones, and non-JSON bytes):
        never a 5xx, every 4xx a Matrix error, every hold created is in the
        audit log, and the audit chain still verifies afterwards."""
        problems: list[str] = []
        created: list[str] = []
        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(st.text(max_size=5), children, max_size=3)
            ),
            max_leaves=6,
        )
        reasons = st.one_of(
            st.text(max_size=50),
            st.text(st.characters(codec=None, categories=["Cs", "Cc", "Lo"]), max_size=10),
            st.sampled_from(["\ud800", "\x00", "x" * 70000, "é" * 40000]),
            json_values,
        )
        bodies = st.one_of(
            reasons.map(lambda r: json.dumps({"reason": r}).encode()),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.binary(max_size=30),
        )

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(body=bodies, index=st.integers(min_value=0, max_value=10**6))
        def check(body: bytes, index: int) -> None:
            room = f"!fuzz{index}:{SERVER_NAME}"
            resp = self.call("PUT", f"/rooms/{quote_room(room)}/hold", raw=body)
            what = f"PUT hold {body[:80]!r} -> {resp.status} {resp.raw[:120]!r}"
            if resp.status >= 500:
                problems.append(what)
            elif resp.status >= 400:
                if not (isinstance(resp.body, dict) and resp.errcode and "error" in resp.body):
                    problems.append("not a Matrix error: " + what)
            elif resp.body.get("created"):
                created.append(room)

        check()
        self.assertEqual(problems, [])
        held_in_audit = {
            e["room_id"]
            for e in self.call("GET", "/audit?limit=1000").body["entries"]
            if e["action"] == "hold"
        }
        self.assertTrue(created)
        self.assertEqual(set(created) - held_in_audit, set())
        self.assert_chain_verifies()
