"""Scaffolding shared by the fault suite: child processes that park at a named point and get SIGKILLed.

Two halves live here:

- the parent's side (``Child``, ``received_ids``, ``assert_queue_empty``,
  ``link_queue``): start a child Python, wait (bounded) for a line it prints,
  kill it with SIGKILL, check what reached the SMTP server and what is left
  on disk;
- the child's side (``ParkingResource``, ``MarkerDatabase``, ``park``,
  ``report``): imported by the child scripts (``CHILD_PREAMBLE`` puts this
  directory on their ``sys.path``), so the scaffolding a child needs is
  written once.

Nothing here imports pytest at module level: the children import this file.
"""

import collections
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = sys.executable
# Generous: a loaded two-core machine may take seconds to start a Python.
TIMEOUT = 120.0
ALL_STATES = ("ready", "active", "deferred", "held", "failed")
EMPTY_COUNTS = dict.fromkeys(ALL_STATES, 0)

# The first lines of every child script: this directory on sys.path, so
# ``from crashkit import ...`` works in the child.
CHILD_PREAMBLE = f"import sys\nsys.path.insert(0, {HERE!r})\n"


def message(tag, number=0, body=b"body\r\n"):
    """A small CRLF message whose Message-Id is ``<tag-number@example.org>``."""
    return (
        b"From: shop@example.org\r\nTo: alice@example.org\r\n"
        b"Subject: fault suite %s %d\r\n"
        b"Message-Id: <%s-%d@example.org>\r\n"
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n" % (tag.encode(), number, tag.encode(), number)
    ) + body


def message_id(tag, number=0):
    return f"<{tag}-{number}@example.org>"


