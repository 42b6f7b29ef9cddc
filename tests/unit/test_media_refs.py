"""Which media an event references (media/refs.py) and how rows become index rows."""

import json

from twisted.trial.unittest import SynchronousTestCase

from matrix_leave_forget.media.index import refs_of_rows
from matrix_leave_forget.media.refs import (
    KIND_CONTENT,
    KIND_HTML,
    KIND_PROFILE,
    KIND_ROOM_AVATAR,
    KIND_THUMBNAIL,
    media_refs,
    parse_mxc,
)


class ParseMxcTests(SynchronousTestCase):
    def test_parses_server_and_id(self) -> None:
        """An mxc URI gives its server (with a port) and media id; anything else gives None."""
        self.assertEqual(parse_mxc("mxc://example.org/abcDEF_12-3"), ("example.org", "abcDEF_12-3"))
        self.assertEqual(parse_mxc("mxc://h.test:8448/x"), ("h.test:8448", "x"))
        for bad in ("https://example.org/x", "mxc://example.org/", "mxc://a/b/c", 12, None, ""):
            self.assertIsNone(parse_mxc(bad), bad)


class MediaRefsTests(SynchronousTestCase):
    def test_message_fields(self) -> None:
        """url, file.url, info.thumbnail_url and info.thumbnail_file.url are each found."""
        content = {
            "msgtype": "m.image",
            "url": "mxc://s/a",
            "file": {"url": "mxc://s/b"},
            "info": {"thumbnail_url": "mxc://s/c", "thumbnail_file": {"url": "mxc://s/d"}},
        }
        self.assertEqual(
            media_refs("m.room.message", content),
            {
                ("s", "a", KIND_CONTENT),
                ("s", "b", KIND_CONTENT),
                ("s", "c", KIND_THUMBNAIL),
                ("s", "d", KIND_THUMBNAIL),
            },
        )

    def test_sticker_and_custom_types(self) -> None:
        """A sticker's url, and any other event type's, is a content reference."""
        self.assertEqual(
            media_refs("m.sticker", {"url": "mxc://s/st"}), {("s", "st", KIND_CONTENT)}
        )
        self.assertEqual(media_refs("org.custom", {"url": "mxc://s/c"}), {("s", "c", KIND_CONTENT)})

    def test_html_images(self) -> None:
        """Every <img src> of formatted_body, quoted either way or not, in any case."""
        html = (
            "<p>hi <img src=\"mxc://s/one\"> <IMG alt=x SRC='mxc://s/two'/>"
            ' <img src=mxc://s/three> <a href="mxc://s/link">no</a></p>'
        )
        self.assertEqual(
            media_refs("m.room.message", {"formatted_body": html}),
            {("s", "one", KIND_HTML), ("s", "two", KIND_HTML), ("s", "three", KIND_HTML)},
        )

    def test_edit_new_content(self) -> None:
        """An edit's m.new_content media counts too."""
        content = {"url": "mxc://s/old", "m.new_content": {"url": "mxc://s/new"}}
        self.assertEqual(
            media_refs("m.room.message", content),
            {("s", "old", KIND_CONTENT), ("s", "new", KIND_CONTENT)},
        )

    def test_member_avatar_is_profile(self) -> None:
        """A member event's avatar_url is a profile reference; its other fields are not read."""
        content = {"membership": "join", "avatar_url": "mxc://s/me", "url": "mxc://s/x"}
        self.assertEqual(media_refs("m.room.member", content), {("s", "me", KIND_PROFILE)})

    def test_room_avatar(self) -> None:
        """m.room.avatar's url is a room-avatar reference, its thumbnail a thumbnail one."""
        content = {"url": "mxc://s/av", "info": {"thumbnail_url": "mxc://s/avt"}}
        self.assertEqual(
            media_refs("m.room.avatar", content),
            {("s", "av", KIND_ROOM_AVATAR), ("s", "avt", KIND_THUMBNAIL)},
        )

    def test_hostile_content(self) -> None:
        """Content of the wrong shape finds nothing and raises nothing."""
        for content in (None, [], "mxc://s/a", {"url": 5}, {"file": "mxc://s/a"}, {"info": []}):
            self.assertEqual(media_refs("m.room.message", content), set())
        self.assertEqual(media_refs("m.room.message", {"formatted_body": 7}), set())

    def test_encrypted_content_has_none(self) -> None:
        """An encrypted event's content names no media the server can see."""
        content = {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "mxc://s/a is inside"}
        self.assertEqual(media_refs("m.room.encrypted", content), set())


