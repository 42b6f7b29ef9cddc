"""The module in a worker deployment: redis, a main process and one generic worker.

The deployment (tests/integration/workers.py) runs on PostgreSQL, which Synapse
workers require: with ``MLF_TEST_DATABASE`` other than ``postgres`` the live
tests are skipped, saying so. With it, a missing PostgreSQL server,
``redis-server`` or Synapse's redis extra makes every live test fail with a
message naming what is missing.

Requests are sent where docs/workers.md's nginx rules route them:
:meth:`WorkerTests.via_proxy` applies those rules (first matching regex, as
nginx does for regex locations) with the doc's ports mapped to the live ones,
so the tests exercise the documented routing, not just the processes.
"""

import itertools
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from re import Pattern
from typing import Any, ClassVar

import attr
import yaml
from signedjson.key import read_signing_keys
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.audit.entry import verify_chain, verify_keys_from_signing_key
from tests.integration.workers import (
    DOC_MEDIA_PORT,
    DOC_PORTS,
    MAIN_INSTANCE,
    MEDIA_WORKER_NAME,
    WORKER_NAME,
    DeploymentTestCase,
    Ports,
    WorkerDeployment,
    main_fragment,
    media_worker_fragment,
    worker_fragment,
)
from tests.support.harness import (
    REPO_ROOT,
    SERVER_NAME,
    Response,
    SynapseProcess,
    User,
    every_kind_of_client_listener,
    free_port,
    quote_room,
    request,
    run_cli,
)

ADMIN = "/_synapse/client/leave_forget/v1/admin"
DOC_PATH = os.path.join(REPO_ROOT, "docs", "workers.md")
CLIENT_VERSIONS = ("api/v1", "r0", "v3", "unstable")
# The concurrent test: this many users, each leaving one of HAMMER_ROOMS rooms on
# the worker while forgetting one of HAMMER_ROOMS others on the main process.
HAMMER_USERS = 20
HAMMER_ROOMS = 5
# Between two forgets of one thread of the concurrent test, in seconds.
FORGET_PAUSE = 0.1
PURGE_TIMEOUT = 30.0

_unique = itertools.count(1)

# -- docs/workers.md ---------------------------------------------------------


def _doc_text() -> str:
    with open(DOC_PATH) as f:
        return f.read()


def doc_yaml_blocks() -> dict[str, Any]:
    """The doc's YAML blocks, keyed by the file named in each block's first comment line."""
    blocks: dict[str, Any] = {}
    for body in re.findall(r"```yaml\n(.*?)```", _doc_text(), re.S):
        first = body.splitlines()[0]
        match = re.match(r"#\s*(\S+\.yaml)\b", first)
        if match:
            blocks[match.group(1)] = yaml.safe_load(body)
    return blocks


def doc_routes() -> list[tuple[Pattern[str], int]]:
    """The doc's nginx regex locations, in order: (regex, port proxied to)."""
    routes: list[tuple[Pattern[str], int]] = []
    for block in re.findall(r"```nginx\n(.*?)```", _doc_text(), re.S):
        for regex, port in re.findall(
            r"location\s+~\s+(\S+)\s*\{[^}]*?proxy_pass\s+http://127\.0\.0\.1:(\d+);", block
        ):
            routes.append((re.compile(regex), int(port)))
    return routes


def doc_route(path: str) -> int | None:
    """Where nginx, configured as the doc says, sends path: the first matching regex.

    nginx matches locations against the decoded URI without the query string.
    """
    uri = urllib.parse.unquote(path.split("?", 1)[0])
    for regex, port in doc_routes():
        if regex.search(uri):
            return port
    return None


def contains(actual: Any, expected: Any) -> bool:
    """Whether actual has everything expected has: mappings key by key, lists element-wise
    (each expected element contained in some actual element), other values equal."""
    if isinstance(expected, Mapping):
        return isinstance(actual, Mapping) and all(
            k in actual and contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list) and expected:
        return isinstance(actual, list) and all(
            any(contains(a, e) for a in actual) for e in expected
        )
    return bool(actual == expected)


