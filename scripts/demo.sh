#!/usr/bin/env bash
# Start a local Synapse (SQLite) with matrix-leave-forget loaded and show leave
# and forget going through the module. Needs only Python 3.11 and the network
# to PyPI; everything goes into ./.venv and ./demo (both ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# As the README's Install says (a regular install from the checkout), plus the
# harness's YAML writer.
.venv/bin/python -m pip install -q . PyYAML
exec .venv/bin/python scripts/demo.py "$@"
