"""MSC4267 (Matrix 1.18): ``/capabilities`` says whether leave forgets the room.

In ``mount: intercept`` the module adds ``m.forget_forced_upon_leave`` with
Synapse's ``forget_rooms_on_leave`` to Synapse's answer on every version
prefix; every other byte is what Synapse without the module answers (an
oracle Synapse with the same settings is asked the same question). MSC4267's
unstable name appears exactly where Synapse itself puts it. With the option
on, kicks and bans forget too, each forget audited ``via forget_on_leave``.
matrix-js-sdk reads the capability as an application would.
"""

import os
import shutil
import subprocess
from typing import Any, ClassVar

import synapse

from matrix_leave_forget.http.capabilities import STABLE, UNSTABLE
from tests.integration.js_clients import CLIENT_TIMEOUT, NodeReports, js_sdk_dir
from tests.integration.route_helpers import V3, RouteHelpers
from tests.support import rawdb
from tests.support.harness import SynapseProcess, User, quote_room, wait_until

PREFIXES = ("r0", "v3", "unstable")
JS_SCRIPT = "capabilities.mjs"
SYNAPSE_VERSION = tuple(int(part) for part in synapse.__version__.split(".")[:2])


class CapabilityHelpers(RouteHelpers):
    """One module Synapse (intercept) and one oracle Synapse without the module."""

    MODE = "intercept"
    oracle: ClassVar[SynapseProcess]
    oracle_user: ClassVar[User]

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        super().setUpClass()
        cls.oracle = SynapseProcess(None, dict(cls.EXTRA_CONFIG), database=cls.hs.database)
        try:
            cls.oracle.start()
            cls.oracle_user = cls.oracle.register(f"oracle{os.urandom(3).hex()}")
        except Exception:
            cls.oracle.cleanup()
            super().tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if "oracle" in cls.__dict__:
            cls.oracle.cleanup()
            del cls.oracle
        super().tearDownClass()

    def capabilities(self, hs: SynapseProcess, user: User, prefix: str, method: str = "GET") -> Any:
        return hs.client(method, f"/_matrix/client/{prefix}/capabilities", token=user.access_token)

    def check_every_prefix(self, enabled: bool) -> None:
        """Each prefix: 200, the capability with `enabled`, and Synapse's bytes around it."""
        user = self.user("caps")
        for prefix in PREFIXES:
            module = self.capabilities(self.hs, user, prefix)
            native = self.capabilities(self.oracle, self.oracle_user, prefix)
            self.assertEqual((module.status, native.status), (200, 200), prefix)
            caps = module.body["capabilities"]
            self.assertEqual(caps[STABLE], {"enabled": enabled}, prefix)
            self.assertNotIn(STABLE, native.body["capabilities"], "Synapse advertises it now")
            added = b',"%s":{"enabled":%s}' % (STABLE.encode(), b"true" if enabled else b"false")
            self.assertEqual(module.raw, native.raw[:-2] + added + b"}}", prefix)
            self.assertEqual(int(module.headers["content-length"]), len(module.raw), prefix)
            # The unstable name is Synapse's business: where and as Synapse puts it.
            self.assertEqual(caps.get(UNSTABLE), native.body["capabilities"].get(UNSTABLE), prefix)
        # Synapse does not serve /capabilities under api/v1: nor does the module.
        module = self.capabilities(self.hs, user, "api/v1")
        native = self.capabilities(self.oracle, self.oracle_user, "api/v1")
        self.assertEqual((module.status, module.raw), (native.status, native.raw))
        self.assertEqual(module.status, 404)

    def js_sdk_reads(self, enabled: bool) -> None:
        """matrix-js-sdk's getCapabilities() hands the application the capability."""
        target = js_sdk_dir()
        shutil.copy(
            os.path.join(os.path.dirname(__file__), "js", JS_SCRIPT),
            os.path.join(target, JS_SCRIPT),
        )
        user = self.user("js")
        env = dict(
            os.environ,
            HS_URL=f"http://127.0.0.1:{self.hs.client_port}",
            USER_ID=user.user_id,
            ACCESS_TOKEN=user.access_token,
        )
        proc = subprocess.Popen(
            ["node", JS_SCRIPT],
            cwd=target,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            report = NodeReports(proc).next("capabilities")
        finally:
            proc.wait(timeout=CLIENT_TIMEOUT)
        self.assertEqual(report["forget_forced_upon_leave"], {"enabled": enabled})
        self.assertIn("default", report["room_versions"])
        self.assertTrue(all(path.endswith("/capabilities") for path in report["paths"]))


class CapabilityOnTests(CapabilityHelpers):
    """forget_rooms_on_leave: true, MSC4267's experimental flag off (the issue's case)."""

    EXTRA_CONFIG = {"forget_rooms_on_leave": True}

    def test_every_prefix(self) -> None:
        """r0, v3 and unstable answer `enabled: true`, otherwise Synapse's bytes; HEAD
        gets the same length; api/v1 stays Synapse's 404."""
        self.check_every_prefix(True)
        user = self.user("head")
        head = self.capabilities(self.hs, user, "v3", "HEAD")
        get = self.capabilities(self.hs, user, "v3")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.headers["content-length"], str(len(get.raw)))

    def test_js_sdk(self) -> None:
        """matrix-js-sdk sees the capability enabled."""
        self.js_sdk_reads(True)

    def test_kick_and_ban_forget(self) -> None:
        """As Synapse does with the option on, a kick and a ban forget the room for the
        user who was removed; each forget is an entry via forget_on_leave, and Synapse's
        own rows say forgotten."""
        room_id, (alice, bob, carol) = self.joined_room(3)
        path = f"{V3}/rooms/{quote_room(room_id)}"
        self.native(alice, "POST", f"{path}/kick", {"user_id": bob.user_id, "reason": "k"})
        self.native(alice, "POST", f"{path}/ban", {"user_id": carol.user_id, "reason": "b"})
        for user, via in ((bob, "kick"), (carol, "ban")):
            self.assertEqual(self.one_entry(user, room_id, "leave")["via"], via)
            forget = self.one_entry(user, room_id, "forget")
            self.assertEqual((forget["via"], forget["outcome"]), ("forget_on_leave", "ok"))
            self.assertTrue(self.forgotten_in_synapse(user, room_id))
        # The member who stayed forgets nothing.
        self.assertEqual(self.entries(alice, room_id, "forget"), [])

    def test_synapse_alone_forgets_on_kick_and_ban(self) -> None:
        """What the module records is Synapse's behaviour: Synapse without the module,
        option on, forgets the room for a kicked and a banned user too."""
        oracle = self.oracle
        alice, bob, carol = (oracle.register(f"{n}{os.urandom(3).hex()}") for n in "abc")
        room_id = oracle.create_room(alice, preset="public_chat")
        for user in (bob, carol):
            self.assertEqual(oracle.membership(user, room_id, "join").status, 200)
        path = f"{V3}/rooms/{quote_room(room_id)}"
        for action, user in (("kick", bob), ("ban", carol)):
            resp = oracle.client(
                "POST", f"{path}/{action}", {"user_id": user.user_id}, token=alice.access_token
            )
            self.assertEqual(resp.status, 200, resp.body)
        wait_until(
            lambda: all(
                rows and all(r[0] for r in rows)
                for rows in (
                    rawdb.query(
                        oracle,
                        "SELECT forgotten FROM room_memberships WHERE user_id = ? AND room_id = ?",
                        (user.user_id, room_id),
                    )
                    for user in (bob, carol)
                )
            ),
            what="Synapse's own forget of the kicked and the banned user",
        )


