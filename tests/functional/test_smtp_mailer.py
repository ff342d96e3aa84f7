"""SMTPMailer against a real aiosmtpd server on 127.0.0.1: TLS, AUTH, replies, timeouts, vote.

Every server is a ``mailspool.sink.SMTPSink`` with the ``Recorder`` handler
below, which accepts, refuses or stalls as a test tells it and records what
it saw. Certificates come from a throwaway ``trustme`` CA.
"""

import asyncio
import base64
import contextlib
import logging
import smtplib
import socket
import ssl
import threading
import traceback

import pytest
import trustme
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailspool.exceptions import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from mailspool.mailer import SEPARATE_END_OF_DATA, SMTPMailer
from mailspool.reply import SMTPReply
from mailspool.sink import ReceivedMessage, SMTPSink, free_port

# Generous: a slow machine must never turn a working exchange into a timeout.
TIMEOUT = 30.0

SENDER = "shop@example.org"
ALICE = "alice@example.org"
BOB = "bob@example.org"
CAROL = "carol@example.org"
DAVE = "dave@example.org"

USERNAME = "mailer"
PASSWORD = "Zq8-secret-pw-Xv3"


def make_message(subject="Hello"):
    return (
        f"From: Shop <{SENDER}>\r\nTo: {ALICE}\r\nSubject: {subject}\r\n"
        "Message-Id: <test-1@example.org>\r\n\r\nHello Alice,\r\nyour parcel is on its way.\r\n"
    ).encode("ascii")


class Recorder:
    """aiosmtpd handler that records what it receives, and refuses or stalls on request.

    ``rcpt_replies`` maps recipients to the reply RCPT TO gets (others are
    accepted); ``data_reply`` answers DATA; ``data_delay`` stalls DATA that
    many seconds first (``data_started`` is set when it begins). Counters
    are updated in the server's thread before it replies, so they are
    current once the client's command has returned.
    """

    def __init__(self, rcpt_replies=None, data_reply="250 Message accepted for delivery", data_delay=0):
        self.rcpt_replies = dict(rcpt_replies or {})
        self.data_reply = data_reply
        self.data_delay = data_delay
        self.data_started = threading.Event()
        self.received = []
        self.sessions = []  # (session.ssl is not None, TLS on the transport, authenticated) per DATA
        self.ehlos = 0
        self.quits = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlos += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_delay:
            self.data_started.set()
            await asyncio.sleep(self.data_delay)
        if self.data_reply.startswith("250"):
            self.received.append(
                ReceivedMessage(envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content)
            )
            self.sessions.append(
                (
                    session.ssl is not None,
                    server.transport.get_extra_info("ssl_object") is not None,
                    bool(session.authenticated),
                )
            )
        return self.data_reply

    async def handle_QUIT(self, server, session, envelope):
        self.quits += 1
        return "221 Bye"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def server_certificate(ca):
    return ca.issue_cert("127.0.0.1")


@pytest.fixture
def server_tls(server_certificate):
    """A server-side TLS context with a certificate for 127.0.0.1 signed by the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_certificate.configure_cert(context)
    return context


@pytest.fixture
def serve():
    """Start an SMTPSink with the given handler and aiosmtpd options; stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(handler, **options):
            return stack.enter_context(SMTPSink(handler=handler, **options))

        yield start


def mailer_for(sink, **options):
    options.setdefault("timeout", TIMEOUT)
    return SMTPMailer(sink.host, sink.port, **options)


# -- TLS -----------------------------------------------------------------------


def test_starttls_with_ca_file_delivers_over_tls(serve, server_tls, ca_file):
    handler = Recorder()
    sink = serve(handler, tls_context=server_tls, require_starttls=True)

    refused = mailer_for(sink, tls="starttls", ca_file=ca_file).send(SENDER, [ALICE], make_message())

    assert refused == {}
    assert handler.received == [ReceivedMessage(SENDER, (ALICE,), make_message())]
    assert handler.sessions == [(True, True, False)]


