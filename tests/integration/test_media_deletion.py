"""A purged room's media goes with it, and only what nothing else references.

On a real Synapse (retention.period 1s, media_grace a few seconds): a room
with uploaded images, one forwarded into a second room, a profile avatar and
another room's avatar, one downloaded during the grace; both members leave
and forget. After the purge and the grace the room's own image is gone (row,
file, thumbnails), everything else survives with its reason recorded, and a
signed ``purge``/``media_deleted`` entry counts it. An encrypted room keeps
its media.
"""

import csv
import io
import itertools
import json
import os
import signal
import threading
import urllib.parse
from typing import Any

from tests.integration.media_helpers import MediaHelpers, png
from tests.integration.retention_helpers import (
    FAST_RETENTION,
    RELAXED_FORGET,
    RetentionHelpers,
)
from tests.support.harness import quote_room, run_cli, wait_until

# Long enough that a loaded machine still reads a decision before its grace ends.
GRACE = "8s"


class MediaDeletionTest(MediaHelpers, RetentionHelpers):
    """Media of a purged room: deleted if unreferenced, kept (with the reason) otherwise."""

    MODE = "intercept"
    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {**FAST_RETENTION, "media": "delete", "media_grace": GRACE},
    }

    def test_room_media_deleted_rest_kept(self) -> None:
        """Only the purged room's unreferenced image goes (row, file, thumbnails); a
        forwarded image, a profile avatar, another room's avatar and an image
        downloaded during the grace stay, each with its reason."""
        room_id, (alice, bob) = self.joined_room(2)
        own, forwarded, profile, other_avatar, fetched = (
            self.upload(alice, seed) for seed in range(5)
        )
        self.assertTrue(all(self.media_row(u) for u in (own, forwarded, profile, other_avatar)))
        for uri in (own, forwarded, profile, other_avatar, fetched):
            self.send_image(alice, room_id, uri)
        other_room = self.hs.create_room(bob, preset="private_chat")
        self.send_image(bob, other_room, forwarded)
        self.put_state(bob, other_room, "m.room.avatar", {"url": other_avatar})
        # A user in no room: only the profile refers to it.
        carol = self.user("carol")
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/profile/{urllib.parse.quote(carol.user_id)}/avatar_url",
            {"avatar_url": profile},
            token=carol.access_token,
        )
        self.assertEqual(resp.status, 200, resp.body)
        own_file, own_thumbs = self.media_paths(own)
        self.assertTrue(os.path.exists(own_file))
        wait_until(lambda: self.thumbnail_rows(own) > 0, what="thumbnails of the room's image")

        # What a purge would do, shown before it (as with dry_run).
        preview = wait_until(
            lambda: (p := self.detail(room_id)["media_preview"])["index_ready"] and p,
            what="the media preview with the index ready",
        )
        shown = {m["mxc"]: (m["decision"], m["reason"]) for m in preview["media"]}
        self.assertEqual(preview["policy"], "delete")
        self.assertFalse(preview["encrypted"])
        self.assertEqual(shown[own], ("due", None))
        self.assertEqual(shown[forwarded], ("kept", "referenced_elsewhere"))
        self.assertEqual(shown[profile], ("kept", "profile_avatar"))
        self.check_cli_preview(room_id, preview, own, forwarded)

        self.leave_and_forget([alice, bob], room_id)
        self.wait_state(room_id, "purged")
        self.assertIsNone(self.detail(room_id)["media_preview"])
        after = self.cli_room(room_id)
        self.assertIsNone(after["media_preview"])
        self.assertEqual(after["retention"]["state"], "purged")
        self.assertEqual(
            after["purge_receipt"]["seq"], self.detail(room_id)["purge_receipt"]["seq"]
        )
        # Due for deletion: still served during the grace; a download cancels it.
        decisions = wait_until(
            lambda: (d := self.decisions(room_id)) and d.get(own) and d,
            what="the room's media decided",
        )
        self.assertEqual(decisions[own], ("due", None))
        self.assertEqual(decisions[fetched], ("due", None))
        self.assertEqual(self.download(alice, fetched), 200)
        receipt = self.media_entry(room_id)["media"]

        decisions = self.decisions(room_id)
        self.assertEqual(decisions[own], ("deleted", None))
        self.assertEqual(decisions[fetched], ("cancelled", "downloaded_during_grace"))
        self.assertEqual(decisions[forwarded], ("kept", "referenced_elsewhere"))
        self.assertEqual(decisions[other_avatar], ("kept", "referenced_elsewhere"))
        self.assertEqual(decisions[profile], ("kept", "profile_avatar"))
        self.assertFalse(self.media_row(own))
        self.assertEqual(self.thumbnail_rows(own), 0)
        self.assertFalse(os.path.exists(own_file))
        self.assertFalse(os.path.exists(own_thumbs))
        for uri in (forwarded, profile, other_avatar, fetched):
            self.assertTrue(self.media_row(uri), uri)
            self.assertTrue(os.path.exists(self.media_paths(uri)[0]), uri)
        self.assertEqual(receipt["policy"], "delete")
        self.assertEqual(receipt["local_items"], 1)
        self.assertEqual(receipt["local_bytes"], len(png(0)))
        self.assertEqual(receipt["kept_referenced_elsewhere"], 4)
        self.assertEqual(receipt["kept"]["cancelled:downloaded_during_grace"], 1)
        self.assertEqual(self.download(alice, forwarded), 200)
        self.assertEqual(self.download(alice, own), 404)

    def cli_room(self, room_id: str, fmt: str = "json") -> Any:
        """``matrix-leave-forget room ROOM`` in ``fmt`` (json: parsed; table, csv: the text)."""
        flags = () if fmt == "table" else (f"--{fmt}",)
        proc = run_cli(self.hs.config_path, "room", room_id, *flags)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn("Traceback", proc.stderr)
        return json.loads(proc.stdout) if fmt == "json" else proc.stdout

    def check_cli_preview(self, room_id: str, preview: dict[str, Any], due: str, kept: str) -> None:
        """The CLI's ``room`` shows, offline, the admin API's media preview of the room."""
        detail = self.cli_room(room_id)
        self.assertEqual(detail["media_preview"], preview)
        self.assertEqual(detail["retention"], None)
        self.assertIsNone(detail["purge_receipt"])
        table = self.cli_room(room_id, "table")
        self.assertIn("media preview: policy delete; encrypted no; index ready yes", table)
        rows = {
            line.split()[0]: line.split()[1:] for line in table.splitlines() if "mxc://" in line
        }
        self.assertEqual(rows[due][:2], ["due", "-"])
        self.assertEqual(rows[kept][:2], ["kept", "referenced_elsewhere"])
        csv_rows = list(csv.DictReader(io.StringIO(self.cli_room(room_id, "csv"))))
        self.assertEqual(
            {r["mxc"]: r["decision"] for r in csv_rows},
            {m["mxc"]: m["decision"] for m in preview["media"]},
        )

    def test_encrypted_room_keeps_its_media(self) -> None:
        """A purged encrypted room's events go, its media stays, and the entry says why."""
        room_id, (alice, bob) = self.joined_room(2)
        self.put_state(alice, room_id, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
        image = self.upload(alice, 42)
        self.send_image(alice, room_id, image)
        self.leave_and_forget([alice, bob], room_id)
        self.wait_state(room_id, "purged")
        receipt = self.media_entry(room_id)["media"]
        self.assertTrue(receipt["encrypted_room"])
        self.assertEqual(receipt["kept_encrypted_room"], 1)
        self.assertEqual(receipt["local_items"], 0)
        self.assertEqual(self.decisions(room_id)[image], ("kept", "encrypted_room"))
        self.assertTrue(self.media_row(image))
        self.assertTrue(os.path.exists(self.media_paths(image)[0]))

    def test_sigkill_mid_deletion_resumes(self) -> None:
        """Killed with a medium half deleted (its file gone, its rows and thumbnails
        not), the restarted module finishes the deletion and records it once."""
        room_id, (alice, bob) = self.joined_room(2)
        image = self.upload(alice, 77)
        self.send_image(alice, room_id, image)
        image_file, image_thumbs = self.media_paths(image)
        wait_until(lambda: self.thumbnail_rows(image) > 0, what="thumbnails of the image")
        self.leave_and_forget([alice, bob], room_id)
        self.wait_state(room_id, "purged")
        wait_until(
            lambda: self.decisions(room_id).get(image) == ("due", None), what="the image due"
        )
        # A crash in the middle of Synapse's deletion: the file is gone, the rest is not.
        self.hs.stop(signal.SIGKILL)
        os.remove(image_file)
        self.assertTrue(self.media_row(image))
        self.assertTrue(os.path.exists(image_thumbs))
        self.hs.start()
        receipt = self.media_entry(room_id)["media"]
        self.assertEqual(self.decisions(room_id)[image], ("deleted", None))
        self.assertEqual(receipt["local_items"], 1)
        self.assertFalse(self.media_row(image))
        self.assertEqual(self.thumbnail_rows(image), 0)
        self.assertFalse(os.path.exists(image_thumbs))
        self.assertEqual(len(self.media_entries(room_id)), 1)

    def test_deleted_while_messages_keep_coming(self) -> None:
        """On a server that is never silent (a message every 100 ms in another
        room, from before the purge until the deletion), the purged room's image
        is still deleted: the index trails the stream by a run or two, and the
        deletion reads the events past it itself."""
        room_id, (alice, bob) = self.joined_room(2)
        image = self.upload(alice, 91)
        self.send_image(alice, room_id, image)
        chatter = self.user("chatter")
        busy_room = self.hs.create_room(chatter, preset="private_chat")
        stop = threading.Event()
        sent = itertools.count()

        def chat() -> None:
            while not stop.wait(0.1):
                resp = self.hs.client(
                    "PUT",
                    f"/_matrix/client/v3/rooms/{quote_room(busy_room)}/send/m.room.message/"
                    f"c{next(sent)}",
                    {"msgtype": "m.text", "body": "still here"},
                    token=chatter.access_token,
                )
                assert resp.status == 200, resp.raw

        talker = threading.Thread(target=chat, daemon=True)
        talker.start()
        try:
            self.leave_and_forget([alice, bob], room_id)
            self.wait_state(room_id, "purged")
            receipt = self.media_entry(room_id)["media"]
        finally:
            stop.set()
            talker.join(10)
        self.assertEqual(self.decisions(room_id)[image], ("deleted", None))
        self.assertEqual(receipt["local_items"], 1)
        self.assertFalse(self.media_row(image))
        # The traffic went on for the whole grace (up to 10 messages a second).
        self.assertGreater(next(sent), 20)
