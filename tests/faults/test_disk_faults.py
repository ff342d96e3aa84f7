"""The queue's disk fails the application or the processor: full, read-only, missing, not a directory.

Real files, real child processes, real transactions. A "database" joins
the same transaction (``crashkit.MarkerDatabase``: sorts after mailspool,
as zope.sqlalchemy does, and writes its marker file only in
``tpc_finish``), so each test can tell whether it was committed.

How each fault is staged (the tests run as root, which ignores file
permissions and disk quotas):

- full disk: ``RLIMIT_FSIZE`` in the child (``SIGXFSZ`` ignored), so any
  write past the limit fails with EFBIG; and, where a private mount
  namespace can be made (``unshare --mount``), a real 256 KiB tmpfs filled
  up, where writes fail with ENOSPC;
- read-only: the child drops to the ``nobody`` user after its imports
  (queue owned by root, mode 0755 or mailspool's own 0700), or, as root,
  sees the queue through a read-only bind mount (EROFS) in its own mount
  namespace, which disappears with it;
- missing and not a directory: staged directly.
"""

import functools
import os
import pwd
import shutil
import subprocess
import tempfile

import crashkit
import pytest
import transaction

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.exceptions import QueueError
from mailspool.maildir import MaildirQueue


UNSHARE = ["unshare", "--mount", "--propagation", "private", "--"]


@functools.lru_cache(maxsize=None)
def can_unshare_mounts():
    """Whether this process may make a private mount namespace and mount a tmpfs in it."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = tempfile.mkdtemp(prefix="mailspool-mount-probe-")
    try:
        result = subprocess.run(
            [*UNSHARE, "mount", "-t", "tmpfs", "-o", "size=64k", "mailspool-probe", probe],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return result.returncode == 0


def queue_ready(queue_path, count, tag):
    """Commit ``count`` messages for the processor side of a test; return their Message-Ids."""
    manager = transaction.TransactionManager(explicit=True)
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        for number in range(count):
            delivery.send("shop@example.org", ["alice@example.org"], crashkit.message(tag, number))
    return {crashkit.message_id(tag, number) for number in range(count)}


# -- 2. the disk fills up during tpc_vote ------------------------------------------------------------------------

# The child commits one big message and a "database" in one transaction on
# a disk that cannot take it, reports, then commits a small message that
# fits: one failed write leaves nothing stuck.
FULL_DISK = """
import os, resource, signal, subprocess, transaction
from crashkit import MarkerDatabase, describe, report
from mailspool import QueuedMailDelivery

how, queue_path, marker, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if how == "tmpfs":
    # In our own mount namespace: a 256 KiB filesystem, filled up but for 16 KiB.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "mailspool-full", os.path.dirname(queue_path)],
                   check=True)
manager = transaction.TransactionManager(explicit=True)
delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
if how == "rlimit":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
else:
    ballast = os.path.join(os.path.dirname(queue_path), "ballast")
    with open(ballast, "wb", buffering=0) as stream:
        try:
            while True:
                stream.write(b"\\0" * 4096)
        except OSError:
            pass
    os.truncate(ballast, os.path.getsize(ballast) - 16384)

