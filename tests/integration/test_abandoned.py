"""Abandoned rooms put on the purge schedule by an admin, through the admin API and the CLI.

A room every local user left (forgotten or not) before the module was installed
or before a retention period was set is never scheduled by a forget. An admin
lists them (``state=abandoned``) and schedules them: a dry run first, then for
real, audited with the admin as actor; holds, invites and knocks are respected
as for rooms forgotten by all.
"""

import os
import subprocess
import sys
from typing import Any, ClassVar

from tests.integration.retention_helpers import RELAXED_FORGET, RetentionHelpers
from tests.support import rawdb
from tests.support.harness import quote_room

SCHEDULE = "/rooms/abandoned/schedule"


def forget_untracked(hs: Any, room_id: str) -> None:
    """Drop the module's retention row of a room: as if it was forgotten before installation."""
    rawdb.query(hs, "DELETE FROM leave_forget_rooms WHERE room_id = ?", (room_id,))


class AbandonedRoomsTest(RetentionHelpers):
    """Scheduling abandoned rooms: dry run, apply, holds, invites, the CLI."""

    MODULE_CONFIG = {
        "forget_rate_limit": RELAXED_FORGET,
        "retention": {"period": "5s", "sweep_interval": "100ms"},
    }
    left: ClassVar[str]

    def left_room(self) -> str:
        """A room both local members left and did not forget: abandoned, never scheduled."""
        room_id, users = self.joined_room(2)
        for user in users:
            self.leave(user, room_id)
        return room_id

    def invited_room(self) -> str:
        """A room whose last member left while a local user's invite is pending."""
        room_id, (alice, _bob) = self.joined_room(2)
        carol = self.user("c")
        resp = self.hs.membership(alice, room_id, "invite", {"user_id": carol.user_id})
        self.assertEqual(resp.status, 200, resp.body)
        for user in (alice, _bob):
            self.leave(user, room_id)
        return room_id

    def schedule(self, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.admin_ok("POST", SCHEDULE, body))

    def test_dry_run_then_apply(self) -> None:
        """A dry run changes nothing; applying schedules abandoned rooms, audited; they purge."""
        left = self.left_room()
        invited = self.invited_room()
        held = self.left_room()
        self.hold(held)
        self.assertIn(left, self.listed("abandoned"))
        rooms = [left, invited, held]

        dry = self.schedule({"room_ids": rooms})
        self.assertTrue(dry["dry_run"])
        self.assertEqual({r["room_id"] for r in dry["scheduled"]}, {left, held})
        self.assertEqual(
            {r["room_id"]: r["held"] for r in dry["scheduled"]}, {left: False, held: True}
        )
        (skip,) = dry["skipped"]
        self.assertEqual(skip["room_id"], invited)
        self.assertIn("has membership invite", skip["why"])
        # Nothing written: no retention row, no audit entry.
        self.assertIsNone(self.retention(left))
        self.assertEqual(self.purge_outcomes(left), [])

        applied = self.schedule({"room_ids": rooms, "dry_run": False})
        self.assertFalse(applied["dry_run"])
        self.assertEqual({r["room_id"] for r in applied["scheduled"]}, {left, held})
        entries = [e for e in self.audit(room_id=left) if e["action"] == "purge"]
        self.assertEqual(
            [(e["outcome"], e.get("actor")) for e in entries], [("scheduled", self.admin.user_id)]
        )
        self.assertEqual(self.retention(left)["state"], "forgotten")
        self.wait_state(left, "purged", timeout=30)
        self.assertFalse(self.synapse_has_room(left))
        # The held room stays scheduled and unpurged; the invited room untouched.
        self.assertEqual(self.retention(held)["state"], "forgotten")
        self.assertTrue(self.synapse_has_room(held))
        self.assertIsNone(self.retention(invited))
        again = self.schedule({"room_ids": [left, held], "dry_run": False})
        self.assertEqual(again["scheduled"], [])
        self.assertEqual(
            {s["room_id"]: s["why"] for s in again["skipped"]},
            {left: "already purged", held: "already forgotten"},
        )

    def test_room_forgotten_before_installation(self) -> None:
        """A room every local user forgot with no retention row is listed and can be scheduled."""
        room_id, users = self.joined_room(2)
        self.hold(room_id)
        self.leave_and_forget(users, room_id)
        forget_untracked(self.hs, room_id)
        self.release_untracked(room_id)
        self.assertIn(room_id, self.listed("abandoned"))
        applied = self.schedule({"room_ids": [room_id], "dry_run": False})
        self.assertEqual([r["room_id"] for r in applied["scheduled"]], [room_id])
        self.wait_state(room_id, "purged", timeout=30)

    def release_untracked(self, room_id: str) -> None:
        resp = self.admin_api("DELETE", f"/rooms/{quote_room(room_id)}/hold")
        self.assertEqual(resp.status, 200, resp.body)

    def test_bad_bodies_are_400(self) -> None:
        """Malformed bodies answer 400 M_INVALID_PARAM, never 500."""
        for body in (
            {"dry_run": "no"},
            {"room_ids": "!a:b"},
            {"room_ids": ["not a room"]},
            {"limit": 0},
            {"limit": 1001},
            {"from": 5},
        ):
            with self.subTest(body=body):
                resp = self.admin_api("POST", SCHEDULE, body)
                self.assertEqual(resp.status, 400, resp.body)
                self.assertEqual(resp.body["errcode"], "M_INVALID_PARAM")
        resp = self.admin_api("GET", SCHEDULE)
        self.assertEqual(resp.status, 405, resp.body)

    def test_cli_dry_run_then_apply(self) -> None:
        """CLI schedule-abandoned: a dry run by default; --apply schedules through the API."""
        room_id = self.left_room()

        def cli(
            *args: str, token: str | None = self.admin.access_token
        ) -> "subprocess.CompletedProcess[str]":
            env = dict(os.environ)
            env.pop("MLF_ADMIN_TOKEN", None)
            if token is not None:
                env["MLF_ADMIN_TOKEN"] = token
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "matrix_leave_forget.cli",
                    "-c",
                    self.hs.config_path,
                    "schedule-abandoned",
                    "--url",
                    f"http://127.0.0.1:{self.module_port}",
                    "--room",
                    room_id,
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )

        dry = cli()
        self.assertEqual(dry.returncode, 0, dry.stderr)
        self.assertIn("would schedule", dry.stdout)
        self.assertIn("dry run", dry.stderr)
        self.assertIsNone(self.retention(room_id))
        no_token = cli(token=None)
        self.assertEqual(no_token.returncode, 2)
        self.assertIn("MLF_ADMIN_TOKEN", no_token.stderr)
        applied = cli("--apply")
        self.assertEqual(applied.returncode, 0, applied.stderr)
        self.assertIn("scheduled", applied.stdout)
        self.assertIn(self.retention(room_id)["state"], ("forgotten", "purging", "purged"))
