"""Unit tests of the module's config parsing (no Synapse process)."""

from typing import Any

import attr
from synapse.module_api.errors import ConfigError
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget import LeaveForgetModule
from matrix_leave_forget.config import (
    MOUNT_INTERCEPT,
    MOUNT_LISTENER,
    LeaveForgetConfig,
    RateLimitConfig,
    RetentionConfig,
    describe_config,
    parse_config,
    parse_duration_ms,
)
from tests.support.harness import SynapseProcess


class ParseConfigDefaultsTests(SynchronousTestCase):
    def test_empty_mapping_gives_defaults(self) -> None:
        """An empty config block parses to the documented defaults."""
        config = LeaveForgetModule.parse_config({})
        self.assertEqual(config, LeaveForgetConfig())
        self.assertEqual(config.mount, MOUNT_INTERCEPT)
        self.assertIsNone(config.forget_rate_limit)  # as Synapse: forget is not limited
        self.assertTrue(config.audit_failures)
        self.assertEqual(config.retention, RetentionConfig())
        self.assertIsNone(config.retention.period_ms)
        self.assertFalse(config.retention.dry_run)
        self.assertEqual(config.retention.holds, frozenset())
        self.assertEqual(config.retention.sweep_interval_ms, 60_000)

    def test_none_gives_defaults(self) -> None:
        """A missing (null) config block parses to the same defaults as {}."""
        self.assertEqual(LeaveForgetModule.parse_config(None), LeaveForgetConfig())
        self.assertEqual(parse_config(None), LeaveForgetConfig())

    def test_null_sections_give_defaults(self) -> None:
        """`retention:` with no value keeps retention defaults; null rate limit disables it."""
        config = parse_config({"retention": None, "forget_rate_limit": None})
        self.assertEqual(config.retention, RetentionConfig())
        self.assertIsNone(config.forget_rate_limit)

    def test_full_config(self) -> None:
        """Every key, set to a valid non-default value, lands in the parsed config."""
        config = parse_config(
            {
                "mount": "listener",
                "forget_rate_limit": {"per_second": 2, "burst_count": 3},
                "audit_failures": False,
                "retention": {
                    "period": "7d",
                    "dry_run": True,
                    "holds": ["!a:test.local", "!b:test.local"],
                    "sweep_interval": "200ms",
                },
            }
        )
        self.assertEqual(config.mount, MOUNT_LISTENER)
        self.assertEqual(config.forget_rate_limit, RateLimitConfig(per_second=2.0, burst_count=3))
        self.assertIsInstance(config.forget_rate_limit.per_second, float)
        self.assertFalse(config.audit_failures)
        self.assertEqual(
            config.retention,
            RetentionConfig(
                period_ms=7 * 24 * 3600 * 1000,
                dry_run=True,
                holds=frozenset({"!a:test.local", "!b:test.local"}),
                sweep_interval_ms=200,
                media="delete",
            ),
        )

    def test_rate_limit_partial_keeps_other_default(self) -> None:
        """A rate limit block with one key keeps the default for the other."""
        config = parse_config({"forget_rate_limit": {"burst_count": 1}})
        self.assertEqual(config.forget_rate_limit, RateLimitConfig(per_second=0.2, burst_count=1))

    def test_period_off(self) -> None:
        """period: off / false / null means never purge."""
        for value in ("off", False, None):
            self.assertIsNone(parse_config({"retention": {"period": value}}).retention.period_ms)

    def test_room_version_12_room_id_hold(self) -> None:
        """A room id without a server name (room version 12) is accepted as a hold."""
        room = "!" + "a" * 43
        self.assertEqual(
            parse_config({"retention": {"holds": [room]}}).retention.holds, frozenset({room})
        )


class DurationTests(SynchronousTestCase):
    def test_durations(self) -> None:
        """Durations parse with a unit, from ms to y (surrounding blanks ignored)."""
        cases = {
            "500ms": 500,
            "2s": 2000,
            "1m": 60_000,
            "1h": 3_600_000,
            "7d": 7 * 86_400_000,
            "1w": 7 * 86_400_000,
            "1y": 365 * 86_400_000,
            "250ms": 250,
            " 2s ": 2000,
        }
        for value, millis in cases.items():
            self.assertEqual(parse_duration_ms(value, ("x",)), millis, value)
            self.assertEqual(
                parse_config({"retention": {"period": value}}).retention.period_ms, millis, value
            )
            self.assertEqual(
                parse_config({"retention": {"sweep_interval": value}}).retention.sweep_interval_ms,
                millis,
                value,
            )

    def test_bad_durations(self) -> None:
        """Non-durations, zero, negatives, booleans and floats are refused with the path."""
        for value in ("7 days", "2 s", "1.5s", "s", "", "-5", "10x", -5, 0, "0s", True, 1.5, [1]):
            with self.assertRaises(ConfigError, msg=repr(value)) as caught:
                parse_duration_ms(value, ("retention", "period"))
            self.assertEqual(tuple(caught.exception.path), ("retention", "period"))


