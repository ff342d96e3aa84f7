"""Fault injection for delivery: a real SMTP server on 127.0.0.1 that misbehaves when a test says so.

The server is aiosmtpd (``FaultServer``: an aiosmtpd ``Controller`` whose
``factory()`` builds ``FaultSMTP``) with a ``FaultHandler``, which extends
tests/harness.py's ``ScriptedHandler``. A test sets the script on
``server.handler`` before it runs a processor; everything the server saw
is recorded there.

The script (attributes of ``FaultHandler``):

``mail_replies``
    consumed one per MAIL FROM (empty: accepted); a ``421`` reply closes
    the connection after it is sent.
``rcpt_replies``
    ``{address: reply}``: refuse chosen recipients in RCPT TO (``450 ...``,
    ``550 ...``); a ``421`` reply closes the connection.
``data_replies``
    consumed one per DATA, answered after the whole message arrived:
    ``451 ...`` (N of them, then accept), ``550``/``552``/``554 ...``,
    ``421 ...`` (then the server closes), or ``DROP`` (the server closes
    without any reply after the final dot).
``drops_mid_data``
    the next N DATA commands get their 354, then the server reads only
    ``drop_after_bytes`` bytes of the message and resets the connection,
    the rest unread (a client with more to send than the sockets' buffers
    hold is cut off while it is still writing). What was read is kept in
    ``partial_data``.
``stalls``
    the next N DATA commands never get their final reply: the server takes
    the whole message and waits (at most ``STALL_LIMIT`` seconds; in
    practice until the client gives up and hangs up, which cancels the
    wait). ``stall_started`` is set when a stall begins.

Server-wide behaviour is chosen when it starts (``fault_servers(**options)``,
any keyword of aiosmtpd's ``SMTP``): ``enable_SMTPUTF8=False`` (no
SMTPUTF8), ``data_size_limit=N`` (SIZE N is announced and a larger message
refused with 552), ``tls_context=`` with ``require_starttls=True``
(STARTTLS with a certificate from the test CA, ``server_tls_context``),
and AUTH (``auth_options(tls_context)`` gives the keywords for a server
that requires STARTTLS, then AUTH, and takes only ``auth_credentials``).

Records: ``received`` (sender, accepted recipients, message bytes after
the server undid dot-stuffing, so they compare with what was committed),
``sessions`` (TLS on, authenticated) per accepted message, ``partial_data``,
and the counters of ``ScriptedHandler`` (``connections``, ``mails``,
``mail_options``, ``data_attempts``, ``resets``, ``closed_by_server``).

Every wait is bounded: the server's own waits by ``STALL_LIMIT``, and
every server is stopped at teardown (which cancels whatever it still
waits for).

Other fixtures: ``committed`` (commit a message through
``QueuedMailDelivery`` and get back what was queued), ``processor_for``
(a ``QueueProcessor`` with an ``SMTPMailer`` for a server, on the test's
clock), ``queue_entries`` (what ``IMailQueue.entries`` says about one state).
"""

import asyncio
import contextlib
import dataclasses
import ssl
import threading

import pytest
import trustme
from harness import DROP, ScriptedHandler
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, syntax

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.maildir import MaildirQueue
from mailspool.sink import free_port

# Generous: on a slow, shared machine a working exchange must never become a timeout.
TIMEOUT = 30.0
# The longest the server itself ever waits (a stall, reading the start of a message).
STALL_LIMIT = 60.0

AUTH_USERNAME = "mailer"
AUTH_PASSWORD = "Qx7-faults-Pw-9Lm"


class FaultHandler(ScriptedHandler):
    """``ScriptedHandler`` plus MAIL replies, 421 in RCPT, drops in the middle of DATA and stalls.

    See the module docstring for the script and the records.
    """

    DROP = DROP  # for data_replies: close after the message, before the final reply

    def __init__(self):
        super().__init__()
        self.mail_replies = []
        self.drops_mid_data = 0
        self.drop_after_bytes = 4096
        self.partial_data = []
        self.stalls = 0
        self.stall_started = threading.Event()  # set in the server's thread, waited for by the test
        self.sessions = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        reply = self.mail_replies.pop(0) if self.mail_replies else None
        if reply is None:
            return await super().handle_MAIL(server, session, envelope, address, mail_options)
        self.mails += 1
        self.mail_options.append(list(mail_options))
        if reply.startswith("421"):
            self._close_soon(server)
        return reply

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply is not None and reply.startswith("421"):
            self._close_soon(server)
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        if self.stalls > 0:
            self.stalls -= 1
            self.data_attempts += 1
            self.stall_started.set()
            await asyncio.sleep(STALL_LIMIT)  # cancelled as soon as the client hangs up
            return "451 4.3.0 the client waited a whole stall"
        accepted_before = len(self.received)
        reply = await super().handle_DATA(server, session, envelope)
        if len(self.received) > accepted_before:
            tls = server.transport.get_extra_info("ssl_object") is not None
            self.sessions.append((tls, bool(session.authenticated)))
        return reply


