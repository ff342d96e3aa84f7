"""A throwaway PostgreSQL server for the tests and bench/: initdb + pg_ctl in a temporary directory.

``PostgresServer().start()`` makes a cluster on a free loopback port with a
private socket directory (trust authentication, user ``mailspool``), and
``cleanup()`` stops it and removes everything. As root, the server runs as
the ``postgres`` system user (PostgreSQL refuses to run as root), through
``runuser``. ``PostgresServer.from_url(url)`` wraps an existing server
instead (``MAILSPOOL_TEST_POSTGRESQL_URL``): databases are made and dropped
there, but it is never stopped, restarted or killed.

Every wait is bounded (``TIMEOUT`` seconds per command). No pytest here:
bench/ imports this module too.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile

TIMEOUT = 120
USER = "mailspool"


def find_binaries():
    """The directory holding initdb, pg_ctl and postgres, or None."""
    candidates = [os.environ.get("MAILSPOOL_PG_BINDIR")]
    if shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             timeout=30, check=True).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda path: int(path.split("/")[-2]),
                         reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))
    for directory in candidates:
        if directory and all(os.access(os.path.join(directory, name), os.X_OK)
                             for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    return None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One throwaway cluster (see the module docstring). Raises RuntimeError, with the log, if it cannot start."""

    def __init__(self, bindir=None):
        self.bindir = bindir or find_binaries()
        self.host = "127.0.0.1"
        self.port = None
        self.directory = None
        self._external_url = None
        self.running = False

    @classmethod
    def from_url(cls, url):
        """An existing server, reached through ``url`` (any database on it); never started or stopped here."""
        import sqlalchemy

        server = cls(bindir="")
        parsed = sqlalchemy.engine.make_url(url)
        server._external_url = parsed
        server.host, server.port = parsed.host, parsed.port or 5432
        return server

    # -- life cycle -------------------------------------------------------------------------

    def _as_server_user(self):
        """The command prefix that runs PostgreSQL's programs as a user it accepts."""
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root, and there is no 'postgres' user to run PostgreSQL as") from None
        if not shutil.which("runuser"):
            raise RuntimeError("running as root, and runuser is missing to run PostgreSQL as 'postgres'")
        return ["runuser", "-u", "postgres", "--"]

    def _run(self, *command):
        result = subprocess.run([*self._as_server_user(), *command], capture_output=True, text=True,
                                timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed ({result.returncode}): {result.stderr.strip()}\n"
                               f"{self.log_tail()}")
        return result

    def start(self):
        """Create the cluster (first time) and start it on its port; idempotent while running."""
        if self._external_url is not None or self.running:
            return self
        if not self.bindir:
            raise RuntimeError("PostgreSQL server programs (initdb, pg_ctl, postgres) not found")
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="mailspool-pg-")
            if os.geteuid() == 0:
                account = pwd.getpwnam("postgres")
                os.chown(self.directory, account.pw_uid, account.pw_gid)
            self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", USER, "--auth=trust",
                      "-E", "UTF8", "--no-locale", "--no-sync")
            self.port = free_port()
        options = (f"-c listen_addresses={self.host} -p {self.port} -k {self.directory} "
                   "-c max_connections=100 -c fsync=on")
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", self.log, "-w", "-t", "60",
                  "-o", options, "start")
        self.running = True
        return self

    def stop(self, mode="fast"):
        """Stop the server (``fast``: roll back open transactions, close connections)."""
        if self._external_url is not None:
            raise NotImplementedError("an external server (MAILSPOOL_TEST_POSTGRESQL_URL) is not stopped by tests")
        if self.running:
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def restart(self):
        """Stop and start again, same port and data."""
        self.stop()
        self.start()

    def kill(self):
        """SIGKILL the postmaster (a crash); ``start()`` recovers the cluster afterwards."""
        if self._external_url is not None:
            raise NotImplementedError("an external server (MAILSPOOL_TEST_POSTGRESQL_URL) is not killed by tests")
        with open(os.path.join(self.data, "postmaster.pid")) as pidfile:
            os.kill(int(pidfile.readline()), signal.SIGKILL)
        self.running = False

    def cleanup(self):
        """Stop the server if running and remove its directory. Never raises."""
        if self._external_url is not None:
            return
        try:
            self.stop("immediate")
        except Exception:
            pass
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.cleanup()

    # -- databases --------------------------------------------------------------------------

    @property
    def data(self):
        return os.path.join(self.directory, "data")

    @property
    def log(self):
        return os.path.join(self.directory, "server.log")

    def log_tail(self, lines=20):
        try:
            with open(self.log, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except (OSError, TypeError):
            return "(no server log)"

    def url(self, dbname="postgres"):
        """The SQLAlchemy URL of ``dbname`` on this server (psycopg 3)."""
        if self._external_url is not None:
            return self._external_url.set(drivername="postgresql+psycopg", database=dbname).render_as_string(
                hide_password=False)
        return f"postgresql+psycopg://{USER}@{self.host}:{self.port}/{dbname}"

    def _admin(self, statement):
        import psycopg

        url = self._external_url
        with psycopg.connect(host=self.host, port=self.port, user=url.username if url else USER,
                             password=url.password if url else None, dbname="postgres", autocommit=True,
                             connect_timeout=30) as connection:
            connection.execute(statement)

    def create_database(self, name):
        self._admin(f'CREATE DATABASE "{name}"')

    def drop_database(self, name):
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