class WorkerDocTests(SynchronousTestCase):
    """docs/workers.md against the helper (no Synapse needed: runs on every database)."""

    def test_doc_shows_the_configuration_the_helper_writes(self) -> None:
        """The homeserver.yaml and worker1.yaml parts in docs/workers.md are exactly
        what the helper builds for the doc's ports, so the documented deployment is
        the tested one (WorkerTests checks that the processes run with these parts)."""
        blocks = doc_yaml_blocks()
        self.assertEqual(
            sorted(blocks), ["homeserver.yaml", f"{MEDIA_WORKER_NAME}.yaml", f"{WORKER_NAME}.yaml"]
        )
        self.assertEqual(blocks["homeserver.yaml"], main_fragment(DOC_PORTS))
        self.assertEqual(blocks[f"{WORKER_NAME}.yaml"], worker_fragment(DOC_PORTS))
        # The "Media" section's worker (tests/integration/test_media_workers.py runs it).
        self.assertEqual(blocks[f"{MEDIA_WORKER_NAME}.yaml"], media_worker_fragment(DOC_MEDIA_PORT))

    def test_doc_routes_leave_to_a_module_listener_and_forget_to_main(self) -> None:
        """With the doc's nginx rules, leave and forget under every client prefix, POST
        and PUT/{txnId}, reach a module listener: leave the worker's, forget the main
        process's. Leave is routed there although Synapse's usual worker rule for
        membership also matches it (the module's rules come first), other room
        paths still follow Synapse's worker routing, everything else goes to main."""
        room = quote_room("!r00m:test.local")
        for version in CLIENT_VERSIONS:
            base = f"/_matrix/client/{version}/rooms/{room}"
            for suffix in ("", "/txn1"):
                self.assertEqual(doc_route(f"{base}/leave{suffix}"), DOC_PORTS.worker_module)
                self.assertEqual(doc_route(f"{base}/forget{suffix}"), DOC_PORTS.main_module)
            self.assertEqual(doc_route(f"{base}/kick"), DOC_PORTS.worker_client, version)
        self.assertEqual(
            doc_route(f"/_matrix/client/v3/rooms/{room}/messages"), DOC_PORTS.main_client
        )
        self.assertEqual(
            doc_route("/_synapse/client/leave_forget/v1/admin/audit"), DOC_PORTS.main_client
        )


@attr.s(auto_attribs=True, frozen=True)
class Pair:
    """One user of the concurrent test, with a room to leave and one to forget."""

    user: User
    leave_room: str
    forget_room: str


