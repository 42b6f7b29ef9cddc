"""Start a real, pip-installed Synapse as a subprocess and talk HTTP to it.

The harness writes its own ``homeserver.yaml`` (no ``--generate-config``, which
is slow and interactive about stats), generates a signing key with signedjson,
starts ``python -m synapse.app.homeserver`` and waits on ``/health``. Every
listener binds to 127.0.0.1 on a port :func:`free_port` picked.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attr
import yaml
from signedjson.key import generate_signing_key, write_signing_keys

from tests.support.rawdb import pg_connect_args, pg_connection

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVER_NAME = "test.local"
SHARED_SECRET = "matrix-leave-forget-test-secret"

# Generous limits so that only the tests that mean to hit a limiter do.
RELAXED_RATELIMIT = {"per_second": 10000, "burst_count": 10000}


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Below the kernel's ephemeral range: a port the kernel hands out for binding to 0
# is also one it hands to outgoing connections (the tests', Synapse's, PostgreSQL
# clients'), which can take it between the choice and Synapse's bind.
_PORTS = (max(1024, _ephemeral_low() - 12000), _ephemeral_low())
_handed_out: set[int] = set()
_random = random.SystemRandom()


def free_port() -> int:
    """A TCP port on the loopback interface, free now and not handed out before here.

    Concurrent test processes (tox envs in parallel) pick at random, so they
    rarely meet; when they do, :meth:`SynapseProcess.start` picks again.
    """
    for _ in range(1000):
        port = _random.randrange(*_PORTS)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {_PORTS} on 127.0.0.1")


@attr.s(auto_attribs=True, frozen=True)
class Response:
    """What an HTTP request to Synapse came back with."""

    status: int
    body: Any
    raw: bytes
    headers: Mapping[str, str]

    @property
    def errcode(self) -> str | None:
        if isinstance(self.body, dict):
            return self.body.get("errcode")
        return None


@attr.s(auto_attribs=True, frozen=True)
class User:
    """A registered user and one of their access tokens."""

    user_id: str
    access_token: str
    device_id: str | None
    is_guest: bool = False


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    raw_body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    source_ip: str | None = None,
    tls: bool = False,
    unix_socket: str | None = None,
) -> Response:
    """Send one HTTP request to 127.0.0.1:port and decode a JSON answer.

    ``source_ip`` binds the client side to another loopback address, so that a
    proxy's forwarding of the client address can be seen. ``tls`` speaks HTTPS
    (any certificate accepted: the tests' are self-signed); ``unix_socket``
    connects to that socket path instead of the port.
    """
    conn: http.client.HTTPConnection
    if unix_socket is not None:
        conn = _UnixHTTPConnection(unix_socket, timeout)
    elif tls:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=ssl._create_unverified_context()
        )
    else:
        conn = http.client.HTTPConnection(
            "127.0.0.1",
            port,
            timeout=timeout,
            source_address=(source_ip, 0) if source_ip else None,
        )
    send_headers = dict(headers or {})
    if token is not None:
        send_headers["Authorization"] = f"Bearer {token}"
    payload: bytes | None = raw_body
    if payload is None and body is not None:
        payload = json.dumps(body).encode()
    if payload is not None:
        send_headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=payload, headers=send_headers)
        resp = conn.getresponse()
        raw = resp.read()
        resp_headers = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    try:
        decoded: Any = json.loads(raw) if raw else None
    except ValueError:
        decoded = None
    return Response(resp.status, decoded, raw, resp_headers)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (Synapse's ``path:`` listeners)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


# Longer than any single wait for background work is expected to take.
PURGE_TIMEOUT = 15.0

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = PURGE_TIMEOUT, what: str = "") -> T:
    """Poll predicate every 50 ms until it returns something truthy; fail at the deadline.

    For background work that signals nothing (the retention sweep).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what or predicate!r}; last: {value!r}"
            )
        time.sleep(0.05)


def wait_while_progressing(
    progress: Callable[[], int], goal: int, stall: float, what: str = ""
) -> None:
    """Poll progress every 50 ms until it reaches goal; fail once it stalls for stall seconds.

    For background work whose pace is set by the machine (purges paced by
    their own duration): a slow machine takes longer, a stuck one still fails.
    """
    best, moved = -1, time.monotonic()
    while True:
        value = progress()
        if value >= goal:
            return
        if value > best:
            best, moved = value, time.monotonic()
        elif time.monotonic() - moved >= stall:
            raise AssertionError(
                f"no progress for {stall}s waiting for {what or progress!r}: {value} of {goal}"
            )
        time.sleep(0.05)


