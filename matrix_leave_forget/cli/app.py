"""The command line: arguments, running a command, and turning errors into exit statuses."""

import argparse
import datetime
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from matrix_leave_forget.cli.commands import cmd_export, cmd_log
from matrix_leave_forget.cli.config import HomeserverConfig, load_config
from matrix_leave_forget.cli.database import Database, is_database_error, open_database
from matrix_leave_forget.cli.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    PROG,
    CliError,
    one_line,
)
from matrix_leave_forget.cli.render import warn
from matrix_leave_forget.cli.rooms import (
    cmd_receipt,
    cmd_room,
    cmd_rooms,
    cmd_schedule_abandoned,
)
from matrix_leave_forget.cli.verify import cmd_verify
from matrix_leave_forget.db.schema import MAX_INT_ARG
from matrix_leave_forget.retention.state import LISTINGS

DEFAULT_LIMIT = 100

_CONFIG_HELP = "homeserver.yaml (repeat, or give a directory, for a split config as Synapse)"

ROOM_STATES: Sequence[str] = (*LISTINGS, "held", "abandoned")


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    # The admin API's bound: the database's 64-bit integers hold no more.
    if value > MAX_INT_ARG:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INT_ARG}")
    return value


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_timestamp(text: str) -> int:
    """Milliseconds since the epoch, or an ISO 8601 date or time (UTC unless it says otherwise).

    Args:
        text: The option's value.

    Returns:
        Milliseconds since the epoch.

    Raises:
        argparse.ArgumentTypeError: if it is neither, or outside what the admin
            API accepts (0 to MAX_INT_ARG ms: from 1970 on, and what the
            database's 64-bit integers hold).
    """
    # ASCII digits only: \d would also take other scripts' digits.
    if re.fullmatch(r"[0-9]+", text.strip()):
        ms = int(text)
    else:
        try:
            moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a timestamp: {text!r} (milliseconds, or ISO 8601 such as 2024-05-01T12:00)"
            )
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        ms = int(moment.timestamp() * 1000)
    if ms < 0:
        raise argparse.ArgumentTypeError(f"out of range: {text!r} is before 1970-01-01T00:00Z")
    if ms > MAX_INT_ARG:
        raise argparse.ArgumentTypeError(
            f"out of range: {text!r} is more than {MAX_INT_ARG} milliseconds"
        )
    return ms


def _format_options(required_default: bool) -> argparse.ArgumentParser:
    """--json/--csv, accepted before or after the subcommand.

    Only the top-level parser has a default: a subcommand's SUPPRESS default
    leaves the top-level choice alone unless the flag is repeated there.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    default = "table" if required_default else argparse.SUPPRESS
    group.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        default=default,
        help="machine-readable JSON (default: an aligned table)",
    )
    group.add_argument(
        "--csv",
        dest="format",
        action="store_const",
        const="csv",
        default=default,
        help="CSV with a header row (default: an aligned table)",
    )
    return parent


def _summary(command: Callable[..., Any]) -> str:
    """The first line of a command's docstring, as plain text for its --help."""
    return (command.__doc__ or "").strip().splitlines()[0].replace("``", "")


