"""The rooms' commands: rooms, room and receipt read the database; schedule-abandoned
goes through the admin API."""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import (
    Any,
)

import attr

from matrix_leave_forget._synapse.internals import SynapseInternals
from matrix_leave_forget.audit.log import (
    count_purged_since_txn,
)
from matrix_leave_forget.cli.commands import fetch_paged
from matrix_leave_forget.cli.config import (
    HomeserverConfig,
    configured_holds,
    module_config,
)
from matrix_leave_forget.cli.database import Database
from matrix_leave_forget.cli.errors import EXIT_OK, CliError
from matrix_leave_forget.cli.render import (
    Column,
    format_ts,
    render_table,
    warn,
    write_csv,
    write_json,
    write_listing,
)
from matrix_leave_forget.http.paths import ADMIN_PREFIX
from matrix_leave_forget.media.reaper import PREVIEW_LIMIT, preview_txn
from matrix_leave_forget.retention.receipt import (
    MEDIA_NOTHING,
    MEDIA_RECORDED,
    purge_receipt_view_txn,
)
from matrix_leave_forget.retention.state import (
    LISTINGS,
    RetentionState,
    list_rooms_txn,
    retention_counts_txn,
    select_hold_txn,
    select_holds_txn,
)
from matrix_leave_forget.retention.summary import RATE_WINDOW_MS, retention_summary
from matrix_leave_forget.timestamps import now_ms

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
    result: dict[str, Any] = {"state": args.state, "rooms": rooms}
    if more:
        result["next_from"] = rooms[-1]["room_id"]
    if summary is not None:
        result["retention"] = summary
    write_listing(args.format, result, columns, rooms, f"No rooms in state {args.state}.")
    if summary is not None and args.format == "table":
        print(_summary_line(summary))
    elif summary is not None and args.format == "csv":
        warn(_summary_line(summary))
    if more and args.format != "json":
        warn(f"showing the first {args.limit}: continue with --from {rooms[-1]['room_id']}")
    return EXIT_OK


