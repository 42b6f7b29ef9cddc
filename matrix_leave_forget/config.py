"""Configuration of matrix-leave-forget, parsed from the module's ``config:`` block.

Every class is a frozen attrs class built by a ``parse`` function that rejects
unknown keys, wrong types and bad values with a ``ConfigError`` naming the key,
so that a typo stops Synapse at start-up instead of silently doing nothing.
"""

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attr
from synapse.module_api.errors import ConfigError

MOUNT_INTERCEPT = "intercept"
MOUNT_LISTENER = "listener"
MOUNT_MODES = (MOUNT_INTERCEPT, MOUNT_LISTENER)

_DURATION_RE = re.compile(r"(\d{1,20})(ms|s|m|h|d|w|y)", re.ASCII)
_DURATION_UNITS_MS = {
    "ms": 1,
    "s": 1000,
    "m": 60 * 1000,
    "h": 60 * 60 * 1000,
    "d": 24 * 60 * 60 * 1000,
    "w": 7 * 24 * 60 * 60 * 1000,
    "y": 365 * 24 * 60 * 60 * 1000,
}
_UNITS_TEXT = "ms, s, m, h, d, w, y"
# The longest duration accepted (100 years): a room's purge is due at "forgot
# at + period", which must stay a date (and a 64-bit millisecond count).
MAX_DURATION_MS = 100 * _DURATION_UNITS_MS["y"]
# A room id is "!" + opaque localpart + ":" + server name (Matrix spec,
# "Room IDs"). Since room version 12 the server name part may be absent. No
# whitespace or control characters anywhere (fullmatch: no trailing newline).
_ROOM_ID_RE = re.compile(r"![^:\s\x00-\x1f\x7f]+(:[^\s\x00-\x1f\x7f]+)?")
# A user id is "@" + localpart + ":" + server name (Matrix spec, "User Identifiers").
_USER_ID_RE = re.compile(r"^@[^:\s]+:[^\s]+$")


@attr.s(frozen=True, auto_attribs=True)
class RateLimitConfig:
    """A token bucket: ``burst_count`` actions at once, refilled at ``per_second``."""

    per_second: float
    burst_count: int


# retention.media: what becomes of a purged room's media (docs/retention.md "Media").
MEDIA_DELETE = "delete"
MEDIA_KEEP = "keep"


@attr.s(frozen=True, auto_attribs=True)
class RetentionConfig:
    """When and how rooms forgotten by every local user are purged.

    Attributes:
        period_ms: How long a room stays after the last local user forgot it,
            or None to never purge (the state is still recorded).
        dry_run: Record what would be purged, purge nothing.
        holds: Room ids that are never purged, whatever the admin API says.
        sweep_interval_ms: How often the sweep looks for due purges.
        max_concurrent_purges: Most Synapse purge tasks the module keeps running at once.
        purge_load: The share of time purges may keep Synapse busy (0 < x <= 1):
            time with a purge in flight is paid back at this rate before more
            start (see pacing.PurgePacer).
    """

    period_ms: int | None = None
    dry_run: bool = False
    holds: frozenset[str] = frozenset()
    sweep_interval_ms: int = 60 * 1000
    max_concurrent_purges: int = 3
    # The default that kept live sends and /sync near idle while still draining
    # the backlog promptly on PostgreSQL (docs/benchmarks.md §5).
    purge_load: float = 0.3
    media: str = MEDIA_KEEP
    media_grace_ms: int = 7 * 24 * 60 * 60 * 1000


# Refused requests may append this many entries per user at once, then one a minute.
DEFAULT_REFUSAL_BUDGET = RateLimitConfig(per_second=1 / 60, burst_count=10)


@attr.s(frozen=True, auto_attribs=True)
class AuditConfig:
    """The audit log's settings (the ``audit:`` section).

    Attributes:
        refusal_budget: Per-user budget of entries for refused requests; beyond
            it refusals are counted, not appended one by one (docs/audit.md).
        checkpoint_room: The room signed checkpoints of the chain are sent
            into, or None for checkpoints in Synapse's log only.
        checkpoint_sender: The local user who sends them (joined to the room).
        checkpoint_interval_ms: How often the head is checkpointed (if it moved).
        text_retention_ms: How long users' free text (leave reasons) is kept
            before it is erased, or None to keep it (docs/audit.md "Erasure").
    """

    refusal_budget: RateLimitConfig = DEFAULT_REFUSAL_BUDGET
    checkpoint_room: str | None = None
    checkpoint_sender: str | None = None
    checkpoint_interval_ms: int = 60 * 60 * 1000
    text_retention_ms: int | None = None