database = MarkerDatabase(manager, marker)
manager.begin()
manager.get().join(database)
delivery.send("shop@example.org", ["alice@example.org"],
              b"Subject: big\\r\\nMessage-Id: <big@example.org>\\r\\n\\r\\n" + (b"x" * 62 + b"\\r\\n") * (size // 64))
error = None
try:
    manager.commit()
except Exception as exc:
    error = describe(exc)
    manager.abort()
listing = {name: sorted(os.listdir(os.path.join(queue_path, name))) for name in ("tmp", "new", "deferred")}

with manager:
    delivery.send("shop@example.org", ["alice@example.org"],
                  b"Subject: small\\r\\nMessage-Id: <small@example.org>\\r\\n\\r\\nfits\\r\\n")
from mailspool.maildir import MaildirQueue
queue = MaildirQueue(queue_path, create=False)
later = [(entry.state, entry.envelope.message_id) for entry in queue.entries()]
report(error=error, database_calls=database.calls, listing=listing, later=later,
       staged_left=os.listdir(os.path.join(queue_path, "tmp")))
"""


@pytest.mark.parametrize("how", ["rlimit", "tmpfs"])
def test_a_full_disk_in_tpc_vote_aborts_the_whole_transaction_with_a_queue_error_naming_the_queue(
        spawn, tmp_path, how):
    if how == "tmpfs" and not can_unshare_mounts():
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare --mount refused)")
    filesystem = tmp_path / "fs"
    filesystem.mkdir()
    queue_path = filesystem / "queue"
    marker = tmp_path / "database-committed"
    prefix = UNSHARE if how == "tmpfs" else ()

    result = spawn(FULL_DISK, how, queue_path, marker, 256 * 1024, prefix=prefix).result()

    error = result["error"]
    assert error is not None, "the commit did not fail"
    assert error["queue_error"], error
    assert str(queue_path) in error["text"]
    expected = "File too large" if how == "rlimit" else "No space left on device"
    assert expected in error["text"]
    # The database never voted (mail votes first) and was aborted, not committed.
    assert "tpc_finish" not in result["database_calls"]
    assert "tpc_vote" not in result["database_calls"]
    assert "tpc_abort" in result["database_calls"]
    assert not marker.exists()
    # Nothing half-written stays behind, nothing became visible.
    assert result["listing"] == {"tmp": [], "new": [], "deferred": []}
    # And the next transaction, whose message fits, commits normally.
    assert result["later"] == [["ready", "<small@example.org>"]]
    assert result["staged_left"] == []
    if how == "rlimit":  # a tmpfs vanished with the child's mount namespace
        assert [entry.envelope.message_id for entry in MaildirQueue(queue_path).entries()] == ["<small@example.org>"]


# -- 3. the queue directory is missing, not a directory, or read-only ---------------------------------------------


def commit_with_database(delivery, manager, marker):
    database = crashkit.MarkerDatabase(manager, marker)
    manager.begin()
    manager.get().join(database)
    delivery.send("shop@example.org", ["alice@example.org"], crashkit.message("unwritable"))
    return database


def test_not_a_directory_is_a_queue_error_naming_the_path_for_sending_and_for_processing(tmp_path, smtp_sink):
    path = tmp_path / "queue"
    path.write_bytes(b"an ordinary file\n")
    mailer = SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")

    for start in (lambda: QueuedMailDelivery(path),
                  lambda: QueueProcessor(path, mailer),
                  lambda: MaildirQueue(path, create=False)):
        with pytest.raises(QueueError, match="not a directory") as raised:
            start()
        assert str(path) in str(raised.value)
    assert path.read_bytes() == b"an ordinary file\n"


def test_a_missing_queue_is_created_for_sending_but_refused_by_a_processor_that_must_not_create_it(
        tmp_path, manager):
    path = tmp_path / "queue"
    with pytest.raises(QueueError, match="does not exist") as raised:
        MaildirQueue(path, create=False)  # what `mailspool run` opens
    assert str(path) in str(raised.value)
    assert not path.exists()

    delivery = QueuedMailDelivery(path, transaction_manager=manager)  # documented: created, mode 0700
    with manager:
        delivery.send("shop@example.org", ["alice@example.org"], crashkit.message("created"))
    assert MaildirQueue(path, create=False).counts()["ready"] == 1


def test_a_queue_that_cannot_be_created_is_a_queue_error_naming_it_when_the_delivery_is_made(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    path = blocker / "queue"
    with pytest.raises(QueueError) as raised:
        QueuedMailDelivery(path)
    assert str(path) in str(raised.value)


def test_a_queue_removed_after_the_delivery_was_made_fails_the_commit_and_the_database_with_it(
        tmp_path, manager):
    path = tmp_path / "queue"
    marker = tmp_path / "database-committed"
    delivery = QueuedMailDelivery(path, transaction_manager=manager)
    shutil.rmtree(path)  # an operator "cleans up" while the application runs

    database = commit_with_database(delivery, manager, marker)
    with pytest.raises(QueueError) as raised:
        manager.commit()
    manager.abort()

    assert str(path) in str(raised.value)
    assert "No such file or directory" in str(raised.value)
    assert "tpc_finish" not in database.calls and "tpc_abort" in database.calls
    assert not marker.exists()
    assert not path.exists()  # not silently re-created half-way


@pytest.fixture
def shared_dir():
    """A directory under /tmp that other users can traverse (pytest's own tmp_path is 0700)."""
    path = tempfile.mkdtemp(prefix="mailspool-faults-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


# The child tries, on a queue it cannot write, what an application and a
# processor do at start: make a delivery and commit through it, start a
# processor and run it once, open the queue as `mailspool run` does.
UNWRITABLE = """
import os, subprocess, transaction
import logging, email.policy, email.parser, email.generator  # imported before privileges are dropped
from crashkit import MarkerDatabase, describe, message, report
from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.maildir import MaildirQueue

how, queue_path, marker, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if how == "read-only-mount":  # in our own mount namespace, as root
    subprocess.run(["mount", "--bind", queue_path, queue_path], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", queue_path, queue_path], check=True)
else:
    user = __import__("pwd").getpwnam("nobody")
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)

results = {}
manager = transaction.TransactionManager(explicit=True)
try:
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
except Exception as exc:
    results["send"] = {"at": "QueuedMailDelivery()", "error": describe(exc)}
else:
    database = MarkerDatabase(manager, marker)
    manager.begin()
    manager.get().join(database)
    delivery.send("shop@example.org", ["alice@example.org"], message("unwritable"))
    try:
        manager.commit()
        results["send"] = {"at": None}
    except Exception as exc:
        results["send"] = {"at": "commit", "error": describe(exc), "database": database.calls}
        manager.abort()

try:
    processor = QueueProcessor(queue_path, SMTPMailer("127.0.0.1", port, tls="none", timeout=60))
except Exception as exc:
    results["processor"] = {"at": "QueueProcessor()", "error": describe(exc)}
else:
    try:
        results["processor"] = {"at": None, "summary": str(processor.run_once())}
    except Exception as exc:
        results["processor"] = {"at": "run_once", "error": describe(exc)}

try:
    MaildirQueue(queue_path, create=False)
    results["open"] = None
except Exception as exc:
    results["open"] = describe(exc)
report(**results)
"""


@pytest.mark.parametrize("how, mode, send_fails_at, processor_fails_at, opens, reason", [
    # readable, not writable: `mailspool status` may still read it
    ("unprivileged-user", 0o755, "commit", "run_once", True, "permission denied"),
    # another user's queue (mailspool makes its queue 0700)
    ("unprivileged-user", 0o700, "QueuedMailDelivery()", "QueueProcessor()", False, "permission denied"),
    # a read-only filesystem: EROFS, even for root
    ("read-only-mount", 0o700, "commit", "run_once", True, "read-only file system"),
], ids=["not-writable-for-this-user", "another-users-queue", "read-only-mount"])
def test_an_unwritable_queue_is_a_queue_error_naming_it_and_nothing_is_half_done(
        spawn, shared_dir, smtp_sink, how, mode, send_fails_at, processor_fails_at, opens, reason):
    if how == "unprivileged-user":
        if os.geteuid() != 0 or nobody() is None:
            pytest.skip("needs root and a 'nobody' user to run the child unprivileged")
    elif not can_unshare_mounts():
        pytest.skip("cannot make a read-only bind mount in a private mount namespace here")
    queue_path = os.path.join(shared_dir, "queue")
    waiting = queue_ready(queue_path, 3, "waiting")
    for directory, subdirs, _ in os.walk(queue_path):
        os.chmod(directory, mode)
    database_dir = os.path.join(shared_dir, "database")
    os.mkdir(database_dir)
    os.chmod(database_dir, 0o777)  # so that a wrongly committed "database" could write its marker
    marker = os.path.join(database_dir, "committed")
    prefix = UNSHARE if how == "read-only-mount" else ()

    result = spawn(UNWRITABLE, how, queue_path, marker, smtp_sink.port, prefix=prefix).result()

    send, processor = result["send"], result["processor"]
    assert send["at"] == send_fails_at, send
    assert send["error"]["queue_error"] and queue_path in send["error"]["text"], send
    assert reason in send["error"]["text"].lower()
    if send_fails_at == "commit":
        assert "tpc_finish" not in send["database"] and "tpc_abort" in send["database"]
    assert not os.path.exists(marker)
    assert processor["at"] == processor_fails_at, processor
    assert processor["error"]["queue_error"] and queue_path in processor["error"]["text"], processor
    assert reason in processor["error"]["text"].lower()
    if opens:
        assert result["open"] is None  # MaildirQueue(create=False) only needs to read
    else:
        assert result["open"]["queue_error"] and queue_path in result["open"]["text"], result["open"]
        assert reason in result["open"]["text"].lower()  # not "not a mailspool queue?"
    # Nothing was staged, published, claimed or sent.
    queue = MaildirQueue(queue_path, create=False)
    assert queue.counts() == dict(crashkit.EMPTY_COUNTS, ready=3)
    assert os.listdir(os.path.join(queue_path, "tmp")) == []
    assert {entry.envelope.message_id for entry in queue.entries()} == waiting
    assert smtp_sink.received == []



# The cron job's view of the same faults: `mailspool run --once QUEUE` at processor start.
RUN_AS_NOBODY = """
import os, logging.handlers
from mailspool import console
console.build_parser().format_help()  # argparse imports what it needs before privileges are dropped
user = __import__("pwd").getpwnam("nobody")
os.setgroups([])
os.setgid(user.pw_gid)
os.setuid(user.pw_uid)
sys.exit(console.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("fault, exit_status", [
    ("missing", 78),
    ("not-a-directory", 78),
    ("read-only", 75),
])
def test_mailspool_run_once_on_a_queue_it_cannot_use_exits_with_a_message_naming_it(
        spawn, shared_dir, smtp_sink, fault, exit_status):
    queue_path = os.path.join(shared_dir, "queue")
    config_path = os.path.join(shared_dir, "mailspool.ini")
    with open(config_path, "w", encoding="utf-8") as config:
        config.write(f"[mailspool]\nsmtp_host = 127.0.0.1\nsmtp_port = {smtp_sink.port}\nsmtp_tls = none\n")
    os.chmod(config_path, 0o644)
    arguments = ["run", "--once", queue_path, "--config", config_path]
    if fault == "not-a-directory":
        with open(queue_path, "wb"):
            pass
    if fault == "read-only":
        if os.geteuid() != 0 or nobody() is None:
            pytest.skip("needs root and a 'nobody' user to run the command unprivileged")
        queue_ready(queue_path, 1, "cron")
        for directory, _, _ in os.walk(queue_path):
            os.chmod(directory, 0o755)
        child = spawn(RUN_AS_NOBODY, *arguments)
    else:
        child = spawn("import runpy; runpy.run_module('mailspool', run_name='__main__')", *arguments)

    status = child.finish()
    stderr = child.stderr_text()
    assert "Traceback" not in stderr
    assert queue_path in stderr
    assert status == exit_status, stderr
    assert smtp_sink.received == []
