"""Prometheus metrics, scraped from Synapse's own metrics listener."""

import re

from tests.integration.base import SynapseTestCase
from tests.support.harness import quote_room, wait_until


def _find(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample of metric ``name`` with exactly ``labels``, or None."""
    wanted = {"server_name": "test.local", **labels}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == wanted:
            return float(match.group(2))
    return None


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample of metric ``name`` with exactly ``labels``, or 0."""
    value = _find(text, name, **labels)
    return 0.0 if value is None else value


class MetricsTests(SynapseTestCase):
    MODE = "listener"
    MODULE_CONFIG = {"retention": {"period": "1ms", "dry_run": True, "sweep_interval": "50ms"}}

    def test_leave_and_forget_counted_by_outcome(self) -> None:
        """A served leave, a refused forget and a served forget each show up in
        the request counter and the latency histogram with their outcome."""
        user = self.hs.register("metrics_user")
        room = self.hs.create_room(user)
        self.assertEqual(
            self.via_module("POST", room, "forget", token=user.access_token).status, 400
        )
        self.assertEqual(
            self.via_module("POST", room, "leave", {}, token=user.access_token).status, 200
        )
        self.assertEqual(
            self.via_module("POST", room, "forget", token=user.access_token).status, 200
        )

        text = self.hs.metrics()
        counter = "synapse_leave_forget_requests_total"
        self.assertGreaterEqual(_sample(text, counter, action="leave", outcome="ok"), 1)
        self.assertGreaterEqual(_sample(text, counter, action="forget", outcome="ok"), 1)
        self.assertGreaterEqual(_sample(text, counter, action="forget", outcome="M_UNKNOWN"), 1)
        self.assertGreaterEqual(
            _sample(
                text, "synapse_leave_forget_request_seconds_count", action="leave", outcome="ok"
            ),
            1,
        )

    def test_purge_decisions_counted(self) -> None:
        """A room forgotten by its only local user is decided by the sweep (a
        dry run here), and the decision is counted and timed."""
        user = self.hs.register("metrics_purger")
        room = self.hs.create_room(user)
        self.via_module("POST", room, "leave", {}, token=user.access_token)
        self.assertEqual(
            self.via_module("POST", room, "forget", token=user.access_token).status, 200
        )
        admin = self.hs.register("metrics_admin", admin=True)
        path = f"/_synapse/client/leave_forget/v1/admin/rooms/{quote_room(room)}"

        def decided() -> bool:
            body = self.hs.client("GET", path, token=admin.access_token).body
            return bool(body["retention"]) and body["retention"]["state"] == "dry_run"

        wait_until(decided, what="the sweep's dry run")
        text = self.hs.metrics()
        self.assertGreaterEqual(
            _sample(text, "synapse_leave_forget_purges_total", outcome="dry_run"), 1
        )
        self.assertGreaterEqual(
            _sample(text, "synapse_leave_forget_purge_seconds_count", outcome="dry_run"), 1
        )

    def test_alerted_series_exist_at_zero_from_the_start(self) -> None:
        """Every series an alert rule reads is scraped (at 0 before any failure)
        from the start, so that `increase()` sees the first failure as an
        increase instead of a series appearing at 1."""
        text = self.hs.metrics()
        expected = [
            ("synapse_leave_forget_audit_write_failures_total", {"action": "leave"}),
            ("synapse_leave_forget_audit_write_failures_total", {"action": "forget"}),
            ("synapse_leave_forget_purge_failures_total", {"reason": "refused"}),
            ("synapse_leave_forget_purge_failures_total", {"reason": "failed"}),
            ("synapse_leave_forget_requests_total", {"action": "leave", "outcome": "error"}),
            ("synapse_leave_forget_requests_total", {"action": "forget", "outcome": "error"}),
        ] + [
            ("synapse_leave_forget_purges_total", {"outcome": outcome})
            for outcome in ("purge", "dry_run", "held", "cancelled", "purged")
        ]
        for name, labels in expected:
            self.assertIsNotNone(_find(text, name, **labels), f"{name} {labels} not scraped")
        # No test of this class fails a request or an audit write.
        for name, labels in expected[:6]:
            self.assertEqual(_find(text, name, **labels), 0.0, f"{name} {labels}")

    def test_held_room_counted_once(self) -> None:
        """A due room that a hold keeps is one `held` decision, however many
        sweeps find it held afterwards."""
        admin = self.hs.register("metrics_holder", admin=True)
        before = _sample(self.hs.metrics(), "synapse_leave_forget_purges_total", outcome="held")
        room = self.hs.create_room(admin)
        hold = f"/_synapse/client/leave_forget/v1/admin/rooms/{quote_room(room)}/hold"
        self.assertEqual(
            self.hs.client("PUT", hold, {"reason": "keep"}, token=admin.access_token).status, 200
        )
        self.via_module("POST", room, "leave", {}, token=admin.access_token)
        self.assertEqual(
            self.via_module("POST", room, "forget", token=admin.access_token).status, 200
        )

        def held() -> float:
            value = _sample(self.hs.metrics(), "synapse_leave_forget_purges_total", outcome="held")
            return value if value > before else 0.0

        wait_until(held, what="the sweep to find the room held")
        # Three more rooms decided one after the other: at least three later sweeps.
        for i in range(3):
            later = self.hs.create_room(admin)
            self.via_module("POST", later, "leave", {}, token=admin.access_token)
            self.via_module("POST", later, "forget", token=admin.access_token)
            path = f"/_synapse/client/leave_forget/v1/admin/rooms/{quote_room(later)}"

            def decided(path: str = path) -> bool:
                body = self.hs.client("GET", path, token=admin.access_token).body
                return bool(body["retention"]) and body["retention"]["state"] == "dry_run"

            wait_until(decided, what=f"the dry run of later room {i}")
        after = _sample(self.hs.metrics(), "synapse_leave_forget_purges_total", outcome="held")
        self.assertEqual(after - before, 1)