def build_parser() -> argparse.ArgumentParser:
    """The command line: global -c and output flags, and one subparser per command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Read matrix-leave-forget's audit log and room retention state "
        "straight from Synapse's database (read-only; Synapse need not run).",
        epilog="Exit status: 0 success, 1 verify found a bad entry, 2 any other error.",
        parents=[_format_options(True)],
    )
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        metavar="PATH",
        help=_CONFIG_HELP + " (required; before or after COMMAND)",
    )
    formats = _format_options(False)
    # -c after the command as well: its own dest, merged in main(), so that
    # "-c a rooms -c b" keeps both (a subcommand's values replace the top level's).
    formats.add_argument(
        "-c",
        "--config",
        dest="config_after",
        action="append",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=_CONFIG_HELP,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rooms = sub.add_parser(
        "rooms",
        parents=[formats],
        help="list rooms by retention state",
        description=_summary(cmd_rooms),
    )
    rooms.add_argument(
        "--state",
        choices=ROOM_STATES,
        default="forgotten",
        help="the rooms in this state (default: forgotten)",
    )
    rooms.add_argument(
        "--limit",
        type=_non_negative,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N (default {DEFAULT_LIMIT}; 0 for all)",
    )
    rooms.add_argument("--from", dest="after", metavar="ROOM_ID", help="start after this room")
    rooms.set_defaults(func=cmd_rooms)

    room = sub.add_parser(
        "room",
        parents=[formats],
        help="one room: retention state, hold, purge receipt, what a purge would do with its media",
        description=_summary(cmd_room),
    )
    room.add_argument("room", metavar="ROOM_ID")
    room.set_defaults(func=cmd_room)

    receipt = sub.add_parser(
        "receipt",
        parents=[formats],
        help="what a room's purge erased and kept (its signed audit entry)",
        description=_summary(cmd_receipt),
    )
    receipt.add_argument("room", metavar="ROOM_ID")
    receipt.set_defaults(func=cmd_receipt)

    schedule = sub.add_parser(
        "schedule-abandoned",
        parents=[formats],
        help="put abandoned rooms on the purge schedule (dry run unless --apply)",
        description=_summary(cmd_schedule_abandoned),
    )
    schedule.add_argument(
        "--url",
        default="http://localhost:8008",
        help="Synapse's client listener (default http://localhost:8008); the token comes "
        "from the MLF_ADMIN_TOKEN environment variable",
    )
    schedule.add_argument(
        "--room", action="append", metavar="ROOM_ID", help="this room (repeatable)"
    )
    schedule.add_argument(
        "--limit",
        type=_positive,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"without --room: the next N abandoned rooms (default {DEFAULT_LIMIT}, at most 1000)",
    )
    schedule.add_argument("--from", dest="after", metavar="ROOM_ID", help="start after this room")
    schedule.add_argument(
        "--apply",
        action="store_true",
        help="schedule them (default: a dry run that says what would)",
    )
    schedule.set_defaults(func=cmd_schedule_abandoned)

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--user", metavar="USER_ID", help="only this user's entries")
    filters.add_argument("--room", metavar="ROOM_ID", help="only this room's entries")
    filters.add_argument(
        "--since", type=parse_timestamp, metavar="TS", help="from this time (ms or ISO 8601)"
    )
    filters.add_argument(
        "--until", type=parse_timestamp, metavar="TS", help="before this time (ms or ISO 8601)"
    )
    filters.add_argument(
        "--from",
        dest="after",
        type=_non_negative,
        default=0,
        metavar="SEQ",
        help="after this seq (default: 0, from the first entry)",
    )

    log = sub.add_parser(
        "log", parents=[formats, filters], help="show audit entries", description=_summary(cmd_log)
    )
    window = log.add_mutually_exclusive_group()
    window.add_argument(
        "--limit",
        type=_non_negative,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"the oldest N from --from on (default {DEFAULT_LIMIT}; 0 for all)",
    )
    window.add_argument(
        "--newest",
        type=_positive,
        metavar="N",
        help="the newest N instead, still oldest first (as tail does)",
    )
    log.add_argument(
        "--follow",
        action="store_true",
        help="then keep printing new entries as they are written (Ctrl-C stops)",
    )
    log.set_defaults(func=cmd_log)

    export = sub.add_parser(
        "export",
        parents=[formats, filters],
        help="export audit entries as JSON lines (CSV with --csv)",
        description=_summary(cmd_export),
    )
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    export.set_defaults(func=cmd_export)

    verify = sub.add_parser(
        "verify",
        parents=[formats],
        help="check the whole audit chain",
        description=_summary(cmd_verify),
    )
    verify.add_argument(
        "--verify-key",
        action="append",
        metavar="KEY",
        help="'ed25519:<version> <base64>' (as /_matrix/key/v2/server publishes it); "
        "verify with this public key instead of the server's signing key file (repeatable)",
    )
    verify.add_argument(
        "--expect-head",
        action="append",
        metavar="SEQ:HASH",
        help="a head recorded earlier (as verify prints it): fail if the chain ends before "
        "SEQ or has another hash there (repeatable)",
    )
    verify.add_argument(
        "--checkpoints",
        action="append",
        metavar="FILE",
        help="signed checkpoints to check the chain against: JSON lines, each a checkpoint "
        "or a checkpoint event (an export of the checkpoint room) (repeatable)",
    )
    verify.add_argument(
        "--checkpoint-room",
        action="append",
        metavar="ROOM_ID",
        help="check the chain against the checkpoint events this database holds for the "
        "room (audit.checkpoint_room) (repeatable)",
    )
    verify.add_argument(
        "--since",
        metavar="SEQ:HASH",
        help="a head an earlier verify printed: check that the chain still holds it (same "
        "hash, signed), then only the entries after it",
    )
    verify.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="start as --since from the newest checkpoint (of --checkpoints and "
        "--checkpoint-room) whose signature verifies",
    )
    verify.add_argument(
        "--head-file",
        metavar="FILE",
        help="start as --since from the head in FILE, if it exists, and write the new head "
        "there when the chain is valid (for cron: each run checks only the new entries)",
    )
    verify.add_argument(
        "--jobs",
        type=_positive,
        default=min(2, os.cpu_count() or 1),
        metavar="N",
        help="processes checking chunks of the chain at once, when 200,000 entries or more "
        "are to be checked and no old key has an expiry (default: %(default)s)",
    )
    verify.set_defaults(func=cmd_verify)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command line; errors propagate to main.

    Args:
        args: From build_parser().

    Returns:
        The command's exit status.
    """
    config = load_config(args.config)
    db = open_database(config)
    try:
        command: Callable[[Database, HomeserverConfig, argparse.Namespace], int] = args.func
        return command(db, config, args)
    finally:
        db.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``matrix-leave-forget`` console script.

    Args:
        argv: The arguments (default: sys.argv[1:]).

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = (args.config or []) + getattr(args, "config_after", [])
    if not args.config:
        parser.error("the following arguments are required: -c/--config")
    try:
        return run(args)
    except CliError as exc:
        warn(f"error: {exc}")
    except BrokenPipeError:
        # The reader went away (`| head`); point stdout at /dev/null so that
        # the interpreter's final flush does not complain a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Anything else is a bug and keeps its traceback; driver errors
        # (unreachable server, locked file, permissions) are the operator's.
        if not is_database_error(exc):
            raise
        warn(f"error: database: {one_line(str(exc))}")
    return EXIT_ERROR
