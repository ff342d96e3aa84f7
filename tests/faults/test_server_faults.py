"""A misbehaving SMTP server: temporary and permanent replies, cut connections, stalls, partial refusals, SIZE.

Each test commits real messages through ``QueuedMailDelivery``, delivers
them with ``QueueProcessor`` and ``SMTPMailer`` against the ``FaultServer``
of conftest.py, and moves the processor's clock (never sleeps) to make
retries due. "Nothing lost" is checked the same way everywhere: what the
server accepted is byte for byte what was committed, each recipient got
it exactly once, and what was not delivered is still in the queue with
the server's reply.
"""

import pytest

SENDER = "shop@example.org"
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
DAYS = 24 * 3600
EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


def make_message(body_lines=3):
    body = "".join(f"Line {number} of the message body.\r\n" for number in range(body_lines))
    return f"From: Shop <{SENDER}>\r\nTo: {ALICE}\r\nSubject: Your order\r\n\r\n{body}".encode("ascii")


def outcome(summary):
    return summary.sent, summary.deferred, summary.failed


def assert_delivered_once(server, committed, recipients):
    """The server accepted the committed bytes once, for exactly ``recipients``."""
    assert server.handler.received == [(SENDER, tuple(recipients), committed.data)]


def assert_the_retry_delivers_once(processor, server, committed, clock):
    """An hour later the deferred message is sent, arrives once as committed, and leaves the queue."""
    clock.advance(3600)
    assert outcome(processor.run_once()) == (1, 0, 0)
    assert_delivered_once(server, committed, [ALICE])
    assert processor.queue.counts() == EMPTY


# -- 7: temporary trouble is deferred, retried and delivered once ----------------------------


def test_451_twice_then_accepted_is_delivered_once(fault_server, committed, processor_for, clock, queue_entries):
    fault_server.handler.data_replies = ["451 4.3.0 Try again later", "451 4.3.0 Still busy"]
    message = committed(make_message(), [ALICE])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 1, 0)
    (entry,) = queue_entries("deferred")
    assert "451 4.3.0 Try again later" in entry.last_reply
    assert outcome(processor.run_once()) == (0, 0, 0)  # not due yet: the server is not asked again
    assert fault_server.handler.data_attempts == 1

    clock.advance(3600)
    assert outcome(processor.run_once()) == (0, 1, 0)
    assert_the_retry_delivers_once(processor, fault_server, message, clock)
    assert fault_server.handler.data_attempts == 3


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA"])
def test_421_and_close_is_deferred_and_delivered_once_over_a_new_connection(
    stage, fault_server, committed, processor_for, clock, queue_entries
):
    handler = fault_server.handler
    reply = "421 4.3.2 Service shutting down"
    if stage == "MAIL":
        handler.mail_replies = [reply]
    elif stage == "RCPT":
        handler.rcpt_replies = {ALICE: reply}
    else:
        handler.data_replies = [reply]
    message = committed(make_message(), [ALICE])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 1, 0)
    (entry,) = queue_entries("deferred")
    assert reply in entry.last_reply
    assert handler.received == []

    handler.rcpt_replies = {}
    assert_the_retry_delivers_once(processor, fault_server, message, clock)
    assert handler.connections == 2  # the closed connection was not reused


# A 64 KB message fits in the sockets' buffers: the client has written it all
# and learns of the reset while it waits for the reply. 8 MB does not fit:
# the reset interrupts the client while it is still writing.
@pytest.mark.parametrize("body_lines", [2_000, 250_000], ids=["64KB", "8MB"])
def test_a_connection_cut_in_the_middle_of_data_is_deferred_and_delivered_once(
    body_lines, fault_server, committed, processor_for, clock, queue_entries
):
    handler = fault_server.handler
    handler.drops_mid_data = 1
    handler.drop_after_bytes = 4096
    message = committed(make_message(body_lines=body_lines), [ALICE])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 1, 0)
    # The server really had only the start of the message when it reset the connection.
    (partial,) = handler.partial_data
    assert 0 < len(partial) <= 4096 < len(message.data)
    assert message.data.startswith(partial)
    (entry,) = queue_entries("deferred")
    assert "connection failed while sending" in entry.last_reply
    assert handler.received == []

    assert_the_retry_delivers_once(processor, fault_server, message, clock)