_MESSAGE_ID = re.compile(rb"^Message-Id:\s*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


def received_ids(server):
    """Counter of the Message-Ids an SMTP server fixture accepted (smtp_sink or scripted_server)."""
    received = server.handler.received if hasattr(server, "handler") else server.received
    ids = collections.Counter()
    for item in list(received):
        data = item.data if hasattr(item, "data") else item[2]
        found = _MESSAGE_ID.search(data)
        ids[found.group(1).decode() if found else None] += 1
    return ids


def child_env(**extra):
    """The test's environment for a child, never pointing at a mailspool configuration file."""
    env = dict(os.environ)
    env.pop("MAILSPOOL_CONFIG", None)
    env.update(extra)
    return env


def _fail(text):
    import pytest

    pytest.fail(text, pytrace=False)


class Child:
    """A child Python running ``script`` (``-c``) with ``args``; its stdout is read line by line.

    ``prefix`` goes before the interpreter (``["unshare", "--mount", "--"]``).
    stderr goes to a temporary file (a pipe nobody reads could fill and
    block the child); ``stderr_text()`` reads it for failure messages.
    """

    def __init__(self, script, *args, prefix=(), env=None, stdin=None):
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [*prefix, PYTHON, "-c", CHILD_PREAMBLE + script, *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=child_env() if env is None else env,
        )
        self.lines = []
        self._partial = b""
        if stdin is not None:
            self.process.stdin.write(stdin)
            self.close_stdin()

    @property
    def pid(self):
        return self.process.pid

    def stderr_text(self):
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def send(self, data):
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def close_stdin(self):
        if not self.process.stdin.closed:
            self.process.stdin.close()

    def _read_available(self, timeout):
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not readable:
            return True
        chunk = os.read(self.process.stdout.fileno(), 65536)
        if not chunk:
            return False  # end of output: the child has exited (or closed stdout)
        self._partial += chunk
        *complete, self._partial = self._partial.split(b"\n")
        self.lines.extend(line.decode("utf-8", "replace") for line in complete)
        return True

    def wait_for(self, prefix, timeout=TIMEOUT):
        """Return the first line of output starting with ``prefix``; fail (bounded) if it never comes."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            for line in self.lines[checked:]:
                if line.startswith(prefix):
                    return line
            checked = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill(expect_sigkill=False)
                _fail(f"child never printed {prefix!r} within {timeout:g}s; output {self.lines!r}\n"
                      f"{self.stderr_text()}")
            if not self._read_available(min(remaining, 1.0)):
                self.process.wait(timeout=TIMEOUT)
                for line in self.lines[checked:]:
                    if line.startswith(prefix):
                        return line
                self._close()
                _fail(f"child exited ({self.process.returncode}) before printing {prefix!r}; "
                      f"output {self.lines!r}\n{self.stderr_text()}")

    def wait_until(self, condition, timeout=TIMEOUT):
        """Poll ``condition()`` (bounded) while the child runs; fail if the child exits first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                _fail(f"child exited ({self.process.returncode}) before the condition held; "
                      f"output {self.lines!r}\n{self.stderr_text()}")
            if time.monotonic() > deadline:
                self.kill(expect_sigkill=False)
                _fail(f"condition not reached within {timeout:g}s; output {self.lines!r}\n{self.stderr_text()}")
            time.sleep(0.02)

    def result(self, timeout=TIMEOUT):
        """The JSON the child printed after ``result `` (see ``report``)."""
        return json.loads(self.wait_for("result ", timeout)[len("result "):])

    def kill(self, expect_sigkill=True):
        """SIGKILL the child and reap it; with ``expect_sigkill``, check that SIGKILL is what ended it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        returncode = self.process.wait(timeout=TIMEOUT)
        self._close()
        if expect_sigkill and returncode != -signal.SIGKILL:
            _fail(f"child ended with {returncode} before it could be killed; output {self.lines!r}\n"
                  f"{self.stderr_text()}")

    def finish(self, timeout=TIMEOUT):
        """Wait (bounded) for the child to exit on its own; return its exit status. Reads the rest of stdout."""
        self.close_stdin()
        deadline = time.monotonic() + timeout
        while self._read_available(max(0.0, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                self.kill(expect_sigkill=False)
                _fail(f"child did not exit within {timeout:g}s; output {self.lines!r}\n{self.stderr_text()}")
        if self._partial:
            self.lines.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        try:
            returncode = self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill(expect_sigkill=False)
            _fail(f"child did not exit within {timeout:g}s; output {self.lines!r}\n{self.stderr_text()}")
        self._close()
        return returncode

    def _close(self):
        self.close_stdin()
        if not self.process.stdout.closed:
            self.process.stdout.close()

    def cleanup(self):
        """Kill the child if it is still running (for ``finally`` blocks); never raises."""
        try:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._close()
        self._stderr.close()


class Children:
    """Every ``Child`` started through ``spawn`` is killed and reaped when the block ends.

    Test modules wrap it in a fixture: ``with crashkit.Children() as children: yield children.spawn``.
    """

    def __init__(self):
        self.started = []

    def spawn(self, script, *args, **options):
        child = Child(script, *args, **options)
        self.started.append(child)
        return child

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for child in self.started:
            child.cleanup()


def assert_queue_empty(queue_path):
    """Every state empty, and nothing staged or logged."""
    from mailspool.maildir import MaildirQueue

    # (This module is not assertion-rewritten by pytest: the messages say what was found.)
    counts = MaildirQueue(queue_path, create=False).counts()
    assert counts == EMPTY_COUNTS, f"queue not empty: {counts}"
    for name in ("tmp", "log"):
        left = os.listdir(os.path.join(queue_path, name))
        assert left == [], f"left in {name}/: {left}"


def link_queue(template_path, queue_path):
    """A fresh queue at ``queue_path`` holding the ready messages of ``template_path`` (hard links).

    Filling a queue of 2,000 messages the real way (a transaction, a
    write and two fsyncs per message) takes seconds on a slow disk; the
    template is filled that way once, and each test gets its own directory
    entries for the same files. Claims rename and completions unlink only
    the test's own links; the template stays as it was.
    """
    from mailspool.maildir import MaildirQueue

    MaildirQueue(queue_path)
    source = os.path.join(template_path, "new")
    names = os.listdir(source)
    for name in names:
        os.link(os.path.join(source, name), os.path.join(queue_path, "new", name))
    return len(names)


# -- the child's side ------------------------------------------------------------------------------------------


def report(**values):
    """Print ``result <json>`` for the parent's ``Child.result()``."""
    print("result " + json.dumps(values), flush=True)


def describe(exc):
    """What the parent needs to judge an exception raised in the child."""
    from mailspool.exceptions import QueueError

    return {"type": f"{type(exc).__module__}.{type(exc).__qualname__}", "text": str(exc),
            "queue_error": isinstance(exc, QueueError)}


def park(what=""):
    """Tell the parent we are at the point (``parked ...``) and wait to be killed."""
    print(f"parked {what}".rstrip(), flush=True)
    time.sleep(TIMEOUT * 5)
    sys.exit("parked child was not killed")


class ParkingResource:
    """A second resource in the transaction that parks in its ``tpc_vote`` or ``tpc_finish``.

    It sorts after mailspool's data manager (``"!mailspool:..."``), so when
    it parks in ``tpc_vote`` the mail is staged but not published, and in
    ``tpc_finish`` the mail is already published.
    """

    def __init__(self, manager, point):
        assert point in ("tpc_vote", "tpc_finish"), point
        self.transaction_manager = manager
        self.point = point

    def sortKey(self):
        return "~parking"

    def abort(self, transaction):
        pass

    tpc_begin = commit = tpc_abort = abort

    def tpc_vote(self, transaction):
        if self.point == "tpc_vote":
            park("in tpc_vote")

    def tpc_finish(self, transaction):
        if self.point == "tpc_finish":
            park("in tpc_finish")


class MarkerDatabase:
    """Stands for a database joined to the same transaction.

    Like zope.sqlalchemy it sorts after mailspool (``"~..."``); it commits
    (writes ``marker_path``) only in ``tpc_finish``. ``calls`` records the
    two-phase-commit calls it received, in order.
    """

    def __init__(self, manager, marker_path):
        self.transaction_manager = manager
        self.marker_path = marker_path
        self.calls = []

    def sortKey(self):
        return "~database"

    def abort(self, transaction):
        self.calls.append("abort")

    def tpc_begin(self, transaction):
        self.calls.append("tpc_begin")

    def commit(self, transaction):
        self.calls.append("commit")

    def tpc_vote(self, transaction):
        self.calls.append("tpc_vote")

    def tpc_finish(self, transaction):
        self.calls.append("tpc_finish")
        with open(self.marker_path, "w", encoding="ascii") as marker:
            marker.write("committed\n")

    def tpc_abort(self, transaction):
        self.calls.append("tpc_abort")
