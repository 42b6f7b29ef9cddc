"""Helpers shared by the modules that test every route of leave and forget (no tests)."""

import urllib.parse
from typing import Any

from matrix_leave_forget._synapse.contexts import on_new_event_is_safe
from tests.integration.retention_helpers import (
    RELAXED_FORGET,
    RetentionHelpers,
)
from tests.support import rawdb
from tests.support.harness import (
    User,
    quote_room,
    wait_until,
)

V3 = "/_matrix/client/v3"

# Whether this Synapse tells the module the route of a self-leave (on_new_event
# in the request's context); older ones record such a leave as "client".
LIVE_ROUTES = on_new_event_is_safe()


def self_route(via: str) -> str:
    return via if LIVE_ROUTES else "client"


class RouteHelpers(RetentionHelpers):
    """Reading the audit log by user and room (no tests of its own)."""

    MODULE_CONFIG = {"forget_rate_limit": RELAXED_FORGET, "retention": {"period": "1h"}}

    def entries(self, user: User, room_id: str, action: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.audit(room_id=room_id)
            if e["action"] == action and e["user_id"] == user.user_id
        ]

    def one_entry(self, user: User, room_id: str, action: str) -> dict[str, Any]:
        """The single entry of user's action in room_id (waiting for it to be written)."""
        found = wait_until(
            lambda: self.entries(user, room_id, action),
            what=f"a {action} entry for {user.user_id} in {room_id}",
        )
        self.assertEqual(len(found), 1, found)
        return found[0]

    def native(self, user: User, method: str, path: str, body: Any = None) -> dict[str, Any]:
        resp = self.hs.client(
            method, path, body if body is not None else {}, token=user.access_token
        )
        self.assertEqual(resp.status, 200, (path, resp.body))
        return dict(resp.body or {})

    def state_leave(
        self, user: User, room_id: str, version: str = "v3", quoted: bool = False
    ) -> str:
        """Leave through PUT /rooms/{roomId}/state/m.room.member/{own id}; the event id."""
        state_key = urllib.parse.quote(user.user_id, safe="") if quoted else user.user_id
        body = self.native(
            user,
            "PUT",
            f"/_matrix/client/{version}/rooms/{quote_room(room_id)}/state/m.room.member/{state_key}",
            {"membership": "leave", "reason": "by state"},
        )
        return str(body["event_id"])

    def current_event_id(self, room_id: str, user: User) -> str:
        event = self.hs.member_event(self.admin, room_id, user.user_id)
        assert event is not None
        return str(event["event_id"])

    def forgotten_in_synapse(self, user: User, room_id: str) -> bool:
        rows = rawdb.query(
            self.hs,
            "SELECT forgotten FROM room_memberships WHERE user_id = ? AND room_id = ?",
            (user.user_id, room_id),
        )
        return bool(rows) and all(r[0] for r in rows)