class BadConfigTests(SynchronousTestCase):
    """Each bad config raises a ConfigError whose path names the offending key."""

    def assert_refused(self, config: Any, path: tuple[str, ...]) -> ConfigError:
        with self.assertRaises(ConfigError, msg=repr(config)) as caught:
            LeaveForgetModule.parse_config(config)
        error = caught.exception
        self.assertEqual(tuple(error.path or ()), path, f"{config!r}: {error.msg}")
        self.assertIsInstance(error.msg, str)
        self.assertTrue(error.msg)
        return error

    def test_not_a_mapping(self) -> None:
        """A config block that is not a mapping is refused."""
        for config in (["mount"], "listener", 3):
            self.assert_refused(config, ())

    def test_unknown_top_level_key(self) -> None:
        """An unknown top-level key is refused and named in path and message."""
        error = self.assert_refused({"mount": "listener", "retension": {}}, ("retension",))
        self.assertIn("retension", error.msg)
        self.assertIn("retention", error.msg)  # lists what is allowed

    def test_bad_mount(self) -> None:
        """mount must be intercept or listener."""
        for value in ("bogus", "", None, 1, True, ["listener"]):
            error = self.assert_refused({"mount": value}, ("mount",))
            self.assertIn("intercept", error.msg)
            self.assertIn("listener", error.msg)

    def test_bad_rate_limit(self) -> None:
        """per_second must be a positive number and burst_count an integer >= 1."""
        cases: dict[str, tuple[Any, tuple[str, ...]]] = {
            "per_second negative": ({"per_second": -1}, ("forget_rate_limit", "per_second")),
            "per_second zero": ({"per_second": 0}, ("forget_rate_limit", "per_second")),
            "per_second string": ({"per_second": "x"}, ("forget_rate_limit", "per_second")),
            "per_second bool": ({"per_second": True}, ("forget_rate_limit", "per_second")),
            "burst_count zero": ({"burst_count": 0}, ("forget_rate_limit", "burst_count")),
            "burst_count negative": ({"burst_count": -3}, ("forget_rate_limit", "burst_count")),
            "burst_count float": ({"burst_count": 1.5}, ("forget_rate_limit", "burst_count")),
            "burst_count string": ({"burst_count": "10"}, ("forget_rate_limit", "burst_count")),
            "unknown key": ({"per_minute": 1}, ("forget_rate_limit", "per_minute")),
            "not a mapping": ("fast", ("forget_rate_limit",)),
        }
        for value, path in cases.values():
            self.assert_refused({"forget_rate_limit": value}, path)

    def test_bad_retention_period(self) -> None:
        """retention.period refuses "7 days", negatives, zero and booleans."""
        for value in ("7 days", -5, 0, True, "1.5h", [], {}):
            error = self.assert_refused({"retention": {"period": value}}, ("retention", "period"))
            self.assertTrue("duration" in error.msg or "unit" in error.msg, error.msg)

    def test_bare_number_needs_a_unit(self) -> None:
        """A duration without a unit (30, "30") is a start-up error naming the key
        and suggesting 30d, for every duration key: read as milliseconds (as
        Synapse would), period: 30 meant as days would purge every forgotten
        room at once."""
        for section, key in (
            ("retention", "period"),
            ("retention", "sweep_interval"),
            ("retention", "media_grace"),
            ("audit", "checkpoint_interval"),
        ):
            for value in (30, "30", " 30 "):
                error = self.assert_refused({section: {key: value}}, (section, key))
                self.assertIn("no unit", error.msg)
                self.assertIn("30d", error.msg)
                self.assertIn("30ms", error.msg)

    def test_unknown_unit_is_named(self) -> None:
        """An unknown unit is named and the valid ones listed ("30sec" is not "at
        most 100y")."""
        for value, unit in (("30sec", "sec"), ("7 days", "days"), ("10x", "x"), ("2H", "H")):
            error = self.assert_refused({"retention": {"period": value}}, ("retention", "period"))
            self.assertIn(f"unknown unit {unit!r}", error.msg)
            self.assertIn("ms, s, m, h, d, w, y", error.msg)
            self.assertNotIn("100y", error.msg)

    def test_bad_sweep_interval(self) -> None:
        """retention.sweep_interval must be a positive duration (0 would spin)."""
        for value in (0, "0ms", -1, "soon", False, None):
            self.assert_refused(
                {"retention": {"sweep_interval": value}}, ("retention", "sweep_interval")
            )

    def test_bad_holds(self) -> None:
        """retention.holds must be a list of room ids; the bad element is named by index."""
        for value in ("!a:test.local", {"!a:test.local": 1}, 3, True):
            error = self.assert_refused({"retention": {"holds": value}}, ("retention", "holds"))
            self.assertIn("list", error.msg)
        for holds, index in (
            (["not a room id"], "0"),
            (["!ok:test.local", "#alias:test.local"], "1"),
            (["!ok:test.local", "@user:test.local"], "1"),
            ([5], "0"),
            ([None], "0"),
            (["!has space:test.local"], "0"),
            (["!" + "a" * 300 + ":test.local"], "0"),
        ):
            error = self.assert_refused(
                {"retention": {"holds": holds}}, ("retention", "holds", index)
            )
            self.assertIn("room id", error.msg)

    def test_bad_booleans(self) -> None:
        """audit_failures and retention.dry_run must be real booleans, not "yes" or 1."""
        for value in ("yes", "true", 1, 0, None):
            self.assert_refused({"audit_failures": value}, ("audit_failures",))
            self.assert_refused({"retention": {"dry_run": value}}, ("retention", "dry_run"))

    def test_bad_retention_section(self) -> None:
        """retention must be a mapping with known keys only."""
        self.assert_refused({"retention": "7d"}, ("retention",))
        self.assert_refused({"retention": ["7d"]}, ("retention",))
        error = self.assert_refused({"retention": {"periode": "7d"}}, ("retention", "periode"))
        self.assertIn("periode", error.msg)
        self.assertIn("sweep_interval", error.msg)

    def test_nested_unknown_keys(self) -> None:
        """Unknown keys are caught at every level, alongside valid keys."""
        self.assert_refused(
            {"retention": {"period": "1d", "holds": [], "bogus": 1}}, ("retention", "bogus")
        )
        self.assert_refused(
            {"forget_rate_limit": {"per_second": 1, "burst": 5}}, ("forget_rate_limit", "burst")
        )


