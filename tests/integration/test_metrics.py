"""Prometheus metrics, scraped from Synapse's own metrics listener."""

import re

from support.harness import quote_room, wait_until
from tests.integration.base import SynapseTestCase


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample of metric ``name`` with exactly ``labels``, or 0."""
    wanted = {"server_name": "test.local", **labels}
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) == wanted:
            return float(match.group(2))
    return 0.0


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
