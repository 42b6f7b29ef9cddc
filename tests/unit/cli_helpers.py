"""The offline CLI in-process: synthetic SQLite databases with the module's tables, and a
test case that runs ``cli.main`` on them."""

import io
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from signedjson.key import (
    generate_signing_key,
    write_signing_keys,
)
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget import cli
from matrix_leave_forget.audit.entry import ENTRY_FIELDS, GENESIS_HASH, escape_fields, seal_entries
from matrix_leave_forget.audit.log import AUDIT_COLUMNS, STORED_COLUMNS
from matrix_leave_forget.db.schema import MIGRATIONS, SCHEMA_VERSION
from tests.support.chain import make_chain

ORIGIN = "example.org"


class Tty(io.StringIO):
    """A stream that says it is a terminal, as an operator's stderr would."""

    def isatty(self) -> bool:
        return True


def create_database(
    path: str,
    entries: Sequence[dict[str, Any]],
    rooms: Sequence[tuple[Any, ...]] = (),
    holds: Sequence[tuple[Any, ...]] = (),
) -> None:
    """A database with the module's tables at the current schema, holding ``entries``."""
    conn = sqlite3.connect(path)
    try:
        for migration in MIGRATIONS:
            for statement in migration:
                conn.execute(statement)
        conn.execute(
            "CREATE TABLE leave_forget_schema_version (lock CHAR(1) NOT NULL DEFAULT 'X' "
            "UNIQUE CHECK (lock = 'X'), version INTEGER NOT NULL)"
        )
        conn.execute(
            "INSERT INTO leave_forget_schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
        )
        for entry in entries:
            insert_entry(conn, entry)
        for row in rooms:
            # The first nine columns (RoomRetention's); later ones stay null.
            conn.execute(
                "INSERT INTO leave_forget_rooms (room_id, state, forgotten_at, purge_due_at, "
                "purge_started_at, purged_at, cancelled_at, note, updated_at) "
                f"VALUES ({', '.join('?' * 9)})",
                row,
            )
        for row in holds:
            conn.execute(
                "INSERT INTO leave_forget_holds (room_id, held_by, reason, created_at) "
                "VALUES (?, ?, ?, ?)",
                row,
            )
        conn.commit()
    finally:
        conn.close()


def insert_entry(conn: sqlite3.Connection, entry: dict[str, Any]) -> None:
    """Store an entry as AuditLog.append_txn does."""
    conn.execute(
        f"INSERT INTO leave_forget_audit ({', '.join(AUDIT_COLUMNS)}) "
        f"VALUES ({', '.join('?' for _ in AUDIT_COLUMNS)})",
        [entry[c] for c in ENTRY_FIELDS]
        + [entry["hash"], json.dumps(entry["signatures"], sort_keys=True)],
    )


class CliTestCase(SynchronousTestCase):
    """A temporary homeserver: signing key, database and homeserver.yaml."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.key = generate_signing_key("a1")
        self.key_path = os.path.join(self.dir, "signing.key")
        with open(self.key_path, "w") as f:
            write_signing_keys(f, [self.key])
        self.db_path = os.path.join(self.dir, "homeserver.db")
        self.config_path = os.path.join(self.dir, "homeserver.yaml")
        self.write_config()

    def write_config(self, **overrides: Any) -> str:
        """(Re)write homeserver.yaml; a None override removes the key."""
        config: dict[str, Any] = {
            "server_name": ORIGIN,
            "signing_key_path": self.key_path,
            "database": {
                "name": "sqlite3",
                "args": {"database": self.db_path, "cp_min": 1, "cp_max": 1},
            },
        }
        config.update(overrides)
        config = {k: v for k, v in config.items() if v is not None}
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        return self.config_path

    def chain(self, count: int, key: SigningKey | None = None) -> list[dict[str, Any]]:
        """Create the database holding a valid chain of ``count`` entries; return them."""
        entries = make_chain(count, key or self.key)
        create_database(self.db_path, entries)
        return entries

    def run_cli(self, *argv: str, stderr: io.StringIO | None = None) -> tuple[int, str, str]:
        """``matrix-leave-forget -c homeserver.yaml argv...``: (exit status, stdout, stderr)."""
        out, err = io.StringIO(), stderr if stderr is not None else io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        try:
            code = cli.main(["-c", self.config_path, *argv])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        return code, out.getvalue(), err.getvalue()

    def assertCliError(self, argv: Sequence[str], message: str) -> None:
        """Exit status 2 and one line on stderr containing ``message``, no traceback."""
        code, out, err = self.run_cli(*argv)
        self.assertEqual(code, 2, err)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("matrix-leave-forget: error: ", err)
        self.assertIn(message, err)
        self.assertNotIn("Traceback", err)

    def tamper(self, sql: str, *args: Any) -> None:
        """Change the database behind the module's back."""
        conn = sqlite3.connect(self.db_path)
        conn.execute(sql, args)
        conn.commit()
        conn.close()


GROUP = 4


def group_chain(count: int, key: Any, group: int = GROUP) -> list[dict[str, Any]]:
    """``count`` leave entries sealed ``group`` at a time (the group format)."""
    entries: list[dict[str, Any]] = []
    seq, prev = 0, GENESIS_HASH
    while seq < count:
        size = min(group, count - seq)
        fields = [
            escape_fields(
                {
                    "ts": 1_700_000_000_000 + (seq + i) * 1000,
                    "origin": ORIGIN,
                    "instance": "master",
                    "action": "leave",
                    "user_id": f"@user{(seq + i) % 3}:{ORIGIN}",
                    "room_id": f"!room{seq + i}:{ORIGIN}",
                    "reason": f"reason {seq + i}",
                    "event_id": f"$event{seq + i}",
                    "device_id": "DEVICE",
                    "outcome": "ok",
                    "via": "api",
                }
            )
            for i in range(size)
        ]
        sealed = seal_entries(fields, seq, prev, ORIGIN, key)
        seq, prev = sealed[-1]["seq"], sealed[-1]["hash"]
        entries += sealed
    return entries


class ChainStoreTestCase(CliTestCase):
    """A CLI test whose database holds a given chain, stored column by column."""

    def store(self, entries: list[dict[str, Any]]) -> None:
        """Replace the database with one holding entries (every stored column)."""
        if os.path.exists(self.db_path):
            os.unlink(self.db_path)
        create_database(self.db_path, [])
        conn = sqlite3.connect(self.db_path)
        conn.executemany(
            f"INSERT INTO leave_forget_audit ({', '.join(STORED_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in STORED_COLUMNS)})",
            [
                [
                    json.dumps(e["signatures"], sort_keys=True) if c == "signatures" else e.get(c)
                    for c in STORED_COLUMNS
                ]
                for e in entries
            ],
        )
        conn.commit()
        conn.close()

    def head(self, entries: list[dict[str, Any]], seq: int) -> str:
        return f"{seq}:{entries[seq - 1]['hash']}"
