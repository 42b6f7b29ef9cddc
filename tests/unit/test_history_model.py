"""The reference model (tests/history_model.py) on hand-written rooms: the rule itself."""

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.history_model import visible_events

BOB = "@bob:test.local"


def _room(*steps: str) -> list[dict[str, Any]]:
    """Events from steps: "msg", "vis:<visibility>" or "<membership>" (bob's), ids "$<n>"."""
    events = []
    for n, step in enumerate(steps):
        event: dict[str, Any] = {"event_id": f"${n}"}
        if step == "msg":
            event.update(type="m.room.message", content={"body": step})
        elif step.startswith("vis:"):
            event.update(
                type="m.room.history_visibility",
                state_key="",
                content={"history_visibility": step[4:]},
            )
        else:
            event.update(type="m.room.member", state_key=BOB, content={"membership": step})
        events.append(event)
    return events


class ModelTests(SynchronousTestCase):
    def test_departure_does_not_move(self) -> None:
        """After leave, a knock and its rescinding open nothing sent after the leave."""
        room = _room("vis:shared", "join", "msg", "leave", "msg", "knock", "msg", "leave", "msg")
        self.assertEqual(visible_events(room, BOB), {"$0", "$1", "$2", "$3"})

    def test_forget_holds_until_a_join(self) -> None:
        """A forget hides everything through an invite; a rejoin shows the shared history."""
        room = _room("vis:shared", "join", "msg", "leave", "msg", "invite", "msg")
        self.assertEqual(visible_events(room, BOB, forgotten_after="$3"), set())
        room = _room("vis:shared", "join", "msg", "leave", "msg", "invite", "join", "msg")
        self.assertEqual(
            visible_events(room, BOB, forgotten_after="$3"), {f"${i}" for i in range(8)}
        )

    def test_world_readable_per_event(self) -> None:
        """world_readable opens the events sent under it only, to anyone, forgotten or not;
        the change itself is seen under the less restrictive of old and new."""
        room = _room("vis:shared", "join", "msg", "leave", "msg", "vis:world_readable", "msg")
        self.assertEqual(visible_events(room, BOB, forgotten_after="$3"), {"$5", "$6"})
        self.assertEqual(visible_events(room, BOB), {"$0", "$1", "$2", "$3", "$5", "$6"})

    def test_invited_and_joined_visibility(self) -> None:
        """invited shows what was sent while bob was invited; joined only while joined
        (the visibility change itself falls under the shared default it replaced)."""
        room = _room("vis:invited", "invite", "msg", "join", "msg", "leave")
        self.assertEqual(visible_events(room, BOB), {"$0", "$1", "$2", "$3", "$4", "$5"})
        room = _room("vis:joined", "invite", "msg", "join", "msg", "leave")
        self.assertEqual(visible_events(room, BOB), {"$0", "$3", "$4", "$5"})
