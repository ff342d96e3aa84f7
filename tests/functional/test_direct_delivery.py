"""DirectMailDelivery: checks in tpc_vote, sends in tpc_finish, never raises after the commit."""

import logging

import pytest
import zope.event

from mailspool import DirectMailDelivery, SMTPMailer
from mailspool.events import MailFailedEvent, MailSentEvent
from mailspool.exceptions import DeliveryError

MESSAGE = b"From: shop@example.org\r\nSubject: Hi\r\n\r\nHello.\r\n"


@pytest.fixture
def events():
    seen = []
    zope.event.subscribers.append(seen.append)
    yield seen
    zope.event.subscribers.remove(seen.append)


def direct(server, manager):
    return DirectMailDelivery(SMTPMailer(server.host, server.port, tls="none", timeout=10), transaction_manager=manager)


def test_a_refused_recipient_aborts_the_transaction_in_vote(scripted_server, manager):
    scripted_server.handler.rcpt_replies = {"gone@example.org": "550 5.1.1 no such user"}
    delivery = direct(scripted_server, manager)
    manager.begin()
    delivery.send("shop@example.org", ["ok@example.org", "gone@example.org"], MESSAGE)
    with pytest.raises(DeliveryError, match="gone@example.org: 550"):
        manager.commit()
    manager.abort()
    assert scripted_server.handler.data_attempts == 0


def test_a_failure_after_the_commit_is_logged_and_reported_not_raised(scripted_server, manager, events, caplog):
    scripted_server.handler.data_replies = ["554 5.6.0 message refused"]
    delivery = direct(scripted_server, manager)
    with manager:
        message_id = delivery.send("shop@example.org", ["ok@example.org"], MESSAGE)

    (event,) = events
    assert isinstance(event, MailFailedEvent)
    assert event.message_id == message_id and event.recipients == ("ok@example.org",)
    assert "554 5.6.0 message refused" in event.reason
    assert any(
        record.levelno == logging.ERROR and message_id in record.getMessage() for record in caplog.records
    )


def test_a_delivered_message_is_reported(scripted_server, manager, events):
    delivery = direct(scripted_server, manager)
    with manager:
        message_id = delivery.send("shop@example.org", ["ok@example.org"], MESSAGE)
    assert [(type(e), e.message_id, e.recipients) for e in events] == [(MailSentEvent, message_id, ("ok@example.org",))]
    assert len(scripted_server.handler.received) == 1