class CapabilityOffTests(CapabilityHelpers):
    """Synapse's defaults: forget_rooms_on_leave off."""

    def test_every_prefix(self) -> None:
        """r0, v3 and unstable answer `enabled: false`, otherwise Synapse's bytes."""
        self.check_every_prefix(False)

    def test_js_sdk(self) -> None:
        """matrix-js-sdk sees the capability disabled."""
        self.js_sdk_reads(False)


class CapabilityUnstableTests(CapabilityHelpers):
    """forget_rooms_on_leave with Synapse's MSC4267 flag (1.134+ advertises the unstable name)."""

    EXTRA_CONFIG = {
        "forget_rooms_on_leave": True,
        "experimental_features": {"msc4267_enabled": True},
    }

    def test_stable_added_unstable_untouched(self) -> None:
        """The stable name is added after Synapse's unstable one, which is left as Synapse
        wrote it (where this Synapse has it)."""
        self.check_every_prefix(True)
        user = self.user("unstable")
        caps = self.capabilities(self.hs, user, "v3").body["capabilities"]
        self.assertEqual(UNSTABLE in caps, SYNAPSE_VERSION >= (1, 134))
        if UNSTABLE in caps:
            self.assertEqual(caps[UNSTABLE], {"enabled": True})
            self.assertEqual(list(caps)[-2:], [UNSTABLE, STABLE])
