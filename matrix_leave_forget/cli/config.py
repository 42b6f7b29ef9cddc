"""Reading homeserver.yaml: the database settings, the signing keys, the module's config."""

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attr
import yaml
from signedjson.key import get_verify_key
from signedjson.types import VerifyKey
from synapse.module_api.errors import ConfigError

from matrix_leave_forget._synapse.offline_config import (
    main_database_from_config,
    signing_key_path,
    signing_keys_from_config,
)
from matrix_leave_forget.audit.entry import parse_old_signing_keys, verify_key_id
from matrix_leave_forget.cli.errors import CliError, one_line

if TYPE_CHECKING:
    from matrix_leave_forget.config import LeaveForgetConfig

MODULE_NAME = "matrix_leave_forget.LeaveForgetModule"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML file and where, in one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return one_line(str(exc))


def _config_files(paths: Sequence[str]) -> list[str]:
    """Expand ``-c`` arguments the way Synapse does: a directory means its *.yaml files.

    Args:
        paths: The ``-c`` arguments, in order.

    Returns:
        The files to read, in the order their keys apply.

    Raises:
        CliError: if the arguments name no file at all.
    """
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(
                os.path.join(path, name)
                for name in sorted(os.listdir(path))
                if name.endswith(".yaml") and os.path.isfile(os.path.join(path, name))
            )
        else:
            files.append(path)
    if not files:
        raise CliError(f"no config files found in {', '.join(paths)}")
    return files


@attr.s(frozen=True, auto_attribs=True)
class HomeserverConfig:
    """The parts of ``homeserver.yaml`` the CLI reads.

    Attributes:
        sources: The files it was read from, for messages.
        values: Their top-level keys, later files overriding earlier ones (as Synapse).
        config_dir: Where Synapse looks for files that have no explicit path
            (the default signing key): the directory of the last file.
    """

    sources: Sequence[str]
    values: Mapping[str, Any]
    config_dir: str

    @property
    def server_name(self) -> str:
        """The homeserver's name: the origin audit entries are signed as.

        Raises:
            CliError: if the config has none.
        """
        name = self.values.get("server_name")
        if not isinstance(name, str) or not name:
            raise CliError(f"{self.sources[-1]}: server_name is missing")
        return name


def load_config(paths: Sequence[str]) -> HomeserverConfig:
    """Read and merge the homeserver config files.

    Args:
        paths: The ``-c`` arguments (files, or directories of *.yaml files).

    Returns:
        The merged config.

    Raises:
        CliError: a file is missing, unreadable, not YAML or not a mapping.
    """
    files = _config_files(paths)
    values: dict[str, Any] = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except OSError as exc:
            raise CliError(f"cannot read config {path}: {exc.strerror or exc}")
        except yaml.YAMLError as exc:
            raise CliError(f"{path} is not valid YAML: {_yaml_problem(exc)}")
        except UnicodeDecodeError as exc:
            raise CliError(f"{path} is not UTF-8 text: {exc.reason}")
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise CliError(f"{path} must hold a YAML mapping (homeserver.yaml)")
        values.update(loaded)
    return HomeserverConfig(
        sources=files, values=values, config_dir=os.path.dirname(os.path.abspath(files[-1]))
    )


def database_settings(config: HomeserverConfig) -> tuple[str, dict[str, Any]]:
    """The driver name and connection args of the database holding Synapse's main store.

    Synapse's own config section decides (``database``, ``databases`` with
    ``data_stores``, ``database_path``), so the CLI reads the database Synapse uses.

    Args:
        config: The homeserver config.

    Returns:
        The driver name (``sqlite3`` or ``psycopg2``) and its connection args.

    Raises:
        CliError: if no database is configured or Synapse would refuse the settings.
    """
    where = config.sources[-1]
    try:
        found = main_database_from_config(dict(config.values))
    except ConfigError as exc:
        raise CliError(f"{where}: {_config_error(exc)}")
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        # Synapse's reader assumes the right shapes (a mapping per database).
        raise CliError(f"{where}: the database settings are malformed ({one_line(str(exc))})")
    if found is None:
        raise CliError(f"{where}: no database is configured")
    return found


