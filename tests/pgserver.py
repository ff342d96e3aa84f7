"""A throwaway PostgreSQL server for the tests and bench/: initdb + pg_ctl in a temporary directory.

``PostgresServer().start()`` makes a cluster in a new temporary directory
(trust authentication, superuser ``mailspool``, a database ``mailspool``),
listening on a free port of 127.0.0.1 and on a socket in that directory, and
``cleanup()`` stops it and removes everything. ``restart()`` and ``kill()``
serve the tests that need PostgreSQL to go away under a running daemon.

As root, PostgreSQL's programs run as the ``postgres`` system user
(PostgreSQL refuses to run as root), through ``runuser`` when there is one.

``PostgresServer.from_url(url)`` wraps an existing server instead (what
``MAILSPOOL_TEST_POSTGRESQL_URL`` names): databases are made and dropped
there, but it is never stopped, restarted or killed.

Every wait is bounded: ``TIMEOUT`` seconds per command at most. No pytest
here: bench/ imports this module too.
"""

import atexit
import glob
import grp
import os
import pwd
import random
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

TIMEOUT = 120
"""The most any one command (initdb, pg_ctl) may take, in seconds."""

PG_CTL_WAIT = 60
"""How long pg_ctl waits for the server to start or stop (``pg_ctl -t``), in seconds."""

USER = "mailspool"
"""The cluster's superuser, and the database created with the cluster."""

SERVER_ACCOUNT = "postgres"
"""The system user PostgreSQL runs as when the tests run as root."""

PROGRAMS = ("initdb", "pg_ctl", "postgres")

_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes, with the terminating NUL


def find_binaries():
    """The directory holding initdb, pg_ctl and postgres, or None.

    ``MAILSPOOL_PG_BINDIR`` when set (and then only it: a directory chosen
    on purpose is not silently replaced by another version); otherwise the
    first of ``pg_config --bindir``, ``/usr/lib/postgresql/<highest>/bin``
    and the directory of ``initdb`` on PATH that holds all three programs.
    """
    chosen = os.environ.get("MAILSPOOL_PG_BINDIR")
    if chosen:
        return chosen if _holds_programs(chosen) else None
    candidates = []
    if shutil.which("pg_config"):
        try:
            candidates.append(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                             stdin=subprocess.DEVNULL, timeout=30, check=True).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates += [os.path.dirname(initdb), os.path.dirname(os.path.realpath(initdb))]
    return next((directory for directory in candidates if directory and _holds_programs(directory)), None)


def _holds_programs(directory):
    return all(os.access(os.path.join(directory, name), os.X_OK) for name in PROGRAMS)


def _version_key(bindir):
    """``/usr/lib/postgresql/15/bin`` -> (15,); a name that is not a version sorts first."""
    try:
        return tuple(int(part) for part in bindir.split("/")[-2].split("."))
    except ValueError:
        return ()


def free_port(host="127.0.0.1"):
    """A TCP port of ``host`` that nobody uses at the moment.

    Taken below the kernel's ephemeral range when possible: a port from
    that range (what binding port 0 gives) may become the local port of
    some outgoing connection while the server is stopped, and ``restart()``
    must find its port free again.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            ephemeral_low = int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    candidates = random.sample(range(20000, ephemeral_low), 20) if ephemeral_low > 21000 else []
    for port in [*candidates, 0]:
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RuntimeError(f"no free TCP port on {host}")


# -- processes ----------------------------------------------------------------------------------

def process_state(pid):
    """The state letter of process ``pid`` (from /proc): ``Z`` for a zombie (exited, not yet reaped),
    ``?`` when it exists but /proc cannot tell; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
        return text[text.rindex(")") + 2]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


def _is_running(pid):
    """True while ``pid`` exists and is not a zombie (a zombie holds no memory, no socket, no lock)."""
    return process_state(pid) not in (None, "Z", "X")


