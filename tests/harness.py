"""Helpers the tests (and bench/) import by name: bounded waiting, a test clock, a scripted SMTP handler, big queues.

They live here, not in conftest.py, because every conftest.py outside a
package is imported as the module ``conftest``, so ``from conftest import``
would find whichever one pytest loaded last.
"""

import asyncio
import os
import time

from mailspool.envelope import Attempt, Envelope
from mailspool.maildir import STATE_DIRS, unique_name
from mailspool.reply import SMTPReply


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
    ``hidden_extensions`` (upper case, e.g. ``{"8BITMIME"}``) are left out
    of the EHLO reply: a server that does not offer them.
    """

    def __init__(self):
        self.hidden_extensions = set()
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
        return [line for line in responses if line[4:].split(" ")[0].upper() not in self.hidden_extensions]

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


FILL_SHARES = {"ready": 3, "deferred": 1, "failed": 1}  # of every 5 messages


def fill_queue(queue, count, body_size=2000):
    """Write ``count`` messages straight into ``queue`` (format 1, no fsync): set-up for scale tests, fast.

    3/5 ready, 1/5 deferred ten minutes ahead and 1/5 failed, both with an
    attempt log (a 450 for the first of their two recipients). Message
    ``number`` has Message-Id ``<number@example.org>`` and is queued
    ``number`` seconds ago.
    """
    now = time.time()
    body = b"From: shop@example.org\r\nSubject: many\r\n\r\n" + b"x" * body_size + b"\r\n"
    states = [state for state, share in FILL_SHARES.items() for _ in range(share)]
    for number in range(count):
        state = states[number % len(states)]
        queue_id = unique_name()
        envelope = Envelope("shop@example.org", (f"user{number}@example.org", "audit@example.org"),
                            f"<{number}@example.org>", now - number)
        path = os.path.join(queue.path, STATE_DIRS[state], queue_id)
        with open(path, "wb") as stream:
            stream.write(envelope.to_bytes() + body)
        if state != "ready":
            attempt = Attempt(at=now, server="smtp.example.org:25",
                              refused={envelope.recipients[0]: SMTPReply(450, "4.2.1 mailbox busy")})
            with open(os.path.join(queue.path, "log", queue_id), "wb") as log_file:
                log_file.write(attempt.to_line())
        if state == "deferred":
            os.utime(path, (now + 600, now + 600))
