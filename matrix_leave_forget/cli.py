"""``matrix-leave-forget``: read the audit log and retention state offline.

The command reads Synapse's database directly, from the settings in a
``homeserver.yaml``; Synapse need not run (and may: the database is only ever
opened read-only). It lists rooms by retention state, shows and exports audit
entries, and verifies the whole audit chain (every hash link and signature)
with the homeserver's key, or with only its public key (``--verify-key``)::

    matrix-leave-forget -c homeserver.yaml rooms --state forgotten
    matrix-leave-forget -c homeserver.yaml log --user @alice:example.org
    matrix-leave-forget -c homeserver.yaml export -o audit.jsonl
    matrix-leave-forget -c homeserver.yaml verify

Exit status: 0 on success, 1 when ``verify`` finds a bad entry, 2 on any other
error (unreadable config, unsupported or unreachable database, bad usage).
"""

import argparse
import csv
import datetime
import json
import os
import re
import sqlite3
import sys
import tempfile
import time
import urllib.parse
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    FrozenSet,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

import attr
import yaml
from signedjson.key import decode_verify_key_bytes, get_verify_key, read_signing_keys
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64

from matrix_leave_forget._synapse import SynapseInternals
from matrix_leave_forget.admin import LISTINGS
from matrix_leave_forget.audit import (
    GENESIS_HASH,
    VerifyResult,
    iter_verify,
    parse_verify_key,
    verify_key_id,
)
from matrix_leave_forget.schema import SCHEMA_VERSION
from matrix_leave_forget.store import (
    AUDIT_COLUMNS,
    list_rooms_txn,
    select_audit_txn,
    select_holds_txn,
)

PROG = "matrix-leave-forget"

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_ERROR = 2
# What a shell reports for a process killed by SIGPIPE (`... | head`).
EXIT_BROKEN_PIPE = 141

# Rows per query: large enough that round trips do not dominate, small enough
# that a log of millions of entries never sits in memory at once.
BATCH = 1000
DEFAULT_LIMIT = 100

MODULE_NAME = "matrix_leave_forget.LeaveForgetModule"
ROOM_STATES: Sequence[str] = (*LISTINGS, "held", "abandoned")

T = TypeVar("T")


class CliError(Exception):
    """A problem the operator must fix (config, database, usage): one line, exit 2."""


# -- configuration -----------------------------------------------------------


def _one_line(text: str) -> str:
    """Collapse a driver's or parser's multi-line message onto one line."""
    return " ".join(str(text).split())


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML file and where, in one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return _one_line(str(exc))


def _config_files(paths: Sequence[str]) -> List[str]:
    """Expand ``-c`` arguments the way Synapse does: a directory means its *.yaml files.

    Args:
        paths: The ``-c`` arguments, in order.

    Returns:
        The files to read, in the order their keys apply.

    Raises:
        CliError: if the arguments name no file at all.
    """
    files: List[str] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(
                os.path.join(path, name)
                for name in sorted(os.listdir(path))
                if name.endswith(".yaml") and os.path.isfile(os.path.join(path, name))
            )
        else:
            files.append(path)
    if not files:
        raise CliError(f"no config files found in {', '.join(paths)}")
    return files


@attr.s(frozen=True, auto_attribs=True)
class HomeserverConfig:
    """The parts of ``homeserver.yaml`` the CLI reads.

    Attributes:
        sources: The files it was read from, for messages.
        values: Their top-level keys, later files overriding earlier ones (as Synapse).
        config_dir: Where Synapse looks for files that have no explicit path
            (the default signing key): the directory of the last file.
    """

    sources: Sequence[str]
    values: Mapping[str, Any]
    config_dir: str

    @property
    def server_name(self) -> str:
        """The homeserver's name: the origin audit entries are signed as.

        Raises:
            CliError: if the config has none.
        """
        name = self.values.get("server_name")
        if not isinstance(name, str) or not name:
            raise CliError(f"{self.sources[-1]}: server_name is missing")
        return name


