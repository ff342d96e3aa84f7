"""Real processes killed with SIGKILL at named points lose nothing and leave nothing half-done."""

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mailspool.envelope import Envelope
from mailspool.maildir import STALE_STAGING_SECONDS, MaildirQueue

MESSAGE = (
    b"From: shop@example.org\r\nTo: alice@example.org\r\nMessage-Id: <crash@example.org>\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nbody\r\n"
)

# The child commits one message and parks, at the named point, inside a
# resource that sorts after the mail data manager (so the mail's vote, or
# the mail's finish, has already run), then waits to be killed.
APPLICATION = textwrap.dedent("""
    import sys, time, transaction
    from mailspool import QueuedMailDelivery

    queue_path, point = sys.argv[1], sys.argv[2]
    manager = transaction.TransactionManager(explicit=True)

    class ParkingResource:
        transaction_manager = manager
        def sortKey(self): return "~parking"
        def abort(self, txn): pass
        tpc_begin = commit = tpc_abort = abort
        def tpc_vote(self, txn):
            if point == "between-vote-and-finish": self.park()
        def tpc_finish(self, txn):
            if point == "after-finish": self.park()
        def park(self):
            print("parked", flush=True)
            time.sleep(120)

    manager.begin()
    QueuedMailDelivery(queue_path, transaction_manager=manager).send(
        "shop@example.org", ["alice@example.org"], sys.stdin.buffer.read())
    manager.get().join(ParkingResource())
    manager.commit()
""")

PROCESSOR = textwrap.dedent("""
    import sys, time
    from mailspool.maildir import MaildirQueue

    queue = MaildirQueue(sys.argv[1])
    claimed = [queue.claim(queue_id) for queue_id in list(queue.due())]
    print("claimed", len([c for c in claimed if c]), flush=True)
    time.sleep(120)
""")


def run_until(script, args, marker, stdin=b""):
    """Start ``script`` in a child Python, wait (bounded) for ``marker`` on its stdout, return the child."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdin.write(stdin)
    child.stdin.close()
    deadline = time.monotonic() + 60
    output = b""
    while marker not in output:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or child.poll() is not None:
            child.kill()
            pytest.fail(f"child never reached {marker!r}: {output!r} {child.stderr.read()!r}")
        readable, _, _ = select.select([child.stdout], [], [], remaining)
        if readable:
            output += os.read(child.stdout.fileno(), 4096)
    return child


def kill(child):
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stdout.close()
    child.stderr.close()


def test_killed_between_vote_and_finish_leaves_nothing_ready_and_tmp_is_cleaned_later(queue_path):
    queue = MaildirQueue(queue_path)
    child = run_until(APPLICATION, [str(queue_path), "between-vote-and-finish"], b"parked", MESSAGE)
    kill(child)

    assert os.listdir(queue_path / "new") == []
    assert list(queue.due()) == []
    (staged,) = os.listdir(queue_path / "tmp")

    assert queue.cleanup()["stale_staging_removed"] == 0  # too young to be abandoned
    assert os.listdir(queue_path / "tmp") == [staged]
    later = time.time() + STALE_STAGING_SECONDS + 60
    assert queue.cleanup(now=later)["stale_staging_removed"] == 1
    assert os.listdir(queue_path / "tmp") == []


def test_killed_after_finish_leaves_the_message_queued_and_intact(queue_path):
    queue = MaildirQueue(queue_path)
    child = run_until(APPLICATION, [str(queue_path), "after-finish"], b"parked", MESSAGE)
    kill(child)

    assert os.listdir(queue_path / "tmp") == []
    (queue_id,) = queue.due()
    claimed = queue.claim(queue_id)
    assert claimed.read() == MESSAGE
    assert claimed.envelope.message_id == "<crash@example.org>"


def test_claims_of_a_killed_processor_return_to_the_queue_at_once(queue_path):
    queue = MaildirQueue(queue_path)
    for number in range(3):
        envelope = Envelope("shop@example.org", ("alice@example.org",), f"<{number}@example.org>", time.time())
        queue.add(envelope, MESSAGE).publish()
    child = run_until(PROCESSOR, [str(queue_path)], b"claimed 3")

    assert queue.counts()["active"] == 3
    assert queue.cleanup()["dead_claims_released"] == 0  # its holder is alive
    assert list(queue.due()) == []

    kill(child)

    assert queue.cleanup()["dead_claims_released"] == 3
    assert queue.counts() == {"ready": 3, "active": 0, "deferred": 0, "held": 0, "failed": 0}


DELIVERING_PROCESSOR = textwrap.dedent("""
    import sys
    from mailspool import QueueProcessor, SMTPMailer
    QueueProcessor(sys.argv[1], SMTPMailer("127.0.0.1", int(sys.argv[2]), tls="none")).run_once()
""")


def test_a_processor_killed_mid_run_loses_nothing(scripted_server, queue_path, manager):
    from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer

    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        for number in range(20):
            delivery.send("shop@example.org", ["a@example.org"],
                          MESSAGE.replace(b"<crash@", b"<%d@" % number))
    scripted_server.handler.data_delay = 0.05
    child = subprocess.Popen([sys.executable, "-c", DELIVERING_PROCESSOR, str(queue_path),
                              str(scripted_server.port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(scripted_server.handler.received) < 5 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    kill(child)
    delivered_before_kill = len(scripted_server.handler.received)
    assert 5 <= delivered_before_kill < 20

    scripted_server.handler.data_delay = 0
    QueueProcessor(queue_path, SMTPMailer(scripted_server.host, scripted_server.port, tls="none")).run_once()

    ids = [data.split(b"Message-Id: ")[1].split(b"\r\n")[0] for _, _, data in scripted_server.handler.received]
    assert len(set(ids)) == 20
    assert len(ids) - len(set(ids)) <= 1  # only a kill between the final 250 and the unlink duplicates
    assert MaildirQueue(queue_path).counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}