def cmd_receipt(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Show the erasure receipt of a purged room: its signed ``purged`` audit entry.

    The same as ``purge_receipt`` in ``GET .../admin/rooms/{roomId}``, with
    the room's media: its signed ``media_deleted`` entry once written after the
    grace, or where the media stands until then.

    Args:
        db: The database.
        config: The homeserver config (unused).
        args: The parsed command line (``room``).

    Returns:
        The exit status (EXIT_ERROR if the room has no purge recorded).
    """
    view = purge_receipt_view_txn(db.cursor(), args.room, paramstyle=db.paramstyle)
    if view is None:
        raise CliError(f"no purge of {args.room} is recorded in the audit log")
    if args.format == "json":
        write_json(sys.stdout, {"room_id": args.room, **view})
        return EXIT_OK
    rows = receipt_rows(args.room, view)
    if args.format == "csv":
        write_csv(sys.stdout, ["field", "value"], [{"field": k, "value": v} for k, v in rows])
    elif view["receipt"] is None:
        print("\n".join(f"{k}: {v}" for k, v in rows[:2]))
        print("(recorded before erasure receipts existed: no counts)")
    else:
        print("\n".join(f"{k}: {v}" for k, v in rows))
    return EXIT_OK


def receipt_rows(room_id: str, view: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The receipt's lines (field, value): the purge entry's, then its media's.

    Media deleted after the grace is in its own entry (``media_deleted``):
    once written its counts are the ones shown (the purge entry's are 0 under
    ``delete``); until then, where the media stands.
    """
    receipt = view["receipt"] or {}
    media_state = view.get("media")
    shown = receipt
    if media_state is not None and media_state["state"] == MEDIA_RECORDED:
        shown = media_state["receipt"] or {}
    media = shown.get("media") or {}
    rows = [
        ("room", room_id),
        ("entry", f"{view['seq']}:{view['hash']} ({format_ts(view['ts'])})"),
        ("events erased", _count(receipt.get("events"))),
        ("state groups erased", _count(receipt.get("state_groups"))),
        ("media", _media_state(media_state)),
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
    return rows


def _media_state(media: Mapping[str, Any] | None) -> str:
    """The ``media`` line of a receipt: which entry records the media, or where it stands."""
    if media is None:
        return "decided with the purge (no media deletion for it)"
    if media["state"] == MEDIA_RECORDED:
        return f"entry {media['seq']}:{media['hash']} ({format_ts(media['ts'])})"
    if media["state"] == MEDIA_NOTHING:
        return "none held by the server: nothing to delete"
    if media["due"] is None:
        return "pending: not decided yet (the reference index has not read the room's events)"
    return f"pending: {media['due']} due for deletion, the last at {format_ts(media['due_at'])}"


_MEDIA_COLUMNS = (
    Column("mxc", "MEDIA"),
    Column("decision", "DECISION"),
    Column("reason", "REASON"),
    Column("bytes", "BYTES"),
)


def room_detail(db: Database, config: HomeserverConfig, room_id: str) -> dict[str, Any]:
    """One room as ``GET .../admin/rooms/{roomId}`` shows it, without its local members.

    ``media_preview`` (what a purge would do with the room's media now) while
    the room is not purged, as the admin API; the policy is the module's
    ``retention.media`` in homeserver.yaml.
    """
    cur = db.cursor()
    retention = RetentionState.get_room_txn(cur, room_id, paramstyle=db.paramstyle)
    hold = select_hold_txn(cur, room_id, paramstyle=db.paramstyle)
    settings = module_config(config)
    if hold is None and room_id in settings.retention.holds:
        hold = {"room_id": room_id, "held_by": "config", "reason": None, "created_at": None}
    media_preview = None
    if retention is None or retention.purged_at is None:
        preview = preview_txn(cur, room_id, config.server_name, paramstyle=db.paramstyle)
        media_preview = {"policy": settings.retention.media, **preview}
    return {
        "room_id": room_id,
        "retention": attr.asdict(retention) if retention else None,
        "hold": hold,
        "purge_receipt": purge_receipt_view_txn(cur, room_id, paramstyle=db.paramstyle),
        "media_preview": media_preview,
    }


def cmd_room(db: Database, config: HomeserverConfig, args: argparse.Namespace) -> int:
    """Show one room: retention, hold, purge receipt, what a purge would do with its media.

    The same as ``GET .../admin/rooms/{roomId}`` without ``local_members``.

    Args:
        db: The database.
        config: The homeserver config (server name, the module's holds and media policy).
        args: The parsed command line (``room``).

    Returns:
        The exit status.
    """
    detail = room_detail(db, config, args.room)
    preview = detail["media_preview"]
    if args.format == "json":
        write_json(sys.stdout, detail)
        return EXIT_OK
    if args.format == "csv":
        # The media decisions, one row each (the fields of the room are in --json).
        write_csv(sys.stdout, [c.key for c in _MEDIA_COLUMNS], preview["media"] if preview else [])
        return EXIT_OK
    print("\n".join(f"{k}: {v}" for k, v in _room_rows(detail)))
    if preview is not None and preview["media"]:
        print(render_table(_MEDIA_COLUMNS, preview["media"]))
    if preview is not None and len(preview["media"]) >= PREVIEW_LIMIT:
        warn(f"showing the first {PREVIEW_LIMIT} media of the room")
    return EXIT_OK


def _room_rows(detail: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The room's lines (field, value) before its media table."""
    retention = detail["retention"]
    if retention is None:
        state = "not forgotten by all (no retention state)"
    else:
        times = [
            f"{label} {format_ts(retention[key])}"
            for key, label in (
                ("forgotten_at", "forgotten"),
                ("purge_due_at", "purge due"),
                ("purged_at", "purged"),
                ("cancelled_at", "cancelled"),
            )
            if retention[key] is not None
        ]
        note = f"; {retention['note']}" if retention["note"] else ""
        state = f"{retention['state']} ({', '.join(times) or 'no times'}{note})"
    hold = detail["hold"]
    held = "none"
    if hold is not None:
        since = f" since {format_ts(hold['created_at'])}" if hold["created_at"] else ""
        why = f": {hold['reason']}" if hold["reason"] else ""
        held = f"held by {hold['held_by']}{since}{why}"
    receipt = detail["purge_receipt"]
    purge = "none"
    if receipt is not None:
        purge = f"entry {receipt['seq']}:{receipt['hash']} (see: receipt {detail['room_id']})"
    rows = [
        ("room", detail["room_id"]),
        ("retention", state),
        ("hold", held),
        ("purge receipt", purge),
    ]
    preview = detail["media_preview"]
    if preview is None:
        rows.append(("media preview", "none (the room is purged)"))
    else:
        due = [m for m in preview["media"] if m["decision"] == "due"]
        kept = len(preview["media"]) - len(due)
        rows.append(
            (
                "media preview",
                f"policy {preview['policy']}; encrypted {_yes(preview['encrypted'])}; "
                f"index ready {_yes(preview['index_ready'])}"
                + ("" if preview["index_ready"] else " (a reference elsewhere may be missing)"),
            )
        )
        rows.append(
            (
                "media a purge would delete",
                f"{len(due)} ({sum(m['bytes'] for m in due)} bytes); kept {kept}",
            )
        )
    return rows


def _yes(value: bool) -> str:
    return "yes" if value else "no"


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
    write_listing(args.format, answer, _SCHEDULE_COLUMNS, rows, "No abandoned rooms.")
    if answer["dry_run"] and args.format != "json":
        warn("dry run: nothing was scheduled; run again with --apply to schedule")
    if "next_from" in answer and args.format != "json" and not args.room:
        warn(f"more abandoned rooms: continue with --from {answer['next_from']}")
    return EXIT_OK


def _count(value: Any) -> str:
    return "not counted" if value is None else str(value)
