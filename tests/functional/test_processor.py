"""QueueProcessor outcomes against a real, scripted SMTP server."""

import os


from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.envelope import Attempt
from mailspool.processor import RetryPolicy
from mailspool.sink import free_port

MESSAGE = b"From: shop@example.org\r\nSubject: Hi\r\n\r\nHello.\r\n"


def commit(queue_path, manager, recipients, message=MESSAGE):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        return delivery.send("shop@example.org", recipients, message)


def processor_for(server, queue_path, clock, **settings):
    mailer = SMTPMailer(server.host, server.port, tls="none", timeout=10)
    return QueueProcessor(queue_path, mailer, clock=clock, **settings)


def failed_log(queue_path):
    (name,) = os.listdir(queue_path / "failed")
    with open(queue_path / "log" / name, "rb") as log_file:
        return [Attempt.from_line(line) for line in log_file]


def test_451_is_deferred_then_delivered_once(scripted_server, queue_path, manager, clock):
    scripted_server.handler.data_replies = ["451 4.3.0 try again later"]
    commit(queue_path, manager, ["a@example.org"])
    processor = processor_for(scripted_server, queue_path, clock)

    first = processor.run_once()
    assert (first.sent, first.deferred, first.failed) == (0, 1, 0)
    assert processor.run_once().deferred == 0  # not due yet: nothing attempted
    assert scripted_server.handler.data_attempts == 1

    clock.advance(3600)
    second = processor.run_once()
    assert (second.sent, second.deferred, second.failed) == (1, 0, 0)
    assert len(scripted_server.handler.received) == 1
    assert processor.queue.counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


def test_550_goes_to_failed_at_once_with_the_reply_and_is_never_retried(scripted_server, queue_path, manager, clock):
    scripted_server.handler.data_replies = ["550 5.7.1 rejected by policy"]
    commit(queue_path, manager, ["a@example.org"])
    processor = processor_for(scripted_server, queue_path, clock)

    assert processor.run_once().failed == 1
    clock.advance(10 * 24 * 3600)
    processor.run_once()

    assert scripted_server.handler.data_attempts == 1
    (attempt,) = failed_log(queue_path)
    assert "550 5.7.1 rejected by policy" in attempt.error
    assert attempt.server == f"127.0.0.1:{scripted_server.port}"


def test_partial_refusal_serves_each_recipient_once(scripted_server, queue_path, manager, clock):
    handler = scripted_server.handler
    handler.rcpt_replies = {"busy@example.org": "450 4.2.1 mailbox busy", "gone@example.org": "550 5.1.1 no such user"}
    commit(queue_path, manager, ["ok@example.org", "busy@example.org", "gone@example.org"])
    processor = processor_for(scripted_server, queue_path, clock)

    assert processor.run_once().deferred == 1
    assert [r[1] for r in handler.received] == [("ok@example.org",)]

    del handler.rcpt_replies["busy@example.org"]
    clock.advance(3600)
    assert processor.run_once().failed == 1

    # The second attempt went to the deferred recipient alone.
    assert [r[1] for r in handler.received] == [("ok@example.org",), ("busy@example.org",)]
    first, second = failed_log(queue_path)
    assert first.accepted == ("ok@example.org",)
    assert first.refused["busy@example.org"].code == 450
    assert first.refused["gone@example.org"] == (550, "5.1.1 no such user")
    assert second.accepted == ("busy@example.org",)
    assert "gone@example.org: 550 5.1.1 no such user" in second.error


def test_every_recipient_refused_for_good_fails_without_data(scripted_server, queue_path, manager, clock):
    scripted_server.handler.rcpt_replies = {"a@example.org": "550 no", "b@example.org": "551 moved"}
    commit(queue_path, manager, ["a@example.org", "b@example.org"])

    assert processor_for(scripted_server, queue_path, clock).run_once().failed == 1
    assert scripted_server.handler.data_attempts == 0
    (attempt,) = failed_log(queue_path)
    assert set(attempt.refused) == {"a@example.org", "b@example.org"}


def test_a_poison_file_does_not_stop_the_run(scripted_server, queue_path, manager, clock):
    commit(queue_path, manager, ["a@example.org"])
    (queue_path / "new" / "0.garbage").write_bytes(b"\x00\xff not a queue file")

    summary = processor_for(scripted_server, queue_path, clock).run_once()

    assert (summary.sent, summary.failed) == (1, 1)
    assert os.listdir(queue_path / "failed") == ["0.garbage"]


def test_an_unexpected_error_moves_the_message_aside_with_the_reason(queue_path, manager, clock):
    class BrokenMailer:
        def send(self, fromaddr, toaddrs, message):
            raise RuntimeError("bug in a custom mailer")

    commit(queue_path, manager, ["a@example.org"])
    commit(queue_path, manager, ["b@example.org"])

    summary = QueueProcessor(queue_path, BrokenMailer(), clock=clock).run_once()

    assert summary.failed == 2
    for name in os.listdir(queue_path / "failed"):
        with open(queue_path / "log" / name, "rb") as log_file:
            assert "RuntimeError: bug in a custom mailer" in Attempt.from_line(log_file.readline()).error