def load_config(paths: Sequence[str]) -> HomeserverConfig:
    """Read and merge the homeserver config files.

    Args:
        paths: The ``-c`` arguments (files, or directories of *.yaml files).

    Returns:
        The merged config.

    Raises:
        CliError: a file is missing, unreadable, not YAML or not a mapping.
    """
    files = _config_files(paths)
    values: Dict[str, Any] = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as exc:
            raise CliError(f"cannot read config {path}: {exc.strerror or exc}")
        except yaml.YAMLError as exc:
            raise CliError(f"{path} is not valid YAML: {_yaml_problem(exc)}")
        except UnicodeDecodeError as exc:
            raise CliError(f"{path} is not UTF-8 text: {exc.reason}")
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise CliError(f"{path} must hold a YAML mapping (homeserver.yaml)")
        values.update(loaded)
    return HomeserverConfig(
        sources=files, values=values, config_dir=os.path.dirname(os.path.abspath(files[-1]))
    )


def _mapping(value: Any, what: str) -> Dict[str, Any]:
    """value as a mapping (None as an empty one), or a CliError naming ``what``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CliError(f"{what} must be a mapping")
    return value


def database_settings(config: HomeserverConfig) -> Tuple[str, Dict[str, Any]]:
    """The driver name and connection args of the database holding Synapse's main store.

    Follows Synapse's rules: ``database``, else ``databases`` (the entry whose
    ``data_stores`` include ``main``), else the legacy ``database_path``.

    Args:
        config: The homeserver config.

    Returns:
        The driver name (``sqlite3``, ``psycopg2``…) and its connection args.

    Raises:
        CliError: if no database is configured or the section is malformed.
    """
    where = config.sources[-1]
    values = config.values
    section: Optional[Dict[str, Any]] = None
    if values.get("databases"):
        for label, candidate in _mapping(values["databases"], f"{where}: databases").items():
            candidate = _mapping(candidate, f"{where}: databases.{label}")
            if "main" in (candidate.get("data_stores") or ["main", "state"]):
                section = candidate
                break
        if section is None:
            raise CliError(f"{where}: no entry of 'databases' holds the main data store")
    elif values.get("database"):
        section = _mapping(values["database"], f"{where}: database")
    elif values.get("database_path"):
        section = {"name": "sqlite3", "args": {"database": values["database_path"]}}
    else:
        raise CliError(f"{where}: no database is configured")
    name = section.get("name", "sqlite3")
    args = dict(_mapping(section.get("args"), f"{where}: database.args"))
    return str(name), args


# -- database ------------------------------------------------------------------


@attr.s(auto_attribs=True)
class Database:
    """A read-only connection to Synapse's database.

    Attributes:
        conn: The DB-API connection.
        paramstyle: The placeholder its driver wants (passed to the shared
            ``*_txn`` query functions, which are written with ``?``).
        description: What it is, for messages.
    """

    conn: Any
    paramstyle: str
    description: str

    def cursor(self) -> Any:
        """A new DB-API cursor inside the run's one read transaction."""
        return self.conn.cursor()

    def close(self) -> None:
        """Close the connection, ending the read transaction."""
        self.conn.close()


def _open_sqlite(args: Mapping[str, Any]) -> Database:
    """Open the SQLite file named in ``args`` read-only; it must exist."""
    path = args.get("database")
    if not isinstance(path, str) or not path or path == ":memory:":
        raise CliError("database.args.database must name the SQLite database file")
    # Synapse resolves a relative path against its working directory; so do we.
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise CliError(
            f"SQLite database {path} does not exist (a relative path is resolved "
            "against the current directory, as Synapse does)"
        )
    # mode=ro: the CLI must never write to a live homeserver's database.
    # isolation_level=None lets us open one explicit read transaction, so that
    # every batch of a long run sees the same snapshot.
    conn = sqlite3.connect(
        f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, isolation_level=None
    )
    conn.execute("BEGIN")
    return Database(conn, "?", f"SQLite database {path}")


