"""Purged rooms' media with a media-repository worker (docs/workers.md "Media").

The worker deployment of tests/integration/workers.py plus a media-repository
worker (``media1``: ``worker_app: synapse.app.media_repository``, one ``media``
listener) that holds the media store; PostgreSQL only, as every worker test.
The main process, which runs background tasks, decides a purged room's media
and writes the ``media_deleted`` entry; ``media1`` deletes, under Synapse's
worker lock, so that one process at a time deletes. With ``mount: intercept``
the module sits on the media worker's listener too, so a download there
during the grace cancels a deletion.

Uploads and downloads go to the media worker's listener (the main process has
no media store); everything else to the main process.
"""

import json
import os
import signal
import urllib.parse
from typing import Any, ClassVar

from matrix_leave_forget.timestamps import now_ms
from tests.integration.media_helpers import MediaHelpers, png
from tests.integration.workers import (
    MAIN_INSTANCE,
    MEDIA_WORKER_NAME,
    DeploymentTestCase,
    MediaWorkerProcess,
    WorkerDeployment,
)
from tests.support import rawdb
from tests.support.harness import User, quote_room, wait_until

ADMIN = "/_synapse/client/leave_forget/v1/admin"
GRACE = "4s"
MODULE_CONFIG: dict[str, Any] = {
    "forget_rate_limit": None,
    "retention": {
        "period": "1s",
        "sweep_interval": "100ms",
        "media": "delete",
        "media_grace": GRACE,
    },
}
# Synapse's worker lock the deleting process holds (_synapse/media.py).
LOCK = "matrix_leave_forget_media_deletion"
DELETED_LINE = "Deleted mxc://{}"
WAITING_LINE = "Media due for deletion: another process is deleting it"


