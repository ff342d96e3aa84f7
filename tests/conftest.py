"""Fixtures shared by every test: queues in temporary directories, explicit managers, real SMTP servers."""

import crashkit
import pytest
import transaction
from harness import Clock, ScriptedHandler

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
def clock():
    return Clock()


@pytest.fixture
def smtp_sink():
    """A real aiosmtpd server on 127.0.0.1 that records every message it accepts."""
    with SMTPSink() as sink:
        yield sink


@pytest.fixture
def scripted_server():
    """A real SMTP server on 127.0.0.1 whose replies the test scripts (see ScriptedHandler)."""
    handler = ScriptedHandler()
    with SMTPSink(handler=handler) as sink:
        sink.handler = handler
        yield sink


@pytest.fixture
def spawn():
    """Start child Pythons (``crashkit.Child``); every one still running is killed and reaped afterwards."""
    with crashkit.Children() as children:
        yield children.spawn
