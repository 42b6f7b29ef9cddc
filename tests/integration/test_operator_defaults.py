"""What an operator sees with the defaults: the start-up line, readable times, forget's limit.

One Synapse with the module's default settings, except a retention period and
one configured hold (so that the start-up line and the "purge due" line have
something to show).
"""

import re
from typing import ClassVar

from tests.integration.base import SynapseTestCase
from tests.support.harness import SERVER_NAME, User, quote_room

HOLD = f"!held:{SERVER_NAME}"
# Element's "forget" on each of several rooms, or a "forget all left rooms"
# loop in a client: matrix-js-sdk's MatrixClient.forget() sends one POST per
# room, back to back, and does not retry a 429 on it.
ROOMS_FORGOTTEN_IN_A_ROW = 30


class OperatorDefaultsTests(SynapseTestCase):
    MODE = "intercept"
    MODULE_CONFIG = {"retention": {"period": "7d", "holds": [HOLD]}}
    admin: ClassVar[User]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        if "admin" not in cls.__dict__:
            cls.admin = cls.hs.register("admin", admin=True)

    def start_up_lines(self) -> list[str]:
        return [
            line
            for line in self.hs.log_text().splitlines()
            if re.search(r"INFO - .* - matrix-leave-forget \d+\.\d+\.\d+: ", line)
        ]

    def test_one_start_up_line_with_the_effective_settings(self) -> None:
        """Exactly one INFO line at start-up names every effective setting, with
        durations as the config spells them and the holds as a count."""
        (line,) = self.start_up_lines()
        for setting in (
            "mount=intercept",
            "forget_rate_limit=off",
            "audit_failures=true",
            "retention.period=1w",
            "retention.dry_run=false",
            "retention.holds=1",
            "retention.sweep_interval=1m",
        ):
            self.assertIn(f" {setting}", line)

    def test_forgetting_many_left_rooms_in_a_row_is_never_limited(self) -> None:
        """As stock Synapse: a user forgetting 30 left rooms back to back (what a
        client's "forget" on each of several rooms does) gets 200 for every one;
        with the old default limit (burst 10) the 11th was a 429 the client never
        retried."""
        user = self.hs.register("forgetful")
        rooms = []
        for _ in range(ROOMS_FORGOTTEN_IN_A_ROW):
            room = self.hs.create_room(user)
            self.assertEqual(self.hs.membership(user, room, "leave").status, 200)
            rooms.append(room)
        answers = [
            self.hs.client(
                "POST",
                f"/_matrix/client/v3/rooms/{quote_room(room)}/forget",
                {},
                token=user.access_token,
            ).status
            for room in rooms
        ]
        self.assertEqual(answers, [200] * ROOMS_FORGOTTEN_IN_A_ROW)

    def test_purge_due_time_is_logged_in_iso8601(self) -> None:
        """The "forgotten by every local user" line gives the purge's due time as
        ISO 8601 UTC (it was raw milliseconds)."""
        user = self.hs.register("loner")
        room = self.hs.create_room(user)
        self.assertEqual(self.hs.membership(user, room, "leave").status, 200)
        self.assertEqual(self.hs.membership(user, room, "forget").status, 200)
        line = next(
            line
            for line in self.hs.log_text().splitlines()
            if f"Room {room} is now forgotten" in line
        )
        self.assertRegex(line, r"purge due at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\)")
