"""A benchmark-only Synapse module: matrix-leave-forget with its media reference index off.

Loaded next to the module by bench/media.py (never in production), listed
before it in ``modules:``. The module has no setting that stops the index:
it follows Synapse's events stream on every background-tasks process whatever
``retention.media`` says (``keep``, or no retention period at all). To
measure what the index costs a send, this hook replaces the index's
``tick`` with a no-op on the module instance before the module registers its
looping calls, so that everything else (the sweep, the reaper's idle runs,
the audit log, the catch-up) runs as deployed.
"""

from __future__ import annotations

from typing import Any

from synapse.module_api import ModuleApi


async def _no_tick() -> None:
    """The index's run, doing nothing (its positions and rows stay as they are)."""


class MediaIndexOff:
    """Listed before matrix_leave_forget in ``modules:``, so it sees the module being built.

    Args:
        config: Unused.
        api: Synapse's module API (unused: this module serves nothing).
    """

    def __init__(self, config: Any, api: ModuleApi) -> None:
        from matrix_leave_forget import LeaveForgetModule

        original = LeaveForgetModule.__init__

        def without_index(module: Any, *args: Any, **kwargs: Any) -> None:
            original(module, *args, **kwargs)
            # The looping call is registered from _after_start, which runs
            # after every module is loaded: it picks up this attribute.
            module.media_index.tick = _no_tick

        LeaveForgetModule.__init__ = without_index  # type: ignore[method-assign]

    @staticmethod
    def parse_config(config: Any) -> Any:
        """No configuration."""
        return config
