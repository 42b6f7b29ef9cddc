"""The operator admin API under ``/_synapse/client/leave_forget/v1/admin/``.

Server admins only. Every route is documented in docs/routes.md.
"""

import json
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

import attr
from synapse.module_api import (
    DirectServeJsonResource,
    ModuleApi,
    SynapseRequest,
    parse_json_object_from_request,
)
from synapse.module_api.errors import Codes, SynapseError

from matrix_leave_forget.config import RetentionConfig, is_valid_room_id
from matrix_leave_forget.db.schema import MAX_INT_ARG
from matrix_leave_forget.http.paths import ADMIN_PREFIX
from matrix_leave_forget.retention.state import LISTINGS
from matrix_leave_forget.retention.store import RetentionStore
from matrix_leave_forget.retention.summary import RATE_WINDOW_MS, retention_summary
from matrix_leave_forget.timestamps import now_ms

if TYPE_CHECKING:
    from matrix_leave_forget._synapse.internals import SynapseInternals
    from matrix_leave_forget.media.index import MediaIndexer
    from matrix_leave_forget.media.reaper import MediaReaper
    from matrix_leave_forget.retention.state import ForgottenCheckMany
    from matrix_leave_forget.retention.sweeper import RetentionSweeper


MAX_LIMIT = 1000
EXPORT_BATCH = 1000

_ROOMS = re.compile(r"^/rooms$")
_ROOM = re.compile(r"^/rooms/(?P<room_id>[^/]+)$")
_HOLD = re.compile(r"^/rooms/(?P<room_id>[^/]+)/hold$")
_AUDIT = re.compile(r"^/audit$")
_EXPORT = re.compile(r"^/audit/export$")
_RETENTION = re.compile(r"^/retention$")
_SCHEDULE = re.compile(r"^/rooms/abandoned/schedule$")


# Any number of digits (str_arg bounds the length): a long one gets the same
# "at most" answer as the CLI, not "must be an integer".
_INT_RE = re.compile(r"-?[0-9]+")
# Longest string argument (a user or room id is at most 255 bytes).
MAX_STR_ARG = 1024
# A hold reason is kept to what a leave reason can be: an event's size (64 KiB).
MAX_STORED_REASON_BYTES = 64 * 1024


def str_arg(request: SynapseRequest, name: str) -> str | None:
    """Query parameter ``name`` (None if absent): no NUL, at most MAX_STR_ARG characters."""
    values = request.args.get(name.encode())
    if not values:
        return None
    value: str = values[0].decode("utf-8", errors="replace")
    # PostgreSQL's text cannot hold NUL; nothing the filters match holds one.
    if "\x00" in value:
        raise SynapseError(400, f"'{name}' must not contain NUL", Codes.INVALID_PARAM)
    if len(value) > MAX_STR_ARG:
        raise SynapseError(400, f"'{name}' is too long", Codes.INVALID_PARAM)
    return value


def int_arg(request: SynapseRequest, name: str, default: int | None) -> int | None:
    """Query parameter ``name`` as an integer from 0 to MAX_INT_ARG (``default`` if absent)."""
    value = str_arg(request, name)
    if value is None:
        return default
    # ASCII digits only: int() would also take " 1", "1_000" and other scripts' digits.
    if not _INT_RE.fullmatch(value):
        raise SynapseError(400, f"'{name}' must be an integer", Codes.INVALID_PARAM)
    number = int(value)
    if number < 0:
        raise SynapseError(400, f"'{name}' must not be negative", Codes.INVALID_PARAM)
    if number > MAX_INT_ARG:
        raise SynapseError(400, f"'{name}' must be at most {MAX_INT_ARG}", Codes.INVALID_PARAM)
    return number


def hold_reason(request: SynapseRequest) -> str | None:
    """The ``reason`` of a PUT hold body: a string of storable text, bounded like leave reasons."""
    body = parse_json_object_from_request(request, allow_empty_body=True)
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise SynapseError(400, "'reason' must be a string", Codes.BAD_JSON)
    # Any text is kept, NUL and lone surrogates included: the store escapes
    # what an engine cannot hold (audit.escape_fields, docs/audit.md).
    size = len(reason.encode("utf-8", "surrogatepass"))
    if size > MAX_STORED_REASON_BYTES:
        # 413 M_TOO_LARGE, as Synapse answers an event over its size limit.
        raise SynapseError(
            413,
            f"'reason' must be at most {MAX_STORED_REASON_BYTES} bytes",
            Codes.TOO_LARGE,
        )
    return reason