def test_a_mailer_returning_none_means_everyone_accepted(queue_path, manager, clock):
    """zope.sendmail's IMailer.send returns None; such mailers keep working."""
    sent = []

    class ZopeStyleMailer:
        def send(self, fromaddr, toaddrs, message):
            sent.append(toaddrs)

    commit(queue_path, manager, ["a@example.org"])
    assert QueueProcessor(queue_path, ZopeStyleMailer(), clock=clock).run_once().sent == 1
    assert sent == [["a@example.org"]]


def test_max_attempts_moves_a_message_to_failed(scripted_server, queue_path, manager, clock):
    scripted_server.handler.data_replies = ["451 later"] * 5
    commit(queue_path, manager, ["a@example.org"])
    processor = processor_for(scripted_server, queue_path, clock, max_attempts=2)

    assert processor.run_once().deferred == 1
    clock.advance(3600)
    assert processor.run_once().failed == 1
    assert "gave up after 2 attempt(s)" in failed_log(queue_path)[-1].error


def test_max_age_moves_a_message_to_failed(scripted_server, queue_path, manager, clock):
    scripted_server.handler.data_replies = ["451 later"]
    commit(queue_path, manager, ["a@example.org"])
    clock.advance(6 * 24 * 3600)

    assert processor_for(scripted_server, queue_path, clock).run_once().failed == 1


def test_an_unreachable_server_defers(queue_path, manager, clock):
    commit(queue_path, manager, ["a@example.org"])
    mailer = SMTPMailer("127.0.0.1", free_port(), tls="none", timeout=5)
    summary = QueueProcessor(queue_path, mailer, clock=clock).run_once()
    assert summary.deferred == 1
    (name,) = os.listdir(queue_path / "deferred")
    assert "cannot connect" in Attempt.from_line((queue_path / "log" / name).read_bytes()).error


def test_backoff_doubles_from_the_minimum_up_to_the_cap():
    policy = RetryPolicy(backoff_min=60, backoff_max=3600, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 7, 8, 100)] == [60, 120, 240, 3600, 3600, 3600]


def test_jitter_only_shortens_the_delay():
    policy = RetryPolicy(backoff_min=60, backoff_max=3600, jitter=0.1)
    delays = {policy.delay(3) for _ in range(200)}
    assert all(216 <= delay <= 240 for delay in delays)
    assert len(delays) > 1


def test_451_twice_then_accepted(scripted_server, queue_path, manager, clock):
    scripted_server.handler.data_replies = ["451 4.3.0 busy", "451 4.3.0 still busy"]
    commit(queue_path, manager, ["a@example.org"])
    processor = processor_for(scripted_server, queue_path, clock)

    outcomes = []
    for _ in range(3):
        summary = processor.run_once()
        outcomes.append((summary.sent, summary.deferred))
        clock.advance(3600)

    assert outcomes == [(0, 1), (0, 1), (1, 0)]
    assert len(scripted_server.handler.received) == 1


def test_8bit_and_utf8_messages_announce_8bitmime_and_smtputf8(scripted_server, queue_path, manager, clock):
    commit(queue_path, manager, ["body@example.org"], "Subject: Hello\r\n\r\nSchöne Grüße\r\n".encode())
    commit(queue_path, manager, ["header@example.org"], "Subject: Grüße\r\n\r\nSchöne Grüße\r\n".encode())
    commit(queue_path, manager, ["zoë@example.org"])
    commit(queue_path, manager, ["plain@example.org"])

    processor_for(scripted_server, queue_path, clock).run_once()

    handler = scripted_server.handler
    options = {recipients[0]: set(mail_options) - {f"SIZE={len(data)}"}
               for (_, recipients, data), mail_options in zip(handler.received, handler.mail_options)}
    assert options == {
        "body@example.org": {"BODY=8BITMIME"},  # 8-bit text, ASCII headers
        "header@example.org": {"BODY=8BITMIME", "SMTPUTF8"},  # UTF-8 in a header field (RFC 6532)
        "zoë@example.org": {"SMTPUTF8"},  # a non-ASCII address, ASCII data
        "plain@example.org": set(),
    }


def test_a_requeued_failed_message_is_retried_only_for_the_refused_recipient(scripted_server, queue_path, manager,
                                                                            clock):
    scripted_server.handler.rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
    commit(queue_path, manager, ["ok@example.org", "gone@example.org"])
    processor = processor_for(scripted_server, queue_path, clock)
    assert processor.run_once().failed == 1

    scripted_server.handler.rcpt_replies = {}  # the operator fixed the mailbox
    (queue_id,) = os.listdir(queue_path / "failed")
    assert processor.queue.requeue(queue_id) == "failed"
    assert processor.run_once().sent == 1

    assert [r[1] for r in scripted_server.handler.received] == [("ok@example.org",), ("gone@example.org",)]


def test_events_report_who_got_the_message_and_who_never_will(scripted_server, queue_path, manager, clock):
    import zope.event

    from mailspool.events import MailFailedEvent, MailSentEvent

    seen = []
    zope.event.subscribers.append(seen.append)
    try:
        scripted_server.handler.rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
        message_id = commit(queue_path, manager, ["ok@example.org", "gone@example.org"])
        processor_for(scripted_server, queue_path, clock).run_once()
    finally:
        zope.event.subscribers.remove(seen.append)

    assert [(type(e), e.message_id, e.recipients) for e in seen] == [
        (MailSentEvent, message_id, ("ok@example.org",)),
        (MailFailedEvent, message_id, ("gone@example.org",)),
    ]
    assert seen[1].reason == "550 5.1.1 no such user"
