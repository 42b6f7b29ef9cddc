"""The commands: rooms, log, export and verify."""

import argparse
import csv
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import (
    IO,
    Any,
    TypeVar,
)

import attr
from signedjson.types import VerifyKey

from matrix_leave_forget._synapse.internals import SynapseInternals
from matrix_leave_forget.audit.checkpoint import (
    CHECKPOINT_EVENT_TYPE,
    checked_heads,
    read_checkpoints,
)
from matrix_leave_forget.audit.entry import (
    GENESIS_HASH,
    GROUP_FORMATS,
    VerifyResult,
    content_problem,
    iter_verify,
    missing_erasure,
    parse_head,
    parse_verify_key,
    signature_problem,
)
from matrix_leave_forget.audit.log import (
    STORED_COLUMNS,
    count_purged_since_txn,
    purge_receipt_txn,
    select_audit_txn,
    select_erasures_txn,
)
from matrix_leave_forget.cli.config import (
    HomeserverConfig,
    configured_holds,
    server_key_expiry,
    server_verify_keys,
)
from matrix_leave_forget.cli.database import Database, max_seq, newest_start, next_seq
from matrix_leave_forget.cli.errors import EXIT_OK, EXIT_VERIFY_FAILED, CliError, one_line
from matrix_leave_forget.cli.render import (
    Column,
    Progress,
    csv_value,
    format_ts,
    render_table,
    table_widths,
    warn,
    write_csv,
    write_json,
)
from matrix_leave_forget.http.paths import ADMIN_PREFIX
from matrix_leave_forget.retention.receipt import receipt_view
from matrix_leave_forget.retention.state import (
    LISTINGS,
    list_rooms_txn,
    retention_counts_txn,
    select_holds_txn,
)
from matrix_leave_forget.retention.summary import RATE_WINDOW_MS, retention_summary
from matrix_leave_forget.timestamps import now_ms

# Rows per query: large enough that round trips do not dominate, small enough
# that a log of millions of entries never sits in memory at once.
BATCH = 1000

T = TypeVar("T")


def _progress(label: str, db: Database) -> Progress | None:
    """A progress bar on stderr if it is a terminal, else None (and no extra query)."""
    if not Progress.wanted(sys.stderr):
        return None
    return Progress(label, max_seq(db), sys.stderr)


def fetch_paged(
    fetch: Callable[[Any, int], list[T]], key: Callable[[T], Any], after: Any, limit: int
) -> list[T]:
    """Collect up to ``limit`` rows from a keyset-paged query, BATCH rows at a time.

    Args:
        fetch: ``(after, n)`` -> up to n rows after the key ``after``.
        key: A row's key, to continue after it.
        after: Where to start.
        limit: How many rows at most; 0 for all.

    Returns:
        The rows, in key order.
    """
    rows: list[T] = []
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
    Column("forgotten_at", "FORGOTTEN", format_ts),
    Column("purge_due_at", "PURGE DUE", format_ts),
    Column("purge_started_at", "PURGE STARTED", format_ts),
    Column("purged_at", "PURGED", format_ts),
    Column("cancelled_at", "CANCELLED", format_ts),
    Column("updated_at", "UPDATED", format_ts),
    Column("note", "NOTE"),
)
_HOLD_COLUMNS = (
    Column("room_id", "ROOM"),
    Column("held_by", "HELD BY"),
    Column("created_at", "SINCE", format_ts),
    Column("reason", "REASON"),
)
_ABANDONED_COLUMNS = (Column("room_id", "ROOM"),)

_LOG_COLUMNS = (
    Column("seq", "SEQ"),
    Column("ts", "TIME", format_ts),
    Column("action", "ACTION"),
    Column("outcome", "OUTCOME"),
    Column("user_id", "USER"),
    Column("room_id", "ROOM"),
    Column("device_id", "DEVICE"),
    Column("event_id", "EVENT"),
    Column("reason", "REASON"),
)


def _list_rooms(
    db: Database, config: HomeserverConfig, args: argparse.Namespace
) -> list[dict[str, Any]]:
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


def pending_summary(db: Database, config: HomeserverConfig) -> dict[str, Any]:
    """The purge backlog, the rate over the last minute and the time to drain it.

    The same numbers as ``GET .../admin/retention`` (without the pacer's state,
    which lives in the running Synapse).
    """
    cur = db.cursor()
    now = now_ms()
    counts = retention_counts_txn(cur, now, configured_holds(config), paramstyle=db.paramstyle)
    purged = count_purged_since_txn(cur, now - RATE_WINDOW_MS, paramstyle=db.paramstyle)
    return retention_summary(counts, purged)