def _open_postgres(args: Mapping[str, Any]) -> Database:
    """Connect to PostgreSQL with Synapse's psycopg2 args, in a read-only transaction."""
    try:
        import psycopg2
    except ImportError:
        raise CliError(
            "the homeserver uses PostgreSQL but psycopg2 is not installed: "
            "pip install 'matrix-leave-forget[postgres]'"
        )
    # cp_* keys configure Twisted's connection pool, not the connection;
    # psycopg2 rejects them.
    connect_args = {k: v for k, v in args.items() if not k.startswith("cp_")}
    conn = psycopg2.connect(**connect_args)
    # One read-only REPEATABLE READ transaction for the whole run: a snapshot
    # consistent across batches, and no way to write by mistake.
    conn.set_session(readonly=True, isolation_level="REPEATABLE READ")
    where = connect_args.get("database") or connect_args.get("dbname") or "?"
    return Database(conn, "%s", f"PostgreSQL database {where}")


def open_database(config: HomeserverConfig) -> Database:
    """Connect read-only to the homeserver's database and check the module's tables are there.

    Args:
        config: The homeserver config.

    Returns:
        The open database; the caller closes it.

    Raises:
        CliError: unsupported driver, missing file, or no module tables.
    """
    name, args = database_settings(config)
    if name == "sqlite3":
        db = _open_sqlite(args)
    elif name == "psycopg2":
        db = _open_postgres(args)
    else:
        raise CliError(
            f"{config.sources[-1]}: unsupported database {name!r} "
            "(Synapse and this tool support sqlite3 and psycopg2)"
        )
    try:
        _check_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def _check_schema(db: Database) -> None:
    """Refuse a database without the module's tables; warn about a newer schema."""
    cur = db.cursor()
    try:
        # Not schema.current_version: that creates the table, and we are read-only.
        cur.execute("SELECT version FROM leave_forget_schema_version")
        row = cur.fetchone()
    except Exception as exc:
        if not _is_database_error(exc):
            raise
        raise CliError(
            f"{db.description} has no matrix-leave-forget tables "
            "(has Synapse run with the module loaded?)"
        )
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        _warn(
            f"{db.description} was written by a newer matrix-leave-forget (schema "
            f"{version}, this tool knows {SCHEMA_VERSION}): upgrade this tool"
        )


def _is_database_error(exc: BaseException) -> bool:
    """Whether exc comes from a database driver (so it is the operator's to fix, not a bug)."""
    if isinstance(exc, sqlite3.Error):
        return True
    return type(exc).__module__.split(".")[0] == "psycopg2"


def _max_seq(db: Database) -> int:
    """The newest entry's seq, the 100% mark of the progress bar (0 for an empty log)."""
    cur = db.cursor()
    cur.execute("SELECT MAX(seq) FROM leave_forget_audit")
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _next_seq(db: Database, after: int) -> Optional[int]:
    """The seq of the row after ``after``, to name a row whose columns do not decode."""
    cur = db.cursor()
    cur.execute(
        "SELECT MIN(seq) FROM leave_forget_audit WHERE seq > ?".replace("?", db.paramstyle),
        (after,),
    )
    row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else None


# -- keys ----------------------------------------------------------------------


def server_verify_keys(config: HomeserverConfig) -> Dict[str, VerifyKey]:
    """The homeserver's verify keys: its signing keys' public halves and ``old_signing_keys``.

    Old keys matter after a key rotation: entries written before it carry
    signatures by the old key. Paths are found as Synapse finds them.

    Args:
        config: The homeserver config.

    Returns:
        Verify keys by key id (``ed25519:<version>``).

    Raises:
        CliError: if the key file is missing or unparseable.
    """
    values = config.values
    if "signing_key" in values:
        lines = [str(values["signing_key"])]
        where = "signing_key"
    else:
        path = values.get("signing_key_path") or os.path.join(
            config.config_dir, f"{config.server_name}.signing.key"
        )
        path = os.path.abspath(str(path))
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
        except OSError as exc:
            raise CliError(f"cannot read signing key {path}: {exc.strerror or exc}")
    try:
        signing_keys = read_signing_keys(lines)
    except Exception as exc:
        raise CliError(f"cannot parse signing key {where}: {_one_line(str(exc))}")
    if not signing_keys:
        raise CliError(f"no signing key in {where}")
    keys: Dict[str, VerifyKey] = {verify_key_id(k): get_verify_key(k) for k in signing_keys}
    old = _mapping(values.get("old_signing_keys"), "old_signing_keys")
    for key_id, data in old.items():
        try:
            keys.setdefault(key_id, decode_verify_key_bytes(key_id, decode_base64(data["key"])))
        except Exception as exc:
            raise CliError(f"old_signing_keys: cannot parse {key_id}: {_one_line(str(exc))}")
    return keys


