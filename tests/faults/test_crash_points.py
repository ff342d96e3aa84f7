"""Real processes SIGKILLed at named points: an application mid-commit, a processor mid-delivery.

Each child is a separate Python that parks at the named point (it prints
``parked``) and is then killed with SIGKILL by the test; nothing in the
code under test is replaced. The parking is scaffolding wrapped around the
real calls: a resource that sorts after the mail in the same transaction,
or a wrapper that parks before (or after) calling the queue's real
``claim``/``complete``, or smtplib's real ``send``. Mail goes over a real
aiosmtpd server on 127.0.0.1 (``scripted_server``/``smtp_sink``).
"""

import asyncio
import os
import threading
import time

import crashkit
import pytest
import transaction

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.maildir import STALE_STAGING_SECONDS, MaildirQueue


def mailer_for(server):
    return SMTPMailer(server.host, server.port, tls="none", timeout=crashkit.TIMEOUT)


# -- 1. the application dies in the middle of a commit ----------------------------------------------------------

APPLICATION = """
import transaction
from crashkit import ParkingResource
from mailspool import QueuedMailDelivery

queue_path, point = sys.argv[1], sys.argv[2]
manager = transaction.TransactionManager(explicit=True)
delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
manager.begin()
delivery.send("shop@example.org", ["alice@example.org"], sys.stdin.buffer.read())
manager.get().join(ParkingResource(manager, point))
manager.commit()
print("committed", flush=True)
"""


def test_application_killed_between_vote_and_finish_queues_nothing_and_the_staged_file_is_removed_a_day_later(
        spawn, queue_path, smtp_sink):
    queue = MaildirQueue(queue_path)
    data = crashkit.message("between-vote-and-finish")
    child = spawn(APPLICATION, queue_path, "tpc_vote", stdin=data)
    child.wait_for("parked in tpc_vote")  # the mail voted (staged, fsynced); the transaction is undecided
    child.kill()

    assert os.listdir(queue_path / "new") == []
    assert os.listdir(queue_path / "deferred") == []
    assert list(queue.due()) == []
    (staged,) = os.listdir(queue_path / "tmp")
    assert (queue_path / "tmp" / staged).read_bytes().endswith(data)  # fully written, never published

    summary = QueueProcessor(queue, mailer_for(smtp_sink)).run_once()
    assert (summary.sent, summary.failed, summary.deferred) == (0, 0, 0)
    assert smtp_sink.received == []

    assert queue.cleanup(now=time.time())["stale_staging_removed"] == 0  # could still be a live commit
    assert os.listdir(queue_path / "tmp") == [staged]
    a_day_later = time.time() + STALE_STAGING_SECONDS + 60
    assert queue.cleanup(now=a_day_later)["stale_staging_removed"] == 1
    crashkit.assert_queue_empty(queue_path)
    assert smtp_sink.received == []


def test_application_killed_after_finish_has_its_message_delivered_exactly_once(spawn, queue_path, smtp_sink):
    queue = MaildirQueue(queue_path)
    data = crashkit.message("after-finish")
    child = spawn(APPLICATION, queue_path, "tpc_finish", stdin=data)
    child.wait_for("parked in tpc_finish")  # the mail's tpc_finish has published it
    child.kill()

    assert os.listdir(queue_path / "tmp") == []
    assert queue.counts()["ready"] == 1

    processor = QueueProcessor(queue, mailer_for(smtp_sink))
    assert processor.run_once().sent == 1
    assert processor.run_once().sent == 0
    (received,) = smtp_sink.received
    assert received.data == data  # the queued bytes are the sent bytes
    assert received.recipients == ("alice@example.org",)
    crashkit.assert_queue_empty(queue_path)


# -- 4. the processor dies at each point of a delivery, then a new one runs ------------------------------------

MESSAGES = 5
KILLED = 3  # the third message is the one in hand when the processor dies

PROCESSOR = """
import smtplib
from crashkit import park
from mailspool import QueueProcessor, SMTPMailer

queue_path, port, point, nth = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
processor = QueueProcessor(queue_path, SMTPMailer("127.0.0.1", port, tls="none", timeout=600))
queue = processor.queue
real_claim, real_complete, real_send = queue.claim, queue.complete, smtplib.SMTP.send
seen = {"claim": 0, "complete": 0, "data": 0, "message_id": None}


def claim(queue_id, *args, **kwargs):
    seen["claim"] += 1
    if point == "before-claim" and seen["claim"] == nth:
        park()
    claimed = real_claim(queue_id, *args, **kwargs)
    seen["message_id"] = claimed.envelope.message_id if claimed is not None else None
    if point == "after-claim" and seen["claim"] == nth:
        park(seen["message_id"])
    return claimed


def complete(claimed):
    seen["complete"] += 1
    if point == "after-final-250" and seen["complete"] == nth:
        park(claimed.envelope.message_id)  # the server has said 250; the file is still in active/
    real_complete(claimed)


def send(connection, data):
    # smtplib sends the whole DATA payload, ending in CRLF.CRLF, in one call.
    if isinstance(data, bytes) and data.endswith(b"\\r\\n.\\r\\n"):
        seen["data"] += 1
        if point == "while-sending-data" and seen["data"] == nth:
            real_send(connection, data[: len(data) // 2])
            park(seen["message_id"])  # half of the message is on the wire, no final dot
    return real_send(connection, data)


queue.claim, queue.complete, smtplib.SMTP.send = claim, complete, send
print("finished", processor.run_once(), flush=True)
"""


