"""The commands that read the audit log (log, export) and the paging they share.

The rooms' commands are in cli/rooms.py, verify in cli/verify.py.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import (
    IO,
    Any,
    TypeVar,
)

from matrix_leave_forget.audit.log import (
    STORED_COLUMNS,
    select_audit_txn,
)
from matrix_leave_forget.cli.config import (
    HomeserverConfig,
)
from matrix_leave_forget.cli.database import Database, max_seq, newest_start
from matrix_leave_forget.cli.errors import EXIT_OK, CliError
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

# Rows per query: large enough that round trips do not dominate, small enough
# that a log of millions of entries never sits in memory at once.
BATCH = 1000


T = TypeVar("T")


def progress_for(label: str, db: Database) -> Progress | None:
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
    progress = progress_for("Exporting", db)
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