def server_verify_keys(config: HomeserverConfig) -> dict[str, VerifyKey]:
    """The homeserver's verify keys: its signing keys' public halves and ``old_signing_keys``.

    Old keys matter after a key rotation: entries written before it carry
    signatures by the old key. Synapse's own key config reads them, so the
    files and the default path are the ones Synapse uses.

    Args:
        config: The homeserver config.

    Returns:
        Verify keys by key id (``ed25519:<version>``).

    Raises:
        CliError: if the key file is missing or unparseable.
    """
    values = dict(config.values)
    values.setdefault("server_name", config.server_name)
    path = signing_key_path(values, config.config_dir)
    hint = (
        "; or verify with the server's public key instead: --verify-key "
        f"'ed25519:<version> <base64>' (as https://{config.server_name}/_matrix/key/v2/server "
        "publishes it)"
    )
    if path is not None:
        cause = _unreadable(path)
        if cause is not None:
            fix = (
                "run as the user Synapse runs as, or grant read access"
                if "permission" in cause
                else "check signing_key_path in homeserver.yaml"
            )
            raise CliError(f"cannot read signing key {path}: {cause} ({fix}{hint})")
    where = path or "signing_key"
    try:
        _, signing_keys, old = signing_keys_from_config(values, config.config_dir)
    except Exception as exc:  # the file is readable (checked above): its content is not
        cause = _config_error(exc) if isinstance(exc, ConfigError) else one_line(str(exc))
        raise CliError(
            f"cannot parse signing key {where}: {cause} (is it the file Synapse uses, one "
            f"'ed25519 <version> <base64>' line per key?{hint})"
        )
    keys: dict[str, VerifyKey] = {verify_key_id(k): get_verify_key(k) for k in signing_keys}
    for key_id, key in old.items():
        keys.setdefault(key_id, key)
    return keys


def _unreadable(path: str) -> str | None:
    """Why the file at ``path`` cannot be read (missing, a directory, no permission), or None."""
    if not os.path.lexists(path):
        return "no such file"
    if os.path.isdir(path):
        return "is a directory"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def server_key_expiry(config: HomeserverConfig) -> dict[str, int]:
    """When each of ``old_signing_keys`` expired (``expired_ts``, ms), by key id.

    A key signs no audit entry or checkpoint from that time on (docs/audit.md,
    "Keys and their expiry").

    Raises:
        CliError: if ``old_signing_keys`` does not parse.
    """
    try:
        return parse_old_signing_keys(config.values.get("old_signing_keys"))[1]
    except ValueError as exc:
        raise CliError(one_line(str(exc)))


def _config_error(exc: ConfigError) -> str:
    """A Synapse ConfigError in one line, with the key it names."""
    path = ".".join(str(p) for p in (getattr(exc, "path", None) or ()))
    return one_line(f"{path}: {exc.msg}" if path else exc.msg)


def configured_holds(config: HomeserverConfig) -> frozenset[str]:
    """Rooms held by the module's config (``retention.holds``); the admin API lists them too.

    Args:
        config: The homeserver config.

    Returns:
        The configured holds (empty if the module is not configured there).

    Raises:
        CliError: if the module's config is one the module itself would reject.
    """
    return module_config(config).retention.holds


def module_config(config: HomeserverConfig) -> "LeaveForgetConfig":
    """The module's config as the module parses it (its defaults if it is not configured).

    Raises:
        CliError: if the module's config is one the module itself would reject.
    """
    from matrix_leave_forget.config import parse_config

    modules = config.values.get("modules") or []
    if not isinstance(modules, list):
        raise CliError("modules must be a list")
    for module in modules:
        if isinstance(module, dict) and module.get("module") == MODULE_NAME:
            try:
                return parse_config(module.get("config"))
            except ConfigError as exc:
                path = ".".join(getattr(exc, "path", None) or ())
                raise CliError(f"module config {path}: {exc.msg}")
    return parse_config(None)
