"""The two mount modes: what each serves where, and intercept's start-up check."""

from typing import Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.base import SynapseTestCase
from tests.support.harness import (
    Response,
    SynapseProcess,
    User,
    every_kind_of_client_listener,
    free_port,
    quote_room,
    request,
    wait_until,
)

OUR_MODULE = "matrix_leave_forget.LeaveForgetModule"
OTHER_MODULE = "tests.integration.extra_module.PathClaimingModule"
ADMIN_AUDIT = "/_synapse/client/leave_forget/v1/admin/audit"


def _modules(order: list[str], mount: str = "intercept") -> list[dict[str, Any]]:
    configs = {
        OUR_MODULE: {"mount": mount},
        OTHER_MODULE: {"path": "/_matrix/custom"},
    }
    return [{"module": name, "config": configs[name]} for name in order]


class _ServerPerTest(SynchronousTestCase):
    """Each test starts its own Synapse: these tests are about start-up."""

    def start(
        self, extra: dict[str, Any], module_config: dict[str, Any] | None = None
    ) -> SynapseProcess:
        hs = SynapseProcess(module_config, extra)
        self.addCleanup(hs.cleanup)
        hs.start()
        return hs

    def start_with_listeners(
        self, module_config: dict[str, Any], ports_by_name: dict[str, int]
    ) -> SynapseProcess:
        """Start Synapse with, besides the harness's listeners, one plain HTTP
        listener per entry serving only that named resource."""
        hs = SynapseProcess(module_config)
        self.addCleanup(hs.cleanup)
        listeners = hs.homeserver_config()["listeners"] + [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "resources": [{"names": [name]}],
            }
            for name, port in ports_by_name.items()
        ]
        hs.reconfigure(extra_config={"listeners": listeners})
        hs.start()
        return hs

    @staticmethod
    def leave_on(port: int, room_id: str, user: User) -> Response:
        return request(
            port,
            "POST",
            f"/_matrix/client/v3/rooms/{quote_room(room_id)}/leave",
            {},
            token=user.access_token,
        )

    def audit_actions(self, hs: SynapseProcess, admin_token: str) -> list[str]:
        resp = hs.client("GET", ADMIN_AUDIT, token=admin_token)
        self.assertEqual(resp.status, 200, resp.body)
        return [e["action"] for e in resp.body["entries"]]


class InterceptTests(_ServerPerTest):
    def test_each_listener_keeps_its_own_resources(self) -> None:
        """Intercept mode gives every listener its own /_matrix node: a listener
        with resources: [] still serves neither the client nor the federation
        API, while the client listener serves both and routes leave through the
        module (an audit entry appears)."""
        hs = self.start({}, {"mount": "intercept"})
        admin = hs.register("admin", admin=True)
        room = hs.create_room(admin)
        resp = hs.client(
            "POST",
            f"/_matrix/client/v3/rooms/{quote_room(room)}/leave",
            {},
            token=admin.access_token,
        )
        self.assertEqual(resp.status, 200)
        self.assertEqual(self.audit_actions(hs, admin.access_token), ["leave"])
        self.assertEqual(hs.client("GET", "/_matrix/client/versions").status, 200)
        self.assertEqual(hs.client("GET", "/_matrix/federation/v1/version").status, 200)
        for path in ("/_matrix/client/versions", "/_matrix/federation/v1/version"):
            resp = hs.module("GET", path)
            self.assertEqual((resp.status, resp.errcode), (404, "M_UNRECOGNIZED"), path)

    def test_federation_only_listener_gets_no_client_api(self) -> None:
        """A federation-only listener must not start serving client leave once
        /_matrix is claimed by the module."""
        fed_port = free_port()
        hs = self.start_with_listeners({"mount": "intercept"}, {"federation": fed_port})
        admin = hs.register("admin", admin=True)
        resp = self.leave_on(fed_port, hs.create_room(admin), admin)
        self.assertEqual((resp.status, resp.errcode), (404, "M_UNRECOGNIZED"))
        self.assertEqual(request(fed_port, "GET", "/_matrix/federation/v1/version").status, 200)
        self.assertEqual(self.audit_actions(hs, admin.access_token), [])

    def test_module_listed_before_still_served(self) -> None:
        """Another module's resource under /_matrix, listed before ours, is
        handed to our node and keeps working; leave is still intercepted."""
        hs = self.start({"modules": _modules([OTHER_MODULE, OUR_MODULE])})
        resp = hs.client("GET", "/_matrix/custom")
        self.assertEqual((resp.status, resp.body), (200, {"hello": "from another module"}))
        admin = hs.register("admin", admin=True)
        room = hs.create_room(admin)
        resp = hs.client(
            "POST",
            f"/_matrix/client/v3/rooms/{quote_room(room)}/leave",
            {},
            token=admin.access_token,
        )
        self.assertEqual(resp.status, 200)
        self.assertEqual(self.audit_actions(hs, admin.access_token), ["leave"])

    def test_start_fails_loudly_when_interception_breaks(self) -> None:
        """A resource tree the module cannot route (another module registering
        under /_matrix after ours) stops Synapse at start-up with a message that
        says why and what to do, instead of silently serving leave natively."""
        hs = SynapseProcess(None, {"modules": _modules([OUR_MODULE, OTHER_MODULE])})
        self.addCleanup(hs.cleanup)
        try:
            hs.start()
        except RuntimeError:
            pass  # exited before /health answered
        # /health may answer in the instant before the check runs; the process
        # must exit on its own all the same.
        self.assertEqual(hs.wait_for_exit(30), 1)
        message = hs.tail_logs()
        self.assertIn("mount: intercept is not in place", message)
        self.assertIn("custom", message)