class SynapseRefusesBadConfigTests(SynchronousTestCase):
    def test_synapse_refuses_to_start_and_names_the_key(self) -> None:
        """A real Synapse with `mount: bogus` exits at start-up, and its output names `mount`."""
        hs = SynapseProcess({"mount": "bogus"})
        try:
            with self.assertRaises(RuntimeError) as caught:
                hs.start(timeout=60)
        finally:
            hs.cleanup()
        message = str(caught.exception)
        self.assertIn("Synapse exited", message)
        self.assertIn("mount", message)
        self.assertIn("matrix_leave_forget", message)


class HostileConfigTests(SynchronousTestCase):
    """Values a YAML file can hold that used to crash or slip through (issue 11)."""

    def assert_refused(self, config: Any, path: tuple[str, ...]) -> str:
        with self.assertRaises(ConfigError, msg=repr(config)) as caught:
            LeaveForgetModule.parse_config(config)
        self.assertEqual(tuple(caught.exception.path or ()), path, caught.exception.msg)
        return str(caught.exception.msg)

    def test_non_string_keys(self) -> None:
        """A non-string key ({1: 2}) is a ConfigError naming it, not a TypeError
        from sorting it with the string keys; at every level."""
        self.assertIn("keys must be strings", self.assert_refused({1: 2}, ("1",)))
        self.assert_refused({"retention": {None: 1}}, ("retention", "None"))
        self.assert_refused({"forget_rate_limit": {1.5: 1}}, ("forget_rate_limit", "1.5"))
        self.assert_refused({"mount": "intercept", True: 1}, ("True",))

    def test_non_finite_rate(self) -> None:
        """per_second .nan / .inf / -.inf (YAML floats) are refused."""
        for value in (float("nan"), float("inf"), float("-inf")):
            msg = self.assert_refused(
                {"forget_rate_limit": {"per_second": value}}, ("forget_rate_limit", "per_second")
            )
            self.assertIn("finite", msg)

    def test_room_ids_with_whitespace_or_control_characters(self) -> None:
        """Holds must be exact room ids: a trailing newline (which `$` let through),
        inner whitespace, NUL and other control characters are refused."""
        for room in ("!a:b\n", "!a:b ", "!a\x00:b", "!a:b\x7f", "!a\t:b", "!a:b\r"):
            self.assert_refused({"retention": {"holds": [room]}}, ("retention", "holds", "0"))

    def test_durations_too_long_to_be_a_due_time(self) -> None:
        """A period whose due time cannot be represented (300000000y) is refused at
        start-up with the key, instead of overflowing when the room is forgotten;
        100 years is the longest accepted, for every duration key."""
        for key in ("period", "sweep_interval"):
            for value in ("300000000y", "101y", "9" * 5000 + "s", "99999999999999999999999d"):
                msg = self.assert_refused({"retention": {key: value}}, ("retention", key))
                self.assertIn("100y", msg)
            self.assertEqual(
                parse_duration_ms("100y", ("x",)), 100 * 365 * 86_400_000, "the maximum itself"
            )

    def test_non_ascii_digits(self) -> None:
        """Digits other than ASCII ones (which int() would take) are not durations."""
        self.assert_refused({"retention": {"period": "٣d"}}, ("retention", "period"))


