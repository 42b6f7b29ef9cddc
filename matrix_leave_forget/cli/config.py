"""Reading homeserver.yaml: the database settings, the signing keys, the module's holds."""

import os
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import attr
import yaml
from signedjson.key import decode_verify_key_bytes, get_verify_key, read_signing_keys
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64

from matrix_leave_forget.audit import verify_key_id
from matrix_leave_forget.cli.errors import CliError, _one_line

MODULE_NAME = "matrix_leave_forget.LeaveForgetModule"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML file and where, in one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return _one_line(str(exc))


def _config_files(paths: Sequence[str]) -> List[str]:
    """Expand ``-c`` arguments the way Synapse does: a directory means its *.yaml files.

    Args:
        paths: The ``-c`` arguments, in order.

    Returns:
        The files to read, in the order their keys apply.

    Raises:
        CliError: if the arguments name no file at all.
    """
    files: List[str] = []
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
    values: Dict[str, Any] = {}
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


def _mapping(value: Any, what: str) -> Dict[str, Any]:
    """value as a mapping (None as an empty one), or a CliError naming ``what``."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CliError(f"{what} must be a mapping")
    return value


def database_settings(config: HomeserverConfig) -> Tuple[str, Dict[str, Any]]:
    """The driver name and connection args of the database holding Synapse's main store.

    Follows Synapse's rules: ``database``, else ``databases`` (the entry whose
    ``data_stores`` include ``main``), else the legacy ``database_path``.

    Args:
        config: The homeserver config.

    Returns:
        The driver name (``sqlite3``, ``psycopg2``…) and its connection args.

    Raises:
        CliError: if no database is configured or the section is malformed.
    """
    where = config.sources[-1]
    values = config.values
    section: Optional[Dict[str, Any]] = None
    if values.get("databases"):
        for label, candidate in _mapping(values["databases"], f"{where}: databases").items():
            candidate = _mapping(candidate, f"{where}: databases.{label}")
            if "main" in (candidate.get("data_stores") or ["main", "state"]):
                section = candidate
                break
        if section is None:
            raise CliError(f"{where}: no entry of 'databases' holds the main data store")
    elif values.get("database"):
        section = _mapping(values["database"], f"{where}: database")
    elif values.get("database_path"):
        section = {"name": "sqlite3", "args": {"database": values["database_path"]}}
    else:
        raise CliError(f"{where}: no database is configured")
    name = section.get("name", "sqlite3")
    args = dict(_mapping(section.get("args"), f"{where}: database.args"))
    return str(name), args


def server_verify_keys(config: HomeserverConfig) -> Dict[str, VerifyKey]:
    """The homeserver's verify keys: its signing keys' public halves and ``old_signing_keys``.

    Old keys matter after a key rotation: entries written before it carry
    signatures by the old key. Paths are found as Synapse finds them.

    Args:
        config: The homeserver config.

    Returns:
        Verify keys by key id (``ed25519:<version>``).

    Raises:
        CliError: if the key file is missing or unparseable.
    """
    values = config.values
    if "signing_key" in values:
        lines = [str(values["signing_key"])]
        where = "signing_key"
    else:
        path = values.get("signing_key_path") or os.path.join(
            config.config_dir, f"{config.server_name}.signing.key"
        )
        path = os.path.abspath(str(path))
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line for line in f.read().splitlines() if line.strip()]
        except OSError as exc:
            raise CliError(f"cannot read signing key {path}: {exc.strerror or exc}")
    try:
        signing_keys = read_signing_keys(lines)
    except Exception as exc:
        raise CliError(f"cannot parse signing key {where}: {_one_line(str(exc))}")
    if not signing_keys:
        raise CliError(f"no signing key in {where}")
    keys: Dict[str, VerifyKey] = {verify_key_id(k): get_verify_key(k) for k in signing_keys}
    old = _mapping(values.get("old_signing_keys"), "old_signing_keys")
    for key_id, data in old.items():
        try:
            keys.setdefault(key_id, decode_verify_key_bytes(key_id, decode_base64(data["key"])))
        except Exception as exc:
            raise CliError(f"old_signing_keys: cannot parse {key_id}: {_one_line(str(exc))}")
    return keys


def configured_holds(config: HomeserverConfig) -> FrozenSet[str]:
    """Rooms held by the module's config (``retention.holds``); the admin API lists them too.

    Args:
        config: The homeserver config.

    Returns:
        The configured holds (empty if the module is not configured there).

    Raises:
        CliError: if the module's config is one the module itself would reject.
    """
    from synapse.module_api.errors import ConfigError

    from matrix_leave_forget.config import parse_config

    modules = config.values.get("modules") or []
    if not isinstance(modules, list):
        raise CliError("modules must be a list")
    for module in modules:
        if isinstance(module, dict) and module.get("module") == MODULE_NAME:
            try:
                return parse_config(module.get("config")).retention.holds
            except ConfigError as exc:
                path = ".".join(getattr(exc, "path", None) or ())
                raise CliError(f"module config {path}: {exc.msg}")
    return frozenset()
