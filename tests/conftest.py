"""Fixtures shared by every test: queues in temporary directories, explicit managers, real SMTP servers."""

import pytest
import transaction

from mailspool.maildir import MaildirQueue
from mailspool.sink import SMTPSink


@pytest.fixture
def queue_path(tmp_path):
    return tmp_path / "queue"


@pytest.fixture
def queue(queue_path):
    return MaildirQueue(queue_path)


@pytest.fixture
def manager():
    """An explicit transaction manager, as pyramid_tm's request.tm is."""
    return transaction.TransactionManager(explicit=True)


@pytest.fixture
def smtp_sink():
    """A real aiosmtpd server on 127.0.0.1 that records every message it accepts."""
    with SMTPSink() as sink:
        yield sink
