"""The module's tables and their ordered migrations.

Migrations run inside one transaction at start-up on every process that loads
the module. On PostgreSQL a transaction-scoped advisory lock makes concurrent
starts (main process and workers) take turns; SQLite has a single writer. Each
migration is a list of statements valid on both engines; a version is applied
once and recorded in ``leave_forget_schema_version``. Synapse's own tables are
never altered.
"""

from collections.abc import Sequence
from typing import Any

from matrix_leave_forget._synapse.sql import is_postgres

# Arbitrary, fixed: the advisory lock key for this module's migrations.
_MIGRATION_LOCK_KEY = 0x4C46_4D31  # "LFM1"

MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: the audit chain and per-room retention state.
    (
        """
        CREATE TABLE leave_forget_audit (
            seq BIGINT NOT NULL PRIMARY KEY,
            ts BIGINT NOT NULL,
            origin TEXT NOT NULL,
            instance TEXT NOT NULL,
            action TEXT NOT NULL,
            user_id TEXT,
            room_id TEXT,
            reason TEXT,
            event_id TEXT,
            device_id TEXT,
            outcome TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            signatures TEXT NOT NULL
        )
        """,
        "CREATE INDEX leave_forget_audit_user ON leave_forget_audit (user_id, seq)",
        "CREATE INDEX leave_forget_audit_room ON leave_forget_audit (room_id, seq)",
        "CREATE INDEX leave_forget_audit_ts ON leave_forget_audit (ts)",
        """
        CREATE TABLE leave_forget_rooms (
            room_id TEXT NOT NULL PRIMARY KEY,
            state TEXT NOT NULL,
            forgotten_at BIGINT,
            purge_due_at BIGINT,
            purge_started_at BIGINT,
            purged_at BIGINT,
            cancelled_at BIGINT,
            note TEXT,
            updated_at BIGINT NOT NULL
        )
        """,
        "CREATE INDEX leave_forget_rooms_due ON leave_forget_rooms (state, purge_due_at)",
    ),
    # 2: operator holds, kept apart from the state so a hold survives a purge
    # being cancelled and re-armed.
    (
        """
        CREATE TABLE leave_forget_holds (
            room_id TEXT NOT NULL PRIMARY KEY,
            held_by TEXT NOT NULL,
            reason TEXT,
            created_at BIGINT NOT NULL
        )
        """,
    ),
    # 3: listing rooms by state in room-id order (the admin API's and the CLI's
    # keyset paging) reads an index range instead of sorting every room in
    # that state.
    ("CREATE INDEX leave_forget_rooms_state_room ON leave_forget_rooms (state, room_id)",),
    # 4 (audit-chain): the audit entry's optional fields (audit.OPTIONAL_FIELDS),
    # null on every older entry: the group-sealed format marker, which client
    # texts are stored escaped, a refused reason's size and hash when only its
    # prefix is kept, and how many refusals were counted but not appended.
    (
        "ALTER TABLE leave_forget_audit ADD COLUMN format INTEGER",
        "ALTER TABLE leave_forget_audit ADD COLUMN escaped TEXT",
        "ALTER TABLE leave_forget_audit ADD COLUMN reason_bytes BIGINT",
        "ALTER TABLE leave_forget_audit ADD COLUMN reason_sha256 TEXT",
        "ALTER TABLE leave_forget_audit ADD COLUMN suppressed BIGINT",
        # A hold's reason stored escaped (audit.escape_text) when it holds NUL
        # or a lone surrogate: 1 then, null otherwise.
        "ALTER TABLE leave_forget_holds ADD COLUMN reason_escaped INTEGER",
    ),
    # 5 (audit-routes):
    # how each departure or forget happened (audit.OPTIONAL_FIELDS via, actor,
    # event_ts; null on older entries), entries found by their event (the
    # live path and the catch-up must not record one event twice), and the
    # positions in Synapse's events stream: where the module was installed
    # and how far the catch-up has read (store.STREAM_INSTALLED,
    # store.STREAM_DEPARTURES, set at first start-up).
    (
        "ALTER TABLE leave_forget_audit ADD COLUMN via TEXT",
        "ALTER TABLE leave_forget_audit ADD COLUMN actor TEXT",
        "ALTER TABLE leave_forget_audit ADD COLUMN event_ts BIGINT",
        "CREATE INDEX leave_forget_audit_event ON leave_forget_audit (event_id)",
        """
        CREATE TABLE leave_forget_stream_positions (
            name TEXT NOT NULL PRIMARY KEY,
            stream_id BIGINT NOT NULL
        )
        """,
    ),
    # 6 (erasure): format 3's salted commitment to an entry's free text
    # (hashed) and its salt (not hashed), when the text was erased (not
    # hashed), the erasure records (``erase`` entries, read before the chain
    # by verify), and the entries an erased user acted in (docs/audit.md "Erasure").
    (
        "ALTER TABLE leave_forget_audit ADD COLUMN text_commitment TEXT",
        "ALTER TABLE leave_forget_audit ADD COLUMN erasure TEXT",
        "ALTER TABLE leave_forget_audit ADD COLUMN text_salt TEXT",
        "ALTER TABLE leave_forget_audit ADD COLUMN text_erased BIGINT",
        "CREATE INDEX leave_forget_audit_erasures ON leave_forget_audit (seq) "
        "WHERE erasure IS NOT NULL",
        "CREATE INDEX leave_forget_audit_actor ON leave_forget_audit (actor) "
        "WHERE actor IS NOT NULL",
        # audit.text_retention's pass reads entries still holding text by
        # time: without it, every pass would walk every erased entry again.
        "CREATE INDEX leave_forget_audit_text ON leave_forget_audit (ts) "
        "WHERE reason IS NOT NULL AND text_erased IS NULL",
        # What Synapse held of a room just before its purge (the erasure
        # receipt; _synapse.leftovers.RoomFootprint), null until then.
        "ALTER TABLE leave_forget_rooms ADD COLUMN purge_events BIGINT",
        "ALTER TABLE leave_forget_rooms ADD COLUMN purge_state_groups BIGINT",
        "ALTER TABLE leave_forget_rooms ADD COLUMN purge_min_stream BIGINT",
        # The purge's audit entry's receipt (audit.OPTIONAL_FIELDS).
        "ALTER TABLE leave_forget_audit ADD COLUMN receipt TEXT",
        # The admin who put an abandoned room (left by every local user, not
        # necessarily forgotten) on the purge schedule; null for rooms
        # forgotten by all (docs/retention.md "Abandoned rooms").
        "ALTER TABLE leave_forget_rooms ADD COLUMN scheduled_by TEXT",
    ),
    # 7 (media): the media reference index, (server, media id) -> the events
    # that reference it (media/index.py); filled from Synapse's events stream,
    # its positions in leave_forget_stream_positions (store.STREAM_MEDIA_*).
    # Looked up by media (is it referenced elsewhere?) and by room (what did
    # a purged room reference?).
    (
        """
        CREATE TABLE leave_forget_media_refs (
            media_origin TEXT NOT NULL,
            media_id TEXT NOT NULL,
            room_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            kind TEXT NOT NULL
        )
        """,
        "CREATE UNIQUE INDEX leave_forget_media_refs_key ON leave_forget_media_refs "
        "(media_origin, media_id, event_id, kind)",
        "CREATE INDEX leave_forget_media_refs_room ON leave_forget_media_refs (room_id)",
        # A purged room's media, once the room is up for purge (media/reaper.py):
        # whether the room was encrypted and where its events ended in the
        # stream (the index must have read that far), then what was decided.
        """
        CREATE TABLE leave_forget_media_rooms (
            room_id TEXT NOT NULL PRIMARY KEY,
            state TEXT NOT NULL,
            encrypted INTEGER NOT NULL,
            max_stream BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )
        """,
        "CREATE INDEX leave_forget_media_rooms_state ON leave_forget_media_rooms (state)",
        # Each medium a purged room referenced: due for deletion (until
        # due_at), deleted, kept (and why) or cancelled (and why).
        """
        CREATE TABLE leave_forget_media_deletions (
            media_origin TEXT NOT NULL,
            media_id TEXT NOT NULL,
            room_id TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            bytes BIGINT NOT NULL,
            due_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            PRIMARY KEY (media_origin, media_id, room_id)
        )
        """,
        "CREATE INDEX leave_forget_media_deletions_due ON leave_forget_media_deletions "
        "(state, due_at)",
        "CREATE INDEX leave_forget_media_deletions_room ON leave_forget_media_deletions (room_id)",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)

