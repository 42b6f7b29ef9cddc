"""After a retention purge, no table of Synapse holds the room's event ids or text.

A room is used as a new user would: text, an edit, a reaction, a thread reply,
a redaction, a topic change, a read receipt, tags and room account data. Both
members leave and forget it, retention purges it, and then every table of
Synapse's schema is scanned, every column of every row, for the room's event
ids and texts. Rows holding only the bare room id are allowed in the tables
docs/retention.md lists (stream tables), and nowhere else.
"""

import json
import os
import urllib.parse
from typing import Any, ClassVar

from tests.integration.retention_helpers import FAST_RETENTION, RELAXED_FORGET, RetentionHelpers
from tests.support import rawdb
from tests.support.harness import FAST_BACKGROUND_UPDATES, quote_room, run_cli, wait_until

# Unique texts, one per kind of content.
TEXTS = {
    "message": "leftover-probe message alpha",
    "edit": "leftover-probe edited beta",
    "reaction": "leftover-probe-reaction-gamma",
    "thread": "leftover-probe thread delta",
    "redaction": "leftover-probe redact epsilon",
    "topic": "leftover-probe topic zeta",
    "account_data": "leftover-probe account data eta",
    "tag": "u.leftover-probe-tag-theta",
}

# Tables of Synapse that may keep a row with the purged room's bare id, and
# why (docs/retention.md "What a purge leaves"). Each holds no event id and no
# content, only the id as the key of a stream position.
ROOM_ID_ONLY_TABLES = {
    # The state-delta stream, read by position by /sync, workers' caches and
    # Synapse's background handlers: rows stay, their event ids are cleared
    # (_synapse/leftovers.py).
    "current_state_delta_stream",
    # The tag-change stream (user, room, stream id): a client's next /sync
    # reads "tags changed" from it; no tag content.
    "room_tags_revisions",
    # Synapse's own finished purge task, keyed by the room id; Synapse
    # deletes finished tasks after a week.
    "scheduled_tasks",
}


def holding(rows: dict[str, list[tuple[Any, ...]]], needle: str) -> dict[str, int]:
    """Tables (not the module's own) with rows holding needle in some column, and how many."""
    found: dict[str, int] = {}
    for table, table_rows in rows.items():
        if table.startswith("leave_forget_"):
            continue
        for row in table_rows:
            for value in row:
                if isinstance(value, memoryview):
                    value = value.tobytes()
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                if isinstance(value, str) and needle in value:
                    found[table] = found.get(table, 0) + 1
                    break
    return found