def run_cli(
    config_path: str, *args: str, timeout: float = 120, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``matrix-leave-forget -c config_path args...`` as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "matrix_leave_forget.cli", "-c", config_path, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def create_pg_database(template: str = "template0") -> str:
    """A fresh database with the encoding and collation Synapse requires.

    Empty, unless ``template`` names a database to copy
    (:func:`synapse_pg_template`).
    """
    name = "mlf_" + os.urandom(6).hex()
    conn = pg_connection("postgres", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                f"TEMPLATE {template}"
            )
    finally:
        conn.close()
    return name


# Bumped when what synapse_pg_template makes changes, so that a cluster's old
# templates are not used.
PG_TEMPLATE_FORMAT = 2

# Synapse runs its background updates without its usual pauses, in large
# batches: a fresh database's finish in seconds instead of a minute.
FAST_BACKGROUND_UPDATES: dict[str, Any] = {
    "background_updates": {"sleep_enabled": False, "min_batch_size": 10000}
}

# The template's name, once this process has found it made.
_pg_template: str | None = None


def synapse_pg_template() -> str:
    """A database holding the schema a fresh Synapse creates, for test servers to copy.

    Creating Synapse's schema costs each fresh PostgreSQL test server about a
    second (0.9 CPU-s of PostgreSQL's, some of Synapse's); copying a database
    that has it (``CREATE DATABASE ... TEMPLATE``) a fraction of that. The
    template is made once per Synapse version in the cluster, by a Synapse
    without the module that starts on an empty database, runs its background
    updates to the end and stops; a copy is then what that Synapse would find
    on a restart. Settled, because a background update that alters a table
    while a test's requests run can deadlock with them (PostgreSQL picks one
    to fail, and Synapse logs it). The module's own tables are not in it:
    each test server creates them as on a first start.
    """
    global _pg_template
    if _pg_template is not None:
        return _pg_template
    version = importlib.metadata.version("matrix-synapse")
    key = hashlib.sha256(f"{PG_TEMPLATE_FORMAT}:{version}".encode()).hexdigest()[:12]
    name = "mlf_template_" + key
    conn = pg_connection("postgres", autocommit=True)
    try:
        with conn.cursor() as cur:
            # One maker at a time across test processes; the others wait here
            # and find it made. The lock goes with the connection.
            cur.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                build = create_pg_database()
                try:
                    hs = SynapseProcess(
                        None,
                        FAST_BACKGROUND_UPDATES,
                        database="postgres",
                        pg_database=build,
                    )
                    try:
                        hs.start()
                        wait_until(
                            lambda: _background_updates_done(build),
                            120,
                            "Synapse's background updates on the template",
                        )
                    finally:
                        hs.pg_database = None  # kept: it becomes the template
                        hs.cleanup()
                    # Only a template that was made whole gets its name; the
                    # stopped Synapse's sessions may take a moment to end.
                    wait_until(
                        lambda: _renamed(cur, build, name), 30, "the template's sessions to end"
                    )
                except BaseException:
                    drop_pg_database(build)
                    raise
    finally:
        conn.close()
    _pg_template = name
    return name


def _background_updates_done(dbname: str) -> bool:
    conn = pg_connection(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM background_updates")
            return bool(cur.fetchone()[0] == 0)
    finally:
        conn.close()


def _renamed(cur: Any, old: str, new: str) -> bool:
    import psycopg2

    try:
        cur.execute(f"ALTER DATABASE {old} RENAME TO {new}")
    except psycopg2.errors.ObjectInUse:
        return False
    return True


def drop_pg_database(name: str) -> None:
    conn = pg_connection("postgres", autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        conn.close()


def write_self_signed_cert(directory: str) -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files in directory.

    Returns:
        The ``homeserver.yaml`` keys naming them (for ``tls: true`` listeners).
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    paths = {
        "tls_certificate_path": os.path.join(directory, "tls.crt"),
        "tls_private_key_path": os.path.join(directory, "tls.key"),
    }
    with open(paths["tls_certificate_path"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths["tls_private_key_path"], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    return paths


def every_kind_of_client_listener(workdir: str) -> dict[str, Any]:
    """Client listeners of every kind Synapse has, to add to a process's listeners.

    Returns:
        ``listeners`` (the new ones), ``ports`` (kind -> TCP port),
        ``socket`` (the unix socket's path) and ``tls`` (the certificate keys).
    """
    ports = {"tls": free_port(), "plain": free_port()}
    socket_path = os.path.join(workdir, "client.sock")
    listeners = [
        {
            # Synapse terminating TLS, as on a federation port 8448.
            "port": ports["tls"],
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": True,
            "resources": [{"names": ["client", "federation"]}],
        },
        {
            # A second client listener, without x_forwarded (the harness's has it).
            "port": ports["plain"],
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": False,
            "x_forwarded": False,
            "resources": [{"names": ["client"]}],
        },
        {"path": socket_path, "type": "http", "resources": [{"names": ["client"]}]},
    ]
    return {
        "listeners": listeners,
        "ports": ports,
        "socket": socket_path,
        "tls": write_self_signed_cert(workdir),
    }


def quote_room(room_id: str) -> str:
    """Percent-encode a room id for a path segment, as Matrix clients do."""
    return urllib.parse.quote(room_id, safe="")


# Starts of one Synapse before a port taken by another process fails the test.
BIND_ATTEMPTS = 4


class PortTakenError(Exception):
    """Synapse could not bind a listener port: another process took it first."""


class ListeningProcess:
    """What tests need of a Synapse process, main or worker: its logs and its two listeners.

    Subclasses set ``client_port``, ``module_port``, ``log_path`` and ``_stderr_path``.
    """

    client_port: int
    module_port: int
    log_path: str
    _stderr_path: str = ""

    def tail_logs(self, lines: int = 60) -> str:
        out: list[str] = []
        for path in (self._stderr_path, self.log_path):
            if path and os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.extend(f.readlines()[-lines:])
        return "".join(out)

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def client(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        """A request to the ordinary client listener."""
        return request(self.client_port, method, path, body, **kw)

    def module(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        """A request to the module's own (`resources: []`) listener."""
        return request(self.module_port, method, path, body, **kw)


class SynapseProcess(ListeningProcess):
    """One Synapse homeserver process with matrix-leave-forget configured.

    Args:
        module_config: The ``config:`` block given to the module, or None to
            start Synapse without the module.
        extra_config: Top-level ``homeserver.yaml`` keys merged over the
            defaults (one level deep for mappings).
        database: ``"sqlite"``, ``"postgres"`` (a fresh database on the server
            named by the PG* environment variables, a copy of
            :func:`synapse_pg_template`) or None to follow
            ``MLF_TEST_DATABASE`` (default sqlite).
        workdir: The directory for its files (a fresh temporary one if None).
        pg_database: With ``postgres``, this existing database instead of a
            fresh one.
    """

    def __init__(
        self,
        module_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
        database: str | None = None,
        workdir: str | None = None,
        pg_database: str | None = None,
    ) -> None:
        self.module_config = module_config
        self.extra_config = extra_config or {}
        self.database = database or os.environ.get("MLF_TEST_DATABASE", "sqlite")
        self.pg_database: str | None = None
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="mlf-synapse-")
        self.client_port = free_port()
        self.module_port = free_port()
        self.metrics_port = free_port()
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        self.log_path = os.path.join(self.workdir, "homeserver.log")
        self.process: subprocess.Popen[bytes] | None = None
        if self.database == "postgres":
            self.pg_database = pg_database or create_pg_database(synapse_pg_template())
        self._write_config()

    # -- configuration ---------------------------------------------------

    def homeserver_config(self) -> dict[str, Any]:
        """The full homeserver.yaml this process runs with."""
        key_path = os.path.join(self.workdir, "signing.key")
        if not os.path.exists(key_path):
            with open(key_path, "w") as f:
                write_signing_keys(f, [generate_signing_key("a_test")])
        if self.database == "sqlite":
            database: dict[str, Any] = {
                "name": "sqlite3",
                "args": {"database": os.path.join(self.workdir, "homeserver.db")},
            }
        else:
            database = {"name": "psycopg2", "args": pg_connect_args(self.pg_database)}
        config: dict[str, Any] = {
            "server_name": SERVER_NAME,
            "public_baseurl": f"http://127.0.0.1:{self.client_port}/",
            "pid_file": os.path.join(self.workdir, "homeserver.pid"),
            "listeners": [
                {
                    "port": self.client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": True,
                    "resources": [{"names": ["client", "federation"]}],
                },
                {
                    # The module's own listener, as in `mount: listener`.
                    "port": self.module_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": True,
                    "resources": [],
                },
                {
                    "port": self.metrics_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "metrics",
                },
            ],
            "enable_metrics": True,
            "database": database,
            "log_config": self._write_log_config(),
            "media_store_path": os.path.join(self.workdir, "media_store"),
            "signing_key_path": key_path,
            "registration_shared_secret": SHARED_SECRET,
            "macaroon_secret_key": "macaroon-" + SHARED_SECRET,
            "form_secret": "form-" + SHARED_SECRET,
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "allow_guest_access": True,
            "enable_registration": False,
            "server_notices": {
                "system_mxid_localpart": "notices",
                "system_mxid_display_name": "Server Notices",
                "room_name": "Server Notices",
            },
            "rc_message": RELAXED_RATELIMIT,
            "rc_registration": RELAXED_RATELIMIT,
            "rc_login": {
                "address": RELAXED_RATELIMIT,
                "account": RELAXED_RATELIMIT,
                "failed_attempts": RELAXED_RATELIMIT,
            },
            "rc_joins": {"local": RELAXED_RATELIMIT, "remote": RELAXED_RATELIMIT},
            "rc_joins_per_room": RELAXED_RATELIMIT,
            "rc_invites": {
                "per_room": RELAXED_RATELIMIT,
                "per_user": RELAXED_RATELIMIT,
                "per_issuer": RELAXED_RATELIMIT,
            },
            "rc_room_creation": RELAXED_RATELIMIT,
            "rc_presence": {"per_user": RELAXED_RATELIMIT},
        }
        if self.module_config is not None:
            config["modules"] = [
                {
                    "module": "matrix_leave_forget.LeaveForgetModule",
                    "config": self.module_config,
                }
            ]
        for key, value in self.extra_config.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                merged = dict(config[key])
                merged.update(value)
                config[key] = merged
            else:
                config[key] = value
        return config

    def _write_log_config(self) -> str:
        path = os.path.join(self.workdir, "log.yaml")
        log_config = {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - "
                    "%(levelname)s - %(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": self.log_path,
                    "filters": ["context"],
                }
            },
            "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter"}},
            "loggers": {
                "synapse.storage.SQL": {"level": "WARNING"},
                "synapse.access": {"level": "INFO"},
                "matrix_leave_forget": {"level": "DEBUG"},
            },
            "root": {"level": "INFO", "handlers": ["file"]},
            "disable_existing_loggers": False,
        }
        with open(path, "w") as f:
            yaml.safe_dump(log_config, f)
        return path

    def _write_config(self) -> None:
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.homeserver_config(), f)

    def reconfigure(
        self,
        module_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        """Change the configuration; takes effect at the next start."""
        if module_config is not None:
            self.module_config = module_config
        if extra_config is not None:
            self.extra_config = extra_config
        self._write_config()

    # -- lifecycle -------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start Synapse and wait until it answers /health.

        If another process took one of its ports in the meantime, Synapse
        exits at once; it is started again on fresh ports (a few times).
        """
        # Listeners a test configured itself keep their ports.
        attempts = 1 if "listeners" in self.extra_config else BIND_ATTEMPTS
        for _ in range(attempts - 1):
            try:
                return self._start_once(timeout)
            except PortTakenError:
                self.reassign_ports()
                self._write_config()
        self._start_once(timeout)

    def reassign_ports(self) -> None:
        """Pick fresh ports for every listener (after a bind failure)."""
        self.client_port = free_port()
        self.module_port = free_port()
        self.metrics_port = free_port()

    def _start_once(self, timeout: float) -> None:
        env = dict(os.environ)
        env.setdefault("SYNAPSE_ASYNC_IO_REACTOR", "0")
        # So that Synapse can load test-only modules from tests/.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
        self._stderr_path = os.path.join(self.workdir, "stderr.log")
        stderr = open(self._stderr_path, "ab")
        stderr_start = stderr.tell()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "synapse.app.homeserver", "-c", self.config_path],
            stdout=stderr,
            stderr=stderr,
            cwd=self.workdir,
            env=env,
        )
        stderr.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(self._stderr_path, "rb") as f:
                    f.seek(stderr_start)
                    if b"Address already in use" in f.read():
                        self.process = None
                        raise PortTakenError()
                raise RuntimeError(
                    f"Synapse exited with {self.process.returncode}:\n" + self.tail_logs()
                )
            try:
                if request(
                    self.client_port, "GET", "/health", timeout=2
                ).status == 200 and self._listens_on(self.client_port):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("Synapse did not start in time:\n" + self.tail_logs())

    def _listens_on(self, port: int) -> bool:
        """Whether this Synapse process itself listens on port.

        Another test process may have picked the same free port a moment
        later and started first: its Synapse then answers /health while ours
        is still starting (and about to fail to bind), so an answer alone does
        not say whose server it is. Read from Linux's /proc (elsewhere: True).
        """
        assert self.process is not None
        fd_dir = f"/proc/{self.process.pid}/fd"
        if not os.path.isdir("/proc/net"):
            return True
        try:
            inodes = {
                link[len("socket:[") : -1]
                for link in (os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir))
                if link.startswith("socket:[")
            }
        except OSError:
            return False
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        local_port = int(fields[1].rsplit(":", 1)[1], 16)
                        # State 0A is LISTEN; fields[9] is the socket's inode.
                        if local_port == port and fields[3] == "0A" and fields[9] in inodes:
                            return True
            except OSError:
                continue
        return False

    def wait_for_exit(self, timeout: float = 60.0) -> int:
        """Wait for a Synapse that is expected to exit by itself."""
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop Synapse (SIGTERM by default, SIGKILL to simulate a crash)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self.pg_database is not None and not os.environ.get("MLF_KEEP_WORKDIR"):
            drop_pg_database(self.pg_database)
            self.pg_database = None
        if self._own_workdir and not os.environ.get("MLF_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def register(self, localpart: str, admin: bool = False) -> User:
        """Register a user through the shared-secret admin API."""
        nonce = self.client("GET", "/_synapse/admin/v1/register").body["nonce"]
        password = "pw-" + localpart
        digest = hmac.new(
            SHARED_SECRET.encode(),
            b"\x00".join(
                p.encode() for p in (nonce, localpart, password, "admin" if admin else "notadmin")
            ),
            digestmod=hashlib.sha1,
        ).hexdigest()
        resp = self.client(
            "POST",
            "/_synapse/admin/v1/register",
            {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": digest,
            },
        )
        if resp.status != 200:
            raise RuntimeError(f"registration failed: {resp.status} {resp.body}")
        return User(resp.body["user_id"], resp.body["access_token"], resp.body["device_id"])

    def register_guest(self) -> User:
        resp = self.client("POST", "/_matrix/client/v3/register?kind=guest", {})
        if resp.status != 200:
            raise RuntimeError(f"guest registration failed: {resp.status} {resp.body}")
        return User(
            resp.body["user_id"], resp.body["access_token"], resp.body.get("device_id"), True
        )

    def login(self, user: User) -> User:
        """A second access token (and device) for the same user."""
        localpart = user.user_id[1:].split(":")[0]
        resp = self.client(
            "POST",
            "/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": "pw-" + localpart,
            },
        )
        assert resp.status == 200, resp.body
        return User(user.user_id, resp.body["access_token"], resp.body["device_id"])

    def create_room(self, user: User, **content: Any) -> str:
        resp = self.client(
            "POST", "/_matrix/client/v3/createRoom", content, token=user.access_token
        )
        if resp.status != 200:
            raise RuntimeError(f"createRoom failed: {resp.status} {resp.body}")
        return str(resp.body["room_id"])

    def membership(self, user: User, room_id: str, action: str, body: Any = None) -> Response:
        """A native membership call (join/invite/kick/ban/knock) on the client port."""
        if action == "knock":
            path = f"/_matrix/client/v3/knock/{quote_room(room_id)}"
        elif action == "join":
            path = f"/_matrix/client/v3/join/{quote_room(room_id)}"
        else:
            path = f"/_matrix/client/v3/rooms/{quote_room(room_id)}/{action}"
        return self.client("POST", path, body or {}, token=user.access_token)

    def member_event(self, admin: User, room_id: str, user_id: str) -> dict[str, Any] | None:
        """The current m.room.member event for user_id, read through the admin API."""
        resp = self.client(
            "GET",
            f"/_synapse/admin/v1/rooms/{quote_room(room_id)}/state",
            token=admin.access_token,
        )
        if resp.status != 200:
            return None
        for event in resp.body["state"]:
            if event["type"] == "m.room.member" and event["state_key"] == user_id:
                return dict(event)
        return None

    def sync_rooms(self, user: User) -> dict[str, Any]:
        """The rooms section of an initial /sync."""
        resp = self.client(
            "GET",
            "/_matrix/client/v3/sync?timeout=0&filter="
            + urllib.parse.quote(json.dumps({"room": {"include_leave": True}})),
            token=user.access_token,
        )
        assert resp.status == 200, resp.body
        return dict(resp.body.get("rooms", {}))

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/_synapse/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()
