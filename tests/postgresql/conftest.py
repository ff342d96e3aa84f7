"""A real PostgreSQL server for these tests (tests/pgserver.py), and a fresh database per test.

Fixtures:

- ``postgres_server`` (one per session): a throwaway cluster started for the
  session and removed after it, or the existing server that
  ``MAILSPOOL_TEST_POSTGRESQL_URL`` names (any database URL on it; databases
  are created and dropped there, the server is never stopped).
- ``postgres_url``: the SQLAlchemy URL of a new, empty database of this
  test's own, dropped after the test.
- ``pg_engine``: an SQLAlchemy engine on that database, disposed after the test.

Without PostgreSQL's server programs (found through ``MAILSPOOL_PG_BINDIR``,
``pg_config``, /usr/lib/postgresql or PATH), or without the ``postgresql``
extra, these tests are skipped with the reason, unless
``MAILSPOOL_REQUIRE_POSTGRESQL=1`` (.ci/run sets it: PostgreSQL is
installed on the CI machines), which turns the skip into a failure. A
server that is found but fails to start is an error, with its log.
"""

import itertools
import os

import pytest
from pgserver import PostgresServer

_database_numbers = itertools.count()


def _unavailable(reason):
    """Skip the test, or fail it when MAILSPOOL_REQUIRE_POSTGRESQL=1 says these tests must run."""
    if os.environ.get("MAILSPOOL_REQUIRE_POSTGRESQL") == "1":
        pytest.fail(f"{reason} (MAILSPOOL_REQUIRE_POSTGRESQL=1: these tests must run, not skip)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (a PostgresServer): throwaway, or MAILSPOOL_TEST_POSTGRESQL_URL's."""
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
    if PostgresServer.find_binaries() is None:
        where = os.environ.get("MAILSPOOL_PG_BINDIR")
        _unavailable("PostgreSQL server programs (initdb, pg_ctl) not found: "
                     + (f"not in MAILSPOOL_PG_BINDIR={where}" if where else
                        "install PostgreSQL, or set MAILSPOOL_PG_BINDIR to their directory")
                     + ", or set MAILSPOOL_TEST_POSTGRESQL_URL to an existing server")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def postgres_url(postgres_server):
    """The URL of a new empty database (unique name), dropped after the test."""
    name = f"t_{os.getpid()}_{next(_database_numbers)}"
    postgres_server.create_database(name)
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture
def pg_engine(postgres_url):
    """An SQLAlchemy engine on ``postgres_url``'s database, disposed after the test."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    yield engine
    engine.dispose()