@attr.s(frozen=True, auto_attribs=True)
class LeaveForgetConfig:
    """The whole module configuration.

    Attributes:
        mount: ``intercept`` (default) or ``listener``; see docs/mounting.md.
        forget_rate_limit: Per-user limit on forget, or None for no limit (the
            default, as Synapse: clients forget many rooms in a row and do not
            retry a 429 on forget).
        audit_failures: Also record refused requests in the audit log.
        retention: The retention sweep settings.
        history_guard: Keep the spec's history promises after leave and forget
            on client read paths (docs/history.md); False leaves reads to Synapse.
    """

    mount: str = MOUNT_INTERCEPT
    forget_rate_limit: RateLimitConfig | None = None
    audit_failures: bool = True
    retention: RetentionConfig = RetentionConfig()
    audit: AuditConfig = AuditConfig()
    history_guard: bool = True


def _check_keys(section: Mapping[Any, Any], allowed: Iterable[str], path: str) -> None:
    for key in section:
        if not isinstance(key, str):
            # YAML allows any key ({1: 2}); sorting them with strings would fail.
            raise ConfigError(f"keys must be strings, not {key!r}", _path(path, repr(key)))
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})",
            (path, unknown[0]) if path else (unknown[0],),
        )


def _path(path: str, key: str) -> tuple[str, ...]:
    return tuple(p for p in (path, key) if p)


