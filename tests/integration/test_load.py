"""About 1,000 concurrent leave and forget requests from 200 users.

A real Synapse (SQLite, or PostgreSQL with ``MLF_TEST_DATABASE=postgres``) with
the module, ``forget_rate_limit: null`` and the harness's relaxed Synapse
limits; 200 users, each joined to one of 20 public rooms of an admin. A pool of
48 client threads then sends three waves through the module, each wave shuffled
(with a fixed seed) so that users, rooms, leave and forget, POST and PUT, fresh
and keep-alive connections interleave:

1. per user: forget of their room while still joined (refused, 400
   ``M_UNKNOWN``) and leave of a room they never joined (refused, 403
   ``M_FORBIDDEN``);
2. per user: leave of their room with a reason (POST or PUT), and forget of a
   room id the server does not know (200, outcome ``noop``); one user in four
   repeats their PUT leave (same txnId) concurrently;
3. per user: PUT forget of their room; one user in four repeats it.

1,100 requests, 1,000 of them served (the 100 repeats are transaction replays,
which must add nothing). The whole audit log is then read through the admin
API (paged with from/limit) and compared with what was sent: one entry per
served request, none lost, none doubled, every field right, ``seq`` contiguous
from 1, and the hash chain and every signature valid, checked in-process and by
the offline CLI.

Setup (registering 200 users, 200 joins) costs about as much as the load itself,
so each mount mode runs it once, in a Synapse of its own.
"""

import collections
import http.client
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

import attr
from signedjson.key import read_signing_keys

from matrix_leave_forget.audit.entry import verify_chain, verify_keys_from_signing_key
from tests.integration.base import SynapseTestCase
from tests.support.harness import (
    REPO_ROOT,
    SERVER_NAME,
    Response,
    SynapseProcess,
    User,
    quote_room,
    request,
    run_cli,
)

ADMIN_AUDIT = "/_synapse/client/leave_forget/v1/admin/audit"

USERS = 200
ROOMS = 20
WORKERS = 48
PAGE = 300  # not a divisor of 1,000: the last page is a short one
# No single request may take longer than this, and no wave longer than WAVE_TIMEOUT.
REQUEST_TIMEOUT = 60.0
WAVE_TIMEOUT = 120.0

LOAD_CONFIG: dict[str, Any] = {
    # 200 registrations: the default bcrypt cost would dominate the run time.
    "bcrypt_rounds": 4,
}


@attr.s(auto_attribs=True)
class Call:
    """One request of the load, what it must come back with and what it must leave in the audit.

    ``outcome`` is the audit outcome expected (None: the request must add no entry).
    """

    user: User
    method: str
    action: str
    room_id: str
    body: dict[str, Any]
    status: int
    errcode: str | None
    outcome: str | None
    txn_id: str | None = None
    keep_alive: bool = False
    response: Response | None = None
    failure: str | None = None

    @property
    def path(self) -> str:
        path = f"/_matrix/client/v3/rooms/{quote_room(self.room_id)}/{self.action}"
        return path + (f"/{self.txn_id}" if self.txn_id else "")

    def describe(self) -> str:
        got = (
            self.failure
            if self.response is None
            else f"{self.response.status} {self.response.raw[:200]!r}"
        )
        return f"{self.method} {self.action} {self.user.user_id} {self.room_id} -> {got}"