def _summary_line(summary: Mapping[str, Any]) -> str:
    eta = summary["eta_s"]
    if eta is None:
        drain = "no purge in the last minute, time to drain unknown"
    else:
        drain = f"time to drain ~{eta:.0f} s"
    return (
        f"Backlog: {summary['backlog']} due ({summary['held']} held, "
        f"{summary['waiting']} not yet due), {summary['in_flight']} purging; "
        f"{summary['rate_per_s']:.2f} rooms/s over the last minute; {drain}."
    )


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
    summary = pending_summary(db, config) if args.state == "pending" else None
    if args.format == "json":
        result: dict[str, Any] = {"state": args.state, "rooms": rooms}
        if more:
            result["next_from"] = rooms[-1]["room_id"]
        if summary is not None:
            result["retention"] = summary
        write_json(sys.stdout, result)
    elif args.format == "csv":
        write_csv(sys.stdout, [c.key for c in columns], rooms)
    elif rooms:
        print(render_table(columns, rooms))
    else:
        print(f"No rooms in state {args.state}.")
    if summary is not None and args.format == "table":
        print(_summary_line(summary))
    elif summary is not None and args.format == "csv":
        warn(_summary_line(summary))
    if more and args.format != "json":
        warn(f"showing the first {args.limit}: continue with --from {rooms[-1]['room_id']}")
    return EXIT_OK


def cmd_receipt(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Show the erasure receipt of a purged room: its signed ``purged`` audit entry.

    The same as ``purge_receipt`` in ``GET .../admin/rooms/{roomId}``.

    Args:
        db: The database.
        config: The homeserver config (unused).
        args: The parsed command line (``room``).

    Returns:
        The exit status (EXIT_ERROR if the room has no purge recorded).
    """
    view = receipt_view(purge_receipt_txn(db.cursor(), args.room, paramstyle=db.paramstyle))
    if view is None:
        raise CliError(f"no purge of {args.room} is recorded in the audit log")
    if args.format == "json":
        write_json(sys.stdout, {"room_id": args.room, **view})
        return EXIT_OK
    receipt = view["receipt"] or {}
    media = receipt.get("media") or {}
    rows = [
        ("room", args.room),
        ("entry", f"{view['seq']}:{view['hash']} ({format_ts(view['ts'])})"),
        ("events erased", _count(receipt.get("events"))),
        ("state groups erased", _count(receipt.get("state_groups"))),
        (
            "media erased",
            f"local {media.get('local_items', 0)} ({media.get('local_bytes', 0)} bytes), "
            f"remote {media.get('remote_items', 0)} ({media.get('remote_bytes', 0)} bytes); "
            f"policy {media.get('policy', 'keep')}",
        ),
        (
            "media kept",
            f"referenced elsewhere {media.get('kept_referenced_elsewhere', 0)}, "
            f"encrypted room {media.get('kept_encrypted_room', 0)}",
        ),
        (
            "leftovers cleared",
            ", ".join(f"{t} {n}" for t, n in (receipt.get("leftovers_cleared") or {}).items())
            or "none",
        ),
        (
            "kept (room id only)",
            ", ".join(f"{t} ({why})" for t, why in (receipt.get("kept") or {}).items()) or "none",
        ),
    ]
    if args.format == "csv":
        write_csv(sys.stdout, ["field", "value"], [{"field": k, "value": v} for k, v in rows])
    elif view["receipt"] is None:
        print("\n".join(f"{k}: {v}" for k, v in rows[:2]))
        print("(recorded before erasure receipts existed: no counts)")
    else:
        print("\n".join(f"{k}: {v}" for k, v in rows))
    return EXIT_OK


_SCHEDULE_COLUMNS = (
    Column("room_id", "ROOM"),
    Column("result", "RESULT"),
    Column("purge_due_at", "PURGE DUE", format_ts),
    Column("why", "WHY"),
)

# Where the admin token comes from (an environment variable keeps it out of `ps`).
ADMIN_TOKEN_ENV = "MLF_ADMIN_TOKEN"


def cmd_schedule_abandoned(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Put abandoned rooms on the purge schedule through the admin API (a dry run without --apply).

    The one command that changes anything: it asks the running Synapse
    (``POST .../admin/rooms/abandoned/schedule``), which checks each room and
    records the scheduling in the audit log with the admin as actor.

    Args:
        db: The database (unused: the running Synapse decides).
        config: The homeserver config (unused).
        args: The parsed command line (``url``, ``room``, ``limit``, ``after``, ``apply``).

    Returns:
        The exit status.

    Raises:
        CliError: without a token, or when Synapse refuses or cannot be reached.
    """
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise CliError(f"set {ADMIN_TOKEN_ENV} to a server admin's access token")
    body: dict[str, Any] = {"dry_run": not args.apply}
    if args.room:
        body["room_ids"] = args.room
    else:
        body["limit"] = args.limit
        body["from"] = args.after or ""
    url = args.url.rstrip("/") + ADMIN_PREFIX + "/rooms/abandoned/schedule"
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())
            detail = f"{error.get('errcode')}: {error.get('error')}"
        except ValueError:
            detail = exc.reason
        raise CliError(f"{url}: {exc.code} {detail}")
    except (urllib.error.URLError, OSError) as exc:
        raise CliError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}")
    rows = [
        {
            **r,
            "result": "would schedule" if answer["dry_run"] else "scheduled",
            "why": "held: not purged while held" if r.get("held") else "",
        }
        for r in answer["scheduled"]
    ]
    rows += [{**r, "result": "skipped", "purge_due_at": None} for r in answer["skipped"]]
    if args.format == "json":
        write_json(sys.stdout, answer)
    elif args.format == "csv":
        write_csv(sys.stdout, [c.key for c in _SCHEDULE_COLUMNS], rows)
    elif rows:
        print(render_table(_SCHEDULE_COLUMNS, rows))
    else:
        print("No abandoned rooms.")
    if answer["dry_run"] and args.format != "json":
        warn("dry run: nothing was scheduled; run again with --apply to schedule")
    if "next_from" in answer and args.format != "json" and not args.room:
        warn(f"more abandoned rooms: continue with --from {answer['next_from']}")
    return EXIT_OK


