"""Copies of a stopped test server's database with rows edited, to show that verify catches it."""

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from tests.support.harness import drop_pg_database
from tests.support.rawdb import pg_connection

# One tampering: SQL statements with ``?`` placeholders and their arguments.
Tampering = Sequence[tuple[str, Sequence[Any]]]


def tampered_config(hs: Any, tampering: Tampering, add_cleanup: Callable[..., Any]) -> str:
    """A homeserver.yaml pointing at a fresh copy of the database with ``tampering`` applied."""
    workdir = tempfile.mkdtemp(prefix="mlf-cli-tamper-")
    add_cleanup(shutil.rmtree, workdir, ignore_errors=True)
    with open(hs.config_path) as f:
        config = yaml.safe_load(f)
    if hs.database == "sqlite":
        copy = os.path.join(workdir, "homeserver.db")
        # The backup API, not a file copy: it includes what is still in
        # the WAL file of the stopped server.
        source = sqlite3.connect(
            f"file:{os.path.join(hs.workdir, 'homeserver.db')}?mode=ro", uri=True
        )
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
            for sql, args in tampering:
                target.execute(sql, tuple(args))
            target.commit()
        finally:
            source.close()
            target.close()
        config["database"]["args"]["database"] = copy
    else:
        copy = _copy_pg_database(hs, add_cleanup)
        conn = pg_connection(copy)
        try:
            with conn.cursor() as cur:
                for sql, args in tampering:
                    cur.execute(sql.replace("?", "%s"), tuple(args))
            conn.commit()
        finally:
            conn.close()
        config["database"]["args"]["database"] = copy
    path = os.path.join(workdir, "homeserver.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def _copy_pg_database(hs: Any, add_cleanup: Callable[..., Any]) -> str:
    assert hs.pg_database is not None
    copy = hs.pg_database + "_t" + os.urandom(3).hex()
    conn = pg_connection("postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            # TEMPLATE needs the source idle: Synapse is stopped.
            cur.execute(f"CREATE DATABASE {copy} TEMPLATE {hs.pg_database}")
    finally:
        conn.close()
    add_cleanup(drop_pg_database, copy)
    return copy
