"""The shipped reverse-proxy configs, run by a real nginx and a real Caddy.

docs/proxy/nginx.conf and docs/proxy/Caddyfile are what operators copy to run
the module in `mount: listener` mode behind a proxy. Each test class starts a
Synapse whose module serves leave and forget on its own `resources: []`
listener, then starts the proxy from the shipped file itself: only the three
documented addresses (127.0.0.1:8080 where the proxy listens, 127.0.0.1:8008
Synapse's client listener, 127.0.0.1:8090 the module's listener) are replaced
with the ports the harness picked; every other byte is used as shipped.

Through the proxy's port the tests check that leave and forget reach the module
(an audit entry appears; Synapse's native endpoints, which the client listener
still serves, write none), forwarded byte for byte as the client sent them (read
back from Synapse's access log of the module's listener), and that everything
else reaches Synapse.

The proxies are required, not optional: when a binary is missing the tests fail
with a message naming the Debian package to install (`nginx`, `caddy`).
"""

import http.client
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.base import SynapseTestCase
from tests.support.harness import (
    REPO_ROOT,
    Response,
    SynapseProcess,
    User,
    free_port,
    quote_room,
    request,
    wait_until,
)

PROXY_DOCS = os.path.join(REPO_ROOT, "docs", "proxy")
ADMIN_AUDIT = "/_synapse/client/leave_forget/v1/admin/audit"

# The placeholder addresses in the shipped files, by the port each stands for.
# The test replaces these three strings and nothing else.
PLACEHOLDERS = {"8080": "proxy", "8008": "synapse", "8090": "module"}
_PLACEHOLDER = re.compile(r"127\.0\.0\.1:(8080|8008|8090)(?![0-9])")

# Requests to the proxy are sent from this loopback address, so that Synapse's
# access log shows whether the proxy passed the client's address on.
CLIENT_IP = "127.0.0.23"
# A client-supplied X-Forwarded-For that the proxy must not pass on.
SPOOFED_IP = "127.0.0.66"