def configured_holds(config: HomeserverConfig) -> FrozenSet[str]:
    """Rooms held by the module's config (``retention.holds``); the admin API lists them too.

    Args:
        config: The homeserver config.

    Returns:
        The configured holds (empty if the module is not configured there).

    Raises:
        CliError: if the module's config is one the module itself would reject.
    """
    from synapse.module_api.errors import ConfigError

    from matrix_leave_forget.config import parse_config

    modules = config.values.get("modules") or []
    if not isinstance(modules, list):
        raise CliError("modules must be a list")
    for module in modules:
        if isinstance(module, dict) and module.get("module") == MODULE_NAME:
            try:
                return parse_config(module.get("config")).retention.holds
            except ConfigError as exc:
                path = ".".join(getattr(exc, "path", None) or ())
                raise CliError(f"module config {path}: {exc.msg}")
    return frozenset()


# -- output --------------------------------------------------------------------

# Terminal control characters and bidi overrides in user-supplied text (a
# leave reason) could rewrite or disguise what the table shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _printable(text: str) -> str:
    """text with control characters and bidi overrides shown as escapes."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def format_ts(ms: Any) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, which ``--since`` also accepts.

    Args:
        ms: Milliseconds since the epoch, or None.

    Returns:
        For example ``2024-05-01T12:00:00.000Z``, or ``-`` for None.
    """
    if ms is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(int(ms) / 1000, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(ms) % 1000:03d}Z"


def _text(value: Any) -> str:
    """A table cell: ``-`` for nothing, else the value made safe for a terminal."""
    return "-" if value is None or value == "" else _printable(str(value))


@attr.s(frozen=True, auto_attribs=True)
class Column:
    """One column of a table.

    Attributes:
        key: The field it shows.
        header: Its heading.
        render: How a value reads in the table (JSON and CSV keep raw values).
        always: Show it even when every row is empty (else it is dropped to
            keep the table narrow).
    """

    key: str
    header: str
    render: Callable[[Any], str] = _text
    always: bool = True


