"""The verify command: the audit chain checked offline, whole, incrementally or in parallel."""

import argparse
import concurrent.futures
import itertools
import json
import multiprocessing
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import (
    Any,
)

import attr
from signedjson.types import VerifyKey

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
    select_audit_txn,
    select_erasures_txn,
)
from matrix_leave_forget.cli.commands import BATCH, progress_for
from matrix_leave_forget.cli.config import (
    HomeserverConfig,
    server_key_expiry,
    server_verify_keys,
)
from matrix_leave_forget.cli.database import Database, max_seq, next_seq
from matrix_leave_forget.cli.errors import EXIT_OK, EXIT_VERIFY_FAILED, CliError, one_line
from matrix_leave_forget.cli.render import (
    Progress,
    warn,
    write_csv,
    write_json,
)


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
        try:
            result = _verify_parallel(
                db, origin, keys, expected_heads, result, progress, jobs, erasures
            )
        except concurrent.futures.BrokenExecutor as exc:
            warn(f"a verify worker died ({exc}); checking in one pass instead")
            result, _ = _check_range(
                db, origin, keys, key_expiry, expected_heads, since, after_ts, progress, erasures
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
        # An executor, not multiprocessing.Pool: leaving a Pool early (the first bad
        # chunk) terminates it, which can hang when a worker dies meanwhile; the
        # executor cancels what has not started and reports a dead worker.
        pool = concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init
        )
        try:
            for (after, until, _), (result, first_link) in zip(
                tasks, pool.map(_check_chunk, tasks), strict=True
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
            pool.shutdown(wait=True, cancel_futures=True)
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
    progress = progress_for("Verifying", db)
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