def _mapping(value: Any, path: tuple[str, ...]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("must be a mapping", path)
    return value


def _bool(section: Mapping[str, Any], key: str, default: bool, path: str) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError("must be true or false", _path(path, key))
    return value


def parse_duration_ms(value: Any, path: tuple[str, ...]) -> int:
    """Parse a duration with a unit: "500ms", "30s", "12h", "7d", "1w", "1y".

    Unlike Synapse's own durations, a bare number (``30``, ``"30"``) is refused
    rather than read as milliseconds: an operator who writes ``period: 30``
    meaning 30 days would have every forgotten room purged at once, and a
    retention period is the one setting where a wrong guess loses data.

    Args:
        value: The configured value.
        path: Where the value sits in the config, for the error message.

    Raises:
        ConfigError: if the value is not a positive duration with a unit, of at
            most 100 years.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError("must be a duration such as 30s or 7d", path)
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text, re.ASCII):
        if int(text) <= 0:
            raise ConfigError("must be a positive duration such as 30s or 7d", path)
        number = text.lstrip("+") if len(text) <= 6 else "30"
        raise ConfigError(
            f"{text[:20]!r} has no unit: write e.g. {number}d for days or {number}ms for "
            f"milliseconds (units: {_UNITS_TEXT}); a bare number is refused rather "
            "than guessed",
            path,
        )
    unit = re.fullmatch(r"\d+\s*([^\d\s.]+)", text, re.ASCII)
    if unit is not None and unit.group(1) not in _DURATION_UNITS_MS:
        raise ConfigError(
            f"unknown unit {unit.group(1)[:20]!r} in {text[:40]!r}: use one of {_UNITS_TEXT} "
            "(e.g. 30d)",
            path,
        )
    match = _DURATION_RE.fullmatch(text)
    if match is not None:
        millis = int(match.group(1)) * _DURATION_UNITS_MS[match.group(2)]
    elif unit is not None:  # a valid unit after more digits than any due time needs
        raise ConfigError("must be at most 100y (100 years)", path)
    else:
        raise ConfigError("must be a duration such as 30s or 7d", path)
    if millis <= 0:
        raise ConfigError("must be a positive duration", path)
    if millis > MAX_DURATION_MS:
        raise ConfigError("must be at most 100y (100 years)", path)
    return millis


def is_valid_room_id(room_id: str) -> bool:
    """Whether room_id has the grammar of a Matrix room id."""
    try:
        size = len(room_id.encode())
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return size <= 255 and bool(_ROOM_ID_RE.fullmatch(room_id))


def _parse_rate_limit(value: Any, path: str) -> RateLimitConfig | None:
    if value is None:
        return None
    section = _mapping(value, (path,))
    _check_keys(section, ("per_second", "burst_count"), path)
    per_second = section.get("per_second", 0.2)
    burst_count = section.get("burst_count", 10)
    if isinstance(per_second, bool) or not isinstance(per_second, (int, float)):
        raise ConfigError("must be a number", (path, "per_second"))
    if not math.isfinite(per_second):
        raise ConfigError("must be a finite number", (path, "per_second"))
    if per_second <= 0:
        raise ConfigError("must be greater than 0", (path, "per_second"))
    if isinstance(burst_count, bool) or not isinstance(burst_count, int):
        raise ConfigError("must be an integer", (path, "burst_count"))
    if burst_count < 1:
        raise ConfigError("must be at least 1", (path, "burst_count"))
    return RateLimitConfig(per_second=float(per_second), burst_count=burst_count)


def _parse_retention(value: Any) -> RetentionConfig:
    path = "retention"
    section = _mapping(value, (path,))
    _check_keys(
        section,
        (
            "period",
            "dry_run",
            "holds",
            "sweep_interval",
            "max_concurrent_purges",
            "purge_load",
            "media",
            "media_grace",
        ),
        path,
    )
    period = section.get("period")
    period_ms = (
        None
        if period is None or period is False or period == "off"
        else parse_duration_ms(period, (path, "period"))
    )
    holds_value = section.get("holds", [])
    if not isinstance(holds_value, list):
        raise ConfigError("must be a list of room ids", (path, "holds"))
    for index, room_id in enumerate(holds_value):
        if not isinstance(room_id, str) or not is_valid_room_id(room_id):
            raise ConfigError(f"{room_id!r} is not a room id", (path, "holds", str(index)))
    # Synapse runs at most task_scheduler.max_concurrent_tasks tasks (5 by
    # default): more purges than that only queue inside Synapse, unpaced.
    concurrency = section.get("max_concurrent_purges", RetentionConfig().max_concurrent_purges)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise ConfigError("must be an integer", (path, "max_concurrent_purges"))
    if not 1 <= concurrency <= 100:
        raise ConfigError("must be between 1 and 100", (path, "max_concurrent_purges"))
    load = section.get("purge_load", RetentionConfig().purge_load)
    if isinstance(load, bool) or not isinstance(load, (int, float)):
        raise ConfigError("must be a number", (path, "purge_load"))
    if not 0 < load <= 1:
        raise ConfigError("must be greater than 0 and at most 1", (path, "purge_load"))
    # Deleting media is what a retention period asks for; without one nothing is purged.
    media = section.get("media", MEDIA_DELETE if period_ms is not None else MEDIA_KEEP)
    if media not in (MEDIA_DELETE, MEDIA_KEEP):
        raise ConfigError(f"must be {MEDIA_DELETE!r} or {MEDIA_KEEP!r}", (path, "media"))
    return RetentionConfig(
        period_ms=period_ms,
        dry_run=_bool(section, "dry_run", False, path),
        holds=frozenset(holds_value),
        sweep_interval_ms=parse_duration_ms(
            section.get("sweep_interval", "1m"), (path, "sweep_interval")
        ),
        max_concurrent_purges=concurrency,
        purge_load=float(load),
        media=media,
        media_grace_ms=parse_duration_ms(section.get("media_grace", "7d"), (path, "media_grace")),
    )


def _parse_audit(value: Any) -> AuditConfig:
    path = "audit"
    section = _mapping(value, (path,))
    _check_keys(
        section,
        (
            "refusal_budget",
            "checkpoint_room",
            "checkpoint_sender",
            "checkpoint_interval",
            "text_retention",
        ),
        path,
    )
    budget = section.get("refusal_budget")
    if budget is None:
        refusal_budget = DEFAULT_REFUSAL_BUDGET
    else:
        # Missing sub-keys take this section's defaults, not forget's.
        defaults = {
            "per_second": DEFAULT_REFUSAL_BUDGET.per_second,
            "burst_count": DEFAULT_REFUSAL_BUDGET.burst_count,
        }
        parsed = _parse_rate_limit(
            {**defaults, **_mapping(budget, (path, "refusal_budget"))}, "audit.refusal_budget"
        )
        assert parsed is not None
        refusal_budget = parsed
    room = section.get("checkpoint_room")
    if room is not None and (not isinstance(room, str) or not is_valid_room_id(room)):
        raise ConfigError(f"{room!r} is not a room id", (path, "checkpoint_room"))
    sender = section.get("checkpoint_sender")
    if sender is not None and (not isinstance(sender, str) or not _USER_ID_RE.match(sender)):
        raise ConfigError(f"{sender!r} is not a user id", (path, "checkpoint_sender"))
    if (room is None) != (sender is None):
        missing = "checkpoint_sender" if sender is None else "checkpoint_room"
        raise ConfigError(
            "checkpoint_room and checkpoint_sender go together: set both or neither",
            (path, missing),
        )
    return AuditConfig(
        refusal_budget=refusal_budget,
        checkpoint_room=room,
        checkpoint_sender=sender,
        checkpoint_interval_ms=parse_duration_ms(
            section.get("checkpoint_interval", "1h"), (path, "checkpoint_interval")
        ),
        text_retention_ms=_optional_duration(section.get("text_retention"), path, "text_retention"),
    )


def _optional_duration(value: Any, path: str, key: str) -> int | None:
    """A duration key where ``off``/null/false means none."""
    if value is None or value is False or value == "off":
        return None
    return parse_duration_ms(value, (path, key))


def parse_config(config: Any) -> LeaveForgetConfig:
    """Build a LeaveForgetConfig from the module's ``config:`` block.

    Raises:
        ConfigError: naming the first bad key.
    """
    section = _mapping(config, ())
    _check_keys(
        section,
        ("mount", "forget_rate_limit", "audit_failures", "retention", "audit", "history_guard"),
        "",
    )
    mount = section.get("mount", MOUNT_INTERCEPT)
    if mount not in MOUNT_MODES:
        raise ConfigError(f"must be one of {', '.join(MOUNT_MODES)}", ("mount",))
    forget_rate_limit = (
        _parse_rate_limit(section["forget_rate_limit"], "forget_rate_limit")
        if "forget_rate_limit" in section
        else LeaveForgetConfig().forget_rate_limit
    )
    return LeaveForgetConfig(
        mount=mount,
        forget_rate_limit=forget_rate_limit,
        audit_failures=_bool(section, "audit_failures", True, ""),
        retention=_parse_retention(section.get("retention")),
        audit=_parse_audit(section.get("audit")),
        history_guard=_bool(section, "history_guard", True, ""),
    )


def _duration_text(ms: int) -> str:
    """ms in the largest unit that divides it exactly, as the config would say it."""
    for unit in ("y", "w", "d", "h", "m", "s"):
        if ms % _DURATION_UNITS_MS[unit] == 0:
            return f"{ms // _DURATION_UNITS_MS[unit]}{unit}"
    return f"{ms}ms"


def describe_config(config: Any, prefix: str = "") -> str:
    """The effective settings on one line, for the start-up log.

    Derived from the attrs classes, so that a key added to the config shows up
    here without more code: ``*_ms`` fields read as durations, sets as their
    size, None as ``off``.

    Args:
        config: A LeaveForgetConfig (or one of its sections).
        prefix: The dotted path of ``config`` (for sections).

    Returns:
        For example ``mount=intercept forget_rate_limit=off ... retention.period=7d``.
    """
    parts = []
    for field in attr.fields(type(config)):
        value = getattr(config, field.name)
        name = prefix + field.name
        if attr.has(type(value)):
            parts.append(describe_config(value, name + "."))
            continue
        if name.endswith("_ms"):
            name = name[: -len("_ms")]
            text = "off" if value is None else _duration_text(value)
        elif value is None:
            text = "off"
        elif isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, (set, frozenset, list, tuple)):
            text = str(len(value))
        else:
            text = str(value)
        parts.append(f"{name}={text}")
    return " ".join(parts)
