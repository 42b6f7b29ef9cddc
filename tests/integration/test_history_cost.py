"""What the history guard costs Synapse's database per answer (issue 17, gap 2).

One Synapse with the module. Transactions are counted with Synapse's own
metric (``synapse_storage_transaction_time_count`` per ``desc``), read from its
metrics listener before and after the request measured.
"""

import re
from concurrent.futures import ThreadPoolExecutor

from tests.integration.guard_scenes import INCLUDE_LEAVE, HistoryGuardTestCase
from tests.support.harness import User

_TRANSACTIONS = re.compile(
    r'^synapse_storage_transaction_time_count(?:_total)?\{desc="([^"]+)"[^}]*\} (\S+)$', re.M
)
_SYNC = f"/_matrix/client/v3/sync?timeout=0&filter={INCLUDE_LEAVE}"


class LeftRoomsCostTests(HistoryGuardTestCase):
    def transactions(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for desc, value in _TRANSACTIONS.findall(self.hs.metrics()):
            counts[desc] = counts.get(desc, 0.0) + float(value)
        return counts

    def user_with_left_rooms(self, count: int) -> tuple[User, set[str]]:
        """A user who joined count rooms, each with a message of alice's, and left them."""
        n = self.id().rsplit(".", 1)[-1][-4:] + str(count)
        alice, bob = self.hs.register(f"alicec{n}"), self.hs.register(f"bobc{n}")

        def one(i: int) -> str:
            room_id = self.hs.create_room(alice, preset="private_chat")
            self.ok(self.hs.membership(alice, room_id, "invite", {"user_id": bob.user_id}), "i")
            self.ok(self.hs.membership(bob, room_id, "join"), "join")
            self.send(alice, room_id, f"m{n}x{i}")
            self.ok(self.hs.membership(bob, room_id, "leave"), "leave")
            return room_id

        with ThreadPoolExecutor(4) as pool:
            return bob, set(pool.map(one, range(count)))

    def sync_cost(self, user: User, rooms: set[str]) -> tuple[float, float]:
        """The fewest transactions, in all and the guard's, of three /sync requests.

        The first /sync (include_leave) fills Synapse's caches; the three that follow
        are the same request, answered from Synapse's /sync response cache, so the
        transactions they cost are the guard's check (the fewest of three leaves out
        background work that happened to run meanwhile).
        """
        first = self.ok(self.get(user, _SYNC), "sync")
        self.assertEqual(set(first.body["rooms"]["leave"]), rooms)
        costs = []
        for _ in range(3):
            before = self.transactions()
            resp = self.ok(self.get(user, _SYNC), "sync again")
            after = self.transactions()
            self.assertEqual(set(resp.body["rooms"]["leave"]), rooms)
            delta = {d: after[d] - before.get(d, 0.0) for d in after}
            guard = sum(v for d, v in delta.items() if d.startswith("leave_forget_membership"))
            costs.append((sum(delta.values()), guard))
        return min(costs)

    def test_sync_with_many_left_rooms_costs_what_one_with_few_costs(self) -> None:
        """An include_leave /sync naming 40 left rooms costs the guard no more database
        transactions than one naming 3 (one: the departures of all rooms together,
        in IN lists of bounded size), and at least one (the check did run). Checked
        room by room, the 40 would cost 80 transactions more than the 3 (two queries
        per room), far above the slack of one."""
        few_user, few_rooms = self.user_with_left_rooms(3)
        many_user, many_rooms = self.user_with_left_rooms(40)
        few_total, few_guard = self.sync_cost(few_user, few_rooms)
        many_total, many_guard = self.sync_cost(many_user, many_rooms)
        self.assertGreaterEqual(few_guard, 1)
        self.assertEqual(many_guard, few_guard)
        self.assertLessEqual(many_total, few_total + 1, (few_total, many_total))
