"""Seed a stopped Synapse's database directly with SQL, fast.

A fresh Synapse is started once so that Synapse and the module create their
schemas (and an admin user is registered), then stopped; rows then go straight
into the tables. Audit entries form a valid chain sealed with the homeserver's
own signing key (so ``verify`` checks real signatures). Memberships go into
Synapse's ``rooms``, ``local_current_membership`` and ``room_memberships`` in
the shapes Synapse writes them (no ``events`` rows: nothing the module reads
needs them, and ``event_stream_ordering`` is left NULL, which the triggers and
the NOT VALID foreign key accept).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from bench.common import SERVER_NAME, SynapseProcess, User, log
from matrix_leave_forget.audit.entry import GENESIS_HASH, seal_entry
from matrix_leave_forget.audit.log import AUDIT_COLUMNS
from tests.support import rawdb

# Room kinds, by room index modulo 20 (see seed_memberships).
ACTIVE, ABANDONED, FORGOTTEN, DRY_RUN, CANCELLED, PURGED, PURGING = (
    "active",
    "abandoned",
    "forgotten",
    "dry_run",
    "cancelled",
    "purged",
    "purging",
)
KIND_BY_MOD20 = (
    [ACTIVE] * 10
    + [ABANDONED] * 2
    + [FORGOTTEN] * 3
    + [DRY_RUN]
    + [CANCELLED]
    + [PURGED] * 2
    + [PURGING]
)
DAY_MS = 24 * 3600 * 1000


def room_id(i: int) -> str:
    return "!" + hashlib.sha1(str(i).encode()).hexdigest()[:18] + ":" + SERVER_NAME


def user_id(j: int) -> str:
    return f"@u{j}:{SERVER_NAME}"


def members_of(i: int, n_users: int) -> list[int]:
    """1 to 4 local members (2.5 on average), distinct users."""
    count = 1 + (i * 7919) % 4
    return [(i * 31 + k * 104729) % n_users for k in range(count)]


class Sink:
    """Where seeded rows go: one SQLite file or one PostgreSQL database."""

    def __init__(self, hs: SynapseProcess) -> None:
        self.hs = hs
        self.is_pg = hs.database == "postgres"
        if self.is_pg:
            self.conn: Any = rawdb.pg_connection(hs.pg_database)
            # Skip Synapse's per-row stream-ordering triggers and foreign-key
            # checks while seeding (every seeded row leaves the column NULL).
            self.conn.cursor().execute("SET session_replication_role = replica")
        else:
            self.conn = sqlite3.connect(rawdb.sqlite_path(hs))
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = OFF")
            # Random room ids land all over the indexes: keep them in memory.
            self.conn.execute("PRAGMA cache_size = -1000000")
            # Synapse's per-row stream-ordering triggers cost more than the
            # inserts; every seeded row leaves the column NULL, so they are
            # dropped while seeding and put back, as they were, by finish().
            self._triggers = self.conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                "AND tbl_name IN ('local_current_membership', 'room_memberships')"
            ).fetchall()
            for name, _ in self._triggers:
                self.conn.execute(f"DROP TRIGGER {name}")

    def insert(self, table: str, columns: Sequence[str], rows: list[Sequence[Any]]) -> None:
        if not rows:
            return
        cur = self.conn.cursor()
        if self.is_pg:
            buf = io.StringIO()
            for row in rows:
                buf.write("\t".join(_copy_value(v) for v in row))
                buf.write("\n")
            buf.seek(0)
            cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buf)
        else:
            marks = ", ".join("?" for _ in columns)
            cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        cur.execute(sql.replace("?", "%s") if self.is_pg else sql, args)
        try:
            return list(cur.fetchall())
        except Exception:
            return []

    def finish(self, analyze: bool = True) -> None:
        if not self.is_pg:
            for _, sql in self._triggers:
                self.conn.execute(sql)
        self.conn.commit()
        if self.is_pg and analyze:
            # What autovacuum would have done on a live server.
            self.conn.autocommit = True
            self.conn.cursor().execute("VACUUM ANALYZE")
        self.conn.close()


def _copy_value(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def bench_key_dir() -> str:
    """A directory holding a fixed signing key, reused by every bench Synapse."""
    from signedjson.key import generate_signing_key, write_signing_keys

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "key")
    os.makedirs(path, exist_ok=True)
    key_path = os.path.join(path, "signing.key")
    if not os.path.exists(key_path):
        with open(key_path, "w") as f:
            write_signing_keys(f, [generate_signing_key("a_bench")])
    return key_path


def signing_key() -> Any:
    from signedjson.key import read_signing_keys

    with open(bench_key_dir()) as f:
        return read_signing_keys(f)[0]


def fresh_synapse(
    database: str,
    module_config: dict[str, Any] | None = None,
    extra_modules: Sequence[dict[str, Any]] = (),
) -> tuple[SynapseProcess, User]:
    """A Synapse whose schema exists, with an admin user, stopped, using the bench key."""
    workdir = tempfile.mkdtemp(prefix="mlf-bench-")
    shutil.copy(bench_key_dir(), os.path.join(workdir, "signing.key"))
    config = {"mount": "listener", "forget_rate_limit": None, **(module_config or {})}
    # A fresh database has Synapse's own background updates to run; run them
    # now, flat out, so that they are done before anything is measured.
    extra: dict[str, Any] = {
        "background_updates": {
            "sleep_enabled": False,
            "min_batch_size": 1000,
            "default_batch_size": 1000,
        }
    }
    if extra_modules:
        # Listed first: a hook module may need to see the module being built.
        extra["modules"] = [
            *extra_modules,
            {"module": "matrix_leave_forget.LeaveForgetModule", "config": config},
        ]
    hs = SynapseProcess(config, extra, database=database, workdir=workdir)
    hs._own_workdir = True  # cleanup() removes it
    hs.start()
    try:
        admin = hs.register("admin", admin=True)
        # The module's tables are created right after start; wait for them,
        # and for Synapse's background updates.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            resp = hs.client(
                "GET",
                "/_synapse/client/leave_forget/v1/admin/audit?limit=1",
                token=admin.access_token,
            )
            status = hs.client(
                "GET", "/_synapse/admin/v1/background_updates/status", token=admin.access_token
            )
            if (
                resp.status == 200
                and status.status == 200
                and not status.body.get("current_updates")
            ):
                break
            time.sleep(0.2)
    finally:
        hs.stop()
    return hs, admin


# -- chain -----------------------------------------------------------------------


def audit_chain(
    n: int, n_rooms: int, n_users: int, base_ts: int, step_ms: int
) -> Iterator[tuple[Any, ...]]:
    """n sealed audit rows (in AUDIT_COLUMNS order), a valid chain from seq 1."""
    key = signing_key()
    prev = GENESIS_HASH
    actions = (
        "leave",
        "leave",
        "forget",
        "forget",
        "leave",
        "forget",
        "leave",
        "forget",
        "purge",
        "hold",
    )
    for seq in range(1, n + 1):
        i = (seq * 2654435761) % n_rooms
        members = members_of(i, n_users)
        action = actions[seq % len(actions)]
        user = (
            user_id(members[seq % len(members)]) if action in ("leave", "forget", "hold") else None
        )
        fields = {
            "seq": seq,
            "ts": base_ts + seq * step_ms,
            "origin": SERVER_NAME,
            "instance": "master",
            "action": action,
            "user_id": user,
            "room_id": room_id(i),
            "reason": "bench" if seq % 7 == 0 else None,
            "event_id": f"$ev{seq}" if action == "leave" else None,
            "device_id": "BENCHDEV" if user else None,
            "outcome": "ok" if action in ("leave", "forget", "hold") else "started",
            "prev_hash": prev,
        }
        entry = seal_entry(fields, SERVER_NAME, key)
        prev = entry["hash"]
        yield tuple(
            json.dumps(entry["signatures"], sort_keys=True) if c == "signatures" else entry[c]
            for c in AUDIT_COLUMNS
        )


def seed_audit(
    sinks: Sequence[tuple[Sink, int]], n_rooms: int, n_users: int, base_ts: int, step_ms: int
) -> None:
    """Write one chain into several sinks, each getting its first ``limit`` entries."""
    total = max(limit for _, limit in sinks)
    batch: list[tuple[Any, ...]] = []
    started = time.monotonic()
    done = 0
    for row in audit_chain(total, n_rooms, n_users, base_ts, step_ms):
        batch.append(row)
        if len(batch) >= 20000:
            _flush_audit(sinks, batch, done)
            done += len(batch)
            batch = []
            log(f"  sealed {done} audit entries ({done / (time.monotonic() - started):.0f}/s)")
    _flush_audit(sinks, batch, done)


def _flush_audit(
    sinks: Sequence[tuple[Sink, int]], batch: list[tuple[Any, ...]], offset: int
) -> None:
    for sink, limit in sinks:
        rows = batch[: max(0, limit - offset)]
        sink.insert("leave_forget_audit", AUDIT_COLUMNS, rows)


# -- memberships -------------------------------------------------------------------


def layout(n_members: int) -> tuple[int, int]:
    """(rooms, users) for about n_members local membership rows."""
    # 2.5 local members per room on average; purged and purging rooms (15%) have none.
    return int(n_members / 2.5 / 0.85), max(50, n_members // 20)


class SeedRows:
    """Rows for Synapse's tables and the module's, written to the sink in batches."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.rooms: list[tuple[Any, ...]] = []
        self.lcm: list[tuple[Any, ...]] = []
        self.rm: list[tuple[Any, ...]] = []
        self.retention: list[tuple[Any, ...]] = []
        self.holds: list[tuple[Any, ...]] = []

    def flush_if_full(self) -> None:
        if len(self.lcm) >= 50000:
            self.flush()

    def flush(self) -> None:
        sink = self.sink
        sink.insert(
            "rooms",
            ("room_id", "is_public", "creator", "room_version", "has_auth_chain_index"),
            self.rooms,
        )
        sink.insert(
            "local_current_membership", ("room_id", "user_id", "event_id", "membership"), self.lcm
        )
        sink.insert(
            "room_memberships",
            ("event_id", "user_id", "sender", "room_id", "membership", "forgotten"),
            self.rm,
        )
        sink.insert(
            "leave_forget_rooms",
            (
                "room_id",
                "state",
                "forgotten_at",
                "purge_due_at",
                "purge_started_at",
                "purged_at",
                "cancelled_at",
                "note",
                "updated_at",
            ),
            self.retention,
        )
        sink.insert(
            "leave_forget_holds", ("room_id", "held_by", "reason", "created_at"), self.holds
        )
        for rows in (self.rooms, self.lcm, self.rm, self.retention, self.holds):
            rows.clear()


