"""The history guard on a generic worker (mount: intercept), in the worker deployment.

PostgreSQL only, like tests/integration/test_workers.py, whose deployment this
reuses. Leave and forget go through the main process; the reads go to the
worker's client listener, where the worker's own copy of the module guards
them: after a leave once replication has brought the worker the leave (and with
it any later event), after a forget at once.
"""

import json
import urllib.parse
from typing import Any

from tests.integration.workers import DeploymentTestCase
from tests.support.harness import Response, User, quote_room, wait_until


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


class HistoryGuardWorkerTests(DeploymentTestCase):
    """/sync, /messages, /context and /event served by a generic worker."""

    MODE = "intercept"
    MODULE_CONFIG: dict[str, Any] = {"forget_rate_limit": None}

    def on_worker(self, user: User, path: str) -> Response:
        return self.worker.client("GET", path, token=user.access_token)

    def send(self, user: User, room_id: str, text: str) -> str:
        path = f"/_matrix/client/v3/rooms/{quote_room(room_id)}/send/m.room.message/{text}"
        resp = self.hs.client(
            "PUT", path, {"msgtype": "m.text", "body": text}, token=user.access_token
        )
        assert resp.status == 200, resp.body
        return str(resp.body["event_id"])

    def test_worker_guards_reads_after_leave_and_forget(self) -> None:
        """A worker hides later events after leave and the history after forget."""
        alice, bob = self.hs.register("halice"), self.hs.register("hbob")
        bob_other = self.hs.login(bob)
        room = self.hs.create_room(alice, preset="private_chat")
        rq = quote_room(room)
        self.assertEqual(
            self.hs.membership(alice, room, "invite", {"user_id": bob.user_id}).status, 200
        )
        self.assertEqual(self.hs.membership(bob, room, "join").status, 200)
        since = self.on_worker(bob_other, "/_matrix/client/v3/sync?timeout=0").body["next_batch"]
        before = self.send(alice, room, "before")
        self.assertEqual(self.hs.membership(bob, room, "leave").status, 200)
        after = self.send(alice, room, "after")
        messages = f"/_matrix/client/v3/rooms/{rq}/messages?dir=f&limit=50"
        # Replication reaches the worker asynchronously: wait for the leave there.
        forward = wait_until(
            lambda: (r := self.on_worker(bob, messages)).status == 200 and r.body["chunk"] and r,
            what="the worker serving /messages",
        )
        ids = [e["event_id"] for e in forward.body["chunk"]]
        self.assertIn(before, ids)
        self.assertNotIn(after, ids)
        resp = self.hs.client(
            "POST", f"/_matrix/client/v3/rooms/{rq}/forget", {}, token=bob.access_token
        )
        self.assertEqual(resp.status, 200, resp.body)
        event = f"/_matrix/client/v3/rooms/{rq}/event/{q(before)}"
        # No waiting for replication: the worker keeps the forget at once.
        refused = self.on_worker(bob, event)
        self.assertEqual((refused.status, refused.errcode), (404, "M_NOT_FOUND"))
        context = self.on_worker(bob, f"/_matrix/client/v3/rooms/{rq}/context/{q(before)}")
        self.assertEqual((context.status, context.errcode), (403, "M_FORBIDDEN"))
        body = self.on_worker(bob_other, f"/_matrix/client/v3/sync?timeout=0&since={q(since)}").body
        entry = body["rooms"]["leave"][room]
        self.assertEqual(len(entry["timeline"]["events"]), 1)
        self.assertEqual(entry["timeline"]["events"][0]["content"]["membership"], "leave")
        self.assertNotIn(before, json.dumps(body))
