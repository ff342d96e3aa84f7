"""A real PostgreSQL server for these tests (tests/pgserver.py), and a fresh database per test.

Fixtures: ``postgres_server`` (one per session: a throwaway cluster, or the
server of ``MAILSPOOL_TEST_POSTGRESQL_URL`` when set), ``postgres_url`` (a
new database, dropped after the test) and ``pg_engine`` (an SQLAlchemy
engine on it, disposed after the test).

Without PostgreSQL's server programs, or without the ``postgresql`` extra,
the tests are skipped with the reason, unless ``MAILSPOOL_REQUIRE_POSTGRESQL=1``
(.ci/run sets it: PostgreSQL is installed on the CI machines), which turns
the skip into a failure.
"""

import itertools
import os

import pytest
from pgserver import PostgresServer, find_binaries

_database_numbers = itertools.count()


def _unavailable(reason):
    if os.environ.get("MAILSPOOL_REQUIRE_POSTGRESQL") == "1":
        pytest.fail(f"{reason} (MAILSPOOL_REQUIRE_POSTGRESQL=1 requires these tests to run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    try:
        import psycopg  # noqa: F401
        import sqlalchemy  # noqa: F401
        import zope.sqlalchemy  # noqa: F401
    except ImportError as exc:
        _unavailable(f"the postgresql extra is not installed ({exc}): pip install -e '.[postgresql]'")
    url = os.environ.get("MAILSPOOL_TEST_POSTGRESQL_URL")
    if url:
        yield PostgresServer.from_url(url)
        return
    if find_binaries() is None:
        _unavailable("PostgreSQL server programs (initdb, pg_ctl) not found; set MAILSPOOL_PG_BINDIR "
                     "or MAILSPOOL_TEST_POSTGRESQL_URL")
    server = PostgresServer()
    try:
        server.start()
    except RuntimeError as exc:
        server.cleanup()
        _unavailable(f"cannot start a throwaway PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server):
    name = f"mailspool_test_{os.getpid()}_{next(_database_numbers)}"
    postgres_server.create_database(name)
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture
def pg_engine(postgres_url):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    yield engine
    engine.dispose()
