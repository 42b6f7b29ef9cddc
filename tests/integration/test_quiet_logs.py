"""Synapse's log stays quiet with the module loaded.

One full cycle a user and an operator go through (register, createRoom, join,
send, sync, leave, read the history, forget, read again, the last local user
forgets, the sweep purges the room, the room's rows are gone) on a real
Synapse, in both mounts and with the history guard off; then Synapse's own log
must hold no WARNING or ERROR line. The module's own lines and Synapse's
``synapse.logging.context`` complaints (code running in a request's logcontext
after the request finished, which also breaks Synapse's per-request CPU and
database accounting) are what this is after; the same cycle without the
module is the control that the cycle itself is clean on Synapse.
"""

import json
import re
import urllib.parse
from typing import Any, ClassVar

from tests.integration.base import SynapseTestCase
from tests.support.harness import SynapseProcess, quote_room, wait_until

# A log line: "<time> - <logger> - <lineno> - <LEVEL> - <request> - <message>".
LINE = re.compile(r"^\S+ \S+ - (?P<logger>\S+) - \d+ - (?P<level>[A-Z]+) - ")

RETENTION = {"period": "1ms", "sweep_interval": "50ms"}


def loud_lines(log: str) -> list[str]:
    """The WARNING, ERROR and CRITICAL lines of a Synapse log (continuations included)."""
    loud: list[str] = []
    keep = False
    for line in log.splitlines():
        match = LINE.match(line)
        if match:
            keep = match.group("level") in ("WARNING", "ERROR", "CRITICAL")
        if keep:
            loud.append(line)
    return loud


class QuietCycle:
    """The cycle, for a class that provides ``hs`` and ``leave_forget_port``."""

    failureException: type[AssertionError]

    hs: ClassVar[SynapseProcess]
    WITH_MODULE: ClassVar[bool] = True

    def leave_forget_port(self) -> int:
        raise NotImplementedError

    def call(self, method: str, path: str, body: Any = None, *, token: str) -> Any:
        response = self.hs.client(method, path, body, token=token)
        assert response.status == 200, f"{method} {path}: {response.status} {response.body}"
        return response.body

    def leave_forget(self, room: str, action: str, token: str) -> None:
        from tests.support.harness import request

        path = f"/_matrix/client/v3/rooms/{quote_room(room)}/{action}"
        response = request(self.leave_forget_port(), "POST", path, {}, token=token)
        assert response.status == 200, f"{action}: {response.status} {response.body}"

    def cycle(self, round_no: int) -> None:
        hs = self.hs
        alice = hs.register(f"quiet_alice{round_no}", admin=True)
        bob = hs.register(f"quiet_bob{round_no}")
        room = hs.create_room(alice, preset="public_chat")
        quoted = quote_room(room)
        self.call("POST", f"/_matrix/client/v3/join/{quoted}", {}, token=bob.access_token)
        for i in range(3):
            self.call(
                "PUT",
                f"/_matrix/client/v3/rooms/{quoted}/send/m.room.message/t{round_no}-{i}",
                {"msgtype": "m.text", "body": f"hello {i}"},
                token=alice.access_token,
            )
        since = self.call("GET", "/_matrix/client/v3/sync?timeout=0", token=bob.access_token)[
            "next_batch"
        ]
        self.leave_forget(room, "leave", bob.access_token)
        self.call(
            "GET", f"/_matrix/client/v3/rooms/{quoted}/messages?dir=b", token=bob.access_token
        )
        self.leave_forget(room, "forget", bob.access_token)
        # After forget: history is refused (403 with the module's guard and on
        # Synapse alike); a sync from before the leave.
        response = hs.client(
            "GET", f"/_matrix/client/v3/rooms/{quoted}/messages?dir=b", token=bob.access_token
        )
        assert response.status == 403, response.body
        include_leave = urllib.parse.quote(json.dumps({"room": {"include_leave": True}}))
        self.call(
            "GET",
            f"/_matrix/client/v3/sync?timeout=0&since={since}&filter={include_leave}",
            token=bob.access_token,
        )
        # The last local member leaves and forgets: the room is purged.
        self.leave_forget(room, "leave", alice.access_token)
        self.leave_forget(room, "forget", alice.access_token)
        if self.WITH_MODULE:
            path = f"/_synapse/client/leave_forget/v1/admin/rooms/{quoted}"

            def purged() -> bool:
                body = hs.client("GET", path, token=alice.access_token).body
                return bool(body.get("retention")) and body["retention"]["state"] == "purged"

            wait_until(purged, what="the room's purge")
        else:
            response = hs.client(
                "DELETE",
                f"/_synapse/admin/v2/rooms/{quoted}",
                {"purge": True},
                token=alice.access_token,
            )
            assert response.status == 200, response.body
            delete_id = response.body["delete_id"]

            def purged() -> bool:
                body = hs.client(
                    "GET",
                    f"/_synapse/admin/v2/rooms/delete_status/{delete_id}",
                    token=alice.access_token,
                ).body
                return body.get("status") == "complete"

            wait_until(purged, what="the room's purge")

    def assert_quiet_cycles(self) -> None:
        # Start-up lines (Synapse's banner, the module's deliberate start-up
        # warnings) are not the cycle's.
        start = len(self.hs.log_text())
        for round_no in range(3):
            self.cycle(round_no)
        loud = loud_lines(self.hs.log_text()[start:])
        if loud:
            raise self.failureException(
                f"Synapse logged {len(loud)} loud lines:\n" + "\n".join(loud[:20])
            )


class QuietInterceptTests(QuietCycle, SynapseTestCase):
    MODE = "intercept"
    MODULE_CONFIG = {"retention": RETENTION}

    def leave_forget_port(self) -> int:
        return self.module_port

    def test_full_cycle_logs_no_warning(self) -> None:
        """Three rounds of register/createRoom/join/send/sync/leave/messages/
        forget/sync/purge through the intercepting module leave no WARNING or
        ERROR line in Synapse's log."""
        self.assert_quiet_cycles()


class QuietNoGuardTests(QuietInterceptTests):
    MODULE_CONFIG = {"retention": RETENTION, "history_guard": False}

    def test_full_cycle_logs_no_warning(self) -> None:
        """The same cycle with history_guard: false (reads pass through untouched)
        leaves no WARNING or ERROR line either."""
        self.assert_quiet_cycles()


class QuietListenerTests(QuietInterceptTests):
    MODE = "listener"

    def test_full_cycle_logs_no_warning(self) -> None:
        """The same cycle with the module on its own listener (mount: listener)
        leaves no WARNING or ERROR line either."""
        self.assert_quiet_cycles()


class QuietWithoutModuleTests(QuietCycle, SynapseTestCase):
    """The control: Synapse alone, the same cycle (its own endpoints, its own purge)."""

    WITH_MODULE = False

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        cls.hs = SynapseProcess(None, {})
        try:
            cls.hs.start()
        except Exception:
            cls.hs.cleanup()
            del cls.hs
            raise

    def leave_forget_port(self) -> int:
        return self.hs.client_port

    def test_full_cycle_logs_no_warning(self) -> None:
        """Without the module the same cycle is clean too: whatever the other
        classes of this module find, the module brought it."""
        self.assert_quiet_cycles()
