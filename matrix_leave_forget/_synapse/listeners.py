"""The live HTTP listeners of this process (mount checks)."""

import logging
import os
from typing import Any

from twisted.web.server import Site

logger = logging.getLogger(__name__)


def site_of(factory: Any) -> Site | None:
    """The Site a listening port serves, through any wrapping factories.

    Why: a ``tls: true`` listener is a Twisted listenSSL port, whose factory is
    a TLSMemoryBIOFactory wrapping Synapse's Site (``wrappedFactory``); plain
    TCP and unix-socket ports hold the Site itself.
    """
    for _ in range(4):  # TLS is the only wrapper Synapse uses; allow a few.
        if factory is None or isinstance(factory, Site):
            return factory
        factory = getattr(factory, "wrappedFactory", None)
    return None


def port_key(port: Any) -> Any:
    """What a listening port is configured by: its TCP port number or socket path."""
    host = port.getHost()
    key = getattr(host, "port", None) or getattr(host, "name", None)
    # A unix socket's address is bytes; the config names the path as a string.
    return os.fsdecode(key) if isinstance(key, bytes) else key
