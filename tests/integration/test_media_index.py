"""The media reference index on a real Synapse: filled as events arrive, back-filled after.

Events name media by mxc URI; the index (media/index.py) must hold, per event,
each reference a client can make, be visible in ``GET …/admin/retention``, and
rebuild itself from Synapse's events when it starts empty over existing rooms.
"""

import os
from typing import Any

from tests.integration.retention_helpers import RELAXED_FORGET, RetentionHelpers
from tests.support import rawdb
from tests.support.harness import SERVER_NAME, quote_room, wait_until


class MediaIndexTest(RetentionHelpers):
    """References land in the index live, and an emptied index is back-filled."""

    MODE = "intercept"
    # The index runs where media is deleted: a period long enough that nothing is.
    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {"period": "1h", "media": "delete"},
    }

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

    def state_event(
        self, user: Any, room_id: str, event_type: str, content: Any, state_key: str = ""
    ) -> str:
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote_room(room_id)}/state/{event_type}/"
            + quote_room(state_key),
            content,
            token=user.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        return str(resp.body["event_id"])

    def refs(self, room_id: str) -> set[tuple[str, str, str]]:
        rows = rawdb.query(
            self.hs,
            "SELECT media_id, event_id, kind FROM leave_forget_media_refs WHERE room_id = ?",
            (room_id,),
        )
        return {(str(m), str(e), str(k)) for m, e, k in rows}

    def status(self) -> dict[str, Any]:
        return dict(self.admin_ok("GET", "/retention")["media_index"])

    def fill_room(self) -> tuple[str, set[tuple[str, str, str]]]:
        """A room whose events reference media every way a client can; the references made."""
        room_id, (alice, _bob) = self.joined_room(2)
        server = SERVER_NAME
        image = self.send(
            alice,
            room_id,
            "m.room.message",
            {
                "msgtype": "m.image",
                "body": "cat.png",
                "url": f"mxc://{server}/imgA",
                "info": {"thumbnail_url": f"mxc://{server}/thumbA"},
            },
        )
        encrypted_file = self.send(
            alice,
            room_id,
            "m.room.message",
            {"msgtype": "m.file", "body": "f", "file": {"url": f"mxc://{server}/fileA"}},
        )
        sticker = self.send(alice, room_id, "m.sticker", {"body": "s", "url": "mxc://else/stk"})
        html = self.send(
            alice,
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": "x",
                "format": "org.matrix.custom.html",
                "formatted_body": f'<img src="mxc://{server}/inline">',
            },
        )
        self.send(alice, room_id, "m.room.message", {"msgtype": "m.text", "body": "no media"})
        avatar = self.state_event(alice, room_id, "m.room.avatar", {"url": f"mxc://{server}/rav"})
        member = self.state_event(
            alice,
            room_id,
            "m.room.member",
            {"membership": "join", "avatar_url": f"mxc://{server}/face"},
            alice.user_id,
        )
        return room_id, {
            ("imgA", image, "content"),
            ("thumbA", image, "thumbnail"),
            ("fileA", encrypted_file, "content"),
            ("stk", sticker, "content"),
            ("inline", html, "html"),
            ("rav", avatar, "room_avatar"),
            ("face", member, "profile"),
        }

    def test_live_then_backfill(self) -> None:
        """New events' references reach the index; emptied, it back-fills them on restart."""
        room_id, expected = self.fill_room()
        wait_until(lambda: self.refs(room_id) >= expected, what="the room's references indexed")
        # Exactly those: the message without media and the membership events
        # without avatar add nothing.
        self.assertEqual(self.refs(room_id), expected)
        status = wait_until(
            lambda: (s := self.status())["backfill_done"] and s, what="back-fill done"
        )
        self.assertGreaterEqual(status["position"], status["backfill_target"])
        self.assertGreaterEqual(status["head"], status["position"])

        # Over existing rooms: the index as if the module had just been installed.
        self.hs.stop()
        rawdb.execute(
            self.hs,
            "DELETE FROM leave_forget_media_refs",
            "DELETE FROM leave_forget_stream_positions WHERE name LIKE 'media_refs%'",
        )
        self.hs.start()
        wait_until(lambda: self.refs(room_id) == expected, what="the room's references back-filled")
        status = wait_until(
            lambda: (s := self.status())["backfill_done"] and s, what="back-fill done again"
        )
        self.assertGreaterEqual(status["backfill_target"], 1)


class MediaIndexOffTest(RetentionHelpers):
    """With ``retention.media: keep`` nothing reads the index, so it does not run."""

    MODE = "intercept"
    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {"period": "1h", "media": "keep"},
    }

    def test_no_index_when_media_is_kept(self) -> None:
        """``media_index`` is null in ``GET …/admin/retention`` (it is an object,
        nulls inside, wherever the index runs) and no index position is stored."""
        body = self.admin_ok("GET", "/retention")
        self.assertIsNone(body["media_index"])
        rows = rawdb.query(
            self.hs,
            "SELECT name FROM leave_forget_stream_positions WHERE name LIKE 'media%'",
            (),
        )
        self.assertEqual(rows, [])
