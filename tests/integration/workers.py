"""A Synapse worker deployment for the tests: redis, a main process and one generic worker.

:class:`WorkerDeployment` starts, all on 127.0.0.1 with kernel-chosen ports:

* ``redis-server`` as a subprocess, with no persistence (no RDB, no AOF);
* the main process (:class:`MainProcess`, a :class:`SynapseProcess` on a fresh
  PostgreSQL database) with redis enabled, an HTTP replication listener and an
  ``instance_map`` naming the main process and the worker;
* one generic worker (:class:`WorkerProcess`), ``python -m
  synapse.app.generic_worker -c homeserver.yaml -c worker1.yaml``, with a client
  listener, a ``resources: []`` listener for the module and a replication
  listener.

The module is loaded on both from the shared ``homeserver.yaml`` in ``mount:
listener`` mode: a worker deployment already routes paths in the reverse
proxy, so the module's listener costs one more rule there, and the worker then
serves leave through the module without depending on how Synapse builds a
worker's resource tree (intercept mode leans on that, see docs/mounting.md).

What a worker deployment adds to the configuration is built by
:func:`main_fragment` and :func:`worker_fragment`; the processes run with
exactly those parts (plus the harness's test-only settings), and
docs/workers.md shows them for the ports in :data:`DOC_PORTS` (a test checks
both). ``python -m tests.integration.workers`` prints them in the doc's form.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import attr
import yaml

from tests.integration.base import SynapseTestCase
from tests.support.harness import (
    REPO_ROOT,
    ListeningProcess,
    SynapseProcess,
    free_port,
    request,
)
from tests.support.rawdb import pg_connect_args

MODULE = "matrix_leave_forget.LeaveForgetModule"
WORKER_NAME = "worker1"
# The media-repository worker some classes add (WorkerDeployment.add_media_worker).
MEDIA_WORKER_NAME = "media1"
# Synapse's instance name for the main process (what the audit log records).
MAIN_INSTANCE = "master"
LOOPBACK = "127.0.0.1"


@attr.s(auto_attribs=True, frozen=True)
class Ports:
    """Every port of the deployment."""

    main_client: int
    main_module: int
    main_replication: int
    worker_client: int
    worker_module: int
    worker_replication: int
    redis: int


# The ports docs/workers.md shows (8008 and 8090 as in docs/mounting.md).
DOC_PORTS = Ports(
    main_client=8008,
    main_module=8090,
    main_replication=9093,
    worker_client=8083,
    worker_module=8091,
    worker_replication=9094,
    redis=6379,
)


# The media worker's listener in docs/workers.md ("Media").
DOC_MEDIA_PORT = 8085


def _http_listener(port: int, resources: list[dict[str, Any]]) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "port": port,
        "bind_addresses": [LOOPBACK],
        "type": "http",
        "tls": False,
    }
    if resources != [{"names": ["replication"]}]:
        # Client traffic arrives through the reverse proxy.
        listener["x_forwarded"] = True
    listener["resources"] = resources
    return listener


def main_fragment(ports: Ports) -> dict[str, Any]:
    """The parts of ``homeserver.yaml`` (shared by every process) for this deployment."""
    return {
        "listeners": [
            _http_listener(ports.main_client, [{"names": ["client", "federation"]}]),
            # The module's listener on the main process: forget is routed here.
            _http_listener(ports.main_module, []),
            _http_listener(ports.main_replication, [{"names": ["replication"]}]),
        ],
        "redis": {"enabled": True, "host": LOOPBACK, "port": ports.redis},
        "instance_map": {
            "main": {"host": LOOPBACK, "port": ports.main_replication},
            WORKER_NAME: {"host": LOOPBACK, "port": ports.worker_replication},
        },
        "modules": [{"module": MODULE, "config": {"mount": "listener"}}],
    }


def worker_fragment(ports: Ports) -> dict[str, Any]:
    """The worker's own config file (besides ``worker_log_config``)."""
    return {
        "worker_app": "synapse.app.generic_worker",
        "worker_name": WORKER_NAME,
        "worker_listeners": [
            _http_listener(ports.worker_client, [{"names": ["client"]}]),
            # The module's listener on the worker: leave is routed here.
            _http_listener(ports.worker_module, []),
            _http_listener(ports.worker_replication, [{"names": ["replication"]}]),
        ],
    }