def _count(value: Any) -> str:
    return "not counted" if value is None else str(value)


def _audit_filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filter options as select_audit_txn's keyword arguments."""
    return {
        "user_id": args.user,
        "room_id": args.room,
        "since_ts": args.since,
        "until_ts": args.until,
    }


def cmd_log(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Show audit entries in seq order, as GET .../admin/audit does.

    Args:
        db: The database.
        config: The homeserver config.
        args: The parsed command line.

    Returns:
        The exit status.
    """
    cur = db.cursor()
    filters = _audit_filters(args)
    after, limit = args.after, args.limit
    if args.newest:
        after, limit = newest_start(db, filters, args.newest, args.after), args.newest
    entries = fetch_paged(
        lambda after, n: select_audit_txn(
            cur, after_seq=after, limit=n, paramstyle=db.paramstyle, **filters
        ),
        lambda e: e["seq"],
        after,
        limit,
    )
    more = not args.newest and bool(limit) and len(entries) == limit
    widths: list[int] | None = None
    if args.format == "json" and not args.follow:
        result: dict[str, Any] = {"entries": entries}
        if more:
            result["next_from"] = entries[-1]["seq"]
        write_json(sys.stdout, result)
    elif args.format == "csv":
        write_csv(sys.stdout, STORED_COLUMNS, entries)
    elif args.format == "json":
        _write_json_lines(entries)
    elif args.follow:
        # The headings now, even over no rows, and room for the usual values:
        # the rows that come later are printed in these columns.
        widths = table_widths(_LOG_COLUMNS, entries, _FOLLOW_MIN_WIDTHS)
        print(render_table(_LOG_COLUMNS, entries, widths=widths))
    elif entries:
        print(render_table(_LOG_COLUMNS, entries))
    else:
        print("No audit entries match.")
    if more and args.format != "json" and not args.follow:
        warn(f"showing the first {limit}: continue with --from {entries[-1]['seq']}")
    if args.follow:
        start = entries[-1]["seq"] if entries else _last_seq(db, after)
        _follow(db, filters, start, args.format, widths)
    return EXIT_OK


# How often --follow looks for new entries.
FOLLOW_INTERVAL = 1.0
# Columns --follow keeps wide enough for the usual values of later rows
# (sequence numbers, Matrix errcodes, user and room ids, v4 event ids).
_FOLLOW_MIN_WIDTHS = {
    "seq": 7,
    "action": 6,
    "outcome": 16,
    "user_id": 32,
    "room_id": 34,
    "device_id": 10,
    "event_id": 44,
}


def _write_json_lines(entries: list[dict[str, Any]]) -> None:
    for entry in entries:
        sys.stdout.write(json.dumps(entry, sort_keys=True) + "\n")


def _last_seq(db: Database, after: int) -> int:
    """Where following starts when nothing matched yet: the newest entry so far."""
    return max(after, max_seq(db))


def _follow(
    db: Database,
    filters: Mapping[str, Any],
    after: int,
    output: str,
    widths: Sequence[int] | None,
) -> None:
    """Print matching entries as they are written, until interrupted.

    Each poll ends the read transaction and starts a new one, to see new rows.
    Table rows are printed in the first table's columns (``widths``), without
    a header; CSV and JSON lines continue the stream.
    """
    writer = csv.writer(sys.stdout, lineterminator="\n") if output == "csv" else None
    while True:
        sys.stdout.flush()
        # A new read transaction, started before the wait so that none is held
        # (nor any lock, on a SQLite database not in WAL mode) while waiting.
        db.refresh()
        time.sleep(FOLLOW_INTERVAL)
        for page in _pages(db, filters, after):
            if writer is not None:
                for entry in page:
                    writer.writerow([csv_value(entry.get(k)) for k in STORED_COLUMNS])
            elif output == "json":
                _write_json_lines(page)
            else:
                print(render_table(_LOG_COLUMNS, page, header=False, widths=widths))
            after = page[-1]["seq"]


def _pages(db: Database, filters: Mapping[str, Any], after: int) -> Iterator[list[dict[str, Any]]]:
    """The matching entries after ``after``, BATCH at a time (no empty page)."""
    cur = db.cursor()
    while True:
        page = select_audit_txn(
            cur, after_seq=after, limit=BATCH, paramstyle=db.paramstyle, **filters
        )
        if page:
            yield page
        if len(page) < BATCH:
            return
        after = page[-1]["seq"]


def iter_audit(
    db: Database, filters: Mapping[str, Any], after: int = 0
) -> Iterator[dict[str, Any]]:
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
            writer.writerow(STORED_COLUMNS)
        for entry in iter_audit(db, filters, args.after):
            if writer is not None:
                writer.writerow([csv_value(entry.get(k)) for k in STORED_COLUMNS])
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
        warn(f"exported {count} entries to {args.output}")
    return EXIT_OK


class _UnreadableEntryError(Exception):
    """A row whose columns do not even decode (say, signatures that are not JSON)."""

    def __init__(self, seq: int | None, problem: str) -> None:
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


def _entries_for_verify(
    db: Database, current: dict[str, Any], after: int = 0, until: int | None = None
) -> Iterator[dict[str, Any]]:
    """The log in seq order from after ``after`` (to ``until`` included, if given),
    noting in ``current`` the entry being checked.

    BATCH rows at a time: memory stays bounded whatever the log's size.
    """
    cur = db.cursor()
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
                        next_seq(db, after), f"the row cannot be read: {one_line(str(exc))}"
                    )
                if not row or (until is not None and row[0]["seq"] > until):
                    return
                current["seq"] = row[0]["seq"]
                yield row[0]
                after = row[0]["seq"]
            continue
        for entry in page:
            if until is not None and entry["seq"] > until:
                return
            current["seq"] = entry.get("seq")
            yield entry
        if len(page) < BATCH:
            return
        after = page[-1]["seq"]


def _start_problem(
    db: Database,
    since: tuple[int, str],
    origin: str,
    keys: Mapping[str, VerifyKey],
    key_expiry: Mapping[str, int],
    expected_heads: Sequence[tuple[int, str]],
    erasures: Mapping[int, tuple[int, str, str]],
) -> tuple[VerifyResult | None, int | None]:
    """Whether the chain still holds the head ``since``, checked earlier; and its ts.

    The entry at its seq must be there with that hash, hash to it and carry a
    valid signature (every head ``verify`` prints or a checkpoint names is a
    signed entry): so a chain re-sealed from before the head, a truncation
    below it, or a head that was never in the chain fails here. Expected
    heads at or before it are looked up one by one (the entries before the
    head are not read).

    Returns:
        (the failure, None), or (None, the head's ts) when the check may start after it.
    """
    seq, head_hash = since
    cur = db.cursor()
    rows = select_audit_txn(cur, after_seq=seq - 1, limit=1, paramstyle=db.paramstyle)
    entry = rows[0] if rows else None
    problem = None
    if entry is None or entry["seq"] != seq:
        problem = f"the chain has no entry {seq}: it ends before the recorded head (truncated)"
    elif entry["hash"] != head_hash:
        problem = (
            f"the recorded head {seq}:{head_hash} is not in the chain: entry {seq} has hash "
            f"{entry['hash']} (the chain was rewritten up to it, or the head is not one "
            "verify printed)"
        )
    elif (content := content_problem(entry, erasures)) is not None:
        problem = content
    elif not entry["signatures"]:
        problem = f"{seq}:{head_hash} is not a signed head (verify prints only signed heads)"
    else:
        problem = signature_problem(entry, origin, keys, key_expiry, entry["ts"])
    if problem is not None:
        return VerifyResult(0, GENESIS_HASH, seq, problem), None
    for head_seq, expected in sorted(set(expected_heads)):
        if head_seq > seq:
            break
        cur.execute(
            "SELECT hash FROM leave_forget_audit WHERE seq = ?".replace("?", db.paramstyle),
            (head_seq,),
        )
        row = cur.fetchone()
        if row is None or row[0] != expected:
            found = "no entry there" if row is None else f"entry {head_seq} has hash {row[0]}"
            return (
                VerifyResult(
                    0,
                    GENESIS_HASH,
                    head_seq,
                    f"hash differs from the expected head {head_seq}:{expected} ({found})",
                ),
                None,
            )
    assert entry is not None  # a missing entry is a problem above
    return None, int(entry["ts"])


def verify_database(
    db: Database,
    origin: str,
    keys: Mapping[str, VerifyKey],
    progress: Progress | None,
    key_expiry: Mapping[str, int] | None = None,
    expected_heads: Sequence[tuple[int, str]] = (),
    since: tuple[int, str] | None = None,
    jobs: int = 1,
) -> VerifyResult:
    """Check the audit chain in the database, streaming it.

    Args:
        db: The database.
        origin: The server name every entry must be signed by.
        keys: The verify keys accepted, by key id.
        progress: Where to show progress, if anywhere.
        key_expiry: ``expired_ts`` of old keys, by key id.
        expected_heads: (seq, hash) the chain must hold: recorded heads, checkpoints.
        since: A head (seq, hash) checked earlier: check that the chain still
            holds it, then only the entries after it (O(new entries)).
        jobs: Processes checking chunks of the log at once (_verify_parallel),
            when the log is long enough and the database can be reopened.

    Returns:
        The result; ``bad_seq`` names the first bad entry, if any.
    """
    result = VerifyResult(0, GENESIS_HASH)
    after_ts = None
    # Erased entries come before their erasure records: read the records first.
    erasures = select_erasures_txn(db.cursor(), paramstyle=db.paramstyle)
    if since is not None:
        try:
            failure, after_ts = _start_problem(
                db, since, origin, keys, key_expiry or {}, expected_heads, erasures
            )
        except (AttributeError, TypeError, ValueError, KeyError) as exc:
            failure = VerifyResult(
                0,
                GENESIS_HASH,
                since[0],
                f"the recorded head's entry cannot be checked: {one_line(str(exc))}",
            )
        if failure is not None:
            return attr.evolve(failure, problem=_plain_problem(failure.problem or ""))
        result = VerifyResult(since[0], since[1])
    if (
        jobs > 1
        and not key_expiry
        and db.reopen is not None
        # The workers inherit keys and settings by fork (Linux, the BSDs, macOS).
        and "fork" in multiprocessing.get_all_start_methods()
        and max_seq(db) - result.checked >= PARALLEL_FROM * CHUNK
    ):
        result = _verify_parallel(
            db, origin, keys, expected_heads, result, progress, jobs, erasures
        )
    else:
        result, _ = _check_range(
            db, origin, keys, key_expiry, expected_heads, since, after_ts, progress, erasures
        )
    if result.problem is not None:
        result = attr.evolve(result, problem=_plain_problem(result.problem))
    return result


def _check_range(
    db: Database,
    origin: str,
    keys: Mapping[str, VerifyKey],
    key_expiry: Mapping[str, int] | None,
    expected_heads: Sequence[tuple[int, str]],
    start: tuple[int, str] | None,
    after_ts: int | None,
    progress: Progress | None,
    erasures: Mapping[int, tuple[int, str, str]],
    until: int | None = None,
    chunk: bool = False,
) -> tuple[VerifyResult, tuple[Any, Any] | None]:
    """iter_verify over the entries after ``start`` (to ``until``), read from db.

    With ``chunk``, ``start`` is (seq, anything): the check starts at the
    stored ``prev_hash`` of the entry after seq, and the caller checks that
    it is the previous chunk's head (see _verify_parallel); and an erasure
    record in a later chunk is the caller's to find (missing_erasure).

    Returns:
        The last result, and with ``chunk`` the (seq, prev_hash) of the first
        entry read (None if there was none).
    """
    after = start[0] if start is not None else 0
    result = VerifyResult(*start) if start is not None else VerifyResult(0, GENESIS_HASH)
    current: dict[str, Any] = {"seq": None}
    first_link: tuple[Any, Any] | None = None
    try:
        entries: Iterator[dict[str, Any]] = _entries_for_verify(db, current, after, until)
        if chunk:
            first = next(entries, None)
            if first is not None:
                first_link = (first.get("seq"), first.get("prev_hash"))
                start = (after, first_link[1])
                entries = itertools.chain([first], entries)
        for result in iter_verify(
            entries,
            origin,
            keys,
            key_expiry,
            expected_heads,
            start,
            after_ts,
            erasures,
            check_missing=not chunk,
        ):
            if progress is not None and result.ok:
                progress.update(result.checked, int(current["seq"]))
    except _UnreadableEntryError as exc:
        result = VerifyResult(result.checked, result.head_hash, exc.seq, exc.problem)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        # A row edited into a shape iter_verify cannot even inspect (say,
        # signatures that are valid JSON but not an object) is still tampering.
        seq = current["seq"] if isinstance(current["seq"], int) else result.checked + 1
        result = VerifyResult(
            result.checked,
            result.head_hash,
            seq,
            f"the entry cannot be checked: {one_line(str(exc)) or 'malformed'}",
        )
    return result, first_link


# Entries per chunk of a parallel verify: each worker streams its chunk
# BATCH rows at a time, so memory stays bounded whatever the size.
CHUNK = 25_000
# Chunks below which one pass is as fast: with few chunks the last ones run
# alone, and starting the workers costs more than they save (bench/verify.py:
# 10^5 entries took longer with two workers than with one on 2 CPUs).
PARALLEL_FROM = 8

# What each worker process of a parallel verify checks with (set before the fork).
_WORKER: dict[str, Any] = {}


def _chunk_bounds(db: Database, start: int) -> list[int]:
    """The seqs where chunks end: the first entry, CHUNK or more entries after the
    previous bound, that iter_verify counts as covering (signed, or of the first
    format), so that no chunk ends on entries waiting for a later signature."""
    bounds: list[int] = []
    cur = db.cursor()
    at = start + CHUNK - 1
    while True:
        try:
            page = select_audit_txn(cur, after_seq=at, limit=128, paramstyle=db.paramstyle)
        except (ValueError, TypeError, KeyError):
            return bounds  # the last chunk goes on to the end and reports the row
        if not page:
            return bounds
        bound = next(
            (e["seq"] for e in page if e["signatures"] or e.get("format") not in GROUP_FORMATS),
            None,
        )
        if bound is None:
            at = page[-1]["seq"]
            continue
        bounds.append(bound)
        at = bound + CHUNK - 1


def _worker_init() -> None:
    db: Database = _WORKER["db"]
    assert db.reopen is not None
    _WORKER["own_db"] = db.reopen(_WORKER.get("snapshot"))


def _check_chunk(
    task: tuple[int, int | None, list[tuple[int, str]]],
) -> tuple[VerifyResult, tuple[Any, Any] | None]:
    after, until, heads = task
    return _check_range(
        _WORKER["own_db"],
        _WORKER["origin"],
        _WORKER["keys"],
        None,
        heads,
        (after, GENESIS_HASH) if after else None,
        None,
        None,
        _WORKER["erasures"],
        until,
        chunk=after > 0,
    )


def _verify_parallel(
    db: Database,
    origin: str,
    keys: Mapping[str, VerifyKey],
    expected_heads: Sequence[tuple[int, str]],
    start: VerifyResult,
    progress: Progress | None,
    jobs: int,
    erasures: Mapping[int, tuple[int, str, str]],
) -> VerifyResult:
    """The check of _check_range, by ``jobs`` processes over chunks of the log.

    Each chunk ends on a covering entry (_chunk_bounds) and is checked by
    iter_verify from the stored ``prev_hash`` of its first entry; here, in
    order, each chunk's first entry must follow the previous chunk's last one
    (seq + 1 and prev_hash = its hash) and each chunk must reach its end. So
    every link, hash and signature is checked exactly as in one pass. (Key
    expiry depends on every earlier ``ts``: verify_database checks a log with
    expiring keys in one pass.)
    """
    bounds = _chunk_bounds(db, start.checked)
    starts = [start.checked, *bounds]
    ends: list[int | None] = [*bounds, None]
    tasks = []
    for after, until in zip(starts, ends, strict=True):
        heads = [
            (seq, h) for seq, h in expected_heads if seq > after and (until is None or seq <= until)
        ]
        tasks.append((after, until, heads))
    _WORKER.update(
        db=db, origin=origin, keys=keys, erasures=erasures, snapshot=db.export_snapshot()
    )
    try:
        head_hash, matched, erased = start.head_hash, 0, 0
        result = start
        with multiprocessing.get_context("fork").Pool(jobs, initializer=_worker_init) as pool:
            for (after, until, _), (result, first_link) in zip(
                tasks, pool.imap(_check_chunk, tasks), strict=True
            ):
                if after > 0 and first_link is not None and first_link[0] == after + 1:
                    if first_link[1] != head_hash:
                        return VerifyResult(
                            after,
                            head_hash,
                            after + 1,
                            "prev_hash does not match the previous entry's hash",
                            matched,
                        )
                if result.checked == after:
                    # Nothing in this chunk verified: the last good head is the previous one.
                    result = attr.evolve(result, head_hash=head_hash)
                result = attr.evolve(
                    result,
                    heads_matched=matched + result.heads_matched,
                    erased=erased + result.erased,
                )
                if not result.ok:
                    return result
                if until is not None and result.checked != until:
                    # Only when rows vanish between this process's read and the worker's.
                    return attr.evolve(
                        result,
                        bad_seq=result.checked + 1,
                        problem=f"entry {result.checked + 1} is missing (the chain changed while "
                        "it was checked)",
                    )
                head_hash, matched, erased = result.head_hash, result.heads_matched, result.erased
                if progress is not None:
                    progress.update(result.checked, result.checked)
    finally:
        _WORKER.clear()
    missing = missing_erasure(erasures, result.checked)
    if missing is not None:
        return VerifyResult(result.checked, head_hash, missing[0], missing[1], matched, erased)
    return VerifyResult(result.checked, head_hash, heads_matched=matched, erased=erased)


def _plain_problem(text: str) -> str:
    """A problem in one line for an operator: no Python class names (signedjson's
    messages carry ``<class 'nacl.exceptions.BadSignatureError'>``)."""
    return one_line(re.sub(r"<class '[\w.]+'>:?", "", text))


def _entries(count: int, where: str = "") -> str:
    """'1 audit entry' / 'N audit entries', and with ``where``, '... before it is/are'."""
    text = f"{count} audit {'entry' if count == 1 else 'entries'}"
    if where:
        text += f" {where} {'is' if count == 1 else 'are'}"
    return text


def room_checkpoints(db: Database, room_id: str) -> list[dict[str, Any]]:
    """The contents of the checkpoint events Synapse's database holds for room_id."""
    cur = db.cursor()
    cur.execute(
        "SELECT j.json FROM events AS e JOIN event_json AS j ON j.event_id = e.event_id "
        "WHERE e.room_id = ? AND e.type = ? ORDER BY e.stream_ordering".replace("?", db.paramstyle),
        (room_id, CHECKPOINT_EVENT_TYPE),
    )
    out: list[dict[str, Any]] = []
    for (text,) in cur.fetchall():
        try:
            content = json.loads(text).get("content")
        except (ValueError, AttributeError):
            continue
        if isinstance(content, dict):
            out.append(content)
    return out


def _expected_heads(
    db: Database,
    args: argparse.Namespace,
    origin: str,
    keys: Mapping[str, VerifyKey],
    expiry: Mapping[str, int],
) -> tuple[list[tuple[int, str]], list[str], int]:
    """The heads to check from --expect-head and the checkpoints; rejected checkpoints; count."""
    heads: list[tuple[int, str]] = []
    for text in args.expect_head or ():
        try:
            heads.append(parse_head(text))
        except ValueError as exc:
            raise CliError(f"--expect-head: {exc}")
    checkpoints: list[dict[str, Any]] = []
    for path in args.checkpoints or ():
        try:
            with open(path, encoding="utf-8") as f:
                checkpoints += read_checkpoints(f)
        except OSError as exc:
            raise CliError(f"cannot read checkpoints {path}: {exc.strerror or exc}")
        except ValueError as exc:
            raise CliError(f"checkpoints {path}: {exc}")
    for room_id in args.checkpoint_room or ():
        checkpoints += room_checkpoints(db, room_id)
    valid, rejected = checked_heads(checkpoints, origin, keys, expiry)
    return heads + valid, rejected, len(valid)


def cmd_verify(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Check every hash link and signature, and the expected heads; exit 1 at the first bad entry.

    Args:
        db: The database.
        config: The homeserver config (server name, and keys unless --verify-key).
        args: The parsed command line.

    Returns:
        EXIT_OK, or EXIT_VERIFY_FAILED if an entry is bad.

    Raises:
        CliError: if a key, a head or a checkpoint file cannot be read or parsed.
    """
    expiry: dict[str, int] = {}
    if args.verify_key:
        keys: dict[str, VerifyKey] = {}
        for text in args.verify_key:
            try:
                keys.update(parse_verify_key(text))
            except ValueError as exc:
                raise CliError(str(exc))
    else:
        keys = server_verify_keys(config)
        expiry = server_key_expiry(config)
    origin = config.server_name
    heads, rejected, checkpoints = _expected_heads(db, args, origin, keys, expiry)
    for problem in rejected:
        warn(f"ignoring a checkpoint: {problem}")
    since = _start_head(args, heads[len(heads) - checkpoints :])
    if since is not None:
        # Every other head stays expected (those before the start are looked up).
        heads = [head for head in heads if head != since]
    progress = _progress("Verifying", db)
    try:
        result = verify_database(
            db, origin, keys, progress, expiry, heads, since, getattr(args, "jobs", 1)
        )
    finally:
        if progress is not None:
            progress.finish()
    since_seq = since[0] if since is not None else 0
    # Entries checked by this run: those after the recorded head, if one was given.
    checked = max(result.checked - since_seq, 0) if result.ok else result.checked
    if result.ok and args.head_file and result.checked:
        _write_head_file(args.head_file, result.head_seq, result.head_hash)
    report = {
        "ok": result.ok,
        "checked": checked,
        "head_hash": result.head_hash,
        "bad_seq": result.bad_seq,
        "problem": result.problem,
        "origin": origin,
        "key_ids": sorted(keys),
        "head_seq": result.head_seq,
        "expected_heads": len(heads),
        "heads_matched": result.heads_matched,
        "erased": result.erased,
        "checkpoints": checkpoints,
        "checkpoints_rejected": len(rejected),
        "since_seq": since[0] if since is not None else None,
    }
    if args.format == "json":
        write_json(sys.stdout, report)
    elif args.format == "csv":
        write_csv(sys.stdout, list(report), [report])
    elif result.ok:
        after = f" after the recorded head {since_seq}" if since is not None else ""
        print(
            f"OK: {_entries(checked)}{after} checked; every hash link and signature "
            f"by {origin} ({', '.join(sorted(keys))}) is valid."
        )
        if result.erased:
            print(
                f"{_entries(result.erased)}: free text erased (user erasure or "
                "text_retention), each matching its signed erasure record; not tampering."
            )
        if heads:
            print(
                f"Every expected head is in the chain ({len(heads)}: "
                f"{len(heads) - checkpoints} given, {checkpoints} from checkpoints)."
            )
        print(
            f"Head: {result.head_seq}:{result.head_hash}" if result.checked else "Head: (empty log)"
        )
    else:
        print(f"FAILED at entry {result.bad_seq}: {result.problem}")
        if since is not None and result.checked <= since_seq:
            print(
                f"Checked from the recorded head {since_seq}: no entry after it verified "
                "before this one."
            )
        elif since is not None:
            print(
                f"{_entries(result.checked - since_seq, 'after the recorded head and before it')}"
                f" valid; last good head: {result.head_seq}:{result.head_hash}"
            )
        else:
            print(
                f"{_entries(result.checked, 'before it')} valid; last good head: "
                + (f"{result.head_seq}:{result.head_hash}" if result.checked else "(none)")
            )
    return EXIT_OK if result.ok else EXIT_VERIFY_FAILED


def _start_head(
    args: argparse.Namespace, checkpoint_heads: Sequence[tuple[int, str]]
) -> tuple[int, str] | None:
    """Where an incremental verify starts: the newest of --since, --head-file and,
    with --from-checkpoint, the newest checkpoint whose signature verifies."""
    starts: list[tuple[int, str]] = []
    if args.since:
        try:
            starts.append(parse_head(args.since))
        except ValueError as exc:
            raise CliError(f"--since: {exc}")
    if args.head_file:
        try:
            with open(args.head_file, encoding="utf-8") as f:
                text = f.read().strip()
        except FileNotFoundError:
            text = ""  # the first run: a full check, which writes the file
        except OSError as exc:
            raise CliError(f"cannot read --head-file {args.head_file}: {exc.strerror or exc}")
        if text:
            try:
                starts.append(parse_head(text))
            except ValueError as exc:
                raise CliError(f"--head-file {args.head_file}: {exc}")
    if args.from_checkpoint:
        if checkpoint_heads:
            starts.append(max(checkpoint_heads))
        else:
            warn("--from-checkpoint: no checkpoint verifies; checking the whole chain")
    return max(starts) if starts else None


def _write_head_file(path: str, seq: int, head_hash: str) -> None:
    """Record the verified head for the next run, replacing the file atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".head-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{seq}:{head_hash}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise CliError(f"cannot write --head-file {path}: {exc.strerror or exc}")
