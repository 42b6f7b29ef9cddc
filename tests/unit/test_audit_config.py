"""The ``audit:`` section of the module's config (no Synapse process)."""

from typing import Any

from synapse.module_api.errors import ConfigError
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.config import (
    DEFAULT_REFUSAL_BUDGET,
    AuditConfig,
    RateLimitConfig,
    parse_config,
)


class AuditConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """No audit section: 10 refusal entries at once per user then one a minute; no room."""
        config = parse_config({}).audit
        self.assertEqual(config, AuditConfig())
        self.assertEqual(config.refusal_budget, RateLimitConfig(1 / 60, 10))
        self.assertIsNone(config.checkpoint_room)
        self.assertEqual(config.checkpoint_interval_ms, 3600 * 1000)

    def test_full(self) -> None:
        """Every key parsed; a partial refusal_budget keeps this section's other default."""
        config = parse_config(
            {
                "audit": {
                    "refusal_budget": {"burst_count": 3},
                    "checkpoint_room": "!cp:example.org",
                    "checkpoint_sender": "@audit:example.org",
                    "checkpoint_interval": "10m",
                }
            }
        ).audit
        self.assertEqual(
            config.refusal_budget, RateLimitConfig(DEFAULT_REFUSAL_BUDGET.per_second, 3)
        )
        self.assertEqual(config.checkpoint_room, "!cp:example.org")
        self.assertEqual(config.checkpoint_sender, "@audit:example.org")
        self.assertEqual(config.checkpoint_interval_ms, 600_000)

    def test_bad_values_name_the_key(self) -> None:
        """Each bad value is a ConfigError whose path names the key."""
        cases: dict[str, tuple[Any, tuple[str, ...]]] = {
            "not a mapping": ([], ("audit",)),
            "unknown key": ({"checkpoint": 1}, ("audit", "checkpoint")),
            "bad room": (
                {"checkpoint_room": "room", "checkpoint_sender": "@a:b"},
                ("audit", "checkpoint_room"),
            ),
            "bad sender": (
                {"checkpoint_room": "!r:b", "checkpoint_sender": "a"},
                ("audit", "checkpoint_sender"),
            ),
            "room alone": ({"checkpoint_room": "!r:b"}, ("audit", "checkpoint_sender")),
            "sender alone": ({"checkpoint_sender": "@a:b"}, ("audit", "checkpoint_room")),
            "bad interval": ({"checkpoint_interval": "soon"}, ("audit", "checkpoint_interval")),
            "zero interval": ({"checkpoint_interval": 0}, ("audit", "checkpoint_interval")),
            "bad budget": (
                {"refusal_budget": {"burst_count": 0}},
                ("audit.refusal_budget", "burst_count"),
            ),
            "budget not a mapping": ({"refusal_budget": 5}, ("audit", "refusal_budget")),
        }
        for name, (section, path) in cases.items():
            with self.assertRaises(ConfigError, msg=name) as caught:
                parse_config({"audit": section})
            self.assertEqual(tuple(caught.exception.path or ()), path, name)


class TextRetentionConfigTests(SynchronousTestCase):
    def test_off_by_default_and_off_spelled_out(self) -> None:
        """text_retention keeps free text by default; off, null and false say the same."""
        self.assertIsNone(parse_config({}).audit.text_retention_ms)
        for value in ("off", None, False):
            with self.subTest(value=value):
                config = parse_config({"audit": {"text_retention": value}})
                self.assertIsNone(config.audit.text_retention_ms)

    def test_duration(self) -> None:
        """A duration is parsed like every other duration key."""
        config = parse_config({"audit": {"text_retention": "90d"}})
        self.assertEqual(config.audit.text_retention_ms, 90 * 24 * 3600 * 1000)

    def test_bad_value_names_the_key(self) -> None:
        """A value that is not a duration is a ConfigError at audit.text_retention."""
        for value in ("soon", 0, True, "-1d"):
            with self.subTest(value=value):
                with self.assertRaises(ConfigError) as cm:
                    parse_config({"audit": {"text_retention": value}})
                self.assertEqual(tuple(cm.exception.path or ()), ("audit", "text_retention"))