class RowsTests(SynchronousTestCase):
    def test_rows_to_refs(self) -> None:
        """Each event row gives (server, id, room, event, kind); unreadable JSON is skipped."""
        rows = [
            (1, "$a", "!r:s", "m.room.message", json.dumps({"content": {"url": "mxc://s/a"}})),
            (2, "$b", "!r:s", "m.room.message", "{not json"),
            (
                3,
                "$c",
                "!q:s",
                "m.room.member",
                json.dumps({"content": {"avatar_url": "mxc://s/p"}}),
            ),
            (4, "$d", "!q:s", "m.room.message", json.dumps([1])),
        ]
        self.assertEqual(
            refs_of_rows(rows),
            [("s", "a", "!r:s", "$a", KIND_CONTENT), ("s", "p", "!q:s", "$c", KIND_PROFILE)],
        )


class StretchTests(SynchronousTestCase):
    def setUp(self) -> None:
        import sqlite3

        from matrix_leave_forget.db.schema import run_migrations
        from tests.unit.db_helpers import Txn

        self.conn = sqlite3.connect(":memory:", isolation_level=None)
        self.txn = Txn(self.conn.cursor(), sqlite3)
        run_migrations(self.txn)
        self.txn.execute(
            "CREATE TABLE events (stream_ordering BIGINT, event_id TEXT, room_id TEXT, type TEXT)"
        )
        self.txn.execute("CREATE TABLE event_json (event_id TEXT, json TEXT)")

    def event(self, stream: int, event_id: str, content: dict[str, object]) -> None:
        self.txn.execute(
            "INSERT INTO events VALUES (?, ?, '!r:s', 'm.room.message')", (stream, event_id)
        )
        self.txn.execute(
            "INSERT INTO event_json VALUES (?, ?)", (event_id, json.dumps({"content": content}))
        )

    def test_stretch_is_idempotent_and_moves_the_position(self) -> None:
        """A stretch records each reference once, a re-read adds nothing, the position moves."""
        from matrix_leave_forget._synapse.media import stream_bounds_txn
        from matrix_leave_forget.db.media import (
            STREAM_MEDIA_FORWARD,
            STREAM_MEDIA_LOW,
            STREAM_MEDIA_TARGET,
            MediaRefStore,
        )
        from matrix_leave_forget.media.index import _read_stretch_txn

        self.event(-3, "$back", {"url": "mxc://s/back"})
        self.event(1, "$text", {"body": "no media"})
        self.event(2, "$img", {"url": "mxc://s/img"})
        self.event(9, "$later", {"url": "mxc://s/later"})
        low, high = stream_bounds_txn(self.txn)  # type: ignore[arg-type]
        self.assertEqual((low, high), (-3, 9))
        MediaRefStore.start_txn(self.txn, low, 2)  # type: ignore[arg-type]
        positions = MediaRefStore.positions_txn(self.txn)  # type: ignore[arg-type]
        self.assertEqual(
            positions, {STREAM_MEDIA_FORWARD: -4, STREAM_MEDIA_TARGET: 2, STREAM_MEDIA_LOW: -3}
        )
        for _ in range(2):
            added = _read_stretch_txn(self.txn, STREAM_MEDIA_FORWARD, -4, 2, 2)  # type: ignore[arg-type]
            self.assertEqual(added, 2)
        self.txn.execute("SELECT media_id, event_id FROM leave_forget_media_refs ORDER BY media_id")
        self.assertEqual(self.txn.fetchall(), [("back", "$back"), ("img", "$img")])
        self.assertEqual(
            MediaRefStore.positions_txn(self.txn)[STREAM_MEDIA_FORWARD],  # type: ignore[arg-type]
            2,
        )


class MediaReceiptTests(SynchronousTestCase):
    def test_counts_by_decision(self) -> None:
        """Deleted media count by origin with their bytes; kept ones by reason."""
        from matrix_leave_forget.media.reaper import media_receipt

        rows = [
            ("s", "a", "deleted", None, 10),
            ("s", "b", "deleted", None, 5),
            ("r", "c", "deleted", None, 7),
            ("s", "d", "kept", "referenced_elsewhere", 3),
            ("s", "e", "kept", "encrypted_room", 4),
            ("s", "f", "cancelled", "downloaded_during_grace", 6),
        ]
        media = media_receipt(rows, "s")["media"]
        self.assertEqual(
            {k: v for k, v in media.items() if k != "kept"},
            {
                "policy": "delete",
                "local_items": 2,
                "local_bytes": 15,
                "remote_items": 1,
                "remote_bytes": 7,
                "kept_referenced_elsewhere": 2,
                "kept_encrypted_room": 1,
            },
        )
        self.assertEqual(
            media["kept"],
            {
                "cancelled:downloaded_during_grace": 1,
                "kept:encrypted_room": 1,
                "kept:referenced_elsewhere": 1,
            },
        )