def seed_memberships(sink: Sink, n_members: int, now: int) -> dict[str, Any]:
    """About n_members local membership rows over n_members / 2.5 rooms, of every kind.

    Returns:
        Counts, and sample room ids per kind for the queries.
    """
    n_rooms, n_users = layout(n_members)
    rows = SeedRows(sink)
    samples: dict[str, list[str]] = {}
    counts: dict[str, int] = {}

    for i in range(n_rooms):
        kind = KIND_BY_MOD20[i % 20]
        rid = room_id(i)
        counts[kind] = counts.get(kind, 0) + 1
        if len(samples.setdefault(kind, [])) < 5 and i > n_rooms // 2:
            samples[kind].append(rid)
        members = members_of(i, n_users)
        forgotten_at = now - (i % 30) * DAY_MS
        if kind not in (PURGED, PURGING):
            rows.rooms.append((rid, False, user_id(members[0]), "10", True))
            for k, m in enumerate(members):
                if kind == ACTIVE:
                    membership, forgotten = ("join" if k == 0 or i % 3 else "leave"), 0
                elif kind == ABANDONED:
                    membership, forgotten = "leave", k % 2
                elif kind == CANCELLED:
                    membership, forgotten = ("join" if k == 0 else "leave"), 0 if k == 0 else 1
                else:
                    membership, forgotten = "leave", 1
                eid = f"$m{i}_{k}"
                rows.lcm.append((rid, user_id(m), eid, membership))
                rows.rm.append((eid, user_id(m), user_id(m), rid, membership, forgotten))
        if kind == FORGOTTEN:
            rows.retention.append(
                (
                    rid,
                    "forgotten",
                    forgotten_at,
                    forgotten_at + 30 * DAY_MS,
                    None,
                    None,
                    None,
                    None,
                    forgotten_at,
                )
            )
        elif kind == DRY_RUN:
            rows.retention.append(
                (
                    rid,
                    "dry_run",
                    forgotten_at,
                    forgotten_at + DAY_MS,
                    forgotten_at + DAY_MS,
                    None,
                    None,
                    None,
                    forgotten_at + DAY_MS,
                )
            )
        elif kind == CANCELLED:
            rows.retention.append(
                (
                    rid,
                    "active",
                    forgotten_at,
                    None,
                    None,
                    None,
                    forgotten_at + 1000,
                    "rejoined",
                    forgotten_at + 1000,
                )
            )
        elif kind == PURGED:
            rows.retention.append(
                (
                    rid,
                    "purged",
                    forgotten_at,
                    forgotten_at + DAY_MS,
                    forgotten_at + DAY_MS,
                    forgotten_at + DAY_MS + 5000,
                    None,
                    None,
                    forgotten_at + DAY_MS + 5000,
                )
            )
        elif kind == PURGING:
            rows.retention.append(
                (rid, "purging", forgotten_at, forgotten_at + DAY_MS, now, None, None, None, now)
            )
        if kind == FORGOTTEN and i % 100 == 12:
            rows.holds.append((rid, user_id(0), "litigation", forgotten_at))
            samples.setdefault("held", []).append(rid)
        rows.flush_if_full()
    rows.flush()
    lcm = sink.execute("SELECT COUNT(*) FROM local_current_membership")[0][0]
    retention = sink.execute("SELECT COUNT(*) FROM leave_forget_rooms")[0][0]
    holds = sink.execute("SELECT COUNT(*) FROM leave_forget_holds")[0][0]
    return {
        "rooms": n_rooms,
        "users": n_users,
        "local_current_membership_rows": lcm,
        "leave_forget_rooms_rows": retention,
        "holds": holds,
        "kinds": counts,
        "samples": samples,
    }


