"""matrix-js-sdk through Node: installed once from npm into a shared cache, run as a subprocess."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import queue
import shutil
import subprocess
import threading
from typing import Any

from twisted.trial.unittest import SkipTest

from tests.support.harness import REPO_ROOT

JS_DIR = os.path.join(REPO_ROOT, "tests", "integration", "js")
JS_SCRIPT = "sync_device.mjs"
NPM_TIMEOUT = 600
CLIENT_TIMEOUT = 90.0
LABEL = "mlf.label"


def js_sdk_dir() -> str:
    """A directory with tests/integration/js's package installed (npm install once).

    Raises:
        SkipTest: node or npm is missing, or npm could not install the package.
    """
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise SkipTest(f"{tool} is not on PATH: matrix-js-sdk cannot run")
    with open(os.path.join(JS_DIR, "package.json"), "rb") as f:
        package = f.read()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    target = os.path.join(
        cache, "matrix-leave-forget", "js-" + hashlib.sha256(package).hexdigest()[:16]
    )
    os.makedirs(target, exist_ok=True)
    # One install at a time: trial -j workers and parallel tox environments share the cache.
    with open(os.path.join(target, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(os.path.join(target, "node_modules", "matrix-js-sdk")):
            with open(os.path.join(target, "package.json"), "wb") as f:
                f.write(package)
            try:
                done = subprocess.run(
                    ["npm", "install", "--no-audit", "--no-fund", "--omit=dev"],
                    cwd=target,
                    capture_output=True,
                    text=True,
                    timeout=NPM_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise SkipTest(
                    f"npm install did not finish in {NPM_TIMEOUT} s in {target}"
                ) from None
            if done.returncode != 0:
                raise SkipTest(f"npm install failed in {target}: {done.stderr.strip()[-500:]}")
        # Node resolves packages from the script's directory: the script runs from
        # here. Rewritten only when it changed, so no run reads it half written.
        with open(os.path.join(JS_DIR, JS_SCRIPT), "rb") as f:
            script = f.read()
        installed = os.path.join(target, JS_SCRIPT)
        current = b""
        if os.path.exists(installed):
            with open(installed, "rb") as f:
                current = f.read()
        if current != script:
            with open(installed + ".tmp", "wb") as f:
                f.write(script)
            os.replace(installed + ".tmp", installed)
    return target


class NodeReports:
    """The reports sync_device.mjs prints, read on a thread so that a stuck client
    fails the test after CLIENT_TIMEOUT instead of hanging it."""

    PREFIX = "MLF-REPORT "

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._reports: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.output: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(self.PREFIX):
                self._reports.put(json.loads(line[len(self.PREFIX) :]))
            else:
                self.output.append(line)
        self._reports.put(None)  # the process ended

    def next(self, phase: str) -> dict[str, Any]:
        try:
            report = self._reports.get(timeout=CLIENT_TIMEOUT)
        except queue.Empty:
            raise AssertionError(
                f"no {phase!r} report from node in {CLIENT_TIMEOUT} s:\n"
                + "".join(self.output[-40:])
            ) from None
        if report is None or report.get("phase") != phase:
            raise AssertionError(
                f"expected the {phase!r} report, got {report!r}:\n" + "".join(self.output[-40:])
            )
        return report
