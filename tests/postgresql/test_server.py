"""The PostgreSQL test harness itself (tests/pgserver.py and this directory's conftest.py), on real servers."""

import os
import socket

import pytest
from pgserver import PostgresServer, find_binaries, process_state

_databases_seen = set()


def query(url, statement, **parameters):
    """Run one statement in its own connection (none is kept across a restart); the rows, if it returns any."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            result = connection.execute(sqlalchemy.text(statement), parameters)
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def own_server(postgres_server):
    """A cluster of this module's own, which its tests restart and kill (never the session's shared one).

    With MAILSPOOL_TEST_POSTGRESQL_URL, the shared server itself: its
    restart() and kill() raise NotImplementedError, and the tests skip.
    """
    if postgres_server.external:
        yield postgres_server
        return
    with PostgresServer() as server:
        yield server


def skip_if_external(server):
    if server.external:
        pytest.skip("needs a throwaway server, not the shared one of MAILSPOOL_TEST_POSTGRESQL_URL")


def test_the_server_answers(pg_engine):
    import sqlalchemy

    with pg_engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("select 1")).scalar() == 1
        assert connection.execute(sqlalchemy.text("show server_encoding")).scalar() == "UTF8"


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_new_empty_database_dropped_after_it(postgres_url, run):
    name = query(postgres_url, "select current_database()")[0][0]
    assert name not in _databases_seen
    existing = {row[0] for row in query(postgres_url, "select datname from pg_database")}
    assert not existing & _databases_seen  # the databases of the tests before were dropped
    _databases_seen.add(name)
    assert query(postgres_url, "select count(*) from pg_tables where schemaname = 'public'") == [(0,)]
    query(postgres_url, "create table left_behind (n int)")


def test_a_restart_keeps_committed_data_and_the_port(own_server):
    url = own_server.url()
    query(url, "create table before_restart (n int)")
    query(url, "insert into before_restart values (1), (2)")
    port = own_server.port
    try:
        own_server.restart()
    except NotImplementedError as exc:
        pytest.skip(str(exc))

    assert own_server.port == port
    assert query(url, "select n from before_restart order by n") == [(1,), (2,)]


def test_after_a_kill_start_recovers_committed_data_and_no_process_is_left(own_server):
    import psycopg
    import sqlalchemy

    skip_if_external(own_server)
    url = own_server.url()
    query(url, "create table before_kill (n int)")
    query(url, "insert into before_kill values (7)")
    with open(os.path.join(own_server.data, "postmaster.pid")) as pidfile:
        postmaster = int(pidfile.readline())
    engine = sqlalchemy.create_engine(url)
    connection = engine.connect()
    try:
        backend = connection.execute(sqlalchemy.text("select pg_backend_pid()")).scalar()
        own_server.kill()

        for pid in (postmaster, backend):
            assert process_state(pid) in (None, "Z")  # gone, or a zombie waiting for init
        with pytest.raises(sqlalchemy.exc.OperationalError):
            connection.execute(sqlalchemy.text("select 1"))
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host=own_server.host, port=own_server.port, user="mailspool", connect_timeout=10)
    finally:
        connection.invalidate()
        connection.close()
        engine.dispose()
    own_server.start()

    assert query(url, "select n from before_kill") == [(7,)]


def test_a_server_that_cannot_start_says_why_with_its_log(own_server):
    skip_if_external(own_server)
    own_server.stop()
    with socket.socket() as squatter:  # takes the server's port while it is down
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((own_server.host, own_server.port))
        squatter.listen()
        with pytest.raises(RuntimeError) as failure:
            own_server.start()
    assert "could not bind" in str(failure.value)  # from the server's log
    assert not own_server.running

    own_server.start()
    assert query(own_server.url(), "select 1") == [(1,)]


def test_cleanup_stops_the_server_and_removes_its_directory(postgres_server):
    if not find_binaries():
        pytest.skip("PostgreSQL server programs not found (the shared server is MAILSPOOL_TEST_POSTGRESQL_URL's)")
    with PostgresServer() as server:
        directory = server.directory
        with open(os.path.join(server.data, "postmaster.pid")) as pidfile:
            postmaster = int(pidfile.readline())
        assert query(server.url(), "select current_user") == [("mailspool",)]

    assert process_state(postmaster) is None  # stopped and reaped, not even a zombie
    assert not os.path.exists(directory)


def test_find_binaries_takes_the_directory_mailspool_pg_bindir_names_and_only_it(monkeypatch, tmp_path):
    monkeypatch.delenv("MAILSPOOL_PG_BINDIR", raising=False)
    found = find_binaries()
    if found is None:
        pytest.skip("PostgreSQL server programs not found")
    assert all(os.access(os.path.join(found, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))

    monkeypatch.setenv("MAILSPOOL_PG_BINDIR", found)
    assert PostgresServer.find_binaries() == found
    monkeypatch.setenv("MAILSPOOL_PG_BINDIR", str(tmp_path))
    assert PostgresServer.find_binaries() is None