class EveryListenerTests(SynapseTestCase):
    """mount: intercept beside every kind of listener Synapse can have.

    One Synapse with the harness's listeners (a client listener with
    x_forwarded, a resources: [] listener, metrics) plus a TLS listener, a
    second plain client listener and a unix-socket listener.
    """

    MODE = "intercept"
    extra: ClassVar[dict[str, Any]]
    admin: ClassVar[User]

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        hs = SynapseProcess({"mount": "intercept"})
        extra = every_kind_of_client_listener(hs.workdir)
        hs.reconfigure(
            extra_config={
                "listeners": hs.homeserver_config()["listeners"] + extra["listeners"],
                **extra["tls"],
            }
        )
        try:
            hs.start()
            cls.admin = hs.register("admin", admin=True)
        except Exception:
            hs.cleanup()
            raise
        cls.hs, cls.extra = hs, extra

    def leave_and_audit(self, port: int = 0, **connection: Any) -> None:
        """Leave a fresh room through the given connection; the module must audit it."""
        room = self.hs.create_room(self.admin)
        path = f"/_matrix/client/v3/rooms/{quote_room(room)}/leave"
        resp = request(port, "POST", path, {}, token=self.admin.access_token, **connection)
        self.assertEqual(resp.status, 200, resp.body)
        entries = self.hs.client(
            "GET", f"{ADMIN_AUDIT}?room_id={quote_room(room)}", token=self.admin.access_token
        ).body["entries"]
        self.assertEqual([(e["action"], e["outcome"]) for e in entries], [("leave", "ok")])
        # Everything else on that listener is still Synapse's own.
        resp = request(port, "GET", "/_matrix/client/versions", **connection)
        self.assertEqual(resp.status, 200, resp.body)

    def test_start_up_check_counts_every_client_listener(self) -> None:
        """The start-up check finds all four client listeners, TLS and unix socket
        included (it used to find none behind TLS and stop Synapse)."""
        self.assertIn("Intercepting leave and forget on 4 client listener(s)", self.hs.log_text())

    def test_tls_listener(self) -> None:
        """Leave over HTTPS to a tls: true listener is served and audited by the module."""
        self.leave_and_audit(port=self.extra["ports"]["tls"], tls=True)
        resp = request(
            self.extra["ports"]["tls"], "GET", "/_matrix/federation/v1/version", tls=True
        )
        self.assertEqual(resp.status, 200, resp.body)

    def test_unix_socket_listener(self) -> None:
        """Leave over a unix-socket (path:) listener is served and audited by the module."""
        self.leave_and_audit(unix_socket=self.extra["socket"])

    def test_second_plain_client_listener(self) -> None:
        """A second client listener (x_forwarded off) intercepts as well."""
        self.leave_and_audit(port=self.extra["ports"]["plain"])

    def test_x_forwarded_listener(self) -> None:
        """The harness's x_forwarded client listener, with a forwarded client
        address and scheme as a proxy sends them, intercepts leave."""
        self.leave_and_audit(
            port=self.hs.client_port,
            headers={"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"},
        )