def test_a_connection_closed_after_the_data_but_before_the_reply_is_deferred_and_delivered_once(
    fault_server, committed, processor_for, clock, queue_entries
):
    fault_server.handler.data_replies = [fault_server.handler.DROP]
    message = committed(make_message(), [ALICE])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 1, 0)
    assert "connection failed while sending" in queue_entries("deferred")[0].last_reply

    assert_the_retry_delivers_once(processor, fault_server, message, clock)


def test_a_server_stalling_past_the_timeout_is_deferred_and_delivered_once(
    fault_server, committed, processor_for, clock, queue_entries
):
    handler = fault_server.handler
    handler.stalls = 1
    message = committed(make_message(), [ALICE])
    # Short enough to wait out in a test; long enough for every other step on a slow machine.
    processor = processor_for(fault_server, timeout=4)

    assert outcome(processor.run_once()) == (0, 1, 0)
    assert handler.stall_started.is_set()  # it was the final reply to DATA that never came
    (entry,) = queue_entries("deferred")
    assert "timed out after 4s" in entry.last_reply
    assert handler.received == []

    assert_the_retry_delivers_once(processor, fault_server, message, clock)


# -- 8: a permanent refusal fails at once, with the reply, and is never retried -----------


@pytest.mark.parametrize("reply", [
    "550 5.7.1 Message rejected by policy",
    "554 5.7.1 Spam message rejected",
    "552 5.3.4 Message too big for this mailbox",
])
def test_a_permanent_reply_to_data_fails_with_the_reply_and_is_never_retried(
    reply, fault_server, committed, processor_for, clock, queue_entries
):
    fault_server.handler.data_replies = [reply]
    committed(make_message(), [ALICE])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 0, 1)
    for _ in range(3):
        clock.advance(3 * DAYS)
        assert outcome(processor.run_once()) == (0, 0, 0)

    assert fault_server.handler.data_attempts == 1
    (entry,) = queue_entries("failed")
    (attempt,) = entry.delivery_attempts
    assert reply in attempt.error
    assert attempt.server == fault_server.name
    assert reply in entry.last_reply
    assert fault_server.handler.received == []


def test_a_permanent_refusal_of_the_sender_fails_without_data(fault_server, committed, processor_for, clock,
                                                               queue_entries):
    fault_server.handler.mail_replies = ["553 5.7.1 Sender address rejected"]
    committed(make_message(), [ALICE])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 0, 1)
    clock.advance(10 * DAYS)
    assert outcome(processor.run_once()) == (0, 0, 0)

    assert fault_server.handler.data_attempts == 0
    assert "553 5.7.1 Sender address rejected" in queue_entries("failed")[0].last_reply


# -- 9: one recipient of three refused ---------------------------------------------------


def test_one_of_three_refused_for_good_the_others_get_it_once_and_the_reply_is_kept(
    fault_server, committed, processor_for, clock, queue_entries
):
    refusal = "550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown"
    fault_server.handler.rcpt_replies = {BOB: refusal}
    message = committed(make_message(), [ALICE, BOB, CAROL])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 0, 1)
    for _ in range(3):
        clock.advance(3 * DAYS)
        assert outcome(processor.run_once()) == (0, 0, 0)

    assert_delivered_once(fault_server, message, [ALICE, CAROL])
    (entry,) = queue_entries("failed")
    (attempt,) = entry.delivery_attempts
    assert attempt.accepted == (ALICE, CAROL)
    assert str(attempt.refused[BOB]) == refusal
    assert f"{BOB}: {refusal}" in attempt.error