# Integers are stored as 64-bit (BIGINT; SQLite's INTEGER): the admin API and
# the CLI refuse a larger argument, which would fail in the database driver
# (a 500) instead of being answered.
MAX_INT_ARG = 2**63 - 1


def current_version(txn: Any) -> int:
    """The applied schema version, 0 for an empty database."""
    txn.execute(
        "CREATE TABLE IF NOT EXISTS leave_forget_schema_version ("
        " lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE CHECK (lock = 'X'),"
        " version INTEGER NOT NULL)"
    )
    txn.execute("SELECT version FROM leave_forget_schema_version")
    row = txn.fetchone()
    return int(row[0]) if row else 0


def run_migrations(txn: Any, target: int = SCHEMA_VERSION) -> int:
    """Bring the schema up to ``target``; safe to run on every start.

    Returns:
        The version now in place.

    Raises:
        RuntimeError: if the database holds a newer schema than this code knows,
            which means an older module is running against a newer database.
    """
    if is_postgres(txn):
        # Synapse runs transactions at REPEATABLE READ, whose snapshot is taken
        # by the first query: here the lock's SELECT, i.e. *before* the lock is
        # granted. A process that waited for another to finish migrating would
        # then not see its version row and re-run its DDL ("relation already
        # exists"). At READ COMMITTED every statement after the lock sees the
        # other's commit. This must precede every query of the transaction.
        txn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        txn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK_KEY,))
    version = current_version(txn)
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"matrix-leave-forget schema is at version {version}, newer than this "
            f"module's {SCHEMA_VERSION}: upgrade the module"
        )
    applied: list[int] = []
    for number in range(version + 1, target + 1):
        for statement in MIGRATIONS[number - 1]:
            txn.execute(statement)
        applied.append(number)
    if applied:
        if version == 0:
            txn.execute("INSERT INTO leave_forget_schema_version (version) VALUES (?)", (target,))
        else:
            txn.execute("UPDATE leave_forget_schema_version SET version = ?", (target,))
    return max(version, target)