class FaultSMTP(SMTP):
    """aiosmtpd's SMTP, but DATA can be cut off in the middle (``FaultHandler.drops_mid_data``).

    aiosmtpd calls ``handle_DATA`` only once the whole message has arrived,
    so the cut has to happen here, where the message is read.
    """

    @syntax("DATA")
    async def smtp_DATA(self, arg):
        handler = self.event_handler
        if not (handler.drops_mid_data > 0 and self.envelope is not None and self.envelope.rcpt_tos and not arg):
            return await super().smtp_DATA(arg)
        handler.drops_mid_data -= 1
        handler.data_attempts += 1
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        received = bytearray()
        while len(received) < handler.drop_after_bytes and b"\r\n.\r\n" not in received:
            chunk = await asyncio.wait_for(self._reader.read(handler.drop_after_bytes - len(received)), STALL_LIMIT)
            if not chunk:
                break
            received += chunk
        handler.partial_data.append(bytes(received))
        self.transport.abort()  # a reset, with the rest of the message unread
        handler.closed_by_server += 1
        # connection_lost() cancels this coroutine at the loop's next turn;
        # returning instead would read the rest of the buffered message as commands.
        await asyncio.sleep(STALL_LIMIT)


class _FaultController(Controller):
    def factory(self):
        return FaultSMTP(self.handler, **self.SMTP_kwargs)


class FaultServer:
    """An aiosmtpd server on 127.0.0.1 with a ``FaultHandler`` (``handler``), started by ``start()``.

    ``smtp_options`` are the aiosmtpd ``SMTP`` keywords it was made with.
    """

    def __init__(self, **smtp_options):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.handler = FaultHandler()
        self.name = f"{self.host}:{self.port}"
        self.smtp_options = dict(smtp_options)
        self._controller = _FaultController(self.handler, hostname=self.host, port=self.port, **smtp_options)

    def start(self):
        self._controller.start()
        return self

    def stop(self):
        self._controller.stop()


@pytest.fixture
def fault_servers():
    """``fault_servers(**aiosmtpd SMTP options)`` -> a started ``FaultServer``; all stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(**smtp_options):
            server = FaultServer(**smtp_options).start()
            stack.callback(server.stop)
            return server

        yield start


@pytest.fixture
def fault_server(fault_servers):
    """A plain ``FaultServer`` (no TLS, no AUTH; SMTPUTF8, 8BITMIME and SIZE 32 MiB offered)."""
    return fault_servers()


# -- TLS and AUTH ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_ca():
    """A throwaway certificate authority: the certificates it issues are trusted by nobody else."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(test_ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "test-ca.pem"
    test_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def server_tls_context(test_ca):
    """``server_tls_context(name='127.0.0.1')``: a server-side context with a certificate for ``name``."""

    def make(name="127.0.0.1"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        test_ca.issue_cert(name).configure_cert(context)
        return context

    return make


def _check_login(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == AUTH_USERNAME.encode()
          and auth_data.password == AUTH_PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def auth_credentials():
    """``(username, password)`` that a server made with ``auth_options`` accepts (nothing else is)."""
    return AUTH_USERNAME, AUTH_PASSWORD


@pytest.fixture
def auth_options():
    """``auth_options(tls_context)``: aiosmtpd keywords for STARTTLS required, then AUTH required."""

    def options(tls_context):
        return {"tls_context": tls_context, "require_starttls": True, "authenticator": _check_login,
                "auth_required": True, "auth_require_tls": True}

    return options


# -- queue, commit, processor ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Committed:
    """One committed message: its Message-Id, queue id, and the bytes the queue holds for DATA."""

    message_id: str
    queue_id: str
    data: bytes


@pytest.fixture
def committed(queue_path, manager):
    """``committed(message, recipients, sender=...)``: send in one committed transaction -> ``Committed``."""

    def commit(message, recipients, sender="shop@example.org"):
        delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
        with manager:
            message_id = delivery.send(sender, list(recipients), message)
        queue = MaildirQueue(queue_path)
        (queue_id,) = [entry.queue_id for entry in queue.entries()
                       if entry.envelope is not None and entry.envelope.message_id == message_id]
        return Committed(message_id, queue_id, queue.read_message(queue_id))

    return commit


@pytest.fixture
def processor_for(queue_path, clock):
    """``processor_for(server, retry_settings=None, **SMTPMailer options)``: a QueueProcessor on the test's clock.

    The mailer uses ``tls='none'`` and ``TIMEOUT`` unless told otherwise.
    """

    def make(server, retry_settings=None, **mailer_options):
        mailer_options.setdefault("tls", "none")
        mailer_options.setdefault("timeout", TIMEOUT)
        mailer = SMTPMailer(server.host, server.port, **mailer_options)
        return QueueProcessor(queue_path, mailer, clock=clock, **(retry_settings or {}))

    return make


@pytest.fixture
def queue_entries(queue_path):
    """``queue_entries(state)``: the entries in that state (``QueueEntry``: envelope, attempts, last_reply)."""

    def entries(state):
        return list(MaildirQueue(queue_path).entries([state]))

    return entries