class PurgeLeftoversTest(RetentionHelpers):
    """A used room, purged by retention, leaves no event id or text in Synapse's tables."""

    MODE = "intercept"
    MODULE_CONFIG = {"forget_rate_limit": RELAXED_FORGET, "retention": FAST_RETENTION}
    # The scan waits for Synapse's background updates: without their pauses
    # they finish in seconds instead of a minute.
    EXTRA_CONFIG = FAST_BACKGROUND_UPDATES
    room_id: ClassVar[str]

    def send(self, user: Any, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        txn = os.urandom(8).hex()
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote_room(room_id)}/send/{event_type}/{txn}",
            content,
            token=user.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        return str(resp.body["event_id"])

    def use_room(self) -> tuple[str, list[Any]]:
        """A room with every kind of content a client makes; returns it and its two members."""
        room_id, (alice, bob) = self.joined_room(2)
        room = quote_room(room_id)
        message = self.send(
            alice, room_id, "m.room.message", {"msgtype": "m.text", "body": TEXTS["message"]}
        )
        self.send(
            alice,
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": "* " + TEXTS["edit"],
                "m.new_content": {"msgtype": "m.text", "body": TEXTS["edit"]},
                "m.relates_to": {"rel_type": "m.replace", "event_id": message},
            },
        )
        self.send(
            bob,
            room_id,
            "m.reaction",
            {
                "m.relates_to": {
                    "rel_type": "m.annotation",
                    "event_id": message,
                    "key": TEXTS["reaction"],
                }
            },
        )
        self.send(
            bob,
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": TEXTS["thread"],
                "m.relates_to": {"rel_type": "m.thread", "event_id": message},
            },
        )
        doomed = self.send(bob, room_id, "m.room.message", {"msgtype": "m.text", "body": "doomed"})
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/redact/{doomed}/{os.urandom(4).hex()}",
            {"reason": TEXTS["redaction"]},
            token=bob.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/state/m.room.topic/",
            {"topic": TEXTS["topic"]},
            token=alice.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        resp = self.hs.client(
            "POST",
            f"/_matrix/client/v3/rooms/{room}/receipt/m.read/{urllib.parse.quote(message)}",
            {},
            token=bob.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        user = urllib.parse.quote(bob.user_id)
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/user/{user}/rooms/{room}/tags/{TEXTS['tag']}",
            {"order": 0.5},
            token=bob.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/user/{user}/rooms/{room}/account_data/org.example.probe",
            {"note": TEXTS["account_data"]},
            token=bob.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        return room_id, [alice, bob]

    def test_no_event_id_or_text_left_in_any_table(self) -> None:
        """After the purge no table holds an event id or text; the room id only listed ones."""
        room_id, members = self.use_room()
        for user in members:
            self.leave(user, room_id)
        before = rawdb.all_rows(self.hs)
        event_ids = sorted(
            {
                str(value)
                for row in before.get("events", [])
                if room_id in row
                for value in row
                if isinstance(value, str) and value.startswith("$")
            }
        )
        self.assertGreater(len(event_ids), 10)
        # Every probe is somewhere before the purge: the scan can find what it looks for.
        for text in TEXTS.values():
            self.assertTrue(holding(before, text), text)
        for user in members:
            self.forget(user, room_id)
        self.wait_state(room_id, "purged")
        # A background update that runs at the time keeps its position (an event
        # id) in its progress until it finishes: Synapse's bookkeeping, which goes
        # with the update; the scan reads the database once none runs.
        wait_until(
            lambda: not rawdb.query(self.hs, "SELECT update_name FROM background_updates"),
            timeout=120,
            what="Synapse's background updates to finish",
        )
        after = rawdb.all_rows(self.hs)
        leftovers = {needle: holding(after, needle) for needle in [*event_ids, *TEXTS.values()]}
        self.maxDiff = None
        self.assertEqual({k: v for k, v in leftovers.items() if v}, {})
        room_tables = set(holding(after, room_id))
        self.assertLessEqual(room_tables, ROOM_ID_ONLY_TABLES, room_tables - ROOM_ID_ONLY_TABLES)
        self.check_receipt(room_id, sum(1 for row in before["events"] if room_id in row))

    def check_receipt(self, room_id: str, events: int) -> None:
        """The purge's signed entry says what was erased; the admin API and the CLI show it."""
        # Its media settled (the room had none Synapse held): the view no longer changes.
        view = wait_until(
            lambda: (
                (v := self.detail(room_id)["purge_receipt"])["media"]["state"] != "pending" and v
            ),
            what="the purged room's media settled",
        )
        self.assertEqual(view["media"], {"state": "no_media"})
        entry = next(e for e in self.audit(room_id=room_id) if e["outcome"] == "purged")
        self.assertEqual((view["seq"], view["hash"]), (entry["seq"], entry["hash"]))
        receipt = view["receipt"]
        self.assertEqual(json.loads(entry["receipt"]), receipt)
        # Every event the room had when its purge was requested, its state groups.
        self.assertEqual(receipt["events"], events)
        self.assertGreater(receipt["state_groups"], 0)
        # One thread (its root) and the state changes' event ids cleared.
        self.assertEqual(receipt["leftovers_cleared"]["threads"], 1)
        self.assertGreater(receipt["leftovers_cleared"]["current_state_delta_stream"], 5)
        self.assertEqual(set(receipt["kept"]), ROOM_ID_ONLY_TABLES)
        self.assertEqual(receipt["media"]["policy"], "delete")
        self.assertEqual(receipt["media"]["local_items"], 0)
        cli = run_cli(self.hs.config_path, "receipt", room_id, "--json")
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertEqual(json.loads(cli.stdout), {"room_id": room_id, **view})
        table = run_cli(self.hs.config_path, "receipt", room_id)
        self.assertIn(f"events erased: {events}", table.stdout)
        self.assertIn(f"entry: {entry['seq']}:{entry['hash']}", table.stdout)
        missing = run_cli(self.hs.config_path, "receipt", "!never:test.local")
        self.assertEqual(missing.returncode, 2)
        self.assertIn("no purge of !never:test.local", missing.stderr)
        verify = run_cli(self.hs.config_path, "verify")
        self.assertEqual(verify.returncode, 0, verify.stdout)