def iter_chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def seed_sweep(sink: Sink, n: int, now: int) -> dict[str, int]:
    """n rooms due for purge (forgotten by both local members), and n more not yet due.

    Of the due rooms, 1 % are held through the admin API, 1 % have a member who
    rejoined (the sweep must cancel them) and 0.5 % are unknown to Synapse.
    """
    rows = SeedRows(sink)
    counts = {"due": 0, "held": 0, "rejoined": 0, "unknown": 0, "not_due": 0}

    n_users = max(50, n // 10)
    for i in range(2 * n):
        rid = room_id(i)
        due = i < n
        forgotten_at = now - 2 * DAY_MS + i
        purge_due_at = forgotten_at + DAY_MS if due else now + DAY_MS + i
        unknown = due and i % 200 == 7
        rejoined = due and i % 100 == 3
        if not unknown:
            rows.rooms.append((rid, False, user_id(0), "10", True))
        for k in range(2):
            uid = user_id((i * 2 + k) % n_users)
            eid = f"$s{i}_{k}"
            membership, forgotten = ("join", 0) if rejoined and k == 0 else ("leave", 1)
            if not unknown:
                rows.lcm.append((rid, uid, eid, membership))
                rows.rm.append((eid, uid, uid, rid, membership, forgotten))
        rows.retention.append(
            (rid, "forgotten", forgotten_at, purge_due_at, None, None, None, None, forgotten_at)
        )
        if due and i % 100 == 5:
            rows.holds.append((rid, user_id(0), "bench hold", now))
            counts["held"] += 1
        counts["due" if due else "not_due"] += 1
        counts["rejoined"] += rejoined
        counts["unknown"] += unknown
        rows.flush_if_full()
    rows.flush()
    return counts