def _children(pid):
    """The processes whose parent is ``pid`` (Linux: from /proc; elsewhere none are known)."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
            if int(text[text.rindex(")") + 2:].split()[1]) == pid:
                children.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return children


def _wait_until(condition, timeout):
    """Poll ``condition`` until true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _read_to_end(stream, timeout):
    """All bytes of ``stream`` (a pipe) up to end of file, or None if that takes over ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    chunks = []
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if selector.select(remaining):
                chunk = os.read(stream.fileno(), 65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)


def parent_main(arguments):
    """``python pgserver.py --parent UID GID COMMAND...``: run COMMAND (pg_ctl start), then stay the server's parent.

    pg_ctl exits once the server is up, leaving the postmaster an orphan,
    which the kernel hands to the nearest "child subreaper" above it, or to
    process 1. Process 1 may reap it late (seconds: its pid, still taken,
    stops a new postmaster from starting over the killed one's pid file)
    or never (a container's process 1 that is not an init). This process
    declares itself a subreaper (Linux), so it adopts the postmaster, and,
    if the postmaster is killed, its children; it reaps them as they exit,
    and exits when none is left. COMMAND's output, then a line with its
    exit status, go to stdout, which is closed once COMMAND exits. UID and
    GID (or two empty strings) are the user to run COMMAND as.
    """
    import ctypes

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the tests, whose teardown stops the server
    try:
        adopts = ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        adopts = False
    uid, gid, *command = arguments
    switch = {"user": int(uid), "group": int(gid), "extra_groups": []} if uid else {}
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            **switch)
    sys.stdout.buffer.write(result.stdout + b"\n%d" % result.returncode)
    sys.stdout.buffer.flush()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    while adopts:
        try:
            os.wait()
        except ChildProcessError:
            break


def _traversable_by(path, account):
    """Whether ``account`` (a pwd entry) may enter ``path`` and every directory above it."""
    groups = {account.pw_gid} | {group.gr_gid for group in grp.getgrall() if account.pw_name in group.gr_mem}
    path = os.path.realpath(path)
    while True:
        status = os.stat(path)
        if status.st_uid == account.pw_uid:
            allowed = status.st_mode & 0o100
        elif status.st_gid in groups:
            allowed = status.st_mode & 0o010
        else:
            allowed = status.st_mode & 0o001
        if not allowed:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


class PostgresServer:
    """One throwaway cluster, or an existing server (``from_url``); see the module docstring.

    ``start()`` raises RuntimeError, with the end of the server's log, when
    the server cannot start; ``stop()``, ``restart()`` and ``kill()`` raise
    NotImplementedError for an existing server. ``host`` and ``port`` say
    where the server listens (``port`` is chosen by the first ``start()``
    and kept by every later one). ``bindir`` is ``""`` for an existing
    server, None when no PostgreSQL programs were found.
    """

    def __init__(self, bindir=None):
        self.bindir = bindir if bindir is not None else find_binaries()
        self.host = "127.0.0.1"
        self.port = None
        self.directory = None
        self.running = False
        self._external_url = None
        self._killed = False
        self._dead = []  # pids of killed processes, waited for (until reaped) by cleanup()
        self._parents = []  # the parent_main processes of this server's postmasters (subprocess.Popen)
        self._database_created = False  # the database USER, made by the first start

    find_binaries = staticmethod(find_binaries)

    @classmethod
    def from_url(cls, url):
        """An existing server, reached through ``url`` (any database on it); never started or stopped here."""
        import sqlalchemy

        server = cls(bindir="")
        server._external_url = sqlalchemy.engine.make_url(url)
        server.host, server.port = server._external_url.host, server._external_url.port or 5432
        return server

    @property
    def external(self):
        """True for a server of ``from_url``, which the tests share and must not stop."""
        return self._external_url is not None

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        """Create the cluster (first call) and start it; returns self. A no-op while running, or for ``from_url``.

        The first start picks a free port (another one if that port is
        taken by the time the server binds it); later starts (``restart()``,
        or after ``kill()``) reuse port and data directory.
        """
        if self.external or self.running:
            return self
        if not self.bindir:
            raise RuntimeError(f"PostgreSQL server programs ({', '.join(PROGRAMS)}) not found: "
                               "set MAILSPOOL_PG_BINDIR to the directory that holds them")
        self._server_account()  # as root without a postgres user: fail before making anything
        if self.directory is None:
            self._initialize()
        choose_port = self.port is None
        for attempt in range(3):
            if choose_port:
                self.port = free_port(self.host)
            log_offset = self._log_size()
            try:
                self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", str(PG_CTL_WAIT),
                          "-o", self._server_options(), "start", adopt=True)
                break
            except RuntimeError:
                self._stop_quietly()  # a server that timed out starting may still come up: never leave it
                self._reap_parents(10)
                if not (choose_port and attempt < 2 and "could not bind" in self._log_since(log_offset)):
                    raise
        self.running = True
        self._killed = False
        if not self._database_created:
            self.create_database(USER)
            self._database_created = True
        return self

    def stop(self, mode="fast"):
        """Stop the server and wait until it is gone. ``fast``: roll back and close every connection;
        ``immediate``: exit at once, as in a crash (the next start recovers); ``smart``: wait for clients."""
        if self.external:
            raise NotImplementedError("the server of MAILSPOOL_TEST_POSTGRESQL_URL is shared: tests do not stop it")
        if not self.running:
            return
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", str(PG_CTL_WAIT), "stop")
        self.running = False
        self._reap_parents(10)

    def restart(self):
        """Stop (fast) and start again: same port, same data. Clients see their connections closed."""
        if self.external:
            raise NotImplementedError("the server of MAILSPOOL_TEST_POSTGRESQL_URL is shared: tests cannot restart "
                                      "it; unset the variable to run this test on a throwaway server")
        self.stop()
        self.start()

    def kill(self):
        """SIGKILL the postmaster, as in a crash; ``start()`` then recovers the cluster.

        Returns once the postmaster and its children are gone (they exit when
        they see the postmaster die; any left after 10 seconds is killed
        too), so that the next ``start()`` finds no process holding the data
        directory or its shared memory.
        """
        if self.external:
            raise NotImplementedError("the server of MAILSPOOL_TEST_POSTGRESQL_URL is shared: tests cannot kill "
                                      "it; unset the variable to run this test on a throwaway server")
        pid = self._postmaster_pid()
        if not self.running or pid is None or not _is_running(pid):
            raise RuntimeError("kill(): the server is not running")
        os.kill(pid, signal.SIGSTOP)  # it forks no more children while they are listed
        children = _children(pid)
        os.kill(pid, signal.SIGKILL)
        self.running = False
        self._killed = True
        self._dead += [pid, *children]
        if not _wait_until(lambda: not any(map(_is_running, children)), 10):
            for child in filter(_is_running, children):
                os.kill(child, signal.SIGKILL)
            _wait_until(lambda: not any(map(_is_running, children)), PG_CTL_WAIT)
        # Until the postmaster is reaped (by its parent_main, or else by process 1) its pid is taken, and a
        # new postmaster refuses to start over the pid file that names it.
        self._reap_parents(PG_CTL_WAIT)
        if not _wait_until(lambda: process_state(pid) is None, PG_CTL_WAIT):
            raise RuntimeError(f"the killed postmaster (pid {pid}) was never reaped: this machine's process 1 does "
                               "not reap orphans (in a container, run it with an init, e.g. docker run --init)")

    def cleanup(self):
        """Stop the server if running and remove its directory; waits (a bounded while) until its processes
        are reaped. Never raises. A no-op for ``from_url``."""
        if self.external:
            return
        pid = self._postmaster_pid() if self.directory else None
        try:
            if self.running:
                self.stop("immediate")
            elif self._killed and pid is not None:
                # A killed server leaves shared memory behind (/dev/shm, System V): only PostgreSQL knows which.
                self.start()
                pid = self._postmaster_pid()
                self.stop("immediate")
        except Exception:
            self._stop_quietly()
        if pid is not None:
            self._dead.append(pid)
        self._reap_parents(10)
        for parent in self._parents:  # still waiting for a process that would not exit: orphan it to process 1
            parent.kill()
            parent.wait()
        self._parents = []
        _wait_until(lambda: all(process_state(pid) is None for pid in self._dead), 10)
        self._dead = []
        self.running = False
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self.port = None
            self._database_created = False
        atexit.unregister(self.cleanup)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.cleanup()

    # -- databases --------------------------------------------------------------------------

    def url(self, dbname=USER):
        """The SQLAlchemy URL (psycopg 3) of database ``dbname`` on this server."""
        if self.external:
            return self._external_url.set(drivername="postgresql+psycopg", database=dbname).render_as_string(
                hide_password=False)
        return f"postgresql+psycopg://{USER}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name):
        """Create an empty database ``name`` (from template1)."""
        from psycopg import sql

        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name):
        """Drop database ``name`` if it exists, closing the connections still open to it."""
        from psycopg import sql

        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def _admin(self, statement):
        import psycopg

        if self.external:
            connection = psycopg.connect(self._external_url.set(drivername="postgresql", database="postgres")
                                         .render_as_string(hide_password=False), autocommit=True, connect_timeout=30)
        else:
            connection = psycopg.connect(host=self.host, port=self.port, user=USER, dbname="postgres",
                                         autocommit=True, connect_timeout=30)
        with connection:
            connection.execute(statement)

    # -- files ------------------------------------------------------------------------------

    @property
    def data(self):
        """The cluster's data directory."""
        return os.path.join(self.directory, "data")

    @property
    def log(self):
        """The server's log file (pg_ctl -l)."""
        return os.path.join(self.directory, "server.log")

    def log_tail(self, lines=30):
        """The last ``lines`` lines of the server's log, for error messages."""
        try:
            with open(self.log, errors="replace") as log:
                return "".join(log.readlines()[-lines:]) or "(the server log is empty)"
        except (OSError, TypeError):
            return "(no server log)"

    def _log_size(self):
        try:
            return os.path.getsize(self.log)
        except OSError:
            return 0

    def _log_since(self, offset):
        try:
            with open(self.log, errors="replace") as log:
                log.seek(offset)
                return log.read()
        except OSError:
            return ""

    def _postmaster_pid(self):
        """The pid on postmaster.pid's first line, or None without that file."""
        try:
            with open(os.path.join(self.data, "postmaster.pid")) as pidfile:
                return int(pidfile.readline())
        except (OSError, ValueError):
            return None

    # -- commands ---------------------------------------------------------------------------

    def _server_account(self):
        """The pwd entry of the user PostgreSQL must run as, or None to run it as ourselves (not root)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SERVER_ACCOUNT)
        except KeyError:
            raise RuntimeError(f"running as root, and there is no {SERVER_ACCOUNT!r} system user to run PostgreSQL "
                               "as (it refuses to run as root): create one (useradd --system postgres), or run "
                               "the tests as another user") from None

    def _initialize(self):
        account = self._server_account()
        self.directory = tempfile.mkdtemp(prefix="mailspool-pg-", dir=self._parent_directory(account))
        try:
            if account is not None:
                os.chown(self.directory, account.pw_uid, account.pw_gid)
            self._run("initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale",
                      "--no-sync")
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            raise
        atexit.register(self.cleanup)

    @staticmethod
    def _parent_directory(account):
        """Where to make the temporary directory: one ``account`` can reach, short enough for a socket path."""
        room = _SOCKET_PATH_MAX - len("/mailspool-pg-12345678/.s.PGSQL.65535.lock")
        for parent in dict.fromkeys([tempfile.gettempdir(), "/tmp"]):
            if len(parent) <= room and os.path.isdir(parent) and (account is None or _traversable_by(parent, account)):
                return parent
        raise RuntimeError(f"no temporary directory the {SERVER_ACCOUNT!r} user can reach (with a path of at most "
                           f"{room} characters): set TMPDIR")

    def _server_options(self):
        return (f"-c listen_addresses={self.host} -p {self.port} -k {shlex.quote(self.directory)} "
                "-c fsync=on -c max_connections=100")

    def _run(self, program, *arguments, adopt=False):
        """Run one of PostgreSQL's programs (as the server's user), within ``TIMEOUT`` seconds.

        With ``adopt`` (``pg_ctl start``) it runs under a parent of the
        server's own (see ``parent_main``), which reaps the postmaster when
        it exits. Raises RuntimeError with the program's output and the end
        of the server's log when it fails or times out.
        """
        command = [os.path.join(self.bindir, program), *arguments]
        account = self._server_account()
        switch = {}
        if account is not None:
            if shutil.which("runuser"):
                command = ["runuser", "-u", account.pw_name, "--", *command]
            else:  # the child sets its groups, group and user between fork and exec (a preexec_fn, done safely)
                switch = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        environment = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
        environment["LC_ALL"] = "C"
        try:
            if adopt:
                returncode, output = self._run_adopted(command, switch, environment)
            else:
                result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=environment,
                                        stdin=subprocess.DEVNULL, cwd=self.directory, **switch)
                returncode, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{program} did not finish within {TIMEOUT} s; server log:\n{self.log_tail()}") from None
        except OSError as exc:
            raise RuntimeError(f"cannot run {program}: {exc}") from None
        if returncode != 0:
            raise RuntimeError(f"{program} {' '.join(arguments[-1:])} failed (exit status {returncode}):\n"
                               f"{output.strip()}\nserver log:\n{self.log_tail()}")
        return output

    def _run_adopted(self, command, switch, environment):
        """``command`` under ``parent_main``: (exit status, output) once it exits; the parent stays for the server."""
        user = [str(switch["user"]), str(switch["group"])] if switch else ["", ""]
        parent = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), "--parent", *user, *command],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  cwd=self.directory, env=environment)
        self._parents.append(parent)
        with parent.stdout:
            output = _read_to_end(parent.stdout, TIMEOUT)
        if output is None:
            parent.kill()
            parent.wait()
            raise subprocess.TimeoutExpired(command, TIMEOUT)
        text, _, status = output.decode(errors="replace").rpartition("\n")
        if not status.lstrip("-").isdigit():  # the parent itself failed: its traceback
            return 1, output.decode(errors="replace")
        return int(status), text

    def _reap_parents(self, timeout):
        """Wait (at most ``timeout`` seconds) for the parents of stopped servers to exit; keep the others."""
        deadline = time.monotonic() + timeout
        for parent in list(self._parents):
            try:
                parent.wait(max(0.0, deadline - time.monotonic()))
                self._parents.remove(parent)
            except subprocess.TimeoutExpired:
                pass

    def _stop_quietly(self):
        """Stop whatever server runs on the data directory, at once; never raises."""
        if self.directory is None or self._postmaster_pid() is None:
            return
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "-t", str(PG_CTL_WAIT), "stop")
        except Exception:
            pass


if __name__ == "__main__" and sys.argv[1:2] == ["--parent"]:
    parent_main(sys.argv[2:])
