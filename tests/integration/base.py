"""Base class for tests that run against a real Synapse subprocess."""

from typing import Any, ClassVar, Dict, Optional

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import Response, SynapseProcess, quote_room, request


class SynapseTestCase(SynchronousTestCase):
    """Starts one Synapse per test class, with the module in ``MODE``.

    Subclasses set MODE (``intercept`` or ``listener``) and may extend
    MODULE_CONFIG / EXTRA_CONFIG. ``self.hs`` is the running SynapseProcess.
    """

    MODE: ClassVar[str] = "intercept"
    MODULE_CONFIG: ClassVar[Dict[str, Any]] = {}
    EXTRA_CONFIG: ClassVar[Dict[str, Any]] = {}
    hs: ClassVar[SynapseProcess]

    @classmethod
    def setUpClass(cls) -> None:
        cls.hs = SynapseProcess(
            {"mount": cls.MODE, **cls.MODULE_CONFIG}, dict(cls.EXTRA_CONFIG)
        )
        try:
            cls.hs.start()
        except Exception:
            cls.hs.cleanup()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.hs.cleanup()

    @property
    def module_port(self) -> int:
        """Where the module serves leave and forget in this mode."""
        return self.hs.client_port if self.MODE == "intercept" else self.hs.module_port

    def via_module(
        self, method: str, room_id: Optional[str], action: str, body: Any = None, **kw: Any
    ) -> Response:
        """Call /rooms/{roomId}/{action} through the module (room_id percent-encoded)."""
        path = kw.pop("path", None) or (
            f"/_matrix/client/v3/rooms/{quote_room(room_id or '')}/{action}"
        )
        return request(self.module_port, method, path, body, **kw)
