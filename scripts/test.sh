#!/usr/bin/env bash
# Run the whole test suite: ruff, mypy, and trial (unit tests plus the
# real-Synapse integration suite on SQLite). Extra arguments go to tox, e.g.
#   scripts/test.sh -e postgres      (needs a PostgreSQL server; see docs/development.md)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-tox/bin/tox ]; then
    python3 -m venv .venv-tox
    .venv-tox/bin/python -m pip install -q --upgrade pip
    .venv-tox/bin/python -m pip install -q 'tox>=4'
fi
exec .venv-tox/bin/tox "$@"