# nginx lives in /usr/sbin, which is often not on a non-root user's PATH.
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def find_binary(name: str, package: str) -> str:
    """The proxy's executable; an AssertionError naming the package if absent."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    path = shutil.which(name, path=search)
    if path is None:
        raise AssertionError(
            f"`{name}` is not installed, and these tests run the real proxy with the "
            f"shipped config: install the Debian package `{package}` "
            f"(apt-get install {package})."
        )
    return path


def render_shipped(filename: str, ports: Mapping[str, int]) -> str:
    """docs/proxy/<filename> with its placeholder addresses replaced, nothing else.

    ``ports`` maps "proxy", "synapse" and "module" to the real ports.
    """
    with open(os.path.join(PROXY_DOCS, filename)) as f:
        text = f.read()
    for placeholder in PLACEHOLDERS:
        if f"127.0.0.1:{placeholder}" not in text:
            raise AssertionError(
                f"docs/proxy/{filename} no longer contains 127.0.0.1:{placeholder}; "
                "the test substitutes exactly 127.0.0.1:8080, 127.0.0.1:8008 and "
                "127.0.0.1:8090 (see the file's header)"
            )
    # One pass, so that a substituted port can never be substituted again.
    return _PLACEHOLDER.sub(lambda m: f"127.0.0.1:{ports[PLACEHOLDERS[m.group(1)]]}", text)


def proxy_request(port: int, method: str, path: str, body: Any = None, **kw: Any) -> Response:
    """One HTTP request to 127.0.0.1:port, sent from CLIENT_IP, path sent as given."""
    return request(port, method, path, body, source_ip=CLIENT_IP, **kw)


class ProxyProcess:
    """A reverse proxy run as a foreground subprocess from a shipped config."""

    NAME: ClassVar[str]
    PACKAGE: ClassVar[str]
    SHIPPED: ClassVar[str]

    def __init__(self, hs: SynapseProcess) -> None:
        self.binary = find_binary(self.NAME, self.PACKAGE)
        self.workdir = tempfile.mkdtemp(prefix=f"mlf-{self.NAME}-")
        self.port = free_port()
        self.config = render_shipped(
            self.SHIPPED,
            {"proxy": self.port, "synapse": hs.client_port, "module": hs.module_port},
        )
        self.output_path = os.path.join(self.workdir, "output.log")
        self.process: subprocess.Popen[bytes] | None = None

    def prepare(self) -> list[str]:
        """Write the config files into workdir; return the command line."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def log_files(self) -> list[str]:
        return [self.output_path]

    def start(self, timeout: float = 30.0) -> None:
        """Start the proxy and wait until it answers HTTP on its port."""
        argv = self.prepare()
        with open(self.output_path, "ab") as output:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env(),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.NAME} exited with {self.process.returncode}:\n" + self.tail_logs()
                )
            try:
                # Any HTTP answer will do: routing is what the tests check.
                proxy_request(self.port, "GET", "/_matrix/client/versions", timeout=2)
                return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.NAME} did not answer on port {self.port} within {timeout}s:\n"
                    + self.tail_logs()
                )
            time.sleep(0.05)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(15)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if not os.environ.get("MLF_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def tail_logs(self, lines: int = 40) -> str:
        out: list[str] = []
        for path in self.log_files():
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.extend(f.readlines()[-lines:])
        return "".join(out)


class NginxProcess(ProxyProcess):
    """nginx with docs/proxy/nginx.conf included in a minimal main config."""

    NAME = "nginx"
    PACKAGE = "nginx"
    SHIPPED = "nginx.conf"

    def log_files(self) -> list[str]:
        return [self.output_path, os.path.join(self.workdir, "error.log")]

    def prepare(self) -> list[str]:
        w = self.workdir
        # Run as root, nginx's workers drop to an unprivileged user and must be
        # able to reach the temp directories below.
        os.chmod(w, 0o755)
        snippet = os.path.join(w, "matrix-leave-forget.conf")
        with open(snippet, "w") as f:
            f.write(self.config)
        main = os.path.join(w, "nginx.conf")
        with open(main, "w") as f:
            f.write(
                "daemon off;\n"
                "worker_processes 1;\n"
                f"pid {w}/nginx.pid;\n"
                f"error_log {w}/error.log notice;\n"
                "events {}\n"
                "http {\n"
                f"    access_log {w}/access.log;\n"
                f"    client_body_temp_path {w}/client_body;\n"
                f"    proxy_temp_path {w}/proxy;\n"
                f"    fastcgi_temp_path {w}/fastcgi;\n"
                f"    uwsgi_temp_path {w}/uwsgi;\n"
                f"    scgi_temp_path {w}/scgi;\n"
                f"    include {snippet};\n"
                "}\n"
            )
        return [self.binary, "-p", w + "/", "-c", main]


class CaddyProcess(ProxyProcess):
    """Caddy running docs/proxy/Caddyfile verbatim (but for the three addresses)."""

    NAME = "caddy"
    PACKAGE = "caddy"
    SHIPPED = "Caddyfile"

    def env(self) -> dict[str, str]:
        # Caddy keeps state (autosaved config, certificates) under these.
        env = dict(os.environ)
        env["HOME"] = self.workdir
        env["XDG_CONFIG_HOME"] = os.path.join(self.workdir, "config")
        env["XDG_DATA_HOME"] = os.path.join(self.workdir, "data")
        return env

    def prepare(self) -> list[str]:
        # The shipped file as it is, global options included (admin off).
        main = os.path.join(self.workdir, "Caddyfile")
        with open(main, "w") as f:
            f.write(self.config)
        return [self.binary, "run", "--config", main, "--adapter", "caddyfile"]


class ProxyTestsMixin:
    """Tests run against one proxy; mixed into a SynapseTestCase per proxy."""

    PROXY: ClassVar[type[ProxyProcess]]
    MODE: ClassVar[str] = "listener"
    proxy: ClassVar[ProxyProcess]
    admin: ClassVar[User]
    bob: ClassVar[User]
    hs: ClassVar[SynapseProcess]

    # -- fixtures --------------------------------------------------------

    def setUp(self) -> None:
        # Before Synapse boots: a missing proxy fails every test with the package name.
        try:
            find_binary(self.PROXY.NAME, self.PROXY.PACKAGE)
        except AssertionError as missing:
            self.t.fail(str(missing))
        super().setUp()  # type: ignore[misc]
        if not self.proxy.running():
            self.t.fail(f"{self.PROXY.NAME} is no longer running:\n{self.proxy.tail_logs()}")

    @classmethod
    def setUpClass(cls) -> None:
        if "proxy" in cls.__dict__:
            return
        super().setUpClass()  # type: ignore[misc]
        try:
            cls.admin = cls.hs.register("admin", admin=True)
            cls.bob = cls.hs.register("bob")
            proxy = cls.PROXY(cls.hs)
            try:
                proxy.start()
            except BaseException:
                proxy.cleanup()
                raise
            cls.proxy = proxy
        except BaseException:
            super().tearDownClass()  # type: ignore[misc]
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if "proxy" in cls.__dict__:
            cls.proxy.cleanup()
            del cls.proxy
        super().tearDownClass()  # type: ignore[misc]

    # -- helpers ---------------------------------------------------------

    @property
    def t(self) -> SynchronousTestCase:
        return self  # type: ignore[return-value]

    def via_proxy(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        return proxy_request(self.proxy.port, method, path, body, **kw)

    def new_room(self) -> str:
        """A public room (version 11: its id is !opaque:test.local) that bob joined."""
        room = self.hs.create_room(self.admin, preset="public_chat", room_version="11")
        self.t.assertTrue(room.startswith("!") and room.endswith(":test.local"), room)
        resp = self.hs.membership(self.bob, room, "join")
        self.t.assertEqual(resp.status, 200, resp.body)
        return room

    def audit(self, room_id: str) -> list[dict[str, Any]]:
        """The room's audit entries, read directly from Synapse (not via the proxy)."""
        resp = self.hs.client(
            "GET", f"{ADMIN_AUDIT}?room_id={quote_room(room_id)}", token=self.admin.access_token
        )
        self.t.assertEqual(resp.status, 200, resp.body)
        return list(resp.body["entries"])

    def assert_audited(
        self, room_id: str, actions: list[str], reason: str | None = None, context: str = ""
    ) -> None:
        """bob's successful actions on the room, in order, are exactly ``actions``."""
        entries = self.audit(room_id)
        self.t.assertEqual([e["action"] for e in entries], actions, f"{context} {entries}")
        for entry in entries:
            self.t.assertEqual(
                (entry["user_id"], entry["room_id"], entry["outcome"]),
                (self.bob.user_id, room_id, "ok"),
                entry,
            )
        if reason is not None:
            self.t.assertEqual(entries[-1]["reason"], reason)

    def access_log_line(self, port: int, method: str, path: str) -> str:
        """Synapse's access-log line for `method path` on the listener at ``port``,
        with CLIENT_IP as the client: what the proxy forwarded, byte for byte."""
        request_line = f'"{method} {path} HTTP/1.1"'
        origin = f" - {CLIENT_IP} - {port} - "

        def find() -> str | None:
            for line in self.hs.log_text().splitlines():
                if "Processed request" in line and origin in line and request_line in line:
                    return line
            return None

        return wait_until(find, 10, f"{request_line} from {CLIENT_IP} on port {port}")

    def leave_path(self, room_segment: str, version: str = "v3") -> str:
        return f"/_matrix/client/{version}/rooms/{room_segment}/leave"

    # -- leave and forget reach the module --------------------------------

    def test_leave_percent_encoded_room_id_with_reason(self) -> None:
        """A leave with a reason for a percent-encoded room id (%21...%3A...)
        through the proxy succeeds, reaches the module's listener with the path
        exactly as sent and the client's address in X-Forwarded-For, and is
        audited with the reason; the reason is in bob's membership event."""
        room = self.new_room()
        path = self.leave_path(quote_room(room))
        self.t.assertIn("%21", path)
        self.t.assertIn("%3Atest.local", path)
        resp = self.via_proxy("POST", path, {"reason": "Off to bed"}, token=self.bob.access_token)
        self.t.assertEqual((resp.status, resp.body), (200, {}))
        self.assert_audited(room, ["leave"], reason="Off to bed")
        self.access_log_line(self.hs.module_port, "POST", path)
        event = self.hs.member_event(self.admin, room, self.bob.user_id)
        assert event is not None
        self.t.assertEqual(
            (event["content"]["membership"], event["content"].get("reason")),
            ("leave", "Off to bed"),
        )

    def test_lowercase_percent_encoding_is_forwarded_unchanged(self) -> None:
        """The proxy neither decodes nor re-encodes the room id: %21 and a
        lowercase %3a reach the module's listener byte for byte, and the module
        decodes them to the right room."""
        room = self.new_room()
        segment = quote_room(room).replace("%3A", "%3a")
        path = self.leave_path(segment)
        resp = self.via_proxy("POST", path, {}, token=self.bob.access_token)
        self.t.assertEqual(resp.status, 200, resp.body)
        self.assert_audited(room, ["leave"])
        self.access_log_line(self.hs.module_port, "POST", path)

    def test_leave_raw_room_id(self) -> None:
        """An unencoded room id (!opaque:test.local in the path, as some clients
        send it) is routed to the module too, and forwarded unencoded."""
        room = self.new_room()
        path = self.leave_path(room)
        self.t.assertIn("!", path)
        self.t.assertIn(":test.local", path)
        resp = self.via_proxy("POST", path, {}, token=self.bob.access_token)
        self.t.assertEqual(resp.status, 200, resp.body)
        self.assert_audited(room, ["leave"])
        self.access_log_line(self.hs.module_port, "POST", path)

    def test_forget(self) -> None:
        """Forget through the proxy, after a leave through the proxy, succeeds,
        is served by the module and audited: bob no longer sees the room."""
        room = self.new_room()
        leave = self.via_proxy(
            "POST", self.leave_path(quote_room(room)), {}, token=self.bob.access_token
        )
        self.t.assertEqual(leave.status, 200, leave.body)
        path = f"/_matrix/client/v3/rooms/{quote_room(room)}/forget"
        resp = self.via_proxy("POST", path, {}, token=self.bob.access_token)
        self.t.assertEqual((resp.status, resp.body), (200, {}))
        self.assert_audited(room, ["leave", "forget"])
        self.access_log_line(self.hs.module_port, "POST", path)
        self.t.assertNotIn(room, self.hs.sync_rooms(self.bob).get("leave", {}))

    def test_put_leave_with_txn_id(self) -> None:
        """PUT .../leave/{txnId} through the proxy is served by the module; the
        same txnId again replays the answer without a second event or entry."""
        room = self.new_room()
        path = self.leave_path(quote_room(room)) + "/txn-1"
        for _ in range(2):
            resp = self.via_proxy("PUT", path, {"reason": "once"}, token=self.bob.access_token)
            self.t.assertEqual((resp.status, resp.body), (200, {}))
        self.assert_audited(room, ["leave"], reason="once")
        self.access_log_line(self.hs.module_port, "PUT", path)

    def test_every_client_version_prefix(self) -> None:
        """Leave under api/v1, r0, v3 and unstable, the four prefixes Synapse
        serves it under, all reach the module through the proxy."""
        for version in ("api/v1", "r0", "v3", "unstable"):
            room = self.new_room()
            path = self.leave_path(quote_room(room), version)
            resp = self.via_proxy("POST", path, {}, token=self.bob.access_token)
            self.t.assertEqual(resp.status, 200, (version, resp.body))
            self.assert_audited(room, ["leave"], context=version)
            self.access_log_line(self.hs.module_port, "POST", path)

    def test_paths_that_decode_differently_still_reach_the_module(self) -> None:
        """Synapse matches leave and forget on the raw path, where the room id
        and txnId are any run of characters but '/': an empty txnId, a txnId
        with %2F, or '..' are served natively (without an audit entry) by the
        client listener. The shipped configs match the raw URI too, so these
        reach the module and are audited; a query string does not matter."""
        shapes = [
            ("PUT", "/leave/"),
            ("PUT", "/leave/a%2Fb"),
            ("PUT", "/leave/.."),
            ("PUT", "/leave/%2E%2E"),
            ("POST", "/leave?via=/elsewhere"),
        ]
        for method, suffix in shapes:
            room = self.new_room()
            path = f"/_matrix/client/v3/rooms/{quote_room(room)}{suffix}"
            resp = self.via_proxy(method, path, {}, token=self.bob.access_token)
            self.t.assertEqual(resp.status, 200, (suffix, resp.body))
            self.assert_audited(room, ["leave"], context=f"{method} {path}:")
            self.access_log_line(self.hs.module_port, method, path)
        forget = f"/_matrix/client/v3/rooms/{quote_room(room)}/forget/a%2Fb"
        resp = self.via_proxy("PUT", forget, {}, token=self.bob.access_token)
        self.t.assertEqual(resp.status, 200, resp.body)
        self.assert_audited(room, ["leave", "forget"])
        self.access_log_line(self.hs.module_port, "PUT", forget)

    # -- everything else reaches Synapse ----------------------------------

    def test_other_client_api_reaches_synapse(self) -> None:
        """Other requests go to Synapse's client listener through the proxy:
        /versions, createRoom, join, room state, sending an event whose type is
        `leave` (a room path the leave rule must not catch) and the federation
        API; none of them is audited."""
        resp = self.via_proxy("GET", "/_matrix/client/versions")
        self.t.assertEqual(resp.status, 200, resp.body)
        self.t.assertIn("v1.1", resp.body["versions"])
        self.access_log_line(self.hs.client_port, "GET", "/_matrix/client/versions")

        resp = self.via_proxy(
            "POST",
            "/_matrix/client/v3/createRoom",
            {"preset": "public_chat", "room_version": "11"},
            token=self.admin.access_token,
        )
        self.t.assertEqual(resp.status, 200, resp.body)
        room = resp.body["room_id"]
        quoted = quote_room(room)

        resp = self.via_proxy(
            "POST", f"/_matrix/client/v3/rooms/{quoted}/join", {}, token=self.bob.access_token
        )
        self.t.assertEqual(resp.status, 200, resp.body)
        resp = self.via_proxy(
            "GET", f"/_matrix/client/v3/rooms/{quoted}/state", token=self.bob.access_token
        )
        self.t.assertEqual(resp.status, 200, resp.body)
        self.t.assertIn("m.room.create", [e["type"] for e in resp.body])
        send = f"/_matrix/client/v3/rooms/{quoted}/send/leave/txn-1"
        resp = self.via_proxy("PUT", send, {"body": "hi"}, token=self.bob.access_token)
        self.t.assertEqual(resp.status, 200, resp.body)
        self.t.assertIn("event_id", resp.body)
        self.access_log_line(self.hs.client_port, "PUT", send)

        resp = self.via_proxy("GET", "/_matrix/federation/v1/version")
        self.t.assertEqual(resp.status, 200, resp.body)
        self.t.assertEqual(self.audit(room), [])

    def test_admin_api_through_the_proxy(self) -> None:
        """The module's admin API is reachable through the proxy's
        /_synapse/client rule: the audit log for the admin, 403 for a
        non-admin, 401 without a token."""
        room = self.new_room()
        resp = self.via_proxy(
            "POST", self.leave_path(quote_room(room)), {}, token=self.bob.access_token
        )
        self.t.assertEqual(resp.status, 200, resp.body)
        path = f"{ADMIN_AUDIT}?room_id={urllib.parse.quote(room, safe='')}"
        resp = self.via_proxy("GET", path, token=self.admin.access_token)
        self.t.assertEqual(resp.status, 200, resp.body)
        self.t.assertEqual(
            [(e["action"], e["user_id"]) for e in resp.body["entries"]],
            [("leave", self.bob.user_id)],
        )
        resp = self.via_proxy("GET", path, token=self.bob.access_token)
        self.t.assertEqual((resp.status, resp.errcode), (403, "M_FORBIDDEN"))
        resp = self.via_proxy("GET", path)
        self.t.assertEqual((resp.status, resp.errcode), (401, "M_MISSING_TOKEN"))

    def test_client_address_is_forwarded_and_not_spoofable(self) -> None:
        """Both listeners see the client's real address through X-Forwarded-For
        (the harness's listeners have x_forwarded: true), and an
        X-Forwarded-For sent by the client is not passed on."""
        room = self.new_room()
        spoof = {"X-Forwarded-For": SPOOFED_IP}
        path = self.leave_path(quote_room(room))
        resp = self.via_proxy("POST", path, {}, token=self.bob.access_token, headers=spoof)
        self.t.assertEqual(resp.status, 200, resp.body)
        self.assert_audited(room, ["leave"])
        versions = "/_matrix/client/versions?spoof-check"
        resp = self.via_proxy("GET", versions, headers=spoof)
        self.t.assertEqual(resp.status, 200, resp.body)
        self.access_log_line(self.hs.module_port, "POST", path)
        self.access_log_line(self.hs.client_port, "GET", versions)
        for line in self.hs.log_text().splitlines():
            self.t.assertNotIn(f" - {SPOOFED_IP} - ", line)


class NginxTests(ProxyTestsMixin, SynapseTestCase):
    """docs/proxy/nginx.conf in a real nginx (Debian package `nginx`)."""

    PROXY = NginxProcess


class CaddyTests(ProxyTestsMixin, SynapseTestCase):
    """docs/proxy/Caddyfile in a real Caddy (Debian package `caddy`)."""

    PROXY = CaddyProcess


class CaddyAdminTests(SynchronousTestCase):
    def test_shipped_caddyfile_turns_the_admin_api_off(self) -> None:
        """Caddy's own reading of the shipped Caddyfile (caddy adapt) has its
        admin API disabled: left on localhost:2019, any local process could
        replace the routes and send leave and forget around the module."""
        binary = find_binary(CaddyProcess.NAME, CaddyProcess.PACKAGE)
        result = subprocess.run(
            [binary, "adapt", "--config", os.path.join(PROXY_DOCS, "Caddyfile")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout).get("admin"), {"disabled": True})


class DocsSnippetTests(SynchronousTestCase):
    """The proxy snippets shown in the docs are the tested files' text."""

    def test_snippets_in_docs_are_excerpts_of_the_shipped_files(self) -> None:
        """Every ```nginx and ```caddy block in docs/mounting.md and README.md
        appears verbatim in docs/proxy/nginx.conf or docs/proxy/Caddyfile, so
        the snippets readers copy are the ones the proxy tests run."""
        shipped = {}
        for lang, filename in (("nginx", "nginx.conf"), ("caddy", "Caddyfile")):
            with open(os.path.join(PROXY_DOCS, filename)) as f:
                shipped[lang] = (filename, f.read())
        checked = {"nginx": 0, "caddy": 0}
        block = re.compile(r"^( *)```(nginx|caddy)\n(.*?)^\1```", re.M | re.S)
        for doc in ("docs/mounting.md", "README.md"):
            with open(os.path.join(REPO_ROOT, doc)) as f:
                text = f.read()
            for indent, lang, body in block.findall(text):
                lines = [line[len(indent) :] for line in body.splitlines(keepends=True)]
                filename, content = shipped[lang]
                self.assertIn(
                    "".join(lines), content, f"a {lang} snippet in {doc} differs from {filename}"
                )
                checked[lang] += 1
        self.assertTrue(all(checked.values()), checked)
