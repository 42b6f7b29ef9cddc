"""Helpers shared by the retention test modules: a Synapse with the module and its
admin API, and a second Synapse it federates with (no tests of their own)."""

import itertools
import os
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from matrix_leave_forget.retention.sweeper import SYNAPSE_LOCK_TIMEOUT_S
from matrix_leave_forget.timestamps import now_ms
from tests.integration.base import SynapseTestCase
from tests.support import rawdb
from tests.support.harness import (
    PURGE_TIMEOUT,
    Response,
    SynapseProcess,
    User,
    free_port,
    quote_room,
    request,
    wait_until,
    write_self_signed_cert,
)

ADMIN = "/_synapse/client/leave_forget/v1/admin"
RELAXED_FORGET = {"per_second": 1000, "burst_count": 1000}
FAST_RETENTION = {"period": "1s", "sweep_interval": "100ms"}
# The states a room forgotten by all can be in until something cancels its purge.
AFTER_FORGET = ("forgotten", "purging", "purged", "dry_run")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


_unique = itertools.count(1)


class RetentionHelpers(SynapseTestCase):
    """Helpers shared by the retention test classes (no tests of its own)."""

    MODE = "listener"
    admin: ClassVar[User]
    _boot_failure: ClassVar[str | None] = None
    _up: ClassVar[bool] = False

    @classmethod
    def setUpClass(cls) -> None:
        # Idempotent: a unittest-style runner calls it before the first setUp does.
        if cls.__dict__.get("_up"):
            return
        cls.boot()
        cls._up = True

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.__dict__.get("_up"):
            cls._up = False
            cls.shutdown()

    @classmethod
    def boot(cls) -> None:
        super().setUpClass()
        try:
            cls.admin = cls.hs.register("admin", admin=True)
        except Exception:
            cls.hs.cleanup()
            raise

    @classmethod
    def shutdown(cls) -> None:
        super().tearDownClass()

    # -- users and rooms -------------------------------------------------

    def user(self, prefix: str = "u", admin: bool = False) -> User:
        return self.hs.register(f"{prefix}{next(_unique)}{os.urandom(2).hex()}", admin=admin)

    def leave(self, user: User, room_id: str, reason: str | None = None) -> Response:
        body = {"reason": reason} if reason is not None else {}
        resp = self.via_module("POST", room_id, "leave", body, token=user.access_token)
        self.assertEqual(resp.status, 200, resp.body)
        return resp

    def forget(self, user: User, room_id: str) -> Response:
        resp = self.via_module("POST", room_id, "forget", {}, token=user.access_token)
        self.assertEqual(resp.status, 200, resp.body)
        return resp

    def leave_and_forget(self, users: Sequence[User], room_id: str) -> None:
        for user in users:
            self.leave(user, room_id)
        for user in users:
            self.forget(user, room_id)

    def join(self, user: User, room_id: str) -> None:
        resp = self.hs.membership(user, room_id, "join")
        self.assertEqual(resp.status, 200, resp.body)

    def joined_room(self, members: int = 2) -> tuple[str, list[User]]:
        """A room with a non-admin creator and ``members`` local users in it."""
        users = [self.user("m") for _ in range(members)]
        room_id = self.hs.create_room(users[0], preset="public_chat")
        for user in users[1:]:
            self.join(user, room_id)
        return room_id, users

    def forgotten_room(self, members: int = 2) -> str:
        """A room with a non-admin creator and ``members`` local users, all left and forgotten."""
        room_id, users = self.joined_room(members)
        since = now_ms()
        self.leave_and_forget(users, room_id)
        self.assert_forgotten_by_all(room_id, since)
        return room_id

    def period_ms(self) -> int:
        """The running server's retention period, in milliseconds."""
        period = str(self.hs.module_config["retention"]["period"])
        match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", period)
        assert match is not None, period
        return int(match[1]) * _UNIT_MS[match[2]]

    def assert_forgotten_by_all(self, room_id: str, since: int) -> None:
        """The last forget (made at or after ``since``) armed the room's purge.

        Reads what that forget recorded, which the sweep keeps, rather than
        the state "forgotten": with a 1-3 s period a loaded machine can let the
        sweep move the room on to purging, purged or dry_run before this reads
        it. Tests that need the room still undecided hold it (:meth:`hold`).
        """
        retention = self.retention(room_id)
        self.assertIsNotNone(retention, f"{room_id} is not forgotten by all")
        self.assertIn(retention["state"], AFTER_FORGET, retention)
        self.assertGreaterEqual(retention["forgotten_at"], since - 1000, retention)
        self.assertEqual(retention["purge_due_at"] - retention["forgotten_at"], self.period_ms())

    def hold(self, room_id: str) -> None:
        """Hold the room through the admin API: no purge decision until :meth:`release`.

        Tests that must act between a forget and the purge decision (a
        rejoin, a restart) hold the room first, so the period running out on
        a slow machine cannot decide the room before the action under test.
        """
        path = f"/rooms/{quote_room(room_id)}/hold"
        self.assertTrue(self.admin_ok("PUT", path, {"reason": "test setup"})["created"])

    def release(self, room_id: str) -> dict[str, Any]:
        """Lift the hold :meth:`hold` placed; the admin API's answer."""
        body = dict(self.admin_ok("DELETE", f"/rooms/{quote_room(room_id)}/hold"))
        self.assertTrue(body["lifted"])
        return body

    def synapse_has_room(self, room_id: str) -> bool:
        resp = self.hs.client(
            "GET", f"/_synapse/admin/v1/rooms/{quote_room(room_id)}", token=self.admin.access_token
        )
        self.assertIn(resp.status, (200, 404), resp.body)
        return resp.status == 200

    # -- the module's admin API -------------------------------------------

    def admin_api(
        self, method: str, path: str, body: Any = None, token: str | None = None, **kw: Any
    ) -> Response:
        return request(
            self.module_port,
            method,
            ADMIN + path,
            body,
            token=self.admin.access_token if token is None else token,
            **kw,
        )

    def admin_ok(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.admin_api(method, path, body)
        self.assertEqual(resp.status, 200, resp.body)
        return resp.body

    def detail(self, room_id: str) -> dict[str, Any]:
        return dict(self.admin_ok("GET", f"/rooms/{quote_room(room_id)}"))

    def retention(self, room_id: str) -> dict[str, Any] | None:
        return self.detail(room_id)["retention"]

    def state(self, room_id: str) -> str | None:
        retention = self.retention(room_id)
        return None if retention is None else str(retention["state"])

    def listing(self, state: str) -> list[dict[str, Any]]:
        """Every room of a listing, following next_from."""
        rooms: list[dict[str, Any]] = []
        after = ""
        while True:
            query = f"/rooms?state={state}&limit=50" + (
                f"&from={quote_room(after)}" if after else ""
            )
            body = self.admin_ok("GET", query)
            self.assertEqual(body["state"], state)
            rooms.extend(body["rooms"])
            if "next_from" not in body:
                return rooms
            after = body["next_from"]

    def listed(self, state: str) -> list[str]:
        return [r["room_id"] for r in self.listing(state)]

    def audit(self, **filters: str) -> list[dict[str, Any]]:
        """Every audit entry matching filters, in seq order, following next_from."""
        entries: list[dict[str, Any]] = []
        after = 0
        while True:
            query = "&".join(
                [f"{k}={quote_room(v)}" for k, v in filters.items()]
                + [f"from={after}", "limit=100"]
            )
            body = self.admin_ok("GET", f"/audit?{query}")
            entries.extend(body["entries"])
            if "next_from" not in body:
                return entries
            after = body["next_from"]

    def purge_outcomes(self, room_id: str) -> list[str]:
        return [e["outcome"] for e in self.audit(room_id=room_id) if e["action"] == "purge"]

    def wait_state(
        self, room_id: str, state: str, timeout: float = PURGE_TIMEOUT
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            retention = self.retention(room_id)
            return retention if retention and retention["state"] == state else None

        return wait_until(reached, timeout, f"{room_id} to be {state}")

    def sweep_past(self) -> str:
        """Forget a fresh room and wait for its purge: every room due earlier was swept."""
        sentinel = self.forgotten_room(members=1)
        self.wait_state(sentinel, "purged")
        return sentinel

    def assert_last_forget_keeps(self, user: User, room_id: str) -> None:
        """``user`` leaves and forgets, yet the room is not forgotten by all:
        it gets no retention state and survives a sweep past its period."""
        self.leave_and_forget([user], room_id)
        self.assertIsNone(self.retention(room_id))
        self.sweep_past()
        self.assertIsNone(self.retention(room_id))
        self.assertEqual(self.purge_outcomes(room_id), [])
        self.assertTrue(self.synapse_has_room(room_id))

    def lock_tokens(self) -> list[str]:
        """The tokens of every row in Synapse's read/write lock table now."""
        rows = rawdb.query(self.hs, "SELECT token FROM worker_read_write_locks")
        return [str(row[0]) for row in rows]

    def expire_locks(self, tokens: Sequence[str]) -> None:
        """Make these lock rows look unrenewed for longer than Synapse's lock timeout.

        What the 2 minutes after a crash would do to the dead process's locks,
        without waiting for them: Synapse's next attempt to take the lock
        deletes an expired row, as it would then. Rows a running process
        took (other tokens) are left alone.
        """
        if not tokens:
            return
        expired = now_ms() - (SYNAPSE_LOCK_TIMEOUT_S + 60) * 1000
        rawdb.query(
            self.hs,
            "UPDATE worker_read_write_locks SET last_renewed_ts = ? "
            f"WHERE token IN ({', '.join('?' for _ in tokens)})",
            (expired, *tokens),
        )

    def assert_purged(self, room_id: str) -> None:
        retention = self.wait_state(room_id, "purged")
        self.assertEqual(self.purge_outcomes(room_id), ["started", "purged"])
        self.assertGreaterEqual(retention["purge_started_at"], retention["purge_due_at"])
        self.assertGreaterEqual(retention["purged_at"], retention["purge_started_at"])
        self.assertFalse(self.synapse_has_room(room_id))


class FederatingSynapseProcess(SynapseProcess):
    """A SynapseProcess that federates over loopback: named 127.0.0.1:<TLS port>."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.federation_port = free_port()
        super().__init__(*args, **kwargs)

    @property
    def server_name(self) -> str:
        return f"127.0.0.1:{self.federation_port}"

    def homeserver_config(self) -> dict[str, Any]:
        config = super().homeserver_config()
        config.update(write_self_signed_cert(self.workdir))
        config["server_name"] = self.server_name
        config["listeners"] = [
            *config["listeners"],
            {
                "port": self.federation_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": True,
                "resources": [{"names": ["federation"]}],
            },
        ]
        config["federation_verify_certificates"] = False
        config["ip_range_blacklist"] = []
        config["federation_ip_range_blacklist"] = []
        return config


class FederatedPair:
    """Mixin for a RetentionHelpers class: its Synapse (``hs``, with the module and an
    ``admin``) federates with a remote Synapse without the module, where ``rita`` lives."""

    MODE: ClassVar[str]
    MODULE_CONFIG: ClassVar[dict[str, Any]]
    hs: ClassVar[SynapseProcess]
    admin: ClassVar[User]
    remote: ClassVar[FederatingSynapseProcess]
    rita: ClassVar[User]

    @classmethod
    def boot(cls) -> None:
        cls.hs = FederatingSynapseProcess({"mount": cls.MODE, **cls.MODULE_CONFIG})
        cls.remote = FederatingSynapseProcess(None)
        try:
            cls.hs.start()
            cls.remote.start()
            cls.admin = cls.hs.register("admin", admin=True)
            cls.rita = cls.remote.register("rita")
        except Exception:
            cls.shutdown()
            raise

    @classmethod
    def shutdown(cls) -> None:
        cls.hs.cleanup()
        cls.remote.cleanup()