class MediaReadPathTests(SynchronousTestCase):
    def test_every_prefix(self) -> None:
        """Downloads and thumbnails under every media prefix are seen; other paths are not."""
        from matrix_leave_forget.http.client import media_read

        class Request:
            def __init__(self, path: str) -> None:
                self.path = path.encode()

        for path in (
            "/_matrix/media/v3/download/s.org/abc",
            "/_matrix/media/r0/download/s.org/abc/name.png",
            "/_matrix/media/v1/thumbnail/s.org/abc?width=32",
            "/_matrix/client/v1/media/download/s.org/abc",
            "/_matrix/client/v1/media/thumbnail/s.org/abc",
        ):
            self.assertEqual(media_read(Request(path)), ("s.org", "abc"), path)
        self.assertEqual(
            media_read(Request("/_matrix/client/v1/media/download/h%3A8448/x")), ("h:8448", "x")
        )
        for path in (
            "/_matrix/media/v3/upload",
            "/_matrix/media/v3/config",
            "/_matrix/client/v3/rooms/!r:s/messages",
            "/_matrix/client/v1/media/preview_url",
        ):
            self.assertIsNone(media_read(Request(path)), path)


class UnindexedRefsTests(SynchronousTestCase):
    """media/index.py ``unindexed_refs_txn``: what a deletion adds to the index, read
    in its own transaction (on SQLite tables shaped like Synapse's and the module's)."""

    def setUp(self) -> None:
        import sqlite3

        self.db = sqlite3.connect(":memory:")
        self.db.executescript(
            "CREATE TABLE events (stream_ordering INTEGER, event_id TEXT, room_id TEXT, type TEXT);"
            "CREATE TABLE event_json (event_id TEXT, json TEXT);"
            "CREATE TABLE leave_forget_stream_positions (name TEXT, stream_id INTEGER);"
        )
        self.addCleanup(self.db.close)

    def event(self, stream: int, url: str | None) -> None:
        content = {"msgtype": "m.image", "url": url} if url else {"body": "hi"}
        event_id = f"$e{stream}"
        self.db.execute(
            "INSERT INTO events VALUES (?, ?, '!r:s', 'm.room.message')", (stream, event_id)
        )
        self.db.execute(
            "INSERT INTO event_json VALUES (?, ?)",
            (event_id, json.dumps({"type": "m.room.message", "content": content})),
        )

    def positions(self, forward: int, target: int, low: int) -> None:
        from matrix_leave_forget.db.media import (
            STREAM_MEDIA_FORWARD,
            STREAM_MEDIA_LOW,
            STREAM_MEDIA_TARGET,
        )

        for name, stream in (
            (STREAM_MEDIA_FORWARD, forward),
            (STREAM_MEDIA_TARGET, target),
            (STREAM_MEDIA_LOW, low),
        ):
            self.db.execute(
                "INSERT INTO leave_forget_stream_positions VALUES (?, ?)", (name, stream)
            )

    def refs(self) -> set[tuple[str, str]] | None:
        from matrix_leave_forget.media.index import unindexed_refs_txn

        return unindexed_refs_txn(self.db.cursor())  # type: ignore[arg-type]

    def test_events_past_the_index_up_to_the_head(self) -> None:
        """Only events after the index's position count, up to the newest event,
        text ones included in the range but giving nothing."""
        self.event(9, "mxc://s/before")
        self.event(11, "mxc://s/after")
        self.event(12, None)
        self.event(13, "mxc://s/head")
        self._positions_done(forward=10)
        self.assertEqual(self.refs(), {("s", "after"), ("s", "head")})

    def test_nothing_past_the_index(self) -> None:
        """An index at the head: an empty set (a deletion may go on), not None."""
        self.event(10, "mxc://s/x")
        self._positions_done(forward=10)
        self.assertEqual(self.refs(), set())

    def test_none_until_the_index_can_answer(self) -> None:
        """None before the index ran, during its back-fill, and while it is more
        than a stretch behind the head: the caller must wait."""
        from matrix_leave_forget.media.index import BATCH_POSITIONS

        self.event(1, "mxc://s/x")
        self.assertIsNone(self.refs())
        self.positions(forward=0, target=1, low=0)
        self.assertIsNone(self.refs())
        self.db.execute("DELETE FROM leave_forget_stream_positions")
        self.event(BATCH_POSITIONS + 2, "mxc://s/far")
        self._positions_done(forward=1)
        self.assertIsNone(self.refs())

    def _positions_done(self, forward: int) -> None:
        """Positions of an index whose back-fill is done, at ``forward``."""
        self.positions(forward=forward, target=forward, low=0)
