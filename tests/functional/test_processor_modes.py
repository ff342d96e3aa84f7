"""Parallel workers, racing processors, the in-process thread, the daemon loop, scheduling and the delivery log."""

import datetime
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.processor import QueueProcessorThread
from harness import wait_for

MESSAGE = "From: shop@example.org\r\nSubject: number {number}\r\nMessage-Id: <{number}@example.org>\r\n\r\nHi.\r\n"


def commit_many(queue_path, manager, count):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        for number in range(count):
            delivery.send("shop@example.org", ["a@example.org"], MESSAGE.format(number=number).encode())


def received_ids(sink):
    return [line.split(b":", 1)[1].strip() for r in sink.received for line in r.data.split(b"\r\n")
            if line.lower().startswith(b"message-id:")]


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_deliver_each_message_exactly_once(smtp_sink, queue_path, manager, workers):
    commit_many(queue_path, manager, 500)
    mailer = SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")

    summary = QueueProcessor(queue_path, mailer, workers=workers).run_once()

    assert summary.sent == 500
    ids = received_ids(smtp_sink)
    assert len(ids) == 500 and len(set(ids)) == 500


PROCESSOR_PROCESS = textwrap.dedent("""
    import sys
    from mailspool import QueueProcessor, SMTPMailer
    queue_path, port = sys.argv[1], int(sys.argv[2])
    print(QueueProcessor(queue_path, SMTPMailer("127.0.0.1", port, tls="none")).run_once().sent)
""")


@pytest.mark.parametrize("processes", [2, 4])
def test_racing_processes_deliver_each_message_exactly_once(smtp_sink, queue_path, manager, processes):
    commit_many(queue_path, manager, 500)
    children = [
        subprocess.Popen([sys.executable, "-c", PROCESSOR_PROCESS, str(queue_path), str(smtp_sink.port)],
                         stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    sent = [int(child.communicate(timeout=300)[0]) for child in children]

    assert sum(sent) == 500
    ids = received_ids(smtp_sink)
    assert len(ids) == 500 and len(set(ids)) == 500


def test_the_thread_wakes_at_commit_long_before_its_poll(smtp_sink, queue_path, manager):
    thread = QueueProcessorThread(queue_path, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none"),
                                  poll_interval=600)
    thread.start()
    try:
        assert wait_for(lambda: os.path.isdir(queue_path / "wakeup") and os.listdir(queue_path / "wakeup"))
        commit_many(queue_path, manager, 1)
        # Without the wake-up the message would wait for the 600 s poll.
        assert wait_for(lambda: len(smtp_sink.received) == 1, timeout=60)
    finally:
        thread.stop(timeout=60)
    assert not thread.is_alive()
    assert os.listdir(queue_path / "wakeup") == []


DAEMON_PROCESS = textwrap.dedent("""
    import signal, sys
    from mailspool import QueueProcessor, SMTPMailer
    queue_path, port = sys.argv[1], int(sys.argv[2])
    processor = QueueProcessor(queue_path, SMTPMailer("127.0.0.1", port, tls="none"))
    signal.signal(signal.SIGTERM, lambda *_: processor.stop())
    processor.run_forever(poll_interval=600)
    print("stopped cleanly")
""")


def test_a_daemon_in_another_process_wakes_at_commit_and_stops_on_sigterm(smtp_sink, queue_path, manager):
    os.makedirs(queue_path)
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON_PROCESS, str(queue_path), str(smtp_sink.port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: os.path.isdir(queue_path / "wakeup") and os.listdir(queue_path / "wakeup"))
        commit_many(queue_path, manager, 3)
        assert wait_for(lambda: len(smtp_sink.received) == 3, timeout=60)
        daemon.terminate()
        assert daemon.communicate(timeout=60)[0].strip() == "stopped cleanly"
    finally:
        daemon.kill()
        daemon.wait(timeout=30)


def test_stop_ends_a_run_after_the_message_in_hand(smtp_sink, queue_path, manager):
    commit_many(queue_path, manager, 5)

    class StoppingMailer(SMTPMailer):
        """Asks the processor to stop while sending the first message, as SIGTERM would."""

        stops_left = 1

        def send(self, fromaddr, toaddrs, message):
            if self.stops_left:
                self.stops_left -= 1
                processor.stop()
            return super().send(fromaddr, toaddrs, message)

    processor = QueueProcessor(queue_path, StoppingMailer(smtp_sink.host, smtp_sink.port, tls="none"))
    summary = processor.run_once()

    assert summary.sent == 1
    assert processor.queue.counts()["ready"] == 4
    assert processor.run_once().sent == 4  # a new run is not stopped


def test_a_scheduled_message_is_left_alone_until_it_is_due(smtp_sink, queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    send_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)
    with manager:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE.format(number=1).encode(), send_at=send_at)
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE.format(number=2).encode(),
                      delay=datetime.timedelta(minutes=5))
    mailer = SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")

    assert QueueProcessor(queue_path, mailer).run_once().sent == 0
    later = send_at.timestamp() + 1
    assert QueueProcessor(queue_path, mailer, clock=lambda: later).run_once().sent == 2
    assert len(smtp_sink.received) == 2


def test_send_at_and_delay_together_are_refused(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager, pytest.raises(ValueError, match="send_at or delay, not both"):
        delivery.send("shop@example.org", ["a@example.org"], b"Subject: x\r\n\r\nx\r\n",
                      send_at=datetime.datetime.now(), delay=60)


def test_every_attempt_writes_one_delivery_log_line(scripted_server, queue_path, manager, caplog):
    scripted_server.handler.rcpt_replies = {"busy@example.org": "450 4.2.1 busy, try later"}
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        message_id = delivery.send("shop@example.org", ["ok@example.org", "busy@example.org"],
                                   MESSAGE.format(number=7).encode())
    caplog.set_level(logging.INFO, logger="mailspool.deliveries")

    QueueProcessor(queue_path, SMTPMailer(scripted_server.host, scripted_server.port, tls="none")).run_once()

    (line,) = [r.getMessage() for r in caplog.records if r.name == "mailspool.deliveries"]
    assert f"message_id={message_id} " in line
    assert "recipients=ok@example.org,busy@example.org " in line
    assert "outcome=partial " in line
    assert f"server=127.0.0.1:{scripted_server.port} " in line
    assert "attempt=1 " in line
    assert 'reply="busy@example.org: 450 4.2.1 busy, try later"' in line
    assert "Hi." not in line