def media_worker_fragment(media_port: int) -> dict[str, Any]:
    """A media-repository worker's own config file: it serves media and holds the media store.

    With it the shared ``homeserver.yaml`` says ``enable_media_repo: false``
    (the main process then has no media store) unless the main process keeps
    serving media too.
    """
    return {
        "worker_app": "synapse.app.media_repository",
        "worker_name": MEDIA_WORKER_NAME,
        "worker_listeners": [_http_listener(media_port, [{"names": ["media"]}])],
    }


def to_yaml(fragment: dict[str, Any]) -> str:
    """A fragment as it appears in docs/workers.md (key order kept)."""
    return yaml.safe_dump(fragment, sort_keys=False, default_flow_style=None)


def _wait_for(ready: Any, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout} s")
        time.sleep(0.05)


def _stop_process(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def _tail(path: str, lines: int) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class RedisServer:
    """``redis-server`` on a loopback port, in the foreground, persisting nothing."""

    def __init__(self, workdir: str, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.log_path = os.path.join(workdir, "redis.log")
        self.process: subprocess.Popen[bytes] | None = None

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 15.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH: Synapse workers need redis "
                "(Debian/Ubuntu: apt-get install redis-server)"
            )
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                binary,
                "--bind", LOOPBACK,
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--dir", self.workdir,
                "--logfile", "",
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        log.close()
        try:
            _wait_for(self.ping, self.process, "redis-server", timeout)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{_tail(self.log_path, 20)}") from None

    def stop(self) -> None:
        _stop_process(self.process)
        self.process = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Replication stands still inside the block: redis is stopped (SIGSTOP),
        so no process hears what another writes meanwhile; it resumes after.

        What the processes publish waits in their sockets (nothing is lost), as
        it would behind a slow network or a busy redis.
        """
        assert self.process is not None, "redis is not running"
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)


class MainProcess(SynapseProcess):
    """The harness's Synapse, on PostgreSQL, plus what :func:`main_fragment` adds.

    The harness's own listeners (client, module, metrics) stay; the replication
    listener, ``redis`` and ``instance_map`` are added.
    """

    def __init__(self, module_config: dict[str, Any], redis_port: int, workdir: str) -> None:
        # Needed by homeserver_config(), which the harness calls in __init__.
        self.redis_port = redis_port
        self.replication_port = free_port()
        self.worker_client_port = free_port()
        self.worker_module_port = free_port()
        self.worker_replication_port = free_port()
        # Cheap password hashing: the tests register dozens of users.
        super().__init__(module_config, {"bcrypt_rounds": 4}, database="postgres", workdir=workdir)

    def reassign_ports(self) -> None:
        super().reassign_ports()
        # The worker's ports too: the main's config names them (instance_map).
        self.replication_port = free_port()
        self.worker_client_port = free_port()
        self.worker_module_port = free_port()
        self.worker_replication_port = free_port()

    @property
    def ports(self) -> Ports:
        return Ports(
            main_client=self.client_port,
            main_module=self.module_port,
            main_replication=self.replication_port,
            worker_client=self.worker_client_port,
            worker_module=self.worker_module_port,
            worker_replication=self.worker_replication_port,
            redis=self.redis_port,
        )

    def homeserver_config(self) -> dict[str, Any]:
        config = super().homeserver_config()
        fragment = main_fragment(self.ports)
        config["listeners"] = config["listeners"] + [fragment["listeners"][-1]]
        config["redis"] = fragment["redis"]
        config["instance_map"] = fragment["instance_map"]
        return config


class WorkerProcess(ListeningProcess):
    """One generic worker reading the main's ``homeserver.yaml`` and its own file."""

    def __init__(self, main: MainProcess, name: str = WORKER_NAME) -> None:
        self.main = main
        self.name = name
        self.config_path = os.path.join(main.workdir, f"{name}.yaml")
        self.log_path = os.path.join(main.workdir, f"{name}.log")
        self._stderr_path = os.path.join(main.workdir, f"{name}.stderr.log")
        self.process: subprocess.Popen[bytes] | None = None
        # Test-specific additions: ``listeners`` are appended, other keys set.
        self.extra_config: dict[str, Any] = {}

    # The main process may have moved to fresh ports when it started.
    @property
    def client_port(self) -> int:
        return self.main.worker_client_port

    @property
    def module_port(self) -> int:
        return self.main.worker_module_port

    def fragment(self) -> dict[str, Any]:
        """What the worker's own file holds, besides the test's additions."""
        return worker_fragment(self.main.ports)

    def worker_config(self) -> dict[str, Any]:
        config = self.fragment()
        config["worker_log_config"] = self._write_log_config()
        for key, value in self.extra_config.items():
            if key == "listeners":
                config["worker_listeners"] = config["worker_listeners"] + value
            else:
                config[key] = value
        return config

    def _write_log_config(self) -> str:
        # The harness's logging, into a file of the worker's own.
        with open(self.main.homeserver_config()["log_config"]) as f:
            log_config = yaml.safe_load(f)
        log_config["handlers"]["file"]["filename"] = self.log_path
        path = os.path.join(self.main.workdir, f"{self.name}.log.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(log_config, f)
        return path

    def _write_config(self) -> None:
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.worker_config(), f)

    def start(self, timeout: float = 60.0) -> None:
        self._write_config()
        env = dict(os.environ)
        env.setdefault("SYNAPSE_ASYNC_IO_REACTOR", "0")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH", "")) if p)
        stderr = open(self._stderr_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "synapse.app.generic_worker",
                "-c",
                self.main.config_path,
                "-c",
                self.config_path,
            ],
            stdout=stderr,
            stderr=stderr,
            cwd=self.main.workdir,
            env=env,
        )
        stderr.close()

        def healthy() -> bool:
            try:
                return request(self.client_port, "GET", "/health", timeout=2).status == 200
            except OSError:
                return False

        try:
            _wait_for(healthy, self.process, f"Synapse worker {self.name}", timeout)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{self.tail_logs()}") from None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the worker (SIGKILL to simulate a crash)."""
        if sig != signal.SIGTERM and self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        _stop_process(self.process)
        self.process = None