class _Client:
    """Sends calls from a thread pool, half on fresh connections, half on keep-alive ones.

    Keep-alive connections are per thread. Nothing is ever retried: a request that
    fails at the connection level is a failure of the test, not something to hide.
    """

    def __init__(self, port: int) -> None:
        self._port = port
        self._local = threading.local()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._connections: list[http.client.HTTPConnection] = []
        self.peak_in_flight = 0

    def close(self) -> None:
        for conn in self._connections:
            conn.close()

    def send(self, call: Call) -> None:
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            if call.keep_alive:
                call.response = self._keep_alive(call)
            else:
                call.response = request(
                    self._port,
                    call.method,
                    call.path,
                    call.body,
                    token=call.user.access_token,
                    timeout=REQUEST_TIMEOUT,
                )
        except Exception as exc:
            call.failure = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._in_flight -= 1

    def _keep_alive(self, call: Call) -> Response:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=REQUEST_TIMEOUT)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        try:
            conn.request(
                call.method,
                call.path,
                body=json.dumps(call.body).encode(),
                headers={
                    "Authorization": f"Bearer {call.user.access_token}",
                    "Content-Type": "application/json",
                },
            )
            resp = conn.getresponse()
            raw = resp.read()
        except Exception:
            conn.close()
            self._local.conn = None
            raise
        if resp.will_close:
            conn.close()
            self._local.conn = None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        return Response(resp.status, body, raw, {k.lower(): v for k, v in resp.getheaders()})