def test_one_of_three_refused_for_now_is_retried_alone_until_accepted(
    fault_server, committed, processor_for, clock, queue_entries
):
    handler = fault_server.handler
    refusal = "450 4.2.1 <bob@example.org>: Mailbox busy, try again later"
    handler.rcpt_replies = {BOB: refusal}
    message = committed(make_message(), [ALICE, BOB, CAROL])
    processor = processor_for(fault_server)

    assert outcome(processor.run_once()) == (0, 1, 0)
    (entry,) = queue_entries("deferred")
    assert entry.delivery_attempts[0].accepted == (ALICE, CAROL)
    assert str(entry.delivery_attempts[0].refused[BOB]) == refusal
    assert f"{BOB}: {refusal}" in entry.last_reply

    clock.advance(3600)  # still busy: only Bob is asked, and refused again
    assert outcome(processor.run_once()) == (0, 1, 0)
    second = queue_entries("deferred")[0].delivery_attempts[1]
    assert (second.accepted, list(second.refused)) == ((), [BOB])
    handler.rcpt_replies = {}
    clock.advance(3600)
    assert outcome(processor.run_once()) == (1, 0, 0)

    assert handler.received == [
        (SENDER, (ALICE, CAROL), message.data),
        (SENDER, (BOB,), message.data),
    ]
    assert handler.mails == 3
    assert processor.queue.counts() == EMPTY


def test_a_recipient_refused_for_now_until_the_retries_run_out_fails_with_its_reply_alone(
    fault_server, committed, processor_for, clock, queue_entries
):
    refusal = "450 4.2.2 Mailbox full"
    fault_server.handler.rcpt_replies = {BOB: refusal}
    message = committed(make_message(), [ALICE, BOB, CAROL])
    processor = processor_for(fault_server, retry_settings={"max_attempts": 3})

    outcomes = []
    for _ in range(5):
        outcomes.append(outcome(processor.run_once()))
        clock.advance(3600)

    # The first attempt served Alice and Carol, so it is not a failure; three failures follow.
    assert outcomes == [(0, 1, 0), (0, 1, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0)]
    assert fault_server.handler.received == [(SENDER, (ALICE, CAROL), message.data)]
    (entry,) = queue_entries("failed")
    assert [attempt.accepted for attempt in entry.delivery_attempts] == [(ALICE, CAROL), (), (), ()]
    assert refusal in entry.last_reply


# -- 10: over the server's SIZE ---------------------------------------------------------------


def test_a_message_over_the_announced_size_fails_for_good_without_data(
    fault_servers, committed, processor_for, clock, queue_entries
):
    server = fault_servers(data_size_limit=10_000)
    big = committed(make_message(body_lines=1000), [ALICE])
    processor = processor_for(server)

    assert outcome(processor.run_once()) == (0, 0, 1)
    clock.advance(10 * DAYS)
    assert outcome(processor.run_once()) == (0, 0, 0)

    assert (server.handler.mails, server.handler.data_attempts) == (0, 0)
    (entry,) = queue_entries("failed")
    assert f"accepts messages up to 10000 bytes (SIZE); this one has {len(big.data)}" in entry.last_reply
    assert entry.delivery_attempts[0].server == server.name


def test_a_message_of_exactly_the_announced_size_is_delivered(fault_servers, committed, processor_for):
    server = fault_servers(data_size_limit=10_000)
    head = (f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: exactly the limit\r\n"
            "Message-Id: <exact-size@example.org>\r\nDate: Mon, 23 Nov 2026 18:30:00 +0000\r\n\r\n").encode()
    lines = b"".join(b"x" * 98 + b"\r\n" for _ in range(90))
    padding = 10_000 - len(head) - len(lines) - 2
    data = head + lines + b"y" * padding + b"\r\n"
    assert len(data) == 10_000
    message = committed(data, [ALICE])
    assert message.data == data  # Message-Id and Date given: the queue holds the bytes as they are

    assert processor_for(server).run_once().sent == 1
    assert server.handler.received == [(SENDER, (ALICE,), data)]
    assert "SIZE=10000" in server.handler.mail_options[-1]
