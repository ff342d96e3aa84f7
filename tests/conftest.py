"""Fixtures shared by every test: queues in temporary directories, explicit managers, real SMTP servers."""

import asyncio
import time

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


def wait_for(condition, timeout=60.0):
    """Poll ``condition`` until true or ``timeout`` seconds pass (a bound, never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Clock:
    """A clock the test moves forward, so retries become due without waiting."""

    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def smtp_sink():
    """A real aiosmtpd server on 127.0.0.1 that records every message it accepts."""
    with SMTPSink() as sink:
        yield sink


DROP = "drop the connection"


class ScriptedHandler:
    """An aiosmtpd handler whose replies a test sets: per recipient, and for each DATA in turn.

    ``rcpt_replies`` maps an address to the reply RCPT TO gets (absent:
    accepted). ``data_replies`` is consumed one entry per DATA (empty:
    accepted): a reply string, or ``DROP`` to close the connection without
    a final reply. A 421 reply closes the connection after it is sent, as
    RFC 5321 says. With ``close_after_accepting`` the server closes the
    connection after each accepted message (an idle timeout or a
    per-connection limit). ``data_delay`` seconds pass before each DATA
    reply (a slow server). Accepted messages land in ``received`` as
    (sender, accepted recipients, bytes); ``connections`` counts EHLOs,
    ``mails`` MAIL commands, ``data_attempts`` DATA commands, ``resets`` RSETs.
    """

    def __init__(self):
        self.rcpt_replies = {}
        self.data_replies = []
        self.close_after_accepting = False
        self.data_delay = 0.0
        self.received = []
        self.connections = 0
        self.mails = 0
        self.mail_options = []
        self.data_attempts = 0
        self.resets = 0
        self.closed_by_server = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mails += 1
        self.mail_options.append(list(mail_options))
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RSET(self, server, session, envelope):
        self.resets += 1
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_attempts += 1
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        reply = self.data_replies.pop(0) if self.data_replies else None
        if reply == DROP:
            server.transport.abort()  # gone before the final reply: the client cannot know
            self.closed_by_server += 1
            return "451 never sent"
        if (reply or "").startswith("421"):
            self._close_soon(server)
            return reply
        if reply is not None:
            return reply
        self.received.append((envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content))
        if self.close_after_accepting:
            self._close_soon(server)
        return "250 Message accepted"

    def _close_soon(self, server):
        def close():
            server.transport.close()
            self.closed_by_server += 1

        server.loop.call_soon(close)


@pytest.fixture
def scripted_server():
    """A real SMTP server on 127.0.0.1 whose replies the test scripts (see ScriptedHandler)."""
    handler = ScriptedHandler()
    with SMTPSink(handler=handler) as sink:
        sink.handler = handler
        yield sink
