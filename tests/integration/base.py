"""Base class for tests that run against a real Synapse subprocess."""

import atexit
import itertools
from typing import Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase

from tests.support.harness import Response, SynapseProcess, User, quote_room, request


class ClassFixtures:
    """Runs setUpClass/tearDownClass around each class's tests.

    trial's suites never call them (unittest's do), so the first test of a
    class sets the class up, and the class is torn down when a test of another
    class starts, or when the process exits. Classes set up idempotently, so a
    unittest-style runner calling setUpClass first does no harm.
    """

    current: ClassVar[type["SynapseTestCase"] | None] = None

    @classmethod
    def enter(cls, test_class: type["SynapseTestCase"]) -> None:
        if cls.current is test_class:
            return
        cls.leave()
        failure = test_class.__dict__.get("_boot_failure")
        if failure is not None:
            # Do not boot again (and wait again) for every test of a broken class.
            raise RuntimeError(f"Synapse did not start for {test_class.__name__}: {failure}")
        try:
            test_class.setUpClass()
        except Exception as exc:
            test_class._boot_failure = f"{type(exc).__name__}: {exc}"
            raise
        cls.current = test_class

    @classmethod
    def leave(cls) -> None:
        if cls.current is not None:
            test_class, cls.current = cls.current, None
            test_class.tearDownClass()


atexit.register(ClassFixtures.leave)


class SynapseTestCase(SynchronousTestCase):
    """Starts one Synapse per test class, with the module in ``MODE``.

    Subclasses set MODE (``intercept`` or ``listener``) and may extend
    MODULE_CONFIG / EXTRA_CONFIG. ``self.hs`` is the running SynapseProcess.
    """

    _boot_failure: ClassVar[str | None] = None

    MODE: ClassVar[str] = "intercept"
    MODULE_CONFIG: ClassVar[dict[str, Any]] = {}
    EXTRA_CONFIG: ClassVar[dict[str, Any]] = {}
    hs: ClassVar[SynapseProcess]

    def setUp(self) -> None:
        super().setUp()
        ClassFixtures.enter(type(self))

    @classmethod
    def setUpClass(cls) -> None:
        if "hs" in cls.__dict__:
            return
        cls.hs = SynapseProcess({"mount": cls.MODE, **cls.MODULE_CONFIG}, dict(cls.EXTRA_CONFIG))
        try:
            cls.hs.start()
        except Exception:
            cls.hs.cleanup()
            del cls.hs
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        if "hs" in cls.__dict__:
            cls.hs.cleanup()
            del cls.hs

    @property
    def module_port(self) -> int:
        """Where the module serves leave and forget in this mode."""
        return self.hs.client_port if self.MODE == "intercept" else self.hs.module_port

    def via_module(
        self, method: str, room_id: str | None, action: str, body: Any = None, **kw: Any
    ) -> Response:
        """Call /rooms/{roomId}/{action} through the module (room_id percent-encoded)."""
        path = kw.pop("path", None) or (
            f"/_matrix/client/v3/rooms/{quote_room(room_id or '')}/{action}"
        )
        return request(self.module_port, method, path, body, **kw)


class StoppedServerTestCase(SynapseTestCase):
    """A class whose tests read what a Synapse wrote, after it stopped.

    The class's Synapse starts, :meth:`prepare` writes (and reads whatever must
    be compared while it runs), then Synapse stops: every test reads a
    quiescent database with no server at all.
    """

    _ready: ClassVar[bool] = False

    @classmethod
    def prepare(cls) -> None:
        """Write what the tests read, while the class's Synapse runs."""
        raise NotImplementedError

    @classmethod
    def setUpClass(cls) -> None:
        if cls.__dict__.get("_ready"):
            return
        super().setUpClass()
        try:
            cls.prepare()
        except BaseException:
            super().tearDownClass()
            raise
        cls.hs.stop()
        cls._ready = True

    @classmethod
    def tearDownClass(cls) -> None:
        if cls.__dict__.get("_ready"):
            cls._ready = False
            super().tearDownClass()


_localparts = itertools.count(1)


def unique(prefix: str) -> str:
    """A localpart no other test in this process has used."""
    return f"{prefix}{next(_localparts)}"


def password(user: User) -> str:
    """The password harness.register() gave the user."""
    return "pw-" + user.user_id[1:].split(":")[0]