def test_starttls_with_untrusted_certificate_fails_verification(serve, server_tls):
    handler = Recorder()
    sink = serve(handler, tls_context=server_tls, require_starttls=True)

    with pytest.raises(TransientDeliveryError) as info:
        mailer_for(sink, tls="starttls").send(SENDER, [ALICE], make_message())

    assert f"127.0.0.1:{sink.port}" in str(info.value)
    assert "certificate verify failed" in str(info.value).lower()
    assert info.value.server == f"127.0.0.1:{sink.port}"
    assert handler.received == []


def test_starttls_without_verification_accepts_untrusted_certificate(serve, server_tls):
    handler = Recorder()
    sink = serve(handler, tls_context=server_tls, require_starttls=True)

    refused = mailer_for(sink, tls="starttls", verify=False).send(SENDER, [ALICE], make_message())

    assert refused == {}
    assert [r.data for r in handler.received] == [make_message()]
    assert handler.sessions == [(True, True, False)]


def test_starttls_required_but_not_offered_fails_without_plain_text_fallback(serve, ca_file):
    handler = Recorder()
    sink = serve(handler)  # no tls_context: STARTTLS is not offered

    with pytest.raises(TransientDeliveryError) as info:
        mailer_for(sink, tls="starttls", ca_file=ca_file).send(SENDER, [ALICE], make_message())

    assert "STARTTLS" in str(info.value)
    assert info.value.server == f"127.0.0.1:{sink.port}"
    assert handler.received == []


def test_opportunistic_without_starttls_delivers_in_plain_text(serve, ca_file):
    handler = Recorder()
    sink = serve(handler)

    refused = mailer_for(sink, tls="opportunistic", ca_file=ca_file).send(SENDER, [ALICE], make_message())

    assert refused == {}
    assert [r.data for r in handler.received] == [make_message()]
    assert handler.sessions == [(False, False, False)]


def test_opportunistic_uses_starttls_when_offered(serve, server_tls, ca_file):
    handler = Recorder()
    # require_starttls: the server itself refuses MAIL on a plain session.
    sink = serve(handler, tls_context=server_tls, require_starttls=True)

    refused = mailer_for(sink, tls="opportunistic", ca_file=ca_file).send(SENDER, [ALICE], make_message())

    assert refused == {}
    assert [r.data for r in handler.received] == [make_message()]
    assert handler.sessions == [(True, True, False)]


def test_implicit_tls_with_ca_file_delivers(serve, server_tls, ca_file):
    handler = Recorder()
    sink = serve(handler, ssl_context=server_tls)  # aiosmtpd's Controller wraps the listener in TLS

    refused = mailer_for(sink, tls="ssl", ca_file=ca_file).send(SENDER, [ALICE], make_message())

    assert refused == {}
    assert handler.received == [ReceivedMessage(SENDER, (ALICE,), make_message())]
    (session_ssl, transport_tls, _) = handler.sessions[0]
    assert transport_tls and not session_ssl  # TLS from the first byte, no STARTTLS


# -- AUTH ----------------------------------------------------------------------