def render_table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    """An aligned plain-text table, one row per line.

    Args:
        columns: The columns, in order; optional ones empty in every row are dropped.
        rows: The rows, as mappings from column key to raw value.

    Returns:
        The table, header first, without a trailing newline.
    """
    shown = [
        c for c in columns if c.always or any(row.get(c.key) not in (None, "") for row in rows)
    ]
    cells = [[c.header for c in shown]] + [
        [c.render(row.get(c.key)) for c in shown] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def _csv_value(value: Any) -> Any:
    """A raw value as a CSV cell: nested values as JSON, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        # As JSON spells them, not Python's True/False.
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def write_csv(out: IO[str], keys: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write a header of ``keys`` and one CSV line per row to ``out``."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for row in rows:
        writer.writerow([_csv_value(row.get(k)) for k in keys])


def write_json(out: IO[str], value: Any) -> None:
    """Write value as indented JSON with sorted keys, newline-terminated."""
    json.dump(value, out, indent=2, sort_keys=True)
    out.write("\n")


def _warn(message: str) -> None:
    """A note for the operator on stderr, kept out of the machine-readable stdout."""
    print(f"{PROG}: {message}", file=sys.stderr)


class Progress:
    """A one-line progress indicator on stderr, drawn only when a person is watching.

    Scripts and pipes must get clean output, so nothing is written unless
    stderr is a terminal.

    Args:
        label: What is being done.
        total: The highest seq there is, or 0 if unknown.
        stream: Where to draw (stderr).
    """

    # Redrawing on every row would cost more than the work on a fast disk.
    INTERVAL = 0.1

    def __init__(self, label: str, total: int, stream: IO[str]) -> None:
        self._label = label
        self._total = total
        self._stream = stream
        self._last = 0.0
        self._drawn = False

    @staticmethod
    def wanted(stream: IO[str]) -> bool:
        """Whether stream is a terminal (so a person, not a script, reads it)."""
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def update(self, count: int, seq: int) -> None:
        """Show progress, redrawn at most every INTERVAL seconds.

        Args:
            count: Entries done so far.
            seq: The latest entry's seq, measured against ``total``.
        """
        now = time.monotonic()
        if now - self._last < self.INTERVAL:
            return
        self._last = now
        line = f"{self._label}: {count} {'entry' if count == 1 else 'entries'}"
        if self._total:
            fraction = min(max(seq / self._total, 0.0), 1.0)
            filled = int(fraction * 30)
            line += f" [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}"
        self._stream.write("\r" + line)
        self._stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """Erase the line so that the final report starts on a clean one."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _progress(label: str, db: Database) -> Optional[Progress]:
    """A progress bar on stderr if it is a terminal, else None (and no extra query)."""
    if not Progress.wanted(sys.stderr):
        return None
    return Progress(label, _max_seq(db), sys.stderr)


# -- commands ------------------------------------------------------------------


def fetch_paged(
    fetch: Callable[[Any, int], List[T]], key: Callable[[T], Any], after: Any, limit: int
) -> List[T]:
    """Collect up to ``limit`` rows from a keyset-paged query, BATCH rows at a time.

    Args:
        fetch: ``(after, n)`` -> up to n rows after the key ``after``.
        key: A row's key, to continue after it.
        after: Where to start.
        limit: How many rows at most; 0 for all.

    Returns:
        The rows, in key order.
    """
    rows: List[T] = []
    while True:
        want = BATCH if not limit else min(BATCH, limit - len(rows))
        page = fetch(after, want)
        rows.extend(page)
        if len(page) < want or (limit and len(rows) >= limit):
            return rows
        after = key(page[-1])


_ROOM_COLUMNS = (
    Column("room_id", "ROOM"),
    Column("state", "STATE"),
    Column("forgotten_at", "FORGOTTEN", format_ts, always=False),
    Column("purge_due_at", "PURGE DUE", format_ts, always=False),
    Column("purge_started_at", "PURGE STARTED", format_ts, always=False),
    Column("purged_at", "PURGED", format_ts, always=False),
    Column("cancelled_at", "CANCELLED", format_ts, always=False),
    Column("updated_at", "UPDATED", format_ts),
    Column("note", "NOTE", always=False),
)
_HOLD_COLUMNS = (
    Column("room_id", "ROOM"),
    Column("held_by", "HELD BY"),
    Column("created_at", "SINCE", format_ts),
    Column("reason", "REASON", always=False),
)
_ABANDONED_COLUMNS = (Column("room_id", "ROOM"),)

_LOG_COLUMNS = (
    Column("seq", "SEQ"),
    Column("ts", "TIME", format_ts),
    Column("action", "ACTION"),
    Column("outcome", "OUTCOME"),
    Column("user_id", "USER"),
    Column("room_id", "ROOM"),
    Column("device_id", "DEVICE", always=False),
    Column("event_id", "EVENT", always=False),
    Column("reason", "REASON", always=False),
)


def _list_rooms(
    db: Database, config: HomeserverConfig, args: argparse.Namespace
) -> List[Dict[str, Any]]:
    """The rooms of ``rooms --state``, shaped as the admin API's listing shapes them."""
    state: str = args.state
    cur = db.cursor()
    if state == "held":
        held = {h["room_id"]: h for h in select_holds_txn(cur)}
        for room_id in configured_holds(config):
            held.setdefault(
                room_id,
                {"room_id": room_id, "held_by": "config", "reason": None, "created_at": None},
            )
        rooms = [held[r] for r in sorted(held) if args.after is None or r > args.after]
        return rooms[: args.limit] if args.limit else rooms
    if state == "abandoned":
        room_ids = fetch_paged(
            lambda after, n: SynapseInternals.abandoned_rooms_txn(
                cur, after, n, paramstyle=db.paramstyle
            ),
            lambda r: r,
            args.after or "",
            args.limit,
        )
        return [{"room_id": r} for r in room_ids]
    retained = fetch_paged(
        lambda after, n: list_rooms_txn(cur, LISTINGS[state], after, n, paramstyle=db.paramstyle),
        lambda r: r.room_id,
        args.after,
        args.limit,
    )
    return [attr.asdict(r) for r in retained]


def cmd_rooms(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """List rooms by retention state, as ``GET .../admin/rooms?state=`` does.

    Args:
        db: The database.
        config: The homeserver config (for holds configured in the module).
        args: The parsed command line.

    Returns:
        The exit status.
    """
    rooms = _list_rooms(db, config, args)
    more = bool(args.limit) and len(rooms) == args.limit
    columns = {"held": _HOLD_COLUMNS, "abandoned": _ABANDONED_COLUMNS}.get(
        args.state, _ROOM_COLUMNS
    )
    if args.format == "json":
        result: Dict[str, Any] = {"state": args.state, "rooms": rooms}
        if more:
            result["next_from"] = rooms[-1]["room_id"]
        write_json(sys.stdout, result)
    elif args.format == "csv":
        write_csv(sys.stdout, [c.key for c in columns], rooms)
    elif rooms:
        print(render_table(columns, rooms))
    else:
        print(f"No rooms in state {args.state}.")
    if more and args.format != "json":
        _warn(f"showing the first {args.limit}: continue with --from {rooms[-1]['room_id']}")
    return EXIT_OK


def _audit_filters(args: argparse.Namespace) -> Dict[str, Any]:
    """The filter options as select_audit_txn's keyword arguments."""
    return {
        "user_id": args.user,
        "room_id": args.room,
        "since_ts": args.since,
        "until_ts": args.until,
    }


def cmd_log(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Show audit entries in seq order, as ``GET .../admin/audit`` does.

    Args:
        db: The database.
        config: The homeserver config.
        args: The parsed command line.

    Returns:
        The exit status.
    """
    cur = db.cursor()
    filters = _audit_filters(args)
    entries = fetch_paged(
        lambda after, n: select_audit_txn(
            cur, after_seq=after, limit=n, paramstyle=db.paramstyle, **filters
        ),
        lambda e: e["seq"],
        args.after,
        args.limit,
    )
    more = bool(args.limit) and len(entries) == args.limit
    if args.format == "json":
        result: Dict[str, Any] = {"entries": entries}
        if more:
            result["next_from"] = entries[-1]["seq"]
        write_json(sys.stdout, result)
    elif args.format == "csv":
        write_csv(sys.stdout, AUDIT_COLUMNS, entries)
    elif entries:
        print(render_table(_LOG_COLUMNS, entries))
    else:
        print("No audit entries match.")
    if more and args.format != "json":
        _warn(f"showing the first {args.limit}: continue with --from {entries[-1]['seq']}")
    return EXIT_OK


def iter_audit(
    db: Database, filters: Mapping[str, Any], after: int = 0
) -> Iterator[Dict[str, Any]]:
    """Every matching entry in seq order, fetched BATCH at a time.

    Args:
        db: The database.
        filters: select_audit_txn's filter keywords.
        after: Start after this seq.

    Yields:
        Entries as the admin API returns them.
    """
    cur = db.cursor()
    while True:
        page = select_audit_txn(
            cur, after_seq=after, limit=BATCH, paramstyle=db.paramstyle, **filters
        )
        yield from page
        if len(page) < BATCH:
            return
        after = page[-1]["seq"]


def cmd_export(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Write matching entries as JSON lines (the admin API's export), or CSV with --csv.

    Args:
        db: The database.
        config: The homeserver config.
        args: The parsed command line.

    Returns:
        The exit status.

    Raises:
        CliError: if the output file cannot be created.
    """
    filters = _audit_filters(args)
    to_file = args.output not in (None, "-")
    if to_file:
        # Write beside the target and rename at the end, so that a failed run
        # never leaves a truncated file that looks like a complete export.
        directory = os.path.dirname(os.path.abspath(args.output))
        try:
            fd, tmp_path = tempfile.mkstemp(prefix=".mlf-export-", dir=directory)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc.strerror or exc}")
        out: IO[str] = os.fdopen(fd, "w", encoding="utf-8", newline="")
    else:
        out = sys.stdout
    progress = _progress("Exporting", db)
    count = 0
    try:
        writer = csv.writer(out, lineterminator="\n") if args.format == "csv" else None
        if writer is not None:
            writer.writerow(AUDIT_COLUMNS)
        for entry in iter_audit(db, filters, args.after):
            if writer is not None:
                writer.writerow([_csv_value(entry[k]) for k in AUDIT_COLUMNS])
            else:
                out.write(json.dumps(entry, sort_keys=True) + "\n")
            count += 1
            if progress is not None:
                progress.update(count, entry["seq"])
        if to_file:
            out.close()
            os.replace(tmp_path, args.output)
    except BaseException:
        if to_file:
            out.close()
            os.unlink(tmp_path)
        raise
    finally:
        if progress is not None:
            progress.finish()
    if to_file:
        _warn(f"exported {count} entries to {args.output}")
    return EXIT_OK


class _UnreadableEntryError(Exception):
    """A row whose columns do not even decode (say, signatures that are not JSON)."""

    def __init__(self, seq: Optional[int], problem: str) -> None:
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


def _entries_for_verify(db: Database, current: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """The whole log in seq order, noting in ``current`` the entry being checked."""
    cur = db.cursor()
    after = 0
    while True:
        try:
            page = select_audit_txn(cur, after_seq=after, limit=BATCH, paramstyle=db.paramstyle)
        except (ValueError, TypeError, KeyError):
            # A row in this batch does not decode. Retry row by row, so that
            # the rows before it are still checked and the report names it.
            for _ in range(BATCH):
                try:
                    row = select_audit_txn(cur, after_seq=after, limit=1, paramstyle=db.paramstyle)
                except (ValueError, TypeError, KeyError) as exc:
                    raise _UnreadableEntryError(
                        _next_seq(db, after), f"the row cannot be read: {_one_line(str(exc))}"
                    )
                if not row:
                    return
                current["seq"] = row[0]["seq"]
                yield row[0]
                after = row[0]["seq"]
            continue
        for entry in page:
            current["seq"] = entry.get("seq")
            yield entry
        if len(page) < BATCH:
            return
        after = page[-1]["seq"]


def verify_database(
    db: Database, origin: str, keys: Mapping[str, VerifyKey], progress: Optional[Progress]
) -> VerifyResult:
    """Check the whole audit chain in the database, streaming it.

    Args:
        db: The database.
        origin: The server name every entry must be signed by.
        keys: The verify keys accepted, by key id.
        progress: Where to show progress, if anywhere.

    Returns:
        The result; ``bad_seq`` names the first bad entry, if any.
    """
    result = VerifyResult(0, GENESIS_HASH)
    current: Dict[str, Any] = {"seq": None}
    try:
        for result in iter_verify(_entries_for_verify(db, current), origin, keys):
            if progress is not None and result.ok:
                progress.update(result.checked, int(current["seq"]))
    except _UnreadableEntryError as exc:
        result = VerifyResult(result.checked, result.head_hash, exc.seq, exc.problem)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        # A row edited into a shape iter_verify cannot even inspect (say,
        # signatures that are valid JSON but not an object) is still tampering.
        seq = current["seq"] if isinstance(current["seq"], int) else result.checked + 1
        result = VerifyResult(
            result.checked, result.head_hash, seq, f"the entry cannot be checked: {exc!r}"
        )
    return result


def _entries(count: int, where: str = "") -> str:
    """'1 audit entry' / 'N audit entries', and with ``where``, '... before it is/are'."""
    text = f"{count} audit {'entry' if count == 1 else 'entries'}"
    if where:
        text += f" {where} {'is' if count == 1 else 'are'}"
    return text


def cmd_verify(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Check every hash link and signature; exit 1 at the first bad entry.

    Args:
        db: The database.
        config: The homeserver config (server name, and keys unless --verify-key).
        args: The parsed command line.

    Returns:
        EXIT_OK, or EXIT_VERIFY_FAILED if an entry is bad.

    Raises:
        CliError: if a key cannot be read or parsed.
    """
    if args.verify_key:
        keys: Dict[str, VerifyKey] = {}
        for text in args.verify_key:
            try:
                keys.update(parse_verify_key(text))
            except ValueError as exc:
                raise CliError(str(exc))
    else:
        keys = server_verify_keys(config)
    origin = config.server_name
    progress = _progress("Verifying", db)
    try:
        result = verify_database(db, origin, keys, progress)
    finally:
        if progress is not None:
            progress.finish()
    report = {
        "ok": result.ok,
        "checked": result.checked,
        "head_hash": result.head_hash,
        "bad_seq": result.bad_seq,
        "problem": result.problem,
        "origin": origin,
        "key_ids": sorted(keys),
    }
    if args.format == "json":
        write_json(sys.stdout, report)
    elif args.format == "csv":
        write_csv(sys.stdout, list(report), [report])
    elif result.ok:
        print(
            f"OK: {_entries(result.checked)} checked; every hash link and signature "
            f"by {origin} ({', '.join(sorted(keys))}) is valid."
        )
        print(f"Head hash: {result.head_hash or '(empty log)'}")
    else:
        print(f"FAILED at entry {result.bad_seq}: {result.problem}")
        print(
            f"{_entries(result.checked, 'before it')} valid; last good hash: "
            f"{result.head_hash or '(none)'}"
        )
    return EXIT_OK if result.ok else EXIT_VERIFY_FAILED


# -- arguments -----------------------------------------------------------------


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def parse_timestamp(text: str) -> int:
    """Milliseconds since the epoch, or an ISO 8601 date or time (UTC unless it says otherwise).

    Args:
        text: The option's value.

    Returns:
        Milliseconds since the epoch.

    Raises:
        argparse.ArgumentTypeError: if it is neither.
    """
    if re.fullmatch(r"\d+", text.strip()):
        return int(text)
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a timestamp: {text!r} (milliseconds, or ISO 8601 such as 2024-05-01T12:00)"
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return int(moment.timestamp() * 1000)


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
        help="machine-readable JSON",
    )
    group.add_argument(
        "--csv",
        dest="format",
        action="store_const",
        const="csv",
        default=default,
        help="CSV with a header row",
    )
    return parent


def _summary(command: Callable[..., Any]) -> str:
    """The first line of a command's docstring, for its --help."""
    return (command.__doc__ or "").strip().splitlines()[0]


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
        required=True,
        metavar="PATH",
        help="homeserver.yaml (repeat, or give a directory, for a split config as Synapse)",
    )
    formats = _format_options(False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rooms = sub.add_parser(
        "rooms",
        parents=[formats],
        help="list rooms by retention state",
        description=_summary(cmd_rooms),
    )
    rooms.add_argument("--state", choices=ROOM_STATES, default="forgotten")
    rooms.add_argument(
        "--limit",
        type=_non_negative,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N (default {DEFAULT_LIMIT}; 0 for all)",
    )
    rooms.add_argument("--from", dest="after", metavar="ROOM_ID", help="start after this room")
    rooms.set_defaults(func=cmd_rooms)

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
        "--from", dest="after", type=_non_negative, default=0, metavar="SEQ", help="after this seq"
    )

    log = sub.add_parser(
        "log", parents=[formats, filters], help="show audit entries", description=_summary(cmd_log)
    )
    log.add_argument(
        "--limit",
        type=_non_negative,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N (default {DEFAULT_LIMIT}; 0 for all)",
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``matrix-leave-forget`` console script.

    Args:
        argv: The arguments (default: sys.argv[1:]).

    Returns:
        The exit status (see the module docstring).
    """
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        _warn(f"error: {exc}")
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
        if not _is_database_error(exc):
            raise
        _warn(f"error: database: {_one_line(str(exc))}")
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