def stall_in_data(handler, nth):
    """Make the real server stall after the ``nth`` message's final dot, before its reply.

    Returns (stalled, abandoned) events: ``stalled`` once the server holds
    the whole message; ``abandoned`` when aiosmtpd cancels the stalled
    DATA because the client's connection went away, so the message is not
    accepted. That is aiosmtpd's choice: an MTA that commits a message at
    the final dot, before it replies, would keep it, and the restart would
    send it a second time (the duplicate window opens at the final dot).
    """
    original = handler.handle_DATA
    stalled, abandoned = threading.Event(), threading.Event()
    count = {"data": 0}

    async def handle_DATA(server, session, envelope):
        count["data"] += 1
        if count["data"] == nth:
            stalled.set()
            try:
                await asyncio.sleep(crashkit.TIMEOUT * 5)
            except asyncio.CancelledError:
                abandoned.set()
                raise
        return await original(server, session, envelope)

    handler.handle_DATA = handle_DATA
    return stalled, abandoned


def queue_messages(queue_path, tag):
    manager = transaction.TransactionManager(explicit=True)
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    body = b"".join(b"line %05d of a message long enough to be cut in half on the wire\r\n" % n for n in range(200))
    with manager:
        for number in range(MESSAGES):
            delivery.send("shop@example.org", ["alice@example.org"], crashkit.message(tag, number, body))
    return {crashkit.message_id(tag, number) for number in range(MESSAGES)}


@pytest.mark.parametrize("point, received_before_restart, active_at_kill", [
    pytest.param(point, received, active, id=point) for point, received, active in [
        ("before-claim", KILLED - 1, 0),
        ("after-claim", KILLED - 1, 1),
        ("while-sending-data", KILLED - 1, 1),
        ("server-stalls-in-data", KILLED - 1, 1),
        ("after-final-250", KILLED, 1),
    ]
])
def test_processor_killed_then_restarted_delivers_every_message_with_a_duplicate_only_after_the_final_250(
        spawn, queue_path, scripted_server, point, received_before_restart, active_at_kill):
    expected = queue_messages(queue_path, point)
    queue = MaildirQueue(queue_path)
    if point == "server-stalls-in-data":
        stalled, abandoned = stall_in_data(scripted_server.handler, KILLED)
    child = spawn(PROCESSOR, queue_path, scripted_server.port, point, KILLED)
    if point == "server-stalls-in-data":
        child.wait_until(stalled.is_set)
        child.kill()
        # The server notices the dead connection and drops the unanswered message.
        assert abandoned.wait(crashkit.TIMEOUT)
        killed_id = None
    else:
        killed_id = child.wait_for("parked").partition(" ")[2] or None
        child.kill()

    before = crashkit.received_ids(scripted_server)
    assert sum(before.values()) == received_before_restart
    assert set(before.values()) == {1}
    assert queue.counts() == dict(crashkit.EMPTY_COUNTS, ready=MESSAGES - (KILLED - 1) - active_at_kill,
                                  active=active_at_kill)
    if point == "after-final-250":
        assert killed_id in before  # the server has it; the queue still has it too

    summary = QueueProcessor(queue, mailer_for(scripted_server)).run_once()  # the restart

    assert (summary.sent, summary.deferred, summary.failed) == (MESSAGES - KILLED + 1, 0, 0)
    after = crashkit.received_ids(scripted_server)
    assert set(after) == expected  # nothing lost
    duplicates = {mid: count - 1 for mid, count in after.items() if count > 1}
    if point == "after-final-250":
        assert duplicates == {killed_id: 1}  # exactly the killed message, exactly once more
    else:
        assert duplicates == {}
    crashkit.assert_queue_empty(queue_path)


def test_a_message_claimed_by_a_live_processor_is_left_alone_and_taken_over_once_that_processor_is_killed(
        spawn, queue_path, scripted_server):
    """Overlapping runs where the first is stuck: the second never steals its claim, a third finishes it."""
    expected = queue_messages(queue_path, "live-claim")
    child = spawn(PROCESSOR, queue_path, scripted_server.port, "after-claim", 1)
    claimed_id = child.wait_for("parked").partition(" ")[2]  # alive, holding the first message
    queue = MaildirQueue(queue_path)

    overlapping = QueueProcessor(queue, mailer_for(scripted_server)).run_once()

    assert (overlapping.sent, overlapping.deferred, overlapping.failed) == (MESSAGES - 1, 0, 0)
    assert set(crashkit.received_ids(scripted_server)) == expected - {claimed_id}
    assert queue.counts() == dict(crashkit.EMPTY_COUNTS, active=1)

    child.kill()
    after_the_kill = QueueProcessor(queue, mailer_for(scripted_server)).run_once()

    assert after_the_kill.sent == 1
    received = crashkit.received_ids(scripted_server)
    assert set(received) == expected and set(received.values()) == {1}
    crashkit.assert_queue_empty(queue_path)
