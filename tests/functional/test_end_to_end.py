"""Commit -> run_once -> a real aiosmtpd server has the message, byte for byte."""

import email.message
import subprocess
import sys

import pytest

from mailspool import DirectMailDelivery, QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.exceptions import PermanentDeliveryError


def plain_message(subject="Order shipped"):
    message = email.message.EmailMessage()
    message["From"] = "Shop <shop@example.org>"
    message["To"] = "alice@example.org"
    message["Bcc"] = "audit@example.org"
    message["Subject"] = subject
    message.set_content("Hello Alice,\n.\n.. two dots\nyour parcel is on its way.\n")
    return message


def queued_bytes(queue):
    (queue_id,) = queue.due()
    claimed = queue.claim(queue_id)
    data = claimed.read()
    queue.release(claimed)
    return data


def test_committed_message_arrives_byte_identical_without_bcc(queue_path, manager, smtp_sink):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        delivery.send("shop@example.org", ["alice@example.org", "audit@example.org"], plain_message())
    committed = queued_bytes(delivery.queue)

    summary = QueueProcessor(queue_path, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")).run_once()

    assert (summary.sent, summary.deferred, summary.failed) == (1, 0, 0)
    (received,) = smtp_sink.received
    assert received.data == committed
    assert received.sender == "shop@example.org"
    assert received.recipients == ("alice@example.org", "audit@example.org")
    assert b"Bcc" not in received.data and b"audit@" not in received.data
    assert delivery.queue.counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


def test_aborted_message_never_reaches_the_server(queue_path, manager, smtp_sink):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    manager.begin()
    delivery.send("shop@example.org", ["alice@example.org"], plain_message("aborted"))
    manager.abort()
    with manager:
        delivery.send("shop@example.org", ["alice@example.org"], plain_message("committed"))

    QueueProcessor(queue_path, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")).run_once()

    assert [b"committed" in r.data for r in smtp_sink.received] == [True]


def test_non_ascii_address_is_delivered_with_smtputf8(queue_path, manager, smtp_sink):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    message = email.message.EmailMessage(policy=email.policy.SMTPUTF8)
    message["From"] = "Zoë <zoë@example.org>"
    message["To"] = "用户@例子.广告"
    message["Subject"] = "Grüße"
    message.set_content("Hallo 🎉\n")
    with manager:
        delivery.send("zoë@example.org", ["用户@例子.广告"], message)

    summary = QueueProcessor(queue_path, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")).run_once()

    assert summary.sent == 1
    (received,) = smtp_sink.received
    assert received.recipients == ("用户@例子.广告",)
    assert "Grüße".encode() in received.data


def test_direct_delivery_sends_at_commit_and_not_on_abort(manager, smtp_sink):
    delivery = DirectMailDelivery(SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none"), transaction_manager=manager)
    manager.begin()
    delivery.send("shop@example.org", ["alice@example.org"], plain_message("aborted"))
    manager.abort()
    with manager:
        delivery.send("shop@example.org", ["alice@example.org"], plain_message("committed"))
        assert smtp_sink.received == []

    assert [b"committed" in r.data for r in smtp_sink.received] == [True]


def test_direct_delivery_vote_fails_when_the_server_is_unreachable(manager):
    from mailspool.sink import free_port

    delivery = DirectMailDelivery(SMTPMailer("127.0.0.1", free_port(), tls="none", timeout=5), transaction_manager=manager)
    manager.begin()
    delivery.send("shop@example.org", ["alice@example.org"], plain_message())
    with pytest.raises(Exception, match="cannot connect"):
        manager.commit()
    manager.abort()


def test_smtputf8_is_required_for_non_ascii_addresses(smtp_sink_without_smtputf8):
    mailer = SMTPMailer(smtp_sink_without_smtputf8.host, smtp_sink_without_smtputf8.port, tls="none")
    with pytest.raises(PermanentDeliveryError, match="SMTPUTF8"):
        mailer.send("shop@example.org", ["用户@例子.广告"], b"Subject: x\r\n\r\nx\r\n")
    assert smtp_sink_without_smtputf8.received == []


@pytest.fixture
def smtp_sink_without_smtputf8():
    from mailspool.sink import SMTPSink

    with SMTPSink(enable_SMTPUTF8=False) as sink:
        yield sink


def test_the_demo_runs_and_reports_success():
    result = subprocess.run(
        [sys.executable, "-m", "mailspool", "demo"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the aborted message never appeared" in result.stdout
    assert "the server received 3 message(s)" in result.stdout
