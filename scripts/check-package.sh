#!/usr/bin/env bash
# Build the sdist and the wheel, check their metadata (twine check --strict,
# and no setuptools deprecation warnings), then install the wheel into a clean
# virtualenv, which pulls in Synapse from PyPI, and load the module there the
# way Synapse loads it. pip's cache is reused between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/build"
"$work/build/bin/python" -m pip install -q --upgrade pip build twine
"$work/build/bin/python" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || {
    cat "$work/build.log"
    exit 1
}
if grep -iE "deprecat|SetuptoolsWarning|WARNING.*(license|classifier)" "$work/build.log"; then
    echo "check-package: the build printed the warnings above" >&2
    exit 1
fi
"$work/build/bin/python" -m twine check --strict "$work"/dist/*

python3 -m venv "$work/clean"
"$work/clean/bin/python" -m pip install -q "$work"/dist/*.whl
cd "$work"  # away from the checkout: import the installed copy
"$work/clean/bin/python" - <<'PY'
from synapse.util.module_loader import load_module

import matrix_leave_forget

module, config = load_module(
    {"module": "matrix_leave_forget.LeaveForgetModule", "config": {"retention": {"period": "7d"}}},
    ("modules", "<item 0>"),
)
assert module is matrix_leave_forget.LeaveForgetModule, module
assert config.retention.period_ms == 7 * 86400 * 1000, config
assert "site-packages" in matrix_leave_forget.__file__, matrix_leave_forget.__file__
print("check-package: the wheel installs with Synapse and loads:", matrix_leave_forget.__file__)
PY
"$work/clean/bin/matrix-leave-forget" --help > /dev/null
echo "check-package: sdist and wheel OK"