class MediaWorkerProcess(WorkerProcess):
    """A media-repository worker (:func:`media_worker_fragment`) with one ``media`` listener.

    Uploads and downloads go to its listener (:attr:`client_port`, which also
    answers ``/health``); in ``mount: intercept`` the module sits on it too.
    """

    def __init__(self, main: MainProcess) -> None:
        super().__init__(main, MEDIA_WORKER_NAME)
        self.media_port = free_port()

    @property
    def client_port(self) -> int:
        return self.media_port

    @property
    def module_port(self) -> int:
        return self.media_port

    def fragment(self) -> dict[str, Any]:
        return media_worker_fragment(self.media_port)


def _require_prerequisites() -> None:
    """Fail with a message that says what is missing, before starting anything."""
    if importlib.util.find_spec("txredisapi") is None:
        raise RuntimeError(
            "Synapse's redis support is not installed in this Python "
            f"({sys.executable}): pip install 'matrix-synapse[redis]'"
        )
    if shutil.which("redis-server") is None:
        raise RuntimeError(
            "redis-server is not on PATH: Synapse workers need redis "
            "(Debian/Ubuntu: apt-get install redis-server)"
        )


class WorkerDeployment:
    """redis + main process + one generic worker, with the module on both.

    Args:
        module_config: The module's ``config:`` (``mount: listener`` unless it
            says otherwise).

    Raises:
        RuntimeError: with what is missing, if PostgreSQL, redis-server or
            Synapse's redis extra is not available.
    """

    def __init__(self, module_config: dict[str, Any]) -> None:
        _require_prerequisites()
        redis_port = free_port()
        # Every process's files (configs, logs, signing key, redis's dir) live here.
        self.workdir = tempfile.mkdtemp(prefix="mlf-workers-")
        try:
            self.main = MainProcess(
                {"mount": "listener", **module_config}, redis_port, self.workdir
            )
        except Exception as exc:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if type(exc).__module__.startswith("psycopg2"):
                args = pg_connect_args(None)
                raise RuntimeError(
                    "Synapse workers need PostgreSQL, which is not reachable as "
                    f"{args['user']}@{args['host']}:{args['port']} (PG* variables): "
                    f"{type(exc).__name__}: {str(exc).strip()}"
                ) from None
            raise
        self.redis = RedisServer(self.main.workdir, redis_port)
        self.worker = WorkerProcess(self.main)
        self.media_worker: MediaWorkerProcess | None = None

    @property
    def ports(self) -> Ports:
        return self.main.ports

    def add_media_worker(
        self, main_media_store: bool = False, media_jobs_instance: str | None = None
    ) -> MediaWorkerProcess:
        """Add a media-repository worker (started after the generic worker).

        Args:
            main_media_store: Whether the main process keeps its media store
                (``enable_media_repo``; Synapse's worker docs turn it off).
            media_jobs_instance: ``media_instance_running_background_jobs``, if set.
        """
        extra = {**self.main.extra_config, "enable_media_repo": main_media_store}
        if media_jobs_instance is not None:
            extra["media_instance_running_background_jobs"] = media_jobs_instance
        self.main.reconfigure(extra_config=extra)
        self.media_worker = MediaWorkerProcess(self.main)
        return self.media_worker

    def start(self) -> None:
        """Start redis, then the main process, then the workers."""
        self.redis.start()
        self.main.start()
        self.worker.start()
        if self.media_worker is not None:
            self.media_worker.start()

    def cleanup(self) -> None:
        """Stop everything and drop the database and the working directory."""
        try:
            if self.media_worker is not None:
                self.media_worker.stop()
            self.worker.stop()
            self.main.stop()
            self.redis.stop()
        finally:
            self.main.cleanup()
            if not os.environ.get("MLF_KEEP_WORKDIR"):
                shutil.rmtree(self.workdir, ignore_errors=True)


