"""Mailers: SMTPMailer speaks SMTP through smtplib; SendmailMailer pipes to sendmail; DebugMailer records.

A mailer is the only part of mailspool that reads SMTP reply codes or
exit statuses. It turns them into the outcomes of ``IMailer.send``: a
mapping of refused recipients, a ``TransientDeliveryError`` or a
``PermanentDeliveryError``.
"""

import contextlib
import logging
import os
import re
import smtplib
import socket
import ssl
import subprocess
import threading
import time

from zope.interface import implementer

from mailspool import transcript
from mailspool.exceptions import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from mailspool.interfaces import IMailer, ISMTPMailer
from mailspool.reply import SMTPReply

log = logging.getLogger(__name__)

TLS_MODES = ("starttls", "ssl", "opportunistic", "none")
# An address of only these characters goes into MAIL FROM and RCPT TO as
# "<address>": what smtplib.quoteaddr makes of it too, without the parse
# (email.utils.parseaddr) that costs as much as the rest of our SMTP
# client work per message. Anything else (a display name, brackets,
# non-ASCII) takes smtplib's own path.
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@-]*\Z")


class _ConnectionLost(Exception):
    """A reused connection was found closed (at RSET or MAIL) before anything of a message was sent."""


def parse_host(text, default_port):
    """``'host'``, ``'host:port'`` or ``'[v6]:port'`` -> ``(host, port)``; ValueError naming ``text``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"no host name in {text!r}")
    try:
        return host, int(port) if port else int(default_port)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None


@implementer(ISMTPMailer)
class SMTPMailer:
    """Deliver through an SMTP server, reusing one connection per thread. See ``ISMTPMailer``.

    ``tls`` is ``'starttls'`` (the default: STARTTLS is required, so a
    server that does not offer it is an error, never a plain-text
    fallback), ``'ssl'`` (implicit TLS, usually port 465),
    ``'opportunistic'`` (STARTTLS when offered) or ``'none'``. Certificates
    are verified against the system's trust store, or ``ca_file``, unless
    ``verify=False``. ``certfile`` (and ``keyfile``) present a client
    certificate.

    ``fallback_hosts`` (``'host[:port]'`` strings) are tried in order when
    the servers before them cannot be reached. A connection is reused for
    the next message of the same thread (with RSET between messages) until
    it has been idle ``idle_timeout`` seconds, carried
    ``max_messages_per_connection`` messages, or failed.

    Raises ``ValueError`` naming the option for a bad ``tls`` value, a bad
    host, or a password without a username.
    """

    def __init__(
        self,
        host="localhost",
        port=25,
        username=None,
        password=None,
        tls="starttls",
        timeout=30.0,
        ca_file=None,
        verify=True,
        local_hostname=None,
        fallback_hosts=(),
        idle_timeout=30.0,
        max_messages_per_connection=100,
        certfile=None,
        keyfile=None,
    ):
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        if password is not None and username is None:
            raise ValueError("a password was given without a username")
        self.hostname = host
        self.port = int(port)
        self.servers = [(host, self.port)] + [parse_host(entry, self.port) for entry in fallback_hosts]
        self.username = username
        self._password = password  # never logged, never in repr
        self.tls = tls
        self.timeout = float(timeout)
        self.ca_file = ca_file
        self.verify = verify
        self.local_hostname = local_hostname
        self.certfile = certfile
        self.keyfile = keyfile
        self.idle_timeout = float(idle_timeout)
        self.max_messages_per_connection = int(max_messages_per_connection)
        # Each thread has its own connection: workers send in parallel, and
        # a commit's vote and send (same thread) share one.
        self._local = threading.local()

    def __repr__(self):
        return f"<SMTPMailer {_server_name(*self.servers[0])} tls={self.tls}>"

    @property
    def server(self):
        """``host:port`` of the server this thread last talked to (the first one before that)."""
        return getattr(self._local, "server", None) or _server_name(*self.servers[0])

    # -- IMailer -------------------------------------------------------------

    def send(self, fromaddr, toaddrs, message):
        """See ``IMailer.send``.

        Raises ``PermanentDeliveryError`` without sending anything when the
        message exceeds the SIZE the server announced, or needs SMTPUTF8 and
        the server does not offer it.
        """
        return self._with_connection(
            lambda connection, reused: self._transact(connection, fromaddr, toaddrs, message, True, reused))

    def vote(self, fromaddr, toaddrs, message):
        """See ``IMailer.vote``: connect, and check the size, the sender and every recipient.

        Raises a ``DeliveryError`` when the server cannot be reached or
        would refuse the message or any recipient (the connection is then
        closed). Otherwise keeps the connection for this thread's ``send``.
        """
        def check(connection, reused):
            refused = self._transact(connection, fromaddr, toaddrs, message, False, reused)
            if refused:
                raise _refusal_error(f"{self.server} refused recipients", refused, self.server)

        self._with_connection(check, hold_for_send=True)

    def abort(self):
        """See ``IMailer.abort``: close the connection ``vote`` kept, if any."""
        if not getattr(self._local, "sessions", 0):
            self.close()

    @contextlib.contextmanager
    def session(self):
        """Keep this thread's connection open between sends until the block ends (then QUIT).

        Outside a session each ``send`` (or ``vote`` and its ``send``) uses a
        connection of its own. The queue processor wraps each worker's run
        in a session, so one connection carries many messages.
        """
        self._local.sessions = getattr(self._local, "sessions", 0) + 1
        try:
            yield self
        finally:
            self._local.sessions -= 1
            if not self._local.sessions:
                self.close()

    def close(self):
        """Close this thread's connection politely (QUIT). Never raises; idempotent."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            _quit_quietly(connection)

    # -- connections -----------------------------------------------------------

    def _with_connection(self, use, hold_for_send=False):
        """Run ``use(connection, reused)`` on this thread's connection (reused when alive), then keep or close it.

        A reused connection gets an RSET first only when its last mail
        transaction did not complete: after a completed one the server has
        already reset its state (RFC 5321, 4.1.1.4), and the round trip is
        a fifth of the time a message takes on a fast link. A reused
        connection found closed before anything was sent on it (the RSET or
        the MAIL command fails, or MAIL gets 421) is replaced once.
        """
        keep = hold_for_send or getattr(self._local, "sessions", 0) > 0
        for try_number in (1, 2):
            connection, reused = self._connection()
            try:
                if reused and not self._local.clean:
                    _reset(connection)
                result = use(connection, reused)
            except _ConnectionLost:
                self._drop()  # closed by the server while idle: nothing was sent on it
                if reused and try_number == 1:
                    continue
                raise TransientDeliveryError(f"{self.server} closed the connection", server=self.server) from None
            except DeliveryError as exc:
                self._local.clean = False
                if not exc.refused and (exc.reply is None or exc.reply.code == 421):
                    self._drop()  # the connection is broken or the server is closing it
                elif not keep or hold_for_send:
                    self.close()
                raise
            except BaseException:
                self._drop()
                raise
            self._local.clean = not hold_for_send  # vote leaves MAIL and RCPT open: RSET before the send
            self._local.messages += 1
            self._local.last_used = time.monotonic()
            if not keep or self._local.messages >= self.max_messages_per_connection:
                self.close()
            return result
        raise AssertionError("unreachable: the second try returns or raises")

    def _connection(self):
        """This thread's open connection and whether it was reused; connects when needed."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            if time.monotonic() - self._local.last_used <= self.idle_timeout:
                return connection, True
            self.close()
        connection = self._connect_to_first_available()
        self._local.connection = connection
        self._local.messages = 0
        self._local.clean = True
        self._local.last_used = time.monotonic()
        return connection, False

    def _drop(self):
        """Forget this thread's connection without QUIT (it is broken)."""
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def _connect_to_first_available(self):
        errors = []
        for host, port in self.servers:
            self._local.server = _server_name(host, port)
            try:
                return self._connect(host, port)
            except TransientDeliveryError as exc:
                errors.append(exc)
                if len(self.servers) > 1:
                    log.warning("%s; trying the next server", exc)
        if len(errors) == 1:
            raise errors[0]
        raise TransientDeliveryError(
            "no server could be reached: " + "; ".join(str(error) for error in errors), server=self.server
        )

    def _connect(self, host, port):
        """Open, secure and authenticate one connection; raise DeliveryError on failure."""
        server = _server_name(host, port)
        if self.tls == "ssl":
            connection = transcript.new_connection(server, True, local_hostname=self.local_hostname,
                                                   timeout=self.timeout, context=self._tls_context())
        else:
            connection = transcript.new_connection(server, local_hostname=self.local_hostname, timeout=self.timeout)
        connection._host = host  # smtplib sets it only in __init__; TLS checks the certificate against it
        try:
            code, text = connection.connect(host, port)
            # Every command waits for its reply, so Nagle's algorithm has nothing to coalesce; it could only
            # hold back the end-of-data line written after a large message (see _send_data).
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if code != 220:
                raise _reply_error(SMTPReply.from_smtplib(code, text), f"{server} greeted with an error",
                                   server, transient=True)
            connection.ehlo_or_helo_if_needed()
            if self.tls in ("starttls", "opportunistic"):
                if connection.has_extn("starttls"):
                    connection.starttls(context=self._tls_context())
                    connection.ehlo()
                elif self.tls == "starttls":
                    raise TransientDeliveryError(
                        f"{server} does not offer STARTTLS, which tls='starttls' requires "
                        "(use tls='opportunistic' or 'none' only on a trusted network)",
                        server=server,
                    )
            if self.username is not None:
                connection.login(self.username, self._password or "")
        except DeliveryError:
            _quit_quietly(connection)
            raise
        except smtplib.SMTPAuthenticationError as exc:
            _quit_quietly(connection)
            reply = SMTPReply.from_smtplib(exc.smtp_code, exc.smtp_error)
            # A configuration problem, not the message's: keep it queued.
            raise TransientDeliveryError(
                f"{server} refused the login of {self.username!r}: {reply}", reply=reply, server=server
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            _quit_quietly(connection)
            raise _network_error(exc, f"{server}: cannot connect", server, self.timeout) from exc
        return connection

    def _tls_context(self):
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # -- one mail transaction ------------------------------------------------------

    def _transact(self, connection, fromaddr, toaddrs, message, send_data, reused=False):
        """MAIL, RCPT for each recipient, and DATA if ``send_data``; return the refused recipients.

        Raises DeliveryError when nobody can get the message, and
        _ConnectionLost when a ``reused`` connection turns out to be closed
        at MAIL, before anything of this message was sent.
        """
        server = self.server
        options = self._mail_options(connection, fromaddr, toaddrs, message)
        try:
            try:
                reply = SMTPReply.from_smtplib(*_envelope_command(connection, "mail", fromaddr, options))
            except smtplib.SMTPServerDisconnected:
                if reused:
                    raise _ConnectionLost() from None
                raise
            if reply.code == 421 and reused:
                raise _ConnectionLost()  # the server is closing an idle connection
            if reply.code != 250:
                raise _reply_error(reply, f"{server} refused sender {fromaddr!r}", server)
            refused = {}
            for recipient in toaddrs:
                reply = SMTPReply.from_smtplib(*_envelope_command(connection, "rcpt", recipient))
                if reply.code == 421:
                    raise _reply_error(reply, f"{server} is closing the connection", server)
                if reply.code not in (250, 251):
                    refused[recipient] = reply
            if len(refused) == len(toaddrs):
                _reset(connection)
                raise _refusal_error(f"{server} refused every recipient", refused, server)
            if send_data:
                reply = SMTPReply.from_smtplib(*_send_data(connection, message))
                if reply.code != 250:
                    raise _reply_error(reply, f"{server} refused the message", server)
            return refused
        except DeliveryError:
            raise
        except smtplib.SMTPResponseException as exc:
            reply = SMTPReply.from_smtplib(exc.smtp_code, exc.smtp_error)
            raise _reply_error(reply, f"{server} refused the message", server) from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise _network_error(exc, f"{server}: connection failed while sending", server, self.timeout) from exc

    def _mail_options(self, connection, fromaddr, toaddrs, message):
        """ESMTP parameters for MAIL FROM: SMTPUTF8, SIZE and BODY (RFC 6531, 1870, 6152).

        SMTPUTF8 is requested for non-ASCII addresses and for UTF-8 in the
        message's header fields (RFC 6532), BODY=8BITMIME for any non-ASCII
        byte. Raises PermanentDeliveryError when the message cannot be sent
        to this server as it is (too large, or an extension it needs not
        offered): a queued message is never re-encoded.
        """
        server = self.server
        eight_bit = not message.isascii()
        utf8_headers = eight_bit and not _header_section(message).isascii()
        utf8_addresses = not all(address.isascii() for address in (fromaddr, *toaddrs))
        if eight_bit and not connection.has_extn("8bitmime"):
            raise PermanentDeliveryError(
                f"{server} does not support 8BITMIME, which the 8-bit data of this message needs "
                "(a queued message is sent as committed, never re-encoded)",
                server=server,
            )
        if (utf8_addresses or utf8_headers) and not connection.has_extn("smtputf8"):
            needing = "non-ASCII addresses" if utf8_addresses else "UTF-8 header fields"
            raise PermanentDeliveryError(
                f"{server} does not support SMTPUTF8, which the {needing} of this message need", server=server)
        options = ["SMTPUTF8"] if utf8_addresses or utf8_headers else []
        if connection.has_extn("size"):
            limit = _size_limit(connection)
            if limit and len(message) > limit:
                raise PermanentDeliveryError(
                    f"{server} accepts messages up to {limit} bytes (SIZE); this one has {len(message)}",
                    server=server,
                )
            options.append(f"SIZE={len(message)}")
        if eight_bit:
            options.append("BODY=8BITMIME")
        return options


def _envelope_command(connection, verb, address, options=()):
    """Send MAIL FROM (``verb`` "mail") or RCPT TO ("rcpt") for ``address``; return the reply as smtplib does.

    The same command and reply as ``connection.mail``/``rcpt``; a plain
    address (see ``_PLAIN_ADDRESS``) is written without smtplib's parse.
    SMTPUTF8 goes through smtplib, which switches the command encoding.
    """
    if "SMTPUTF8" in options or not _PLAIN_ADDRESS.match(address):
        return connection.mail(address, options) if verb == "mail" else connection.rcpt(address, options)
    prefix = "FROM:" if verb == "mail" else "TO:"
    options = options if connection.does_esmtp else ()
    connection.putcmd(verb, "".join((prefix, "<", address, ">", *(" " + option for option in options))))
    return connection.getreply()


# From this size on, the message is written as it is and the end-of-data line after it, rather than
# copied once more to append that line (25 MB would cost another 25 MB for the moment of the send).
SEPARATE_END_OF_DATA = 1 << 20


def _data_payload(message):
    """(body, end): ``message`` dot-stuffed (RFC 5321, 4.5.2) and the line that ends the data.

    Together exactly the bytes smtplib's ``SMTP.data`` sends. ``body`` is
    ``message`` itself, not a copy, when no line starts with a dot.
    """
    body = message.replace(b"\n.", b"\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body, (b".\r\n" if body.endswith(b"\r\n") else b"\r\n.\r\n")


def _send_data(connection, message):
    """DATA, then the message; return the final reply as smtplib's ``SMTP.data`` does.

    Raises ``smtplib.SMTPDataError`` when DATA is not answered with 354,
    and smtplib's errors for a broken connection, as ``SMTP.data`` does.
    The same bytes on the wire, with one copy of the message less: a
    message of ``SEPARATE_END_OF_DATA`` bytes or more is sent without
    copying it (two writes), a smaller one in one write.
    """
    connection.putcmd("data")
    code, text = connection.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, text)
    body, end = _data_payload(message)
    if len(body) < SEPARATE_END_OF_DATA:
        connection.send(body + end)
    else:
        connection.send(body)
        connection.send(end)
    return connection.getreply()


def _header_section(message):
    """The bytes of ``message`` before the blank line that ends its header fields."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end]


def _server_name(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _size_limit(connection):
    try:
        return int(connection.esmtp_features.get("size", "").split()[0])
    except (ValueError, IndexError):
        return 0  # SIZE without a number: no fixed limit (RFC 1870)


def _reply_error(reply, what, server, transient=False):
    error_class = PermanentDeliveryError if reply.is_permanent and not transient else TransientDeliveryError
    return error_class(f"{what}: {reply}", reply=reply, server=server)


def _refusal_error(what, refused, server):
    """Every refusal permanent -> PermanentDeliveryError, else Transient; ``refused`` attached."""
    details = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused.items())
    permanent = all(reply.is_permanent for reply in refused.values())
    error_class = PermanentDeliveryError if permanent else TransientDeliveryError
    return error_class(f"{what}: {details}", server=server, refused=refused)


def _network_error(exc, what, server, timeout):
    """A failure without a usable reply (or an error reply during setup); always transient."""
    if isinstance(exc, smtplib.SMTPResponseException):
        reply = SMTPReply.from_smtplib(exc.smtp_code, exc.smtp_error)
        return TransientDeliveryError(f"{what}: {reply}", reply=reply, server=server)
    causes = (exc, exc.__cause__, exc.__context__)
    if any(isinstance(cause, TimeoutError) for cause in causes):
        detail = f"timed out after {timeout:g}s"
    else:
        detail = str(exc) or type(exc).__name__
    return TransientDeliveryError(f"{what}: {detail}", server=server)


def _reset(connection):
    """RSET before reusing a connection; a dead connection shows up here, before any message."""
    try:
        code, _ = connection.rset()
    except (OSError, smtplib.SMTPException):
        raise _ConnectionLost() from None
    if code != 250:
        raise _ConnectionLost()


def _quit_quietly(connection):
    try:
        connection.quit()
    except (OSError, smtplib.SMTPException):
        connection.close()


# sendmail(8) exit codes (sysexits.h) that mean "try again later"; any
# other failure is permanent for the message.
_TEMPORARY_EXIT_CODES = {
    69: "service unavailable",
    70: "internal software error",
    71: "system error",
    72: "critical OS file missing",
    73: "cannot create output file",
    74: "input/output error",
    75: "temporary failure",
    78: "configuration error",
}


DEFAULT_SENDMAIL_TEMPLATE = ("{sendmail_app}", "-i", "-f", "{sender}")


def _sendmail_template(template):
    if template is None:
        return DEFAULT_SENDMAIL_TEMPLATE
    parts = template.split() if isinstance(template, str) else list(template)
    if "-t" in parts:
        log.info("sendmail template: -t dropped; mailspool passes the envelope recipients itself")
    return tuple(part for part in parts if part != "-t")


@implementer(IMailer)
class SendmailMailer:
    """Deliver by piping each message to a sendmail-compatible program. See ``IMailer``.

    Runs ``sendmail_path -i -f SENDER -- RECIPIENT...`` with the message on
    standard input (``template``, pyramid_mailer's ``sendmail_template``, a
    list of arguments with ``{sendmail_app}`` and ``{sender}``, changes
    what comes before ``--``; a ``-t`` in it is dropped, because the
    envelope recipients are always passed, so Bcc recipients get the
    message), with LF line endings (the local submission convention;
    the program restores CRLF on the wire). Exit status 0 is success; the
    ``EX_TEMPFAIL`` family (69-75, 78) is a ``TransientDeliveryError``;
    others, such as ``EX_NOUSER`` (67), a ``PermanentDeliveryError``. A
    missing program or a timeout is transient (fix the setup, mail waits).
    The program accepts or refuses the whole message, so ``send`` returns
    ``{}`` or raises.
    """

    def __init__(self, sendmail_path="/usr/sbin/sendmail", timeout=60.0, template=None):
        self.sendmail_path = sendmail_path
        self.timeout = float(timeout)
        self.template = _sendmail_template(template)

    def __repr__(self):
        return f"<SendmailMailer {self.sendmail_path}>"

    @property
    def server(self):
        return f"sendmail:{self.sendmail_path}"

    def send(self, fromaddr, toaddrs, message):
        """See ``IMailer.send``."""
        arguments = [part.format(sendmail_app=self.sendmail_path, sender=fromaddr or "<>") for part in self.template]
        command = [*arguments, "--", *toaddrs]
        try:
            result = subprocess.run(command, input=message.replace(b"\r\n", b"\n"), capture_output=True,
                                    timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TransientDeliveryError(f"{self.server} timed out after {self.timeout:g}s",
                                         server=self.server) from exc
        except OSError as exc:
            raise TransientDeliveryError(f"{self.server} cannot be run: {exc.strerror}",
                                         server=self.server) from exc
        if result.returncode == 0:
            return {}
        output = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()
        detail = output[-1] if output else "no output"
        status = result.returncode
        if status < 0:
            raise TransientDeliveryError(f"{self.server} was killed by signal {-status}", server=self.server)
        meaning = _TEMPORARY_EXIT_CODES.get(status)
        if meaning is not None:
            raise TransientDeliveryError(f"{self.server} exited {status} ({meaning}): {detail}", server=self.server)
        raise PermanentDeliveryError(f"{self.server} exited {status}: {detail}", server=self.server)

    def vote(self, fromaddr, toaddrs, message):
        """See ``IMailer.vote``: the program must exist and be executable."""
        if not os.access(self.sendmail_path, os.X_OK):
            raise TransientDeliveryError(f"{self.server} is not an executable program", server=self.server)

    def abort(self):
        """See ``IMailer.abort``. Holds nothing."""


@implementer(IMailer)
class DebugMailer:
    """Records every message instead of sending it, and logs one line each.

    ``sent`` is a list of ``(fromaddr, toaddrs, message_bytes)``, for
    development and tests.
    """

    def __init__(self):
        self.sent = []
        self._lock = threading.Lock()

    def send(self, fromaddr, toaddrs, message):
        """See ``IMailer.send``. Never refuses anyone."""
        with self._lock:
            self.sent.append((fromaddr, tuple(toaddrs), message))
        log.info("DebugMailer recorded a message from %r to %d recipient(s)", fromaddr, len(toaddrs))
        return {}

    def vote(self, fromaddr, toaddrs, message):
        """See ``IMailer.vote``. Knows of no reason to fail."""

    def abort(self):
        """See ``IMailer.abort``. Holds nothing."""