class WorkerTests(DeploymentTestCase):
    """Leave, forget, the audit chain and retention across a main process and a worker."""

    MODE = "listener"
    MODULE_CONFIG = {
        "forget_rate_limit": None,
        "retention": {"period": "1s", "sweep_interval": "100ms"},
    }

    admin: ClassVar[User]
    owner: ClassVar[User]

    @classmethod
    def configure_deployment(cls, deployment: WorkerDeployment) -> None:
        """Changes to the deployment's configuration before it starts."""

    @classmethod
    def set_up_deployment(cls) -> None:
        cls.admin = cls.hs.register("admin", admin=True)
        cls.owner = cls.hs.register("owner")

    # -- helpers ------------------------------------------------------------

    def user(self, name: str) -> User:
        return self.hs.register(f"{name}{next(_unique)}")

    def live_port(self, doc_port: int) -> int:
        """The live port of the process listener that has doc_port in the doc."""
        live = self.deployment.ports
        for field in attr.fields(Ports):
            if getattr(DOC_PORTS, field.name) == doc_port:
                return int(getattr(live, field.name))
        raise AssertionError(f"port {doc_port} is not one of the doc's ports")

    def via_proxy(self, method: str, room_id: str, action: str, user: User, **kw: Any) -> Response:
        """Send .../rooms/{roomId}/{action} where docs/workers.md's nginx rules route it."""
        path = f"/_matrix/client/v3/rooms/{quote_room(room_id)}/{action}"
        doc_port = doc_route(path)
        assert doc_port is not None, path
        return request(
            self.live_port(doc_port), method, path, kw.pop("body", {}), token=user.access_token
        )

    def ok(self, resp: Response) -> None:
        self.assertEqual(resp.status, 200, resp.body)

    def join(self, user: User, room_id: str) -> None:
        self.ok(self.hs.membership(user, room_id, "join"))

    def public_room(self) -> str:
        """A public room created by the owner, who stays in it (so it is never purged)."""
        return self.hs.create_room(self.owner, preset="public_chat")

    def audit(self, **filters: str) -> list[dict[str, Any]]:
        """Every audit entry matching filters, in order, through the main's admin export."""
        query = urllib.parse.urlencode(filters)
        resp = self.hs.module("GET", f"{ADMIN}/audit/export?{query}", token=self.admin.access_token)
        self.assertEqual(resp.status, 200, resp.raw)
        return [json.loads(line) for line in resp.raw.decode().splitlines()]

    def room_detail(self, room_id: str) -> dict[str, Any]:
        resp = self.hs.module(
            "GET", f"{ADMIN}/rooms/{quote_room(room_id)}", token=self.admin.access_token
        )
        self.assertEqual(resp.status, 200, resp.body)
        return dict(resp.body)

    def forgotten(self, room_id: str, user: User) -> bool:
        members = {m["user_id"]: m for m in self.room_detail(room_id)["local_members"]}
        return bool(members[user.user_id]["forgotten"])

    def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Poll predicate every 50 ms; fail after PURGE_TIMEOUT s or if a process died."""
        deadline = time.monotonic() + PURGE_TIMEOUT
        while not predicate():
            for name, process in (("main", self.hs.process), (WORKER_NAME, self.worker.process)):
                if process is None or process.poll() is not None:
                    self.fail(f"Synapse {name} exited while waiting for {what}")
            if time.monotonic() > deadline:
                self.fail(f"timed out after {PURGE_TIMEOUT} s waiting for {what}")
            time.sleep(0.05)

    def assert_one_chain(self, entries: list[dict[str, Any]]) -> None:
        """seq runs 1..N with no gap, every prev_hash is its predecessor's hash, and
        the whole chain verifies with the homeserver's key."""
        self.assertEqual([e["seq"] for e in entries], list(range(1, len(entries) + 1)))
        for before, after in zip(entries[:-1], entries[1:], strict=True):
            self.assertEqual(after["prev_hash"], before["hash"], f"chain forks at {after['seq']}")
        with open(os.path.join(self.hs.workdir, "signing.key")) as f:
            (key,) = read_signing_keys(f)
        result = verify_chain(entries, SERVER_NAME, verify_keys_from_signing_key(key))
        self.assertTrue(result.ok, result)
        self.assertEqual(result.checked, len(entries))

    # -- tests --------------------------------------------------------------

    def test_processes_run_the_documented_configuration(self) -> None:
        """The main process and the worker run with the parts docs/workers.md shows
        (with live ports), and the worker loaded the module, set up its schema
        and, not running background tasks, did not schedule the retention sweep."""
        with open(self.hs.config_path) as f:
            homeserver = yaml.safe_load(f)
        with open(self.worker.config_path) as f:
            worker = yaml.safe_load(f)
        ports = self.deployment.ports
        self.assertTrue(contains(homeserver, main_fragment(ports)), homeserver)
        self.assertTrue(contains(worker, worker_fragment(ports)), worker)
        log = self.worker.log_text()
        self.assertIn("Loaded module <matrix_leave_forget.LeaveForgetModule", log)
        self.assertIn("matrix-leave-forget schema at version", log)
        self.assertRegex(log, r"Not running looping call <bound method RetentionSweeper\.sweep")

    def test_leave_on_the_worker_is_served_by_the_module(self) -> None:
        """Leave routed to the worker's module listener is served there: 200, the
        membership event Synapse persisted carries the reason, and the audit entry
        records instance worker1 and that event."""
        alice = self.user("alice")
        room = self.public_room()
        self.join(alice, room)
        resp = self.via_proxy("POST", room, "leave", alice, body={"reason": "via the worker"})
        self.assertEqual((resp.status, resp.body), (200, {}))
        event = self.hs.member_event(self.admin, room, alice.user_id)
        assert event is not None
        self.assertEqual(event["content"], {"membership": "leave", "reason": "via the worker"})
        (entry,) = self.audit(user_id=alice.user_id)
        self.assertEqual(
            {k: entry[k] for k in ("instance", "action", "room_id", "outcome", "reason")},
            {
                "instance": WORKER_NAME,
                "action": "leave",
                "room_id": room,
                "outcome": "ok",
                "reason": "via the worker",
            },
        )
        self.assertEqual(entry["event_id"], event["event_id"])
        self.assertEqual(entry["device_id"], alice.device_id)

    def test_worker_client_listener_leaves_natively(self) -> None:
        """A leave the worker's client listener serves with Synapse's own servlet
        (bypassing the module's endpoint) is still audited: the main process sees
        the event and records it (via client, no device). A leave the worker's
        module endpoint served just before stays one entry (via api)."""
        alice, bob = self.user("alice"), self.user("bob")
        room = self.public_room()
        self.join(alice, room)
        self.join(bob, room)
        self.ok(self.via_proxy("POST", room, "leave", alice))
        resp = self.worker.client(
            "POST", f"/_matrix/client/v3/rooms/{quote_room(room)}/leave", {}, token=bob.access_token
        )
        self.assertEqual(resp.status, 200, resp.body)
        self.wait_until(lambda: bool(self.audit(user_id=bob.user_id)), "bob's leave entry")
        (entry,) = self.audit(user_id=bob.user_id)
        event = self.hs.member_event(self.admin, room, bob.user_id)
        assert event is not None
        self.assertEqual(
            (entry["via"], entry["instance"], entry["event_id"], entry["device_id"]),
            ("client", MAIN_INSTANCE, event["event_id"], None),
        )
        (served,) = self.audit(user_id=alice.user_id)
        self.assertEqual((served["via"], served["instance"]), ("api", WORKER_NAME))

    def test_forget_on_the_worker_is_refused_and_main_serves_it(self) -> None:
        """Forget sent to the worker's module listener, POST or PUT/{txnId}, gets 404
        M_UNRECOGNIZED (as Synapse, which serves forget on the main process only)
        with an error saying to route forget to the main process; nothing is
        forgotten or recorded. Routed as the doc says, forget reaches the main
        process and is served there (audit entry instance master)."""
        carol = self.user("carol")
        room = self.public_room()
        self.join(carol, room)
        self.ok(self.via_proxy("POST", room, "leave", carol))
        forget = f"/_matrix/client/v3/rooms/{quote_room(room)}/forget"
        for method, path in (("POST", forget), ("PUT", forget + "/txn1")):
            resp = self.worker.module(method, path, {}, token=carol.access_token)
            self.assertEqual((resp.status, resp.errcode), (404, "M_UNRECOGNIZED"), method)
            self.assertIn("main process", resp.body["error"])
            self.assertIn("forget", resp.body["error"])
        self.assertFalse(self.forgotten(room, carol))
        self.assertEqual([e["action"] for e in self.audit(user_id=carol.user_id)], ["leave"])

        resp = self.via_proxy("POST", room, "forget", carol)
        self.assertEqual((resp.status, resp.body), (200, {}))
        self.assertTrue(self.forgotten(room, carol))
        entries = self.audit(user_id=carol.user_id)
        self.assertEqual(
            [(e["action"], e["instance"], e["outcome"]) for e in entries],
            [("leave", WORKER_NAME, "ok"), ("forget", MAIN_INSTANCE, "ok")],
        )

    def test_concurrent_appends_from_both_processes_form_one_chain(self) -> None:
        """20 leaves on the worker (20 users over 5 rooms) while 20 threads keep
        forgetting on the main process (each user a room it left; 5 rooms) until
        every leave has been answered, then once more: every request succeeds and
        gets exactly one audit entry, from the process that served it; the
        entries of the two processes interleave; and the whole log is one
        unbroken chain (seq 1..N, each prev_hash its predecessor's hash, every
        hash and signature valid), also for the offline CLI's verify."""
        with ThreadPoolExecutor(10) as pool:
            users = list(pool.map(lambda i: self.user(f"h{i}_"), range(HAMMER_USERS)))
            rooms = list(pool.map(lambda _: self.public_room(), range(2 * HAMMER_ROOMS)))
        pairs = [
            Pair(u, rooms[i % HAMMER_ROOMS], rooms[HAMMER_ROOMS + i % HAMMER_ROOMS])
            for i, u in enumerate(users)
        ]
        with ThreadPoolExecutor(10) as pool:
            joins = [
                pool.submit(self.join, p.user, room)
                for p in pairs
                for room in (p.leave_room, p.forget_room)
            ]
            for future in joins:
                future.result()
            for resp in pool.map(
                lambda p: self.via_proxy("POST", p.forget_room, "leave", p.user), pairs
            ):
                self.ok(resp)
        before = self.audit()[-1]["seq"]

        start = threading.Barrier(2 * len(pairs))
        leaves_done = threading.Event()
        pending_leaves = [len(pairs)]
        lock = threading.Lock()

        def leave(pair: Pair) -> list[Response]:
            start.wait(30)
            try:
                return [self.via_proxy("POST", pair.leave_room, "leave", pair.user)]
            finally:
                with lock:
                    pending_leaves[0] -= 1
                    if not pending_leaves[0]:
                        leaves_done.set()

        def forget(pair: Pair) -> list[Response]:
            # Forgetting a room one has left again is answered 200 and recorded
            # again, so each thread keeps the main process appending until the
            # last leave is answered, and once more after. The pause (cut short
            # when the leaves are done) keeps the main from being so busy with
            # forgets that the leaves, whose events the main persists, crawl.
            start.wait(30)
            answers = [self.via_proxy("POST", pair.forget_room, "forget", pair.user)]
            while not leaves_done.wait(FORGET_PAUSE) and len(answers) < 500:
                answers.append(self.via_proxy("POST", pair.forget_room, "forget", pair.user))
            answers.append(self.via_proxy("POST", pair.forget_room, "forget", pair.user))
            return answers

        with ThreadPoolExecutor(2 * len(pairs)) as pool:
            leaves = [pool.submit(leave, p) for p in pairs]
            forgets = [pool.submit(forget, p) for p in pairs]
            answers = {
                "leave": [r for f in leaves for r in f.result(60)],
                "forget": [r for f in forgets for r in f.result(60)],
            }
        for action, responses in answers.items():
            for resp in responses:
                self.assertEqual((resp.status, resp.body), (200, {}), action)

        entries = self.audit()
        self.assert_one_chain(entries)
        hammered = [e for e in entries if e["seq"] > before]
        missing = "an answered request has no audit entry (look for 'Could not record')"
        self.assertEqual(
            sorted((e["user_id"], e["room_id"]) for e in hammered if e["action"] == "leave"),
            sorted((p.user.user_id, p.leave_room) for p in pairs),
            missing,
        )
        self.assertEqual(
            len([e for e in hammered if e["action"] == "forget"]), len(answers["forget"]), missing
        )
        for entry in hammered:
            instance = WORKER_NAME if entry["action"] == "leave" else MAIN_INSTANCE
            self.assertEqual((entry["instance"], entry["outcome"]), (instance, "ok"), entry)
        # The two processes really appended at the same time: the worker's
        # entries are not one block before or after the main's.
        order = "".join("w" if e["instance"] == WORKER_NAME else "m" for e in hammered)
        self.assertGreater(len(re.findall("w+", order)), 1, f"appends did not interleave: {order}")
        for log in (self.hs.log_text(), self.worker.log_text()):
            self.assertNotIn("Could not record", log)

        verify = run_cli(self.hs.config_path, "verify", timeout=60)
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)

    def test_retention_sweeps_run_on_the_main_process_only(self) -> None:
        """A room forgotten by every local user (one left on the worker, one on the
        main process) is purged once the 1 s period is over, and only the main
        process sweeps: every purge entry in the log is instance master, the
        main's log has "Retention sweep" lines and the worker's has none."""
        dave, erin = self.user("dave"), self.user("erin")
        room = self.hs.create_room(dave, preset="public_chat")
        self.join(erin, room)
        self.ok(self.via_proxy("POST", room, "leave", dave))
        self.ok(self.hs.module(
            "POST", f"/_matrix/client/v3/rooms/{quote_room(room)}/leave", {},
            token=erin.access_token,
        ))  # fmt: skip
        for user in (dave, erin):
            self.ok(self.via_proxy("POST", room, "forget", user))
        self.assertEqual(self.room_detail(room)["retention"]["state"], "forgotten")

        self.wait_until(
            lambda: (self.room_detail(room)["retention"] or {}).get("state") == "purged",
            f"{room} to be purged",
        )
        purges = [e for e in self.audit() if e["action"] == "purge"]
        self.assertEqual(
            [(e["outcome"], e["instance"]) for e in purges if e["room_id"] == room],
            [("started", MAIN_INSTANCE), ("purged", MAIN_INSTANCE)],
        )
        self.assertEqual({e["instance"] for e in purges}, {MAIN_INSTANCE})
        self.assertIn("Retention sweep", self.hs.log_text())
        self.assertNotIn("Retention sweep", self.worker.log_text())


