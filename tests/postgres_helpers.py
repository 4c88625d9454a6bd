"""The local PostgreSQL the integration tests use: 127.0.0.1:5432, user ``postgres``, trust
auth (``.ci/run`` starts it). If it is not reachable the tests that need it *fail* with a
message saying so: a skipped test would hide a broken deployment path."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def pg_admin(needed_by: str):
    """An autocommit connection to the ``postgres`` database, or a test failure naming ``needed_by``."""
    import psycopg2

    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=5, **PG)
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {PG['host']}:{PG['port']} as user {PG['user']} ({exc}). "
            f"{needed_by} needs it: start it (`.ci/run` does, or `pg_ctlcluster <version> main start`).",
            pytrace=False,
        )
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def fresh_database(needed_by: str, driver: str = "postgresql") -> Iterator[str]:
    """A new, empty database ``keyart_test_<random>``, dropped afterwards; yields its URI
    (``driver`` is the URI's scheme, e.g. ``postgresql+psycopg2``)."""
    name = f"keyart_test_{secrets.token_hex(4)}"
    conn = pg_admin(needed_by)
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{driver}://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