class MediaWorkerCase(MediaHelpers, DeploymentTestCase):
    """A worker deployment with a media-repository worker (no tests of its own)."""

    MODE = "intercept"
    MODULE_CONFIG = MODULE_CONFIG
    admin: ClassVar[User]

    @classmethod
    def set_up_deployment(cls) -> None:
        cls.admin = cls.hs.register("admin", admin=True)

    @property
    def media(self) -> MediaWorkerProcess:
        assert self.media_worker is not None
        return self.media_worker

    def audit(self, **filters: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(filters)
        resp = self.hs.client("GET", f"{ADMIN}/audit/export?{query}", token=self.admin.access_token)
        self.assertEqual(resp.status, 200, resp.raw)
        return [json.loads(line) for line in resp.raw.decode().splitlines()]

    def user(self, name: str) -> User:
        return self.hs.register(f"{name}{now_ms()}")

    def purged_room_with_image(self, seed: int) -> tuple[str, str, User]:
        """A room whose only image nothing else references, purged; (room, mxc, uploader)."""
        alice, bob = self.user("alice"), self.user("bob")
        room = self.hs.create_room(alice, preset="public_chat")
        self.assertEqual(self.hs.membership(bob, room, "join").status, 200)
        image = self.upload(alice, seed)
        self.send_image(alice, room, image)
        wait_until(lambda: self.thumbnail_rows(image) > 0, what="thumbnails of the image")
        self.leave_and_forget(room, alice, bob)
        self.wait_purged(room)
        wait_until(lambda: self.decisions(room).get(image) == ("due", None), what="the image due")
        return room, image, alice

    def leave_and_forget(self, room: str, *users: User) -> None:
        for action in ("leave", "forget"):
            for user in users:
                resp = self.hs.client(
                    "POST",
                    f"/_matrix/client/v3/rooms/{quote_room(room)}/{action}",
                    {},
                    token=user.access_token,
                )
                self.assertEqual(resp.status, 200, (action, resp.body))

    def wait_purged(self, room: str) -> None:
        def purged() -> bool:
            resp = self.hs.client(
                "GET", f"{ADMIN}/rooms/{quote_room(room)}", token=self.admin.access_token
            )
            return resp.status == 200 and (resp.body["retention"] or {}).get("state") == "purged"

        wait_until(purged, what=f"{room} purged")

    def due_at(self, room: str, image: str) -> int:
        rows = rawdb.query(
            self.hs,
            "SELECT due_at FROM leave_forget_media_deletions WHERE room_id = ? AND media_id = ?",
            (room, image.rsplit("/", 1)[1]),
        )
        return int(rows[0][0])

    def hold_lock(self, instance: str) -> None:
        """Synapse's media deletion lock, held by ``instance`` (renewed far in the future)."""
        rawdb.query(self.hs, "DELETE FROM worker_locks WHERE lock_name = ?", (LOCK,))
        rawdb.query(
            self.hs,
            "INSERT INTO worker_locks (lock_name, lock_key, instance_name, token, last_renewed_ts)"
            " VALUES (?, '', ?, 'test', ?)",
            (LOCK, instance, now_ms() + 3_600_000),
        )

    def drop_lock(self) -> None:
        rawdb.query(self.hs, "DELETE FROM worker_locks WHERE lock_name = ?", (LOCK,))

    def assert_deleted(self, room: str, image: str) -> None:
        image_file, image_thumbs = self.media_paths(image)
        self.assertEqual(self.decisions(room)[image], ("deleted", None))
        self.assertFalse(self.media_row(image))
        self.assertEqual(self.thumbnail_rows(image), 0)
        self.assertFalse(os.path.exists(image_file))
        self.assertFalse(os.path.exists(image_thumbs))


class MediaWorkerTests(MediaWorkerCase):
    """The media store on a media-repository worker only (``enable_media_repo: false``)."""

    @classmethod
    def configure_deployment(cls, deployment: WorkerDeployment) -> None:
        deployment.add_media_worker()

    @property
    def media_port(self) -> int:
        return self.media.media_port

    def test_media_worker_deletes_and_its_downloads_cancel(self) -> None:
        """The media worker deletes a purged room's unreferenced image (row, file,
        thumbnails), the main process deletes nothing and writes the
        media_deleted entry (instance master); a download through the media
        worker's listener during the grace (the module intercepts there)
        cancels the other image's deletion."""
        self.assertIn("Intercepting leave and forget on 1 client listener", self.media.log_text())
        self.assertIn("Deleting purged rooms' media on this process", self.media.log_text())
        wait_until(
            lambda: "This process has no media store" in self.hs.log_text(),
            what="the main process saying who deletes",
        )
        alice, bob = self.user("alice"), self.user("bob")
        room = self.hs.create_room(alice, preset="public_chat")
        self.assertEqual(self.hs.membership(bob, room, "join").status, 200)
        own, fetched = self.upload(alice, 10), self.upload(alice, 11)
        for uri in (own, fetched):
            self.send_image(alice, room, uri)
        wait_until(lambda: self.thumbnail_rows(own) > 0, what="thumbnails of the room's image")
        own_file, _ = self.media_paths(own)
        self.assertTrue(os.path.exists(own_file))

        self.leave_and_forget(room, alice, bob)
        self.wait_purged(room)
        decisions = wait_until(
            lambda: (d := self.decisions(room)) and len(d) == 2 and d,
            what="the room's media decided",
        )
        self.assertEqual(decisions, {own: ("due", None), fetched: ("due", None)})
        self.assertEqual(self.download(alice, fetched), 200)
        receipt = self.media_entry(room)["media"]

        self.assert_deleted(room, own)
        self.assertEqual(self.decisions(room)[fetched], ("cancelled", "downloaded_during_grace"))
        self.assertTrue(self.media_row(fetched))
        self.assertEqual(self.download(alice, fetched), 200)
        self.assertEqual(self.download(alice, own), 404)
        self.assertEqual((receipt["local_items"], receipt["local_bytes"]), (1, len(png(10))))
        self.assertEqual(receipt["kept"], {"cancelled:downloaded_during_grace": 1})
        (entry,) = self.media_entries(room)
        self.assertEqual(entry["instance"], MAIN_INSTANCE)
        own_id = own[len("mxc://") :]
        self.assertIn(DELETED_LINE.format(own_id), self.media.log_text())
        self.assertNotIn("Deleted mxc://", self.hs.log_text())
        self.assertNotIn("Deleted mxc://", self.worker.log_text())

    def test_one_process_at_a_time_deletes(self) -> None:
        """While another process holds the media deletion lock the media worker
        deletes nothing (the image stays due past its grace and its file stays);
        once the lock is free it deletes."""
        self.hold_lock("another_media_worker")
        try:
            room, image, _alice = self.purged_room_with_image(20)
            due_at = self.due_at(room, image)
            wait_until(lambda: now_ms() > due_at, what="the image's grace to end")
            seen = len(self.media.log_text())
            wait_until(
                lambda: WAITING_LINE in self.media.log_text()[seen:],
                what="the media worker finding the lock taken",
            )
            self.assertEqual(self.decisions(room)[image], ("due", None))
            self.assertTrue(os.path.exists(self.media_paths(image)[0]))
        finally:
            self.drop_lock()
        self.media_entry(room)
        self.assert_deleted(room, image)

    def test_sigkill_while_deleting_resumes_on_restart(self) -> None:
        """The media worker killed (SIGKILL) holding the lock with an image half
        deleted (its file gone, its rows and thumbnails not): restarted, it
        takes its own lock back at once (not after Synapse's 2-minute lock
        timeout), finishes the deletion, and the entry is written once."""
        self.hold_lock("another_media_worker")
        try:
            room, image, _alice = self.purged_room_with_image(30)
            image_file, image_thumbs = self.media_paths(image)
            self.media.stop(signal.SIGKILL)
            # As the killed worker left it: its lock (renewed moments ago), the file gone.
            self.hold_lock(MEDIA_WORKER_NAME)
            os.remove(image_file)
            self.assertTrue(self.media_row(image))
            self.assertTrue(os.path.exists(image_thumbs))
            self.media.start()
            self.media_entry(room)
        finally:
            self.drop_lock()
        self.assert_deleted(room, image)
        self.assertEqual(len(self.media_entries(room)), 1)


class MediaStoreOnBothTests(MediaWorkerCase):
    """The main process keeps its media store next to a media worker, and
    ``media_instance_running_background_jobs: media1`` names who runs media jobs."""

    @classmethod
    def configure_deployment(cls, deployment: WorkerDeployment) -> None:
        deployment.add_media_worker(main_media_store=True, media_jobs_instance=MEDIA_WORKER_NAME)

    def test_the_named_media_instance_deletes(self) -> None:
        """The main process holds a media store too but leaves deletion to the
        instance media_instance_running_background_jobs names: media1 deletes,
        the main process decides and reports only."""
        wait_until(
            lambda: (
                "deleted by media1 (media_instance_running_background_jobs)" in self.hs.log_text()
            ),
            what="the main process saying who deletes",
        )
        self.assertIn("Deleting purged rooms' media on this process", self.media.log_text())
        room, image, _alice = self.purged_room_with_image(40)
        self.media_entry(room)
        self.assert_deleted(room, image)
        self.assertIn(DELETED_LINE.format(image[len("mxc://") :]), self.media.log_text())
        self.assertNotIn("Deleted mxc://", self.hs.log_text())
