"""Case 19: the clock jumps. No message is held for as long as the jump, none is retried on every run, none is lost.

A deferred message is due at its file's mtime, which the processor sets
to its own clock's "now + back-off". If that clock is then set back by a
day, a retry meant for one minute later is a day and a minute away. No
retry legitimately waits longer than ``RetryPolicy.longest_wait``
(``backoff_max`` plus a clock-skew allowance), so a deferred message due
further ahead than that is tried at once and then deferred from the new
"now" as usual. Scheduled messages (``send_at``/``delay``: no attempt log)
keep their time whatever the clock does.

A clock that jumps a day *ahead* while an application is between
``tpc_vote`` and ``tpc_finish`` makes its staged file look a day old;
housekeeping keeps it because its writer still runs (a real child process
parked in the commit), and it is published when the commit finishes.

The clock is injected (``QueueProcessor(clock=...)``, ``cleanup(now=...)``);
the server is a real aiosmtpd server scripted to answer 451 to the first
DATA commands.
"""

import datetime
import os
import time

import pytest

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.maildir import STALE_STAGING_SECONDS, MaildirQueue
from mailspool.processor import CLOCK_SKEW_ALLOWANCE

DAY = 24 * 3600
MESSAGE = b"From: shop@example.org\r\nTo: a@example.org\r\nSubject: clock {n}\r\n\r\nbody\r\n"
POLICY = {"backoff_min": 60.0, "backoff_max": 3600.0, "jitter": 0.0}


def commit(queue_path, manager, count=1, **schedule):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        for number in range(count):
            delivery.send("shop@example.org", ["a@example.org"], MESSAGE.replace(b"{n}", b"%d" % number),
                          **schedule)


def make_processor(queue_path, server, clock):
    return QueueProcessor(MaildirQueue(queue_path), SMTPMailer(server.host, server.port, tls="none"),
                          clock=clock, **POLICY)


def deferred_due_times(queue_path):
    return sorted(entry.due_at for entry in MaildirQueue(queue_path).entries(["deferred"]))


def test_a_retry_deferred_before_the_clock_went_back_a_day_is_tried_at_once_then_backs_off(
        queue_path, manager, scripted_server, clock):
    handler = scripted_server.handler
    handler.data_replies = ["451 4.3.0 try later", "451 4.3.0 try later"]
    commit(queue_path, manager)
    processor = make_processor(queue_path, scripted_server, clock)

    assert processor.run_once().deferred == 1
    assert deferred_due_times(queue_path) == [clock.now + 60]  # first back-off: one minute

    clock.advance(-DAY)  # the clock is set back by a day: the retry is now a day and a minute away
    summary = processor.run_once()

    assert summary.deferred == 1 and handler.data_attempts == 2  # tried at once, not held for a day
    assert deferred_due_times(queue_path) == [clock.now + 120]  # the second back-off, from the new "now"

    # No tight loop: until that back-off has passed, run after run leaves it alone.
    for _ in range(10):
        summary = processor.run_once()
        assert (summary.sent, summary.deferred, summary.failed, summary.skipped) == (0, 0, 0, 0)
        clock.advance(10)
    assert handler.data_attempts == 2

    clock.advance(30)  # 130 s after the second failure
    assert processor.run_once().sent == 1
    assert handler.data_attempts == 3 and len(handler.received) == 1
    assert MaildirQueue(queue_path).counts()["deferred"] == 0


def test_a_jump_back_shorter_than_the_longest_back_off_only_lengthens_the_wait(
        queue_path, manager, scripted_server, clock):
    handler = scripted_server.handler
    handler.data_replies = ["451 4.3.0 try later"]
    commit(queue_path, manager)
    processor = make_processor(queue_path, scripted_server, clock)
    processor.run_once()
    jump = 1800  # within longest_wait: indistinguishable from a long back-off, so it is honoured

    clock.advance(-jump)
    for _ in range(5):
        processor.run_once()
        clock.advance(60)
    assert handler.data_attempts == 1  # not retried on every run

    clock.advance(jump + 60 - 5 * 60)  # back where the first back-off ends
    assert processor.run_once().sent == 1
    assert handler.data_attempts == 2


