"""Helpers shared by the media deletion test modules (no tests of their own).

:class:`MediaHelpers` is a mixin for a test class that has ``self.hs`` (the
main process: its database and work directory, whose ``media_store`` every
process shares) and ``self.audit(**filters)``; uploads and downloads go to
:attr:`MediaHelpers.media_port` (the main's client listener unless a
media-repository worker serves media).
"""

import io
import json
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from tests.support import rawdb
from tests.support.harness import SynapseProcess, User, quote_room, request, wait_until


def png(seed: int) -> bytes:
    """A 100x100 PNG, different per seed (so Synapse makes thumbnails of it)."""
    from PIL import Image

    image = Image.new("RGB", (100, 100), (seed % 256, (seed * 7) % 256, 99))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


class MediaHelpers:
    """Uploads, image messages, Synapse's media rows and files, the module's decisions."""

    hs: SynapseProcess

    if TYPE_CHECKING:
        # The test class's own (the admin API's audit listing).
        def audit(self, **filters: str) -> list[dict[str, Any]]: ...

    @property
    def media_port(self) -> int:
        """Where media is uploaded and downloaded."""
        return self.hs.client_port

    def upload(self, user: User, seed: int, on: SynapseProcess | None = None) -> str:
        """Upload ``png(seed)`` as ``user`` (to ``on``, a server without the module, if given)."""
        resp = request(
            on.client_port if on is not None else self.media_port,
            "POST",
            "/_matrix/media/v3/upload?filename=i.png",
            raw_body=png(seed),
            headers={"Content-Type": "image/png"},
            token=user.access_token,
        )
        assert resp.status == 200, resp.body
        return str(resp.body["content_uri"])

    def download(self, user: User, uri: str, on: SynapseProcess | None = None) -> int:
        server, media_id = uri[len("mxc://") :].split("/")
        port = on.client_port if on is not None else self.media_port
        tail = f"/download/{urllib.parse.quote(server)}/{media_id}"
        resp = request(port, "GET", "/_matrix/client/v1/media" + tail, token=user.access_token)
        if resp.status == 404 and isinstance(resp.body, dict):
            if resp.body.get("errcode") == "M_UNRECOGNIZED":
                # Synapse before 1.109 (the oldest supported, 1.98) has only
                # the legacy media API.
                resp = request(port, "GET", "/_matrix/media/v3" + tail, token=user.access_token)
        return resp.status

    def send_image(
        self, user: User, room_id: str, uri: str, on: SynapseProcess | None = None
    ) -> str:
        resp = (on or self.hs).client(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote_room(room_id)}/send/m.room.message/"
            + os.urandom(6).hex(),
            {"msgtype": "m.image", "body": "i.png", "url": uri},
            token=user.access_token,
        )
        assert resp.status == 200, resp.body
        return str(resp.body["event_id"])

    def put_state(self, user: User, room_id: str, event_type: str, content: Any) -> None:
        resp = self.hs.client(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote_room(room_id)}/state/{event_type}/",
            content,
            token=user.access_token,
        )
        assert resp.status == 200, resp.body

    def media_row(self, uri: str, on: SynapseProcess | None = None) -> bool:
        """Whether this server (or ``on``) holds a local medium's row."""
        media_id = uri.rsplit("/", 1)[1]
        rows = rawdb.query(
            on or self.hs, "SELECT 1 FROM local_media_repository WHERE media_id = ?", (media_id,)
        )
        return bool(rows)

    def thumbnail_rows(self, uri: str) -> int:
        media_id = uri.rsplit("/", 1)[1]
        rows = rawdb.query(
            self.hs,
            "SELECT COUNT(*) FROM local_media_repository_thumbnails WHERE media_id = ?",
            (media_id,),
        )
        return int(rows[0][0])

    def media_paths(self, uri: str, on: SynapseProcess | None = None) -> tuple[str, str]:
        """The file and the thumbnail directory of a local medium in the media store."""
        m = uri.rsplit("/", 1)[1]
        store = os.path.join((on or self.hs).workdir, "media_store")
        return (
            os.path.join(store, "local_content", m[0:2], m[2:4], m[4:]),
            os.path.join(store, "local_thumbnails", m[0:2], m[2:4], m[4:]),
        )

    def decisions(self, room_id: str) -> dict[str, tuple[str, str | None]]:
        rows = rawdb.query(
            self.hs,
            "SELECT media_origin, media_id, state, reason FROM leave_forget_media_deletions"
            " WHERE room_id = ?",
            (room_id,),
        )
        return {f"mxc://{o}/{m}": (str(s), r) for o, m, s, r in rows}

    def remote_cache(self, uri: str) -> tuple[str, int] | None:
        """(file id, bytes) of this server's cached copy of another server's medium, or None."""
        origin, media_id = uri[len("mxc://") :].split("/")
        rows = rawdb.query(
            self.hs,
            "SELECT filesystem_id, media_length FROM remote_media_cache"
            " WHERE media_origin = ? AND media_id = ?",
            (origin, media_id),
        )
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    def remote_thumbnail_rows(self, uri: str) -> int:
        origin, media_id = uri[len("mxc://") :].split("/")
        rows = rawdb.query(
            self.hs,
            "SELECT COUNT(*) FROM remote_media_cache_thumbnails"
            " WHERE media_origin = ? AND media_id = ?",
            (origin, media_id),
        )
        return int(rows[0][0])

    def remote_cache_paths(self, uri: str, file_id: str) -> tuple[str, str]:
        """The file and the thumbnail directory of a cached remote medium in the media store."""
        origin = uri[len("mxc://") :].split("/")[0]
        store = os.path.join(self.hs.workdir, "media_store")
        parts = (origin, file_id[0:2], file_id[2:4], file_id[4:])
        return (
            os.path.join(store, "remote_content", *parts),
            os.path.join(store, "remote_thumbnail", *parts),
        )

    def media_entries(self, room_id: str) -> list[dict[str, Any]]:
        """The room's ``purge``/``media_deleted`` audit entries."""
        return [
            e
            for e in self.audit(room_id=room_id)
            if e["action"] == "purge" and e["outcome"] == "media_deleted"
        ]

    def media_entry(self, room_id: str) -> dict[str, Any]:
        """The receipt of the room's ``media_deleted`` entry, once it is written."""
        entry = wait_until(
            lambda: (entries := self.media_entries(room_id)) and entries[0],
            what=f"the media_deleted entry of {room_id}",
        )
        receipt = entry["receipt"]
        return dict(json.loads(receipt) if isinstance(receipt, str) else receipt)