class InterceptRefusalTests(_ServerPerTest):
    def test_start_fails_beside_tls_and_unix_listeners_when_interception_breaks(self) -> None:
        """With TLS and unix-socket listeners found, the start-up check still
        refuses to run when interception is not in place (a module registering
        under /_matrix after ours)."""
        hs = SynapseProcess(None, {"modules": _modules([OUR_MODULE, OTHER_MODULE])})
        self.addCleanup(hs.cleanup)
        extra = every_kind_of_client_listener(hs.workdir)
        hs.reconfigure(
            extra_config={
                **hs.extra_config,
                "listeners": hs.homeserver_config()["listeners"] + extra["listeners"],
                **extra["tls"],
            }
        )
        try:
            hs.start()
        except RuntimeError:
            pass  # exited before /health answered
        self.assertEqual(hs.wait_for_exit(30), 1)
        message = hs.tail_logs()
        self.assertIn("mount: intercept is not in place", message)
        self.assertIn("custom", message)


class ListenerTests(_ServerPerTest):
    def test_served_under_every_client_version_on_the_module_listener(self) -> None:
        """In listener mode the module answers leave under api/v1, r0, v3 and
        unstable, the four prefixes Synapse itself serves leave under, so no
        client path bypasses the audit once the proxy routes them."""
        hs = self.start({}, {"mount": "listener"})
        admin = hs.register("admin", admin=True)
        for version in ("api/v1", "r0", "v3", "unstable"):
            room = hs.create_room(admin)
            resp = hs.module(
                "POST",
                f"/_matrix/client/{version}/rooms/{quote_room(room)}/leave",
                {},
                token=admin.access_token,
            )
            self.assertEqual(resp.status, 200, (version, resp.body))
        self.assertEqual(self.audit_actions(hs, admin.access_token), ["leave"] * 4)

    def test_client_listener_stays_native(self) -> None:
        """The fact the deployment advice rests on: on a listener that serves
        `client`, leave is Synapse's own. The module only observes the event
        afterwards (an entry with via `client`, not `api`: no device, and a
        refused request would leave no trace), which is why the reverse proxy
        must route leave and forget to the module's listener."""
        hs = self.start({}, {"mount": "listener"})
        admin = hs.register("admin", admin=True)
        room = hs.create_room(admin)
        resp = hs.client(
            "POST",
            f"/_matrix/client/v3/rooms/{quote_room(room)}/leave",
            {},
            token=admin.access_token,
        )
        self.assertEqual(resp.status, 200)

        def observed() -> list[dict[str, Any]]:
            resp = hs.client("GET", ADMIN_AUDIT, token=admin.access_token)
            self.assertEqual(resp.status, 200, resp.body)
            return list(resp.body["entries"])

        entries = wait_until(observed, what="the observed native leave")
        self.assertEqual([(e["action"], e.get("via")) for e in entries], [("leave", "client")])
        self.assertIsNone(entries[0].get("device_id"))

    def test_federation_and_replication_listeners_serve_the_module_too(self) -> None:
        """The fact docs/mounting.md warns about: Synapse gives module resources to
        every HTTP listener, so in listener mode a federation-only and a
        replication-only listener serve (and audit) leave as well, and the
        federation listener serves the module's admin API."""
        extra_ports = {"federation": free_port(), "replication": free_port()}
        hs = self.start_with_listeners({"mount": "listener"}, extra_ports)
        self.assertIn("Serving leave and forget on 3 listener(s)", hs.log_text())
        admin = hs.register("admin", admin=True)
        for name, port in extra_ports.items():
            resp = self.leave_on(port, hs.create_room(admin), admin)
            self.assertEqual(resp.status, 200, (name, resp.body))
        self.assertEqual(self.audit_actions(hs, admin.access_token), ["leave", "leave"])
        resp = request(extra_ports["federation"], "GET", ADMIN_AUDIT, token=admin.access_token)
        self.assertEqual(resp.status, 200, resp.body)

    def test_other_paths_on_the_module_listener_are_unrecognized(self) -> None:
        """Only leave and forget are served on the module's listener: any other
        room path is a 404 M_UNRECOGNIZED, like Synapse's own unknown paths."""
        hs = self.start({}, {"mount": "listener"})
        admin = hs.register("admin", admin=True)
        room = hs.create_room(admin)
        resp = hs.module(
            "GET", f"/_matrix/client/v3/rooms/{quote_room(room)}/messages", token=admin.access_token
        )
        self.assertEqual((resp.status, resp.errcode), (404, "M_UNRECOGNIZED"))


class FirstStartTests(_ServerPerTest):
    def test_first_sweep_waits_for_the_schema(self) -> None:
        """On a fresh database the retention sweep, however frequent, starts
        only once the module's tables exist: it used to run before them and
        log an exception on every first start."""
        hs = self.start({}, {"retention": {"period": "1h", "sweep_interval": "1ms"}})
        wait_until(lambda: "Retention sweep:" in hs.log_text(), what="a sweep to finish")
        self.assertNotIn("Traceback", hs.log_text())