def test_the_wait_after_any_jump_is_bounded_by_the_longest_back_off(queue_path, manager, scripted_server, clock):
    handler = scripted_server.handler
    handler.data_replies = ["451 4.3.0 try later"] * 9  # the first three runs fail, the fourth delivers
    commit(queue_path, manager, count=3)
    processor = make_processor(queue_path, scripted_server, clock)
    assert processor.run_once().deferred == 3
    longest_wait = processor.retry_policy.longest_wait
    assert longest_wait == POLICY["backoff_max"] + CLOCK_SKEW_ALLOWANCE

    for jump in (longest_wait + 1, 7 * DAY, 365 * DAY):  # anything beyond longest_wait
        clock.advance(-jump)
        before = handler.data_attempts
        processor.run_once()
        assert handler.data_attempts == before + 3, f"held after a jump back of {jump} s"
    assert len(handler.received) == 3  # the fourth DATA onwards is accepted
    assert MaildirQueue(queue_path).counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


def test_a_scheduled_message_keeps_its_time_when_the_clock_goes_back(queue_path, manager, scripted_server, clock):
    send_at = datetime.datetime.fromtimestamp(clock.now + 3 * DAY)
    commit(queue_path, manager, send_at=send_at)
    processor = make_processor(queue_path, scripted_server, clock)

    clock.advance(-DAY)  # now four days before its time: far beyond longest_wait, but scheduled on purpose
    for _ in range(3):
        assert processor.run_once().sent == 0
    assert scripted_server.handler.data_attempts == 0
    (entry,) = MaildirQueue(queue_path).entries(["deferred"])
    assert entry.scheduled and entry.due_at == pytest.approx(send_at.timestamp(), abs=0.01)

    clock.now = send_at.timestamp()
    assert processor.run_once().sent == 1
    assert len(scripted_server.handler.received) == 1


def test_a_clock_that_keeps_going_back_costs_one_attempt_per_jump_never_one_per_run(
        queue_path, manager, scripted_server, clock):
    handler = scripted_server.handler
    handler.data_replies = ["451 4.3.0 try later"] * 100
    commit(queue_path, manager)
    processor = make_processor(queue_path, scripted_server, clock)
    processor.run_once()

    jumps = 0
    for run in range(60):
        if run % 20 == 19:
            clock.advance(-DAY)  # three jumps back in 60 runs
            jumps += 1
        else:
            clock.advance(1)  # runs one second apart: a daemon woken by commits
        processor.run_once()

    assert handler.data_attempts == 1 + jumps
    assert handler.received == []
    assert os.listdir(queue_path / "deferred") != []  # still queued, nothing lost


# An application in the middle of its commit: the mail is staged (tmp/, fsync'd), and
# a second resource waits in tpc_vote for a line on stdin before the commit finishes.
WAITING_COMMIT = """
import transaction
from mailspool import QueuedMailDelivery


class WaitInVote:
    def __init__(self, manager):
        self.transaction_manager = manager

    def sortKey(self):
        return "~wait"  # after the mail's data manager: the mail is staged when this votes

    def abort(self, transaction):
        pass

    tpc_begin = commit = tpc_abort = tpc_finish = abort

    def tpc_vote(self, transaction):
        print("voted", flush=True)
        sys.stdin.readline()


manager = transaction.TransactionManager(explicit=True)
delivery = QueuedMailDelivery(sys.argv[1], transaction_manager=manager)
manager.begin()
delivery.send("shop@example.org", ["a@example.org"], b"Subject: staged across a clock jump\\r\\n\\r\\nbody\\r\\n")
manager.get().join(WaitInVote(manager))
manager.commit()
print("committed", flush=True)
"""


def test_a_clock_jumping_a_day_ahead_mid_commit_does_not_remove_the_staged_message(spawn, queue_path):
    queue = MaildirQueue(queue_path)
    child = spawn(WAITING_COMMIT, queue_path)
    child.wait_for("voted")
    (staged,) = os.listdir(queue_path / "tmp")

    a_day_ahead = time.time() + STALE_STAGING_SECONDS + 60  # housekeeping after the clock jumped
    assert queue.cleanup(now=a_day_ahead)["stale_staging_removed"] == 0  # its writer still runs
    child.send(b"go\n")
    child.wait_for("committed")

    assert [(entry.queue_id, entry.state) for entry in queue.entries()] == [(staged, "ready")]

