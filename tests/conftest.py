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


class ScriptedHandler:
    """An aiosmtpd handler whose replies a test sets: per recipient, and for each DATA in turn.

    ``rcpt_replies`` maps an address to the reply RCPT TO gets (absent:
    accepted). ``data_replies`` is consumed one reply per DATA (empty:
    accepted). Accepted messages land in ``received`` as (sender,
    accepted recipients, bytes); ``data_attempts`` counts every DATA.
    """

    def __init__(self):
        self.rcpt_replies = {}
        self.data_replies = []
        self.received = []
        self.data_attempts = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_attempts += 1
        if self.data_replies:
            return self.data_replies.pop(0)
        self.received.append((envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content))
        return "250 Message accepted"


@pytest.fixture
def scripted_server():
    """A real SMTP server on 127.0.0.1 whose replies the test scripts (see ScriptedHandler)."""
    handler = ScriptedHandler()
    with SMTPSink(handler=handler) as sink:
        sink.handler = handler
        yield sink