class DescribeConfigTests(SynchronousTestCase):
    def test_start_up_line_follows_the_attrs_fields(self) -> None:
        """The start-up line is derived from the attrs config: every field, nested
        sections dotted, *_ms as durations, sets as counts, None as off; a field
        added to a config class shows up without touching describe_config."""
        config = parse_config(
            {
                "forget_rate_limit": {"per_second": 0.5, "burst_count": 3},
                "retention": {"period": "90s", "holds": ["!a:b", "!c:d"], "dry_run": True},
            }
        )
        tokens = describe_config(config).split()
        expected = (
            "mount=intercept forget_rate_limit.per_second=0.5 forget_rate_limit.burst_count=3 "
            "audit_failures=true retention.period=90s retention.dry_run=true "
            "retention.holds=2 retention.sweep_interval=1m"
        ).split()
        # Other keys (and sections) may stand between these, in field order.
        self.assertEqual([t for t in tokens if t in expected], expected)
        self.assertEqual(
            {t.split("=")[0].split(".")[0] for t in tokens},
            {f.name for f in attr.fields(type(config))},
        )

        @attr.s(frozen=True, auto_attribs=True)
        class Extended:
            history_guard: bool = True
            wait_ms: int | None = None

        self.assertEqual(describe_config(Extended()), "history_guard=true wait=off")


class ConfigFuzzTests(SynchronousTestCase):
    def test_any_yaml_value_parses_or_names_the_key(self) -> None:
        """Whatever a YAML file can hold, at any key the module knows, parse_config
        returns a config or raises a ConfigError with a non-empty message; never
        another exception (which Synapse would print as a traceback)."""
        from hypothesis import given, settings
        from hypothesis import strategies as st

        scalars = st.one_of(
            st.none(),
            st.booleans(),
            st.integers(min_value=-(10**40), max_value=10**40),
            st.floats(),
            st.text(max_size=12),
            st.sampled_from(["7d", "off", "1ms", "300000000y", "!a:b", "!a:b\n", "listener"]),
        )
        values = st.recursive(
            scalars,
            lambda children: (
                st.lists(children, max_size=3)
                | st.dictionaries(
                    st.one_of(st.text(max_size=8), st.integers()), children, max_size=3
                )
            ),
            max_leaves=8,
        )
        keys = st.sampled_from(
            ["mount", "forget_rate_limit", "audit_failures", "retention", "other", 1]
        )
        inner = st.sampled_from(
            ["period", "dry_run", "holds", "sweep_interval", "per_second", "burst_count"]
        )
        configs = st.one_of(
            values,
            st.dictionaries(keys, values, max_size=4),
            st.dictionaries(keys, st.dictionaries(inner, values, max_size=4), max_size=4),
        )

        @settings(max_examples=1500, derandomize=True, deadline=None, database=None)
        @given(configs)
        def check(config: Any) -> None:
            try:
                parse_config(config)
            except ConfigError as error:
                self.assertTrue(error.msg)

        check()


class MediaConfigTests(SynchronousTestCase):
    def assert_refused(self, config: dict[str, Any], path: tuple[str, ...]) -> ConfigError:
        with self.assertRaises(ConfigError) as caught:
            parse_config(config)
        self.assertEqual(tuple(caught.exception.path or ()), path)
        return caught.exception

    def test_media_defaults(self) -> None:
        """media is delete with a retention period, keep without; media_grace is 7d."""
        with_period = parse_config({"retention": {"period": "30d"}}).retention
        self.assertEqual((with_period.media, with_period.media_grace_ms), ("delete", 7 * 86400000))
        self.assertEqual(parse_config({}).retention.media, "keep")
        kept = parse_config({"retention": {"period": "30d", "media": "keep"}}).retention
        self.assertEqual(kept.media, "keep")
        grace = parse_config({"retention": {"media_grace": "2s"}}).retention
        self.assertEqual(grace.media_grace_ms, 2000)

    def test_bad_media_values_name_the_key(self) -> None:
        """A media policy other than delete/keep, or a grace without a unit, names its key."""
        for bad in ("purge", True, 1, None):
            self.assert_refused({"retention": {"media": bad}}, ("retention", "media"))
        for bad in ("7", "-1d", "soon"):
            self.assert_refused({"retention": {"media_grace": bad}}, ("retention", "media_grace"))
