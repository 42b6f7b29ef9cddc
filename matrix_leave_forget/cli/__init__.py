"""``matrix-leave-forget``: read the audit log and retention state offline.

The command reads Synapse's database directly, from the settings in a
``homeserver.yaml``; Synapse need not run (and may: the database is only ever
opened read-only). It lists rooms by retention state, shows one room (with what
a purge would do with its media) and a purge's receipt, shows and exports audit
entries, and verifies the whole audit chain (every hash link and signature)
with the homeserver's key, or with only its public key (``--verify-key``)::

    matrix-leave-forget -c homeserver.yaml rooms --state forgotten
    matrix-leave-forget -c homeserver.yaml room '!room:example.org'
    matrix-leave-forget -c homeserver.yaml log --user @alice:example.org
    matrix-leave-forget -c homeserver.yaml export -o audit.jsonl
    matrix-leave-forget -c homeserver.yaml verify

Exit status: 0 on success, 1 when ``verify`` finds a bad entry, 2 on any other
error (unreadable config, unsupported or unreachable database, bad usage).
"""

from matrix_leave_forget.cli.app import build_parser, main, parse_timestamp, run
from matrix_leave_forget.cli.commands import BATCH
from matrix_leave_forget.cli.config import (
    MODULE_NAME,
    HomeserverConfig,
    configured_holds,
    load_config,
    server_verify_keys,
)
from matrix_leave_forget.cli.database import Database, open_database
from matrix_leave_forget.cli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_VERIFY_FAILED,
    PROG,
    CliError,
)
from matrix_leave_forget.cli.render import Progress, format_ts, render_table
from matrix_leave_forget.cli.verify import verify_database

__all__ = [
    "BATCH",
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_VERIFY_FAILED",
    "MODULE_NAME",
    "PROG",
    "CliError",
    "Database",
    "HomeserverConfig",
    "Progress",
    "build_parser",
    "configured_holds",
    "format_ts",
    "load_config",
    "main",
    "open_database",
    "parse_timestamp",
    "render_table",
    "run",
    "server_verify_keys",
    "verify_database",
]
