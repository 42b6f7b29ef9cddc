"""A stand-in for Synapse's LoggingTransaction over a DB-API cursor; PostgreSQL or skip."""

import os
from collections.abc import Sequence
from typing import Any

from twisted.trial.unittest import SkipTest


class _Engine:
    def __init__(self, module: Any) -> None:
        self.module = module


class Txn:
    """Just enough of Synapse's LoggingTransaction for run_migrations."""

    def __init__(self, cursor: Any, module: Any, paramstyle: str = "?") -> None:
        self._cursor = cursor
        self.database_engine = _Engine(module)
        self._paramstyle = paramstyle
        self.statements: list[str] = []

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.statements.append(sql)
        if self._paramstyle != "?":
            sql = sql.replace("?", self._paramstyle)
        self._cursor.execute(sql, tuple(args))

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> Any:
        return self._cursor.fetchall()


def postgres_or_skip() -> Any:
    if os.environ.get("MLF_TEST_DATABASE") != "postgres":
        raise SkipTest(
            "PostgreSQL migration tests need MLF_TEST_DATABASE=postgres "
            "(and a server named by the PG* variables)"
        )
    try:
        import psycopg2
    except ImportError:
        raise SkipTest("psycopg2 is not installed")
    return psycopg2
