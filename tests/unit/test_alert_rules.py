"""The Prometheus alert rules' own unit tests (docs/monitoring/alerts_test.yml)."""

import os
import shutil
import subprocess

import yaml
from twisted.trial import unittest

MONITORING = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "docs",
    "monitoring",
)


class AlertRuleTests(unittest.TestCase):
    def test_every_alert_has_promtool_tests(self) -> None:
        """Every alert of alerts.yml is named by a test case of alerts_test.yml
        that expects it to fire and by one that expects it quiet."""
        with open(os.path.join(MONITORING, "alerts.yml")) as f:
            alerts = {
                rule["alert"]
                for group in yaml.safe_load(f)["groups"]
                for rule in group["rules"]
                if "alert" in rule
            }
        with open(os.path.join(MONITORING, "alerts_test.yml")) as f:
            cases = [
                case for test in yaml.safe_load(f)["tests"] for case in test["alert_rule_test"]
            ]
        self.assertTrue(alerts)
        fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
        quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
        self.assertEqual(sorted(alerts - fires), [])
        self.assertEqual(sorted(alerts - quiet), [])

    def test_promtool_unit_tests_pass(self) -> None:
        """`promtool test rules` passes: each alert fires on the first failure
        (a series absent then at 1, and one at 0 then 1) and stays quiet otherwise."""
        promtool = shutil.which("promtool")
        if promtool is None:
            self.skipTest("promtool is not installed (Debian package `prometheus`)")
        result = subprocess.run(
            [promtool, "test", "rules", "alerts_test.yml"],
            cwd=MONITORING,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS", result.stdout)
