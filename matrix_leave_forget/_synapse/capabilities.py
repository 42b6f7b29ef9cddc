"""Synapse's settings behind MSC4267's forget-on-leave capability (Matrix 1.18)."""

from typing import Any

import attr
from synapse.module_api import ModuleApi


@attr.s(frozen=True, auto_attribs=True)
class ForgetOnLeaveSettings:
    """What ``GET /capabilities`` must say about forget-on-leave.

    Attributes:
        enabled: Synapse's ``forget_rooms_on_leave``.
        unstable: Whether Synapse advertises MSC4267's unstable name
            (``experimental_features.msc4267_enabled``, Synapse 1.134+).
    """

    enabled: bool
    unstable: bool


def forget_on_leave_settings(api: ModuleApi) -> ForgetOnLeaveSettings:
    """Synapse's forget-on-leave settings, read once at start-up.

    Why: ModuleApi exposes no homeserver configuration; both values hang off
    ``hs.config`` (``room.forget_on_leave`` since before 1.98,
    ``experimental.msc4267_enabled`` since 1.134; absent reads as off).
    """
    config: Any = api._hs.config
    room = getattr(config, "room", None)
    experimental = getattr(config, "experimental", None)
    return ForgetOnLeaveSettings(
        enabled=bool(getattr(room, "forget_on_leave", False)),
        unstable=bool(getattr(experimental, "msc4267_enabled", False)),
    )
