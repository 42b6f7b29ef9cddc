"""A benchmark-only Synapse module: run matrix-leave-forget's retention sweep on demand.

Loaded next to the module by bench/sweep.py (never in production): it serves
``POST /_bench/sweep?passes=N`` on every listener, runs the sweeper's
``sweep()`` up to N times (stopping at a pass that decides nothing) and
answers with each pass's wall time and outcome counts.
"""

import time
from typing import Any

from synapse.module_api import DirectServeJsonResource, ModuleApi

_INSTANCES: list[Any] = []


class SweepHook:
    """Listed before matrix_leave_forget in ``modules:``, so it sees the module being built."""

    def __init__(self, config: Any, api: ModuleApi) -> None:
        from matrix_leave_forget import LeaveForgetModule

        original = LeaveForgetModule.__init__

        def record(module: Any, *args: Any, **kwargs: Any) -> None:
            original(module, *args, **kwargs)
            _INSTANCES.append(module)

        LeaveForgetModule.__init__ = record  # type: ignore[method-assign]
        api.register_web_resource("/_bench/sweep", _SweepResource())

    @staticmethod
    def parse_config(config: Any) -> Any:
        return config


def _sweeper() -> Any:
    if not _INSTANCES:
        raise RuntimeError("matrix_leave_forget is not loaded after bench.sweep_hook")
    return _INSTANCES[-1].sweeper


class _SweepResource(DirectServeJsonResource):
    isLeaf = True

    async def _async_render_POST(self, request: Any) -> tuple[int, dict[str, Any]]:
        passes = int(request.args.get(b"passes", [b"1"])[0])
        sweeper = _sweeper()
        out: list[dict[str, Any]] = []
        for _ in range(passes):
            started = time.perf_counter()
            counts = await sweeper.sweep()
            elapsed = time.perf_counter() - started
            out.append(
                {
                    "seconds": round(elapsed, 4),
                    "counts": counts,
                    "stats": getattr(sweeper, "last_stats", None),
                }
            )
            # "held" is counted on every pass; only decisions show progress.
            if not any(n for outcome, n in counts.items() if outcome != "held"):
                break
        return 200, {"passes": out}