def doc_blocks(ports: Ports = DOC_PORTS, media_port: int = DOC_MEDIA_PORT) -> str:
    """The configuration parts in docs/workers.md's form."""
    return (
        "# homeserver.yaml (read by every process)\n"
        + to_yaml(main_fragment(ports))
        + f"\n# {WORKER_NAME}.yaml\n"
        + to_yaml(worker_fragment(ports))
        + f"\n# {MEDIA_WORKER_NAME}.yaml\n"
        + to_yaml(media_worker_fragment(media_port))
    )


if __name__ == "__main__":
    print(doc_blocks(), end="")


class DeploymentTestCase(SynapseTestCase):
    """Starts one main process and one worker, both with the module, per test class."""

    if os.environ.get("MLF_TEST_DATABASE", "sqlite") != "postgres":
        skip = (
            "Synapse workers need PostgreSQL: set MLF_TEST_DATABASE=postgres "
            "(tox -e postgres) with a PostgreSQL server in the PG* variables"
        )

    deployment: ClassVar[WorkerDeployment]
    worker: ClassVar[WorkerProcess]
    # Set when configure_deployment added one (WorkerDeployment.add_media_worker).
    media_worker: ClassVar[MediaWorkerProcess | None] = None

    @classmethod
    def setUpClass(cls) -> None:
        if "deployment" in cls.__dict__:
            return
        deployment = WorkerDeployment({"mount": cls.MODE, **cls.MODULE_CONFIG})
        try:
            cls.configure_deployment(deployment)
            deployment.start()
            cls.hs = deployment.main
            cls.worker = deployment.worker
            cls.media_worker = deployment.media_worker
            cls.set_up_deployment()
        except BaseException:
            deployment.cleanup()
            raise
        cls.deployment = deployment

    @classmethod
    def configure_deployment(cls, deployment: WorkerDeployment) -> None:
        """Changes to the deployment's configuration before it starts."""

    @classmethod
    def set_up_deployment(cls) -> None:
        """What the whole class needs on the running deployment."""

    @classmethod
    def tearDownClass(cls) -> None:
        if "deployment" in cls.__dict__:
            cls.deployment.cleanup()
            del cls.deployment
            del cls.hs
