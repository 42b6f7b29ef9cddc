"""Synapse's own readers of homeserver.yaml, for the offline CLI."""

import logging
import os
from typing import Any

from signedjson.types import SigningKey

logger = logging.getLogger(__name__)


# -- the offline CLI: Synapse's own readers of homeserver.yaml -----------------
# Why: the CLI runs without a homeserver, so ModuleApi is not there; and it
# must pick exactly the database and the keys Synapse picks from the same
# config (``database`` vs ``databases`` vs ``database_path``, data_stores,
# the default signing key path, ``old_signing_keys``). Synapse's config
# sections do that; reading them here means the CLI cannot disagree with it.
# The whole HomeServerConfig is not loaded: it would create directories (the
# media store) and demand files the CLI does not need (TLS certificates, log
# config), which an operator's read-only account may not have.


def main_database_from_config(values: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The driver name and connection args Synapse's main data store would use.

    Args:
        values: The merged top-level keys of homeserver.yaml (not modified).

    Returns:
        ``(name, args)``, or None if the config names no database.

    Raises:
        synapse.config.ConfigError: if Synapse would refuse the database settings.
    """
    import copy

    from synapse.config.database import DatabaseConfig
    from synapse.config.homeserver import HomeServerConfig

    section = DatabaseConfig(HomeServerConfig())
    section.read_config(copy.deepcopy(values))
    for database in section.databases:
        if "main" in database.databases:
            return str(database.config.get("name", "sqlite3")), dict(database.config["args"])
    return None


def signing_key_path(values: dict[str, Any], config_dir: str) -> str | None:
    """The absolute path of the signing key file Synapse reads; None for an inline key.

    Args:
        values: The merged top-level keys of homeserver.yaml.
        config_dir: The directory of the last config file (for the default key path).
    """
    if "signing_key" in values:
        return None
    path = values.get("signing_key_path") or os.path.join(
        config_dir, f"{values['server_name']}.signing.key"
    )
    return os.path.abspath(str(path))


def signing_keys_from_config(
    values: dict[str, Any], config_dir: str
) -> tuple[str, list[SigningKey], dict[str, Any]]:
    """The homeserver's signing keys and old verify keys, read as Synapse reads them.

    Args:
        values: The merged top-level keys of homeserver.yaml.
        config_dir: The directory of the last config file (for the default key path).

    Returns:
        Where the keys came from (for messages), the signing keys, and the
        ``old_signing_keys`` as verify keys by key id.

    Raises:
        synapse.config.ConfigError: if Synapse could not read them either.
    """
    from signedjson.key import read_signing_keys
    from synapse.config.homeserver import HomeServerConfig
    from synapse.config.key import KeyConfig

    section = KeyConfig(HomeServerConfig())
    path = signing_key_path(values, config_dir)
    if path is None:
        where = "signing_key"
        keys = read_signing_keys([values["signing_key"]])
    else:
        where = path
        keys = section.read_signing_keys(where, "signing_key")
    old = section.read_old_signing_keys(values.get("old_signing_keys"))
    return where, list(keys), dict(old)