def check_credentials(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USERNAME.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


def auth_server(serve, server_tls, handler):
    return serve(
        handler,
        tls_context=server_tls,
        require_starttls=True,
        authenticator=check_credentials,
        auth_required=True,
        auth_require_tls=True,
    )


def test_auth_with_right_password_delivers(serve, server_tls, ca_file):
    handler = Recorder()
    sink = auth_server(serve, server_tls, handler)
    mailer = mailer_for(sink, tls="starttls", ca_file=ca_file, username=USERNAME, password=PASSWORD)

    assert mailer.send(SENDER, [ALICE], make_message()) == {}

    assert [r.data for r in handler.received] == [make_message()]
    assert handler.sessions == [(True, True, True)]


def test_auth_with_wrong_password_stays_queued_and_never_shows_the_password(
    serve, server_tls, ca_file, caplog
):
    caplog.set_level(logging.DEBUG)
    wrong = PASSWORD + "-wrong"
    handler = Recorder()
    sink = auth_server(serve, server_tls, handler)
    mailer = mailer_for(sink, tls="starttls", ca_file=ca_file, username=USERNAME, password=wrong)

    with pytest.raises(TransientDeliveryError) as info:
        mailer.send(SENDER, [ALICE], make_message())

    assert info.value.reply.code == 535
    assert USERNAME in str(info.value)
    assert handler.received == []
    encoded = base64.b64encode(wrong.encode()).decode()
    everything = [
        str(info.value),
        "".join(traceback.format_exception(info.value)),
        repr(mailer),
        caplog.text,
        *(record.getMessage() for record in caplog.records),
    ]
    for text in everything:
        assert PASSWORD not in text
        assert encoded not in text


# -- replies -------------------------------------------------------------------


def test_partly_refused_recipients_are_returned_and_the_others_get_the_message(serve):
    handler = Recorder({BOB: "550 5.1.1 No such user", CAROL: "450 4.2.1 Mailbox busy"})
    sink = serve(handler)

    refused = mailer_for(sink, tls="none").send(SENDER, [ALICE, BOB, CAROL, DAVE], make_message())

    assert refused == {
        BOB: SMTPReply(550, "5.1.1 No such user"),
        CAROL: SMTPReply(450, "4.2.1 Mailbox busy"),
    }
    assert handler.received == [ReceivedMessage(SENDER, (ALICE, DAVE), make_message())]


def test_addresses_with_display_names_are_sent_as_smtplib_would_and_plain_ones_as_given(serve):
    # Plain addresses skip smtplib's address parser; anything else (here a
    # display name, which IMailer callers may pass) still goes through it.
    handler = Recorder()
    sink = serve(handler)
    tagged = "o'neil+orders/2026=x@example.org"

    refused = mailer_for(sink, tls="none").send(f"Shop <{SENDER}>", [f"Alice <{ALICE}>", tagged], make_message())

    assert refused == {}
    assert handler.received == [ReceivedMessage(SENDER, (ALICE, tagged), make_message())]


def test_every_recipient_refused_for_good_is_permanent(serve):
    handler = Recorder({BOB: "550 5.1.1 No such user", CAROL: "553 5.1.3 Bad address"})
    sink = serve(handler)

    with pytest.raises(PermanentDeliveryError) as info:
        mailer_for(sink, tls="none").send(SENDER, [BOB, CAROL], make_message())

    assert info.value.refused == {
        BOB: SMTPReply(550, "5.1.1 No such user"),
        CAROL: SMTPReply(553, "5.1.3 Bad address"),
    }
    assert handler.received == []


def test_every_recipient_refused_with_some_temporary_replies_is_transient(serve):
    handler = Recorder({BOB: "550 5.1.1 No such user", CAROL: "450 4.2.1 Mailbox busy"})
    sink = serve(handler)

    with pytest.raises(TransientDeliveryError) as info:
        mailer_for(sink, tls="none").send(SENDER, [BOB, CAROL], make_message())

    assert info.value.refused == {
        BOB: SMTPReply(550, "5.1.1 No such user"),
        CAROL: SMTPReply(450, "4.2.1 Mailbox busy"),
    }
    assert handler.received == []


def test_data_answered_with_4xx_is_transient(serve):
    sink = serve(Recorder(data_reply="451 4.3.0 Try again later"))

    with pytest.raises(TransientDeliveryError) as info:
        mailer_for(sink, tls="none").send(SENDER, [ALICE], make_message())

    assert info.value.reply == SMTPReply(451, "4.3.0 Try again later")


def test_data_answered_with_5xx_is_permanent(serve):
    sink = serve(Recorder(data_reply="554 5.7.1 Message rejected as spam"))

    with pytest.raises(PermanentDeliveryError) as info:
        mailer_for(sink, tls="none").send(SENDER, [ALICE], make_message())

    assert info.value.reply == SMTPReply(554, "5.7.1 Message rejected as spam")


# -- network trouble -----------------------------------------------------------


def test_nothing_listening_is_transient_cannot_connect():
    port = free_port()
    mailer = SMTPMailer("127.0.0.1", port, tls="none", timeout=TIMEOUT)

    with pytest.raises(TransientDeliveryError) as info:
        mailer.send(SENDER, [ALICE], make_message())

    assert "cannot connect" in str(info.value)
    assert info.value.server == f"127.0.0.1:{port}"
    assert info.value.reply is None


def test_server_stalling_past_the_timeout_is_transient_timed_out(serve):
    # The server is cancelled when the client hangs up, so the 3s are rarely waited out.
    handler = Recorder(data_delay=3)
    sink = serve(handler)

    with pytest.raises(TransientDeliveryError) as info:
        mailer_for(sink, tls="none", timeout=1).send(SENDER, [ALICE], make_message())

    assert "timed out" in str(info.value)
    assert handler.data_started.wait(TIMEOUT)  # the stall was in DATA, not in connecting
    assert handler.received == []


# -- vote ----------------------------------------------------------------------


def test_vote_raises_for_a_refused_recipient_and_keeps_no_connection(serve):
    handler = Recorder({BOB: "550 5.1.1 No such user"})
    sink = serve(handler)
    mailer = mailer_for(sink, tls="none")

    with pytest.raises(DeliveryError) as info:
        mailer.vote(SENDER, [ALICE, BOB], make_message())

    assert BOB in str(info.value)
    assert handler.quits == 1
    mailer.abort()
    assert handler.received == []


def test_vote_connection_is_reused_by_send_and_closed_by_abort(serve):
    handler = Recorder()
    sink = serve(handler)
    mailer = mailer_for(sink, tls="none")

    mailer.vote(SENDER, [ALICE], make_message("first"))
    assert (handler.ehlos, handler.quits, handler.received) == (1, 0, [])
    assert mailer.send(SENDER, [ALICE], make_message("first")) == {}
    assert (handler.ehlos, handler.quits) == (1, 1)  # the voted connection, then QUIT
    assert [r.data for r in handler.received] == [make_message("first")]

    mailer.vote(SENDER, [ALICE], make_message("second"))
    assert (handler.ehlos, handler.quits) == (2, 1)
    mailer.abort()
    assert (handler.ehlos, handler.quits) == (2, 2)
    mailer.abort()  # nothing held: still fine
    assert [r.data for r in handler.received] == [make_message("first")]


def test_vote_connection_belongs_to_the_voting_thread(serve):
    handler = Recorder()
    sink = serve(handler)
    mailer = mailer_for(sink, tls="none")
    mailer.vote(SENDER, [ALICE], make_message())
    results = []
    other = threading.Thread(target=lambda: results.append(mailer.send(SENDER, [BOB], make_message())))

    other.start()
    other.join(TIMEOUT)

    assert results == [{}]
    assert handler.ehlos == 2  # the other thread opened its own connection
    assert mailer.send(SENDER, [ALICE], make_message()) == {}
    assert handler.ehlos == 2  # this thread still had its voted one
    assert [r.recipients for r in handler.received] == [(BOB,), (ALICE,)]


# -- the bytes -----------------------------------------------------------------


def test_lines_starting_with_a_dot_arrive_intact(serve):
    handler = Recorder()
    sink = serve(handler)
    message = (
        f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: dots\r\n\r\n"
        ".\r\n..\r\n.leading dot\r\n. \r\n...\r\nnot . the end\r\n.\r\nlast line\r\n"
    ).encode("ascii")

    mailer_for(sink, tls="none").send(SENDER, [ALICE], message)

    (received,) = handler.received
    assert received.data == message


# -- transcript ------------------------------------------------------------------


def test_transcript_logs_the_dialog_without_credentials_or_body(serve, server_tls, ca_file, caplog):
    caplog.set_level(logging.DEBUG, logger="mailspool.transcript")
    handler = Recorder()
    sink = auth_server(serve, server_tls, handler)
    mailer = mailer_for(sink, tls="starttls", ca_file=ca_file, username=USERNAME, password=PASSWORD)

    mailer.send(SENDER, [ALICE], make_message())

    lines = [r.getMessage() for r in caplog.records if r.name == "mailspool.transcript"]
    dialog = "\n".join(lines)
    server = f"127.0.0.1:{sink.port}"
    assert all(line.startswith(server + " ") for line in lines)
    assert f"{server} S: 220 " in dialog
    assert f"{server} C: STARTTLS" in dialog
    assert f"{server} C: AUTH PLAIN <credentials redacted>" in dialog
    assert f"{server} S: 235 " in dialog
    assert f"{server} C: mail FROM:<{SENDER}>" in dialog
    assert f"{server} C: <message data, {len(make_message()) + 3} bytes>" in dialog
    assert f"{server} S: 250 " in dialog
    plain_blob = base64.b64encode(f"\0{USERNAME}\0{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, plain_blob, "your parcel is on its way"):
        assert secret not in dialog


def test_transcript_starts_with_the_first_connection_opened_after_debug_is_turned_on(serve, caplog):
    caplog.set_level(logging.INFO, logger="mailspool.transcript")
    sink = serve(Recorder())
    mailer = mailer_for(sink, tls="none")
    with mailer.session():
        mailer.send(SENDER, [ALICE], make_message("before"))
        caplog.set_level(logging.DEBUG, logger="mailspool.transcript")
        mailer.send(SENDER, [ALICE], make_message("same connection"))
    assert not [r for r in caplog.records if r.name == "mailspool.transcript"]

    mailer.send(SENDER, [ALICE], make_message("new connection"))

    assert any("C: mail FROM:" in r.getMessage() for r in caplog.records if r.name == "mailspool.transcript")


def test_transcript_redacts_auth_login_exchanges(serve, server_tls, ca_file, caplog):
    caplog.set_level(logging.DEBUG, logger="mailspool.transcript")
    handler = Recorder()
    sink = serve(handler, tls_context=server_tls, require_starttls=True, authenticator=check_credentials,
                 auth_required=True, auth_require_tls=True, auth_exclude_mechanism=["PLAIN"])
    mailer = mailer_for(sink, tls="starttls", ca_file=ca_file, username=USERNAME, password=PASSWORD)

    mailer.send(SENDER, [ALICE], make_message())

    dialog = "\n".join(r.getMessage() for r in caplog.records if r.name == "mailspool.transcript")
    assert "C: AUTH LOGIN <credentials redacted>" in dialog
    assert "S: 334 " in dialog
    assert "C: <credentials redacted>" in dialog
    for secret in (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(),
                   base64.b64encode(USERNAME.encode()).decode()):
        assert secret not in dialog
    assert len(handler.received) == 1


@pytest.mark.parametrize("message", [
    b"Subject: dots\r\n\r\n.leading\r\n..two\r\nmiddle.dot\r\n.\r\nlast\r\n",
    b".Starts-With: a dot\r\n\r\nbody\r\n",
    b"Subject: no line break at the end\r\n\r\nbody",
    b"Subject: large, two writes\r\n\r\n" + b".dot\r\nline\r\n" * (SEPARATE_END_OF_DATA // 10 + 1),
    b"Subject: large, no dots\r\n\r\n" + b"line\r\n" * (SEPARATE_END_OF_DATA // 6 + 1),
], ids=["dots", "starts-with-dot", "no-final-crlf", "large-with-dots", "large"])
def test_the_server_receives_what_smtplib_data_would_have_sent(smtp_sink, message):
    SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none", timeout=TIMEOUT).send(SENDER, [ALICE], message)
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=TIMEOUT) as plain:
        plain.sendmail(SENDER, [ALICE], message)

    ours, smtplibs = smtp_sink.received
    assert ours.data == smtplibs.data


def test_connections_do_not_wait_for_nagle(smtp_sink):
    mailer = SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none", timeout=TIMEOUT)
    with mailer.session():
        mailer.send(SENDER, [ALICE], make_message())

        connection = mailer._local.connection  # the end of a large message is a write of its own
        assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

