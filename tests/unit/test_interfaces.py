"""Every implementation, test doubles included, is checked against the contract it claims."""

import pytest
import transaction
from transaction.interfaces import ISavepointDataManager
from zope.interface.verify import verifyClass, verifyObject

from mailspool import (
    DebugMailer, DirectMailDelivery, QueuedMailDelivery, QueueProcessor, QueueProcessorThread, SendmailMailer,
    SMTPMailer,
)
from mailspool import interfaces
from mailspool.datamanager import MailDataManager
from mailspool.envelope import Envelope
from mailspool.events import MailFailedEvent, MailSentEvent


def test_queued_delivery(queue_path):
    delivery = QueuedMailDelivery(queue_path)
    assert verifyObject(interfaces.IQueuedMailDelivery, delivery)
    assert delivery.queuePath == str(queue_path)


def test_direct_delivery():
    assert verifyObject(interfaces.IDirectMailDelivery, DirectMailDelivery(DebugMailer()))


def test_smtp_mailer():
    assert verifyObject(interfaces.ISMTPMailer, SMTPMailer("127.0.0.1", 2525, tls="none"))


def test_sendmail_mailer():
    assert verifyObject(interfaces.IMailer, SendmailMailer("/usr/sbin/sendmail"))


def test_debug_mailer():
    assert verifyObject(interfaces.IMailer, DebugMailer())


def test_maildir_queue(queue):
    assert verifyObject(interfaces.IMailQueue, queue)


def test_staged_and_claimed_files(queue):
    envelope = Envelope("a@example.org", ("b@example.org",), "<x@example.org>", 0.0)
    staged = queue.add(envelope, b"Subject: x\r\n\r\nbody\r\n")
    assert verifyObject(interfaces.IStagedMessage, staged)
    staged.publish()
    (queue_id,) = queue.due()
    claimed = queue.claim(queue_id)
    assert verifyObject(interfaces.IClaimedMessage, claimed)
    queue.release(claimed)


def test_queue_processor(queue):
    assert verifyObject(interfaces.IMailQueueProcessor, QueueProcessor(queue, DebugMailer()))
    assert verifyObject(interfaces.IMailQueueProcessor, QueueProcessorThread(queue, DebugMailer()).processor)


def test_queue_listener(queue):
    listener = queue.listener()
    try:
        assert verifyObject(interfaces.IQueueListener, listener)
    finally:
        listener.close()


def test_data_manager():
    manager = transaction.TransactionManager()
    assert verifyObject(ISavepointDataManager, MailDataManager(manager, operation=None, description="test"))


@pytest.mark.parametrize("event, interface", [
    (MailSentEvent("<x@example.org>", ["a@example.org"]), interfaces.IMailSentEvent),
    (MailFailedEvent("<x@example.org>", ["a@example.org"], "550 no"), interfaces.IMailFailedEvent),
])
def test_events(event, interface):
    assert verifyObject(interface, event)


def test_zope_sendmail_names_are_all_there():
    for name in ("IMailDelivery", "IDirectMailDelivery", "IQueuedMailDelivery", "IMailer", "ISMTPMailer",
                 "IMailQueueProcessor", "IMailQueue"):
        assert getattr(interfaces, name).__doc__, name
    assert verifyClass(interfaces.IMailDelivery, QueuedMailDelivery)


def test_pyramid_mailer_and_its_test_double(tmp_path):
    from mailspool.pyramid import Mailer, settings_from_pyramid
    from mailspool.testing import DummyMailer

    mailer = Mailer(settings_from_pyramid({"mail.queue_path": str(tmp_path / "q")}))
    assert verifyObject(interfaces.IPyramidMailer, mailer)
    assert verifyObject(interfaces.IPyramidMailer, mailer.bind(transaction_manager=transaction.TransactionManager()))
    assert verifyObject(interfaces.IPyramidMailer, DummyMailer())
