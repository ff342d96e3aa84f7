"""Connection reuse, reconnection, server limits, dropped connections, SIZE and failover, against real servers."""

import logging
import os

from harness import DROP, ScriptedHandler

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.envelope import Attempt
from mailspool.exceptions import PermanentDeliveryError
from mailspool.sink import SMTPSink, free_port

MESSAGE = "From: shop@example.org\r\nSubject: number {number}\r\nMessage-Id: <{number}@example.org>\r\n\r\nHi.\r\n"


def commit_many(queue_path, manager, count, size=0):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        for number in range(count):
            body = MESSAGE.format(number=number) + ("x" * 76 + "\r\n") * (size // 78)  # SMTP-legal lines
            delivery.send("shop@example.org", ["a@example.org"], body.encode())


def mailer_for(server, **options):
    return SMTPMailer(server.host, server.port, tls="none", timeout=30, **options)


def test_one_connection_carries_many_messages(scripted_server, queue_path, manager):
    commit_many(queue_path, manager, 10)

    assert QueueProcessor(queue_path, mailer_for(scripted_server)).run_once().sent == 10

    assert scripted_server.handler.connections == 1
    assert len(scripted_server.handler.received) == 10


def test_a_connection_is_replaced_after_max_messages(scripted_server, queue_path, manager):
    commit_many(queue_path, manager, 7)

    QueueProcessor(queue_path, mailer_for(scripted_server, max_messages_per_connection=3)).run_once()

    assert scripted_server.handler.connections == 3
    assert len(scripted_server.handler.received) == 7


def test_a_connection_the_server_closed_is_replaced_without_losing_a_message(scripted_server, queue_path, manager):
    scripted_server.handler.close_after_accepting = True
    commit_many(queue_path, manager, 4)

    summary = QueueProcessor(queue_path, mailer_for(scripted_server)).run_once()

    assert (summary.sent, summary.deferred) == (4, 0)
    assert scripted_server.handler.connections == 4
    assert len(scripted_server.handler.received) == 4


def test_421_defers_that_message_and_the_run_goes_on_over_a_new_connection(scripted_server, queue_path, manager,
                                                                           clock):
    scripted_server.handler.data_replies = ["421 4.3.2 shutting down"]
    commit_many(queue_path, manager, 3)
    processor = QueueProcessor(queue_path, mailer_for(scripted_server), clock=clock)

    first = processor.run_once()
    assert (first.sent, first.deferred) == (2, 1)
    assert scripted_server.handler.connections == 2

    clock.advance(3600)
    assert processor.run_once().sent == 1
    subjects = sorted(data.split(b"Subject: ")[1].split(b"\r\n")[0] for _, _, data in scripted_server.handler.received)
    assert subjects == [b"number 0", b"number 1", b"number 2"]


def test_a_connection_dropped_during_data_defers_and_delivers_once_later(scripted_server, queue_path, manager,
                                                                         clock):
    scripted_server.handler.data_replies = [DROP]
    commit_many(queue_path, manager, 1)
    processor = QueueProcessor(queue_path, mailer_for(scripted_server), clock=clock)

    assert processor.run_once().deferred == 1
    (name,) = os.listdir(queue_path / "deferred")
    assert "connection failed while sending" in Attempt.from_line((queue_path / "log" / name).read_bytes()).error

    clock.advance(3600)
    assert processor.run_once().sent == 1
    assert len(scripted_server.handler.received) == 1


def test_a_message_over_the_announced_size_fails_without_mail_or_data(queue_path, manager):
    handler = ScriptedHandler()
    with SMTPSink(handler=handler, data_size_limit=2000) as server:
        commit_many(queue_path, manager, 1, size=5000)
        summary = QueueProcessor(queue_path, mailer_for(server)).run_once()

    assert summary.failed == 1
    assert (handler.mails, handler.data_attempts) == (0, 0)
    (name,) = os.listdir(queue_path / "failed")
    error = Attempt.from_line((queue_path / "log" / name).read_bytes()).error
    assert "accepts messages up to 2000 bytes (SIZE)" in error


def test_size_within_the_limit_is_announced_and_sent(queue_path, manager):
    handler = ScriptedHandler()
    with SMTPSink(handler=handler, data_size_limit=100_000) as server:
        mailer = mailer_for(server)
        mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\nsmall\r\n")
    assert len(handler.received) == 1


def test_an_unreachable_primary_fails_over_and_the_attempt_names_the_host_used(scripted_server, queue_path, manager):
    dead_port = free_port()
    mailer = SMTPMailer("127.0.0.1", dead_port, tls="none", timeout=10,
                       fallback_hosts=[f"127.0.0.1:{scripted_server.port}"])
    commit_many(queue_path, manager, 2)

    assert QueueProcessor(queue_path, mailer).run_once().sent == 2
    assert len(scripted_server.handler.received) == 2


def test_every_host_unreachable_defers_naming_each(queue_path, manager):
    first, second = free_port(), free_port()
    mailer = SMTPMailer("127.0.0.1", first, tls="none", timeout=10, fallback_hosts=[f"127.0.0.1:{second}"])
    commit_many(queue_path, manager, 1)

    assert QueueProcessor(queue_path, mailer).run_once().deferred == 1
    (name,) = os.listdir(queue_path / "deferred")
    error = Attempt.from_line((queue_path / "log" / name).read_bytes()).error
    assert f"127.0.0.1:{first}" in error and f"127.0.0.1:{second}" in error


def test_the_delivery_log_names_the_fallback_host(scripted_server, queue_path, manager, caplog):
    mailer = SMTPMailer("127.0.0.1", free_port(), tls="none", timeout=10,
                       fallback_hosts=[f"127.0.0.1:{scripted_server.port}"])
    commit_many(queue_path, manager, 1)
    caplog.set_level(logging.INFO, logger="mailspool.deliveries")

    QueueProcessor(queue_path, mailer).run_once()

    (line,) = [r.getMessage() for r in caplog.records if r.name == "mailspool.deliveries"]
    assert f"server=127.0.0.1:{scripted_server.port} " in line


def test_send_outside_a_session_closes_its_connection(scripted_server):
    mailer = mailer_for(scripted_server)
    mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n1\r\n")
    mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n2\r\n")
    assert scripted_server.handler.connections == 2


def test_a_session_reuses_one_connection(scripted_server):
    mailer = mailer_for(scripted_server)
    with mailer.session():
        for number in range(3):
            mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n%d\r\n" % number)
    assert scripted_server.handler.connections == 1


def test_permanent_errors_keep_the_connection_for_the_next_message(scripted_server):
    scripted_server.handler.data_replies = ["554 no"]
    mailer = mailer_for(scripted_server)
    with mailer.session():
        try:
            mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n1\r\n")
        except PermanentDeliveryError:
            pass
        mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n2\r\n")
    assert scripted_server.handler.connections == 1
    assert len(scripted_server.handler.received) == 1


def test_rset_only_follows_a_transaction_that_did_not_complete(scripted_server):
    scripted_server.handler.data_replies = [None, None, "554 5.6.0 refused", None]  # accept, accept, refuse, accept
    mailer = mailer_for(scripted_server)
    with mailer.session():
        mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n1\r\n")
        mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n2\r\n")  # completed before: no RSET
        try:
            mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n3\r\n")
        except PermanentDeliveryError:
            pass
        mailer.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\n4\r\n")  # after a refusal: RSET
    assert scripted_server.handler.resets == 1
    assert scripted_server.handler.connections == 1
    assert len(scripted_server.handler.received) == 3