def run_pool(
    jobs: list[Callable[[], Any]], workers: int = WORKERS, timeout: float = WAVE_TIMEOUT
) -> list[Any]:
    """Run jobs on a thread pool and return their results in order (exceptions propagate)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        deadline = time.monotonic() + timeout
        return [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]


if TYPE_CHECKING:
    _MixinBase = SynapseTestCase
else:
    _MixinBase = object


class LoadScenario(_MixinBase):
    """The load run, by one concrete class per mount mode."""

    MODULE_CONFIG: ClassVar[dict[str, Any]] = {"forget_rate_limit": None}
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = LOAD_CONFIG

    @classmethod
    def setUpClass(cls) -> None:
        # As SynapseTestCase, but in a work directory with a prefix of its own:
        # the CLI run at the end reads it (homeserver.yaml, key, database), and
        # a concurrent clean-up of stale /tmp/mlf-synapse-* directories has been
        # seen to pull it away mid-run.
        if "hs" in cls.__dict__:
            return
        cls.hs = SynapseProcess(
            {"mount": cls.MODE, **cls.MODULE_CONFIG},
            dict(cls.EXTRA_CONFIG),
            workdir=tempfile.mkdtemp(prefix="mlf-load-"),
        )
        try:
            cls.hs.start()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if "hs" in cls.__dict__:
            workdir = cls.hs.workdir
            cls.hs.cleanup()
            del cls.hs
            if not os.environ.get("MLF_KEEP_WORKDIR"):
                shutil.rmtree(workdir, ignore_errors=True)

    def test_concurrent_leave_forget_audit_is_complete_and_verifies(self) -> None:
        """1,100 leave/forget requests (1,000 served, 100 txnId replays) from
        200 users, sent 48 at a time through the module: no 5xx, every answer
        the expected 200 or Matrix error, and the audit log holds exactly one
        entry per served request (none lost, none duplicated, a replayed PUT
        adds none) with the right user, room, action, outcome, reason, device
        and a distinct leave event, seq 1..N without gaps, and a chain whose
        hashes and signatures verify, both in-process and with the offline
        CLI."""
        hs = self.hs
        started = time.monotonic()
        with open(os.path.join(hs.workdir, "signing.key")) as f:
            signing_key = read_signing_keys(f)[0]
        admin = hs.register("loadadmin", admin=True)
        users: list[User] = run_pool(
            [lambda i=i: hs.register(f"load{i}") for i in range(USERS)], workers=16
        )
        rooms: list[str] = run_pool(
            [lambda: hs.create_room(admin, preset="public_chat") for _ in range(ROOMS + 1)],
            workers=8,
        )
        # rooms[ROOMS] is joined by nobody but the admin: leaving it is refused.
        stranger_room = rooms[ROOMS]

        def room(i: int) -> str:
            return rooms[i % ROOMS]

        join_answers = run_pool(
            [lambda i=i, u=u: hs.membership(u, room(i), "join") for i, u in enumerate(users)]
        )
        for user, resp in zip(users, join_answers, strict=True):
            self.assertEqual(resp.status, 200, f"setup: {user.user_id} joining: {resp.raw[:200]!r}")
        setup_seconds = time.monotonic() - started

        rng = random.Random(20240601)  # a fixed interleaving, for reproducibility

        def wave(calls: list[Call]) -> list[Call]:
            rng.shuffle(calls)
            for index, call in enumerate(calls):
                call.keep_alive = index % 2 == 1
            return calls

        def leave(i: int, u: User, replay: bool = False) -> Call:
            """Leave of the user's room with a reason: POST for even users, PUT for odd ones."""
            body = {"reason": f"load test {i} \u2708"}
            if i % 2 == 0:
                return Call(u, "POST", "leave", room(i), body, 200, None, "ok")
            outcome = None if replay else "ok"
            return Call(u, "PUT", "leave", room(i), body, 200, None, outcome, txn_id=f"l{i}")

        def forget(i: int, u: User, replay: bool = False) -> Call:
            outcome = None if replay else "ok"
            return Call(u, "PUT", "forget", room(i), {}, 200, None, outcome, txn_id=f"f{i}")

        waves = [
            wave(
                [
                    c
                    for i, u in enumerate(users)
                    for c in (
                        # Still joined: refused, and recorded as refused.
                        Call(u, "POST", "forget", room(i), {}, 400, "M_UNKNOWN", "M_UNKNOWN"),
                        Call(
                            u, "POST", "leave", stranger_room, {}, 403, "M_FORBIDDEN", "M_FORBIDDEN"
                        ),
                    )
                ]
            ),
            wave(
                [
                    c
                    for i, u in enumerate(users)
                    for c in (
                        leave(i, u),
                        # A room the user never had a membership in: 200, outcome noop.
                        Call(
                            u, "POST", "forget", f"!unknown{i}:{SERVER_NAME}", {}, 200, None, "noop"
                        ),
                    )
                ]
                # The same PUT (same txnId) again: the first answer, no second entry.
                + [leave(i, u, replay=True) for i, u in enumerate(users) if i % 4 == 1]
            ),
            wave(
                [forget(i, u) for i, u in enumerate(users)]
                + [forget(i, u, replay=True) for i, u in enumerate(users) if i % 4 == 0]
            ),
        ]

        client = _Client(self.module_port)
        self.addCleanup(client.close)
        load_started = time.monotonic()
        for calls in waves:
            run_pool([lambda c=c: client.send(c) for c in calls])
        load_seconds = time.monotonic() - load_started
        sent = [c for calls in waves for c in calls]

        # -- every answer ------------------------------------------------------
        failures = [c.describe() for c in sent if c.response is None]
        self.assertEqual(failures, [], "requests that got no HTTP answer")
        server_errors = [c.describe() for c in sent if c.response and c.response.status >= 500]
        self.assertEqual(server_errors, [], "5xx answers")
        for call in sent:
            assert call.response is not None
            if call.response.status != 200:
                self.assertIsInstance(call.response.errcode, str, call.describe())
                self.assertIsInstance(call.response.body.get("error"), str, call.describe())
            else:
                self.assertEqual(call.response.body, {}, call.describe())
        unexpected = [
            c.describe()
            for c in sent
            if c.response and (c.response.status, c.response.errcode) != (c.status, c.errcode)
        ]
        self.assertEqual(unexpected, [], "answers other than expected")
        self.assertGreaterEqual(client.peak_in_flight, WORKERS // 2, "the load was not concurrent")

        # -- the audit log, as served -----------------------------------------
        entries = self.whole_audit_log(admin, max_pages=len(sent) // PAGE + 3)
        served = [c for c in sent if c.outcome is not None]
        self.assertEqual([e["seq"] for e in entries], list(range(1, len(entries) + 1)))
        self.assertEqual(len(entries), len(served), "one audit entry per served request")

        def key(user_id: str, room_id: str, action: str, outcome: str) -> tuple[str, ...]:
            return (user_id, room_id, action, outcome)

        expected: Counter[tuple[str, ...]] = collections.Counter(
            key(c.user.user_id, c.room_id, c.action, c.outcome) for c in served if c.outcome
        )
        logged: Counter[tuple[str, ...]] = collections.Counter(
            key(e["user_id"], e["room_id"], e["action"], e["outcome"]) for e in entries
        )
        self.assertEqual(expected - logged, collections.Counter(), "lost audit entries")
        self.assertEqual(logged - expected, collections.Counter(), "extra audit entries")
        self.assertEqual(
            {k[:3] for k in logged if k[3] in ("ok", "noop")},
            {
                (c.user.user_id, c.room_id, c.action)
                for c in sent
                if c.response and c.response.status == 200
            },
            "successful (user, room, action) in the audit vs. answered 200",
        )

        devices = {u.user_id: u.device_id for u in users}
        reasons = {
            (c.user.user_id, c.room_id): c.body.get("reason") for c in served if c.action == "leave"
        }
        leave_events = []
        for entry in entries:
            self.assertEqual(entry["origin"], SERVER_NAME)
            self.assertEqual(entry["device_id"], devices[entry["user_id"]], entry)
            if entry["action"] == "leave":
                self.assertEqual(entry["reason"], reasons[entry["user_id"], entry["room_id"]])
            if entry["action"] == "leave" and entry["outcome"] == "ok":
                self.assertTrue(entry["event_id"], entry)
                leave_events.append(entry["event_id"])
            else:
                self.assertIsNone(entry["event_id"], entry)
        self.assertEqual(len(leave_events), USERS)
        self.assertEqual(len(set(leave_events)), len(leave_events), "a leave event twice")

        # -- the chain -----------------------------------------------------------
        result = verify_chain(entries, SERVER_NAME, verify_keys_from_signing_key(signing_key))
        self.assertTrue(result.ok, f"chain broken at {result.bad_seq}: {result.problem}")
        self.assertEqual(result.checked, len(served))
        self.assertEqual(result.head_hash, entries[-1]["hash"])

        cli = run_cli(hs.config_path, "--json", "verify", cwd=REPO_ROOT)
        self.assertEqual(cli.returncode, 0, cli.stdout + cli.stderr)
        report = json.loads(cli.stdout)
        self.assertEqual(
            (report["ok"], report["checked"], report["head_hash"]),
            (True, len(served), entries[-1]["hash"]),
        )

        self.assertEqual(request(self.module_port, "GET", "/health").status, 200)
        sys.stderr.write(
            f"\n[load {self.MODE}/{hs.database}] setup {setup_seconds:.1f}s; {len(sent)} requests "
            f"in {load_seconds:.1f}s ({len(sent) / load_seconds:.0f}/s), peak "
            f"{client.peak_in_flight} in flight; {len(entries)} audit entries\n"
        )

    def whole_audit_log(self, admin: User, max_pages: int) -> list[dict[str, Any]]:
        """Every audit entry, paging through the admin API with from/limit."""
        entries: list[dict[str, Any]] = []
        after = 0
        for _ in range(max_pages):
            resp = request(
                self.hs.client_port,
                "GET",
                f"{ADMIN_AUDIT}?from={after}&limit={PAGE}",
                token=admin.access_token,
            )
            self.assertEqual(resp.status, 200, resp.raw[:300])
            page = resp.body["entries"]
            entries.extend(page)
            if "next_from" not in resp.body:
                return entries
            self.assertEqual(resp.body["next_from"], page[-1]["seq"])
            after = resp.body["next_from"]
        self.fail(f"the audit log did not end within {max_pages} pages")


class ListenerLoadTests(LoadScenario, SynapseTestCase):
    """The load through the module's own listener (``mount: listener``)."""

    MODE = "listener"


class InterceptLoadTests(LoadScenario, SynapseTestCase):
    """The load through Synapse's client listener (``mount: intercept``)."""

    MODE = "intercept"