class InterceptWorkerTests(DeploymentTestCase):
    """mount: intercept on a generic worker, which records no listening ports."""

    MODE = "intercept"
    MODULE_CONFIG = {"forget_rate_limit": None}

    def test_worker_intercepts_leave_on_its_client_listener(self) -> None:
        """The start-up check finds the worker's listeners (a worker keeps no list
        of its ports), so intercept mode starts there and leave sent to the
        worker's ordinary client listener is served, and audited, by the module."""
        self.assertIn("Intercepting leave and forget on 1 client listener", self.worker.log_text())
        admin = self.hs.register("admin", admin=True)
        user = self.hs.register("leaver")
        room = self.hs.create_room(user)
        resp = self.worker.client(
            "POST",
            f"/_matrix/client/v3/rooms/{quote_room(room)}/leave",
            {},
            token=user.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        entries = self.hs.client(
            "GET", "/_synapse/client/leave_forget/v1/admin/audit", token=admin.access_token
        ).body["entries"]
        self.assertEqual(
            [(e["action"], e["instance"], e["user_id"]) for e in entries],
            [("leave", "worker1", user.user_id)],
        )


class InterceptEveryWorkerListenerTests(DeploymentTestCase):
    """mount: intercept on a generic worker with TLS, unix-socket and extra client
    listeners, and on a main process with a TLS listener."""

    MODE = "intercept"
    MODULE_CONFIG = {"forget_rate_limit": None}
    extra: ClassVar[dict[str, Any]]
    main_tls_port: ClassVar[int]

    @classmethod
    def configure_deployment(cls, deployment: WorkerDeployment) -> None:
        cls.extra = every_kind_of_client_listener(deployment.workdir)
        deployment.worker.extra_config = {"listeners": cls.extra["listeners"]}
        # Synapse loads the certificate only when the shared homeserver.yaml has
        # a TLS listener (as a main process terminating federation TLS does).
        main = deployment.main
        cls.main_tls_port = free_port()
        main_tls = dict(cls.extra["listeners"][0], port=cls.main_tls_port)
        main.reconfigure(
            extra_config={
                **main.extra_config,
                **cls.extra["tls"],
                "listeners": SynapseProcess.homeserver_config(main)["listeners"] + [main_tls],
            }
        )

    def test_worker_intercepts_on_every_listener(self) -> None:
        """A worker finds its TLS and unix-socket listeners among the reactor's
        (it keeps no list of ports), so its start-up check counts all four client
        listeners and leave over each of them is served, and audited, by the module."""
        self.assertIn("Intercepting leave and forget on 4 client listener", self.worker.log_text())
        self.assertIn("Intercepting leave and forget on 2 client listener", self.hs.log_text())
        admin = self.hs.register("admin", admin=True)
        connections: list[dict[str, Any]] = [
            {"port": self.main_tls_port, "tls": True},
            {"port": self.extra["ports"]["tls"], "tls": True},
            {"port": self.extra["ports"]["plain"]},
            {"port": 0, "unix_socket": self.extra["socket"]},
        ]
        for connection in connections:
            room = self.hs.create_room(admin)
            resp = request(
                path=f"/_matrix/client/v3/rooms/{quote_room(room)}/leave",
                method="POST",
                body={},
                token=admin.access_token,
                **connection,
            )
            self.assertEqual(resp.status, 200, (connection, resp.body))
            entries = self.hs.client(
                "GET",
                f"/_synapse/client/leave_forget/v1/admin/audit?room_id={quote_room(room)}",
                token=admin.access_token,
            ).body["entries"]
            instance = MAIN_INSTANCE if connection["port"] == self.main_tls_port else WORKER_NAME
            self.assertEqual(
                [(e["action"], e["instance"]) for e in entries], [("leave", instance)], connection
            )
