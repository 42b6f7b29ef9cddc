"""A stand-in for another operator module that serves a resource of its own."""

from typing import Any

from synapse.module_api import ModuleApi
from twisted.web.resource import Resource


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"hello": "from another module"}'


class PathClaimingModule:
    """Registers a resource at ``config["path"]``, as many real modules do."""

    def __init__(self, config: dict[str, Any], api: ModuleApi) -> None:
        api.register_web_resource(config["path"], _Hello())

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, Any]:
        return config