def limit_arg(request: SynapseRequest) -> int:
    """The page size: ``limit``, 1 to MAX_LIMIT, 100 if absent."""
    limit = int_arg(request, "limit", 100)
    assert limit is not None
    if not 1 <= limit <= MAX_LIMIT:
        raise SynapseError(400, f"'limit' must be between 1 and {MAX_LIMIT}", Codes.INVALID_PARAM)
    return limit


def room_arg(raw: str) -> str:
    """A room id from a path segment (percent-decoded), which must be a valid room id."""
    room_id = urllib.parse.unquote(raw)
    if not is_valid_room_id(room_id):
        raise SynapseError(400, f"{room_id!r} is not a room id", Codes.INVALID_PARAM)
    return room_id


class AdminResource(DirectServeJsonResource):
    """Serves the admin routes.

    Args:
        api: The module API (authentication, admin check).
        store: The retention store.
        retention: The retention config (configured holds).
        internals: Reads Synapse's tables (abandoned rooms, local members).
        ready: Resolves once the module's tables are in place.
        sweeper: The retention sweeper, for its pacing state (GET /retention).
        abandoned_check: Why rooms are not abandoned (the membership rules'
            why_not_abandoned_many_txn), for scheduling abandoned rooms.
        media_index: The media reference index, for its progress (GET /retention).
        media_reaper: Previews what a purge would do with a room's media (room detail).
    """

    isLeaf = True

    def __init__(
        self,
        api: ModuleApi,
        store: RetentionStore,
        retention: RetentionConfig,
        internals: "SynapseInternals",
        ready: Callable[[], Awaitable[None]],
        sweeper: "RetentionSweeper",
        abandoned_check: Optional["ForgottenCheckMany"] = None,
        media_index: Optional["MediaIndexer"] = None,
        media_reaper: Optional["MediaReaper"] = None,
    ) -> None:
        super().__init__()
        self._media_reaper = media_reaper
        self._media_index = media_index
        self._sweeper = sweeper
        self._abandoned_check = abandoned_check
        self._ready = ready
        self._api = api
        self._store = store
        self._retention = retention
        self._internals = internals

    async def _async_render(self, request: SynapseRequest) -> tuple[int, Any] | None:
        await self._ready()
        requester = await self._api.get_user_by_req(request)
        admin_id = requester.user.to_string()
        if not await self._api.is_user_admin(admin_id):
            raise SynapseError(403, "You are not a server admin", Codes.FORBIDDEN)
        path = request.path.decode("ascii", errors="replace")
        if not path.startswith(ADMIN_PREFIX):
            raise SynapseError(404, "Unrecognized request", Codes.UNRECOGNIZED)
        route = path[len(ADMIN_PREFIX) :]
        method = request.method
        if method == b"HEAD":
            method = b"GET"

        if _SCHEDULE.match(route):
            if method != b"POST":
                raise SynapseError(405, "Unrecognized request", Codes.UNRECOGNIZED)
            return 200, await self._schedule_abandoned(request, admin_id)
        if (match := _HOLD.match(route)) is not None:
            room_id = room_arg(match.group("room_id"))
            if method == b"PUT":
                reason = hold_reason(request)
                created = await self._store.retention.put_hold(room_id, admin_id, reason)
                return 200, {"room_id": room_id, "held": True, "created": created}
            if method == b"DELETE":
                lifted = await self._store.retention.lift_hold(room_id, admin_id)
                if room_id in self._retention.holds:
                    # Configured holds cannot be lifted through the API.
                    return 200, {"room_id": room_id, "held": True, "lifted": lifted}
                return 200, {"room_id": room_id, "held": False, "lifted": lifted}
        elif method != b"GET":
            pass
        elif _ROOMS.match(route):
            return 200, await self._list_rooms(request)
        elif (match := _ROOM.match(route)) is not None:
            return 200, await self._room_detail(room_arg(match.group("room_id")))
        elif _AUDIT.match(route):
            return 200, await self._audit_page(request)
        elif _EXPORT.match(route):
            await self._export(request)
            return None
        elif _RETENTION.match(route):
            return 200, await self._retention_status()
        if any(p.match(route) for p in (_ROOMS, _ROOM, _HOLD, _AUDIT, _EXPORT, _RETENTION)):
            raise SynapseError(405, "Unrecognized request", Codes.UNRECOGNIZED)
        raise SynapseError(404, "Unrecognized request", Codes.UNRECOGNIZED)

    async def _list_rooms(self, request: SynapseRequest) -> dict[str, Any]:
        state = str_arg(request, "state") or "forgotten"
        after = str_arg(request, "from")
        limit = limit_arg(request)
        if state == "held":
            # A page of the admin API's holds merged with the configured ones
            # (few): the first `limit` of the union are among these.
            held = {
                h["room_id"]: h for h in await self._store.retention.get_holds_page(after, limit)
            }
            for room_id in self._retention.holds:
                if after is None or room_id > after:
                    held.setdefault(
                        room_id,
                        {
                            "room_id": room_id,
                            "held_by": "config",
                            "reason": None,
                            "created_at": None,
                        },
                    )
            rooms: list[dict[str, Any]] = [held[r] for r in sorted(held)][:limit]
        elif state == "abandoned":
            room_ids = await self._api.run_db_interaction(
                "leave_forget_abandoned_rooms",
                self._internals.abandoned_rooms_txn,
                after or "",
                limit,
            )
            rooms = [{"room_id": r} for r in room_ids]
        elif state in LISTINGS:
            rows = await self._store.retention.list_rooms(LISTINGS[state], after, limit)
            rooms = [attr.asdict(r) for r in rows]
        else:
            raise SynapseError(
                400,
                f"'state' must be one of {', '.join([*LISTINGS, 'held', 'abandoned'])}",
                Codes.INVALID_PARAM,
            )
        result: dict[str, Any] = {"state": state, "rooms": rooms}
        if len(rooms) == limit:
            result["next_from"] = rooms[-1]["room_id"]
        return result

    async def _schedule_abandoned(self, request: SynapseRequest, admin_id: str) -> dict[str, Any]:
        """Put abandoned rooms on the purge schedule; a dry run unless ``"dry_run": false``.

        Body: ``room_ids`` (at most MAX_LIMIT), or none to take the next
        ``limit`` abandoned rooms after ``from`` (as ``GET /rooms?state=abandoned``).
        """
        body = parse_json_object_from_request(request, allow_empty_body=True)
        dry_run = body.get("dry_run", True)
        if not isinstance(dry_run, bool):
            raise SynapseError(400, "'dry_run' must be true or false", Codes.INVALID_PARAM)
        given = body.get("room_ids")
        next_from: str | None = None
        room_ids: list[str]
        if given is None:
            after = body.get("from", "")
            limit = body.get("limit", 100)
            if not isinstance(after, str) or len(after) > MAX_STR_ARG:
                raise SynapseError(400, "'from' must be a room id", Codes.INVALID_PARAM)
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
                raise SynapseError(
                    400, f"'limit' must be an integer from 1 to {MAX_LIMIT}", Codes.INVALID_PARAM
                )
            room_ids = await self._api.run_db_interaction(
                "leave_forget_abandoned_rooms", self._internals.abandoned_rooms_txn, after, limit
            )
            if len(room_ids) == limit:
                next_from = room_ids[-1]
        elif (
            not isinstance(given, list)
            or len(given) > MAX_LIMIT
            or not all(isinstance(r, str) and is_valid_room_id(r) for r in given)
        ):
            raise SynapseError(
                400,
                f"'room_ids' must be a list of at most {MAX_LIMIT} room ids",
                Codes.INVALID_PARAM,
            )
        else:
            room_ids = list(dict.fromkeys(given))
        period = self._retention.period_ms
        if period is None:
            raise SynapseError(
                400,
                "No retention period is set (retention.period): nothing would purge them",
                Codes.INVALID_PARAM,
            )
        result = await self._store.retention.schedule_abandoned(
            room_ids,
            admin_id,
            period,
            self._abandoned_check_txn,
            self._retention.holds,
            dry_run,
        )
        answer: dict[str, Any] = {
            "dry_run": dry_run,
            "scheduled": result.scheduled,
            "skipped": result.skipped,
        }
        if next_from is not None:
            answer["next_from"] = next_from
        return answer

    def _abandoned_check_txn(self, txn: Any, room_ids: Sequence[str]) -> dict[str, str]:
        if self._abandoned_check is None:
            return dict.fromkeys(room_ids, "cannot be checked on this process")
        return self._abandoned_check(txn, room_ids)

    async def _retention_status(self) -> dict[str, Any]:
        """The purge backlog, the current rate and the estimated time to drain it.

        Counts come from the database, so every process answers alike; the
        pacing block is there on the process that purges.
        """
        now = now_ms()
        counts = await self._store.retention.backlog_counts(now, self._retention.holds)
        purged = await self._store.audit.count_purged_since(now - RATE_WINDOW_MS)
        pacing: dict[str, Any] | None = None
        if self._api.should_run_background_tasks():
            pacing = {"pumping": self._sweeper.pumping, **self._sweeper.pacer.snapshot()}
        estimated = pacing["estimated_rate_per_s"] if pacing is not None else None
        return {
            **retention_summary(counts, purged, estimated),
            "dry_run": self._retention.dry_run,
            "pacing": pacing,
            "media_index": (
                await self._media_index.status() if self._media_index is not None else None
            ),
        }

    async def _room_detail(self, room_id: str) -> dict[str, Any]:
        retention = await self._store.retention.get_room(room_id)
        members = await self._api.run_db_interaction(
            "leave_forget_local_members", self._internals.local_memberships_txn, room_id
        )
        history = await self._store.audit.member_history(room_id)
        purge = await self._store.purge_receipt(room_id)
        hold = await self._store.retention.get_hold(room_id)
        if hold is None and room_id in self._retention.holds:
            hold = {"room_id": room_id, "held_by": "config", "reason": None, "created_at": None}
        # What its purge would do with its media (also what dry_run shows), while
        # the room is there to look at.
        media_preview = None
        if self._media_reaper is not None and (retention is None or retention.purged_at is None):
            media_preview = await self._media_reaper.preview(room_id)
        return {
            "room_id": room_id,
            "retention": attr.asdict(retention) if retention else None,
            "hold": hold,
            # The signed entry that records what the purge erased and kept, and
            # the one that records its media after the grace (or where it stands).
            "purge_receipt": purge,
            "media_preview": media_preview,
            "local_members": [
                {
                    "user_id": user_id,
                    "membership": membership,
                    "forgotten": forgotten,
                    **history.get(user_id, {}),
                }
                for user_id, membership, forgotten in members
            ],
        }

    async def _audit_page(self, request: SynapseRequest) -> dict[str, Any]:
        limit = limit_arg(request)
        entries = await self._store.audit.audit_page(
            user_id=str_arg(request, "user_id"),
            room_id=str_arg(request, "room_id"),
            since_ts=int_arg(request, "since", None),
            until_ts=int_arg(request, "until", None),
            after_seq=int_arg(request, "from", 0) or 0,
            limit=limit,
        )
        result: dict[str, Any] = {"entries": entries}
        if len(entries) == limit:
            result["next_from"] = entries[-1]["seq"]
        return result

    async def _export(self, request: SynapseRequest) -> None:
        """Stream every matching entry as JSON lines, paging through the table."""
        after = int_arg(request, "from", 0) or 0
        user_id = str_arg(request, "user_id")
        room_id = str_arg(request, "room_id")
        since_ts = int_arg(request, "since", None)
        until_ts = int_arg(request, "until", None)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        while True:
            entries = await self._store.audit.audit_page(
                user_id=user_id,
                room_id=room_id,
                since_ts=since_ts,
                until_ts=until_ts,
                after_seq=after,
                limit=EXPORT_BATCH,
            )
            for entry in entries:
                request.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
            if len(entries) < EXPORT_BATCH:
                break
            after = entries[-1]["seq"]
        request.finish()
