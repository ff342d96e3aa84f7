"""Mailers: SMTPMailer speaks SMTP through smtplib; DebugMailer records instead of sending.

The mailer is the only part of mailspool that reads SMTP reply codes. It
turns them into the outcomes of ``IMailer.send``: a mapping of refused
recipients, a ``TransientDeliveryError`` or a ``PermanentDeliveryError``.
"""

import logging
import smtplib
import socket
import ssl
import threading

from zope.interface import implementer

from mailspool.exceptions import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from mailspool.interfaces import IMailer, ISMTPMailer
from mailspool.reply import SMTPReply

log = logging.getLogger(__name__)

TLS_MODES = ("starttls", "ssl", "opportunistic", "none")


@implementer(ISMTPMailer)
class SMTPMailer:
    """Deliver through one SMTP server. See ``ISMTPMailer``.

    ``tls`` is ``'starttls'`` (the default: STARTTLS is required, so a
    server that does not offer it is an error, not a plain-text fallback),
    ``'ssl'`` (implicit TLS, usually port 465), ``'opportunistic'``
    (STARTTLS when offered) or ``'none'``. Certificates are verified against
    the system's trust store, or ``ca_file``, unless ``verify=False``.

    Raises ``ValueError`` for a ``tls`` value it does not know.
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
    ):
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        if password is not None and username is None:
            raise ValueError("a password was given without a username")
        self.hostname = host
        self.port = int(port)
        self.username = username
        self._password = password  # never logged, never in repr
        self.tls = tls
        self.timeout = float(timeout)
        self.ca_file = ca_file
        self.verify = verify
        self.local_hostname = local_hostname
        # vote() opens a connection that the send() of the same commit
        # reuses; commits run in one thread, so the spare is per thread.
        self._voted = threading.local()

    def __repr__(self):
        return f"<SMTPMailer {self.server} tls={self.tls}>"

    @property
    def server(self):
        return f"{self.hostname}:{self.port}"

    # -- IMailer -------------------------------------------------------------

    def send(self, fromaddr, toaddrs, message):
        """See ``IMailer.send``."""
        connection = self._take_voted_connection() or self._connect()
        try:
            return self._transact(connection, fromaddr, toaddrs, message, send_data=True)
        finally:
            _quit_quietly(connection)

    def vote(self, fromaddr, toaddrs, message):
        """See ``IMailer.vote``: connect, and check the sender and every recipient.

        Raises ``DeliveryError`` when the server cannot be reached or refuses
        the sender or any recipient. Keeps the connection for ``send``.
        """
        connection = self._connect()
        try:
            refused = self._transact(connection, fromaddr, toaddrs, message, send_data=False)
            if refused:
                details = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused.items())
                raise PermanentDeliveryError(f"{self.server} refused recipients: {details}", server=self.server)
            connection.rset()
        except BaseException:
            _quit_quietly(connection)
            raise
        self.abort()
        self._voted.connection = connection

    def abort(self):
        """See ``IMailer.abort``."""
        connection = self._take_voted_connection()
        if connection is not None:
            _quit_quietly(connection)

    def _take_voted_connection(self):
        connection = getattr(self._voted, "connection", None)
        self._voted.connection = None
        return connection

    # -- the SMTP conversation -----------------------------------------------

    def _connect(self):
        """Open, secure and authenticate a connection; raise DeliveryError on failure."""
        try:
            if self.tls == "ssl":
                connection = smtplib.SMTP_SSL(
                    self.hostname, self.port, local_hostname=self.local_hostname,
                    timeout=self.timeout, context=self._tls_context(),
                )
            else:
                connection = smtplib.SMTP(
                    self.hostname, self.port, local_hostname=self.local_hostname, timeout=self.timeout
                )
        except (OSError, smtplib.SMTPException) as exc:
            raise self._error(exc, "cannot connect") from exc
        try:
            connection.ehlo_or_helo_if_needed()
            if self.tls in ("starttls", "opportunistic"):
                if connection.has_extn("starttls"):
                    connection.starttls(context=self._tls_context())
                    connection.ehlo()
                elif self.tls == "starttls":
                    raise TransientDeliveryError(
                        f"{self.server} does not offer STARTTLS, which tls='starttls' requires "
                        "(use tls='opportunistic' or 'none' only on a trusted network)",
                        server=self.server,
                    )
            if self.username is not None:
                connection.login(self.username, self._password or "")
        except DeliveryError:
            _quit_quietly(connection)
            raise
        except smtplib.SMTPAuthenticationError as exc:
            _quit_quietly(connection)
            # A configuration problem, not the message's: keep it queued.
            raise TransientDeliveryError(
                f"{self.server} refused the login of {self.username!r}: {SMTPReply.from_smtplib(exc.smtp_code, exc.smtp_error)}",
                reply=SMTPReply.from_smtplib(exc.smtp_code, exc.smtp_error), server=self.server,
            ) from exc
        except (OSError, smtplib.SMTPException) as exc:
            _quit_quietly(connection)
            raise self._error(exc, "cannot set up the session") from exc
        return connection

    def _tls_context(self):
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _transact(self, connection, fromaddr, toaddrs, message, send_data):
        """One mail transaction: MAIL, RCPT for each recipient, and DATA if ``send_data``.

        Returns the refused recipients; raises DeliveryError when nobody can
        get the message.
        """
        try:
            options = self._mail_options(connection, fromaddr, toaddrs, message)
            reply = SMTPReply.from_smtplib(*connection.mail(fromaddr, options))
            if reply.code != 250:
                raise self._reply_error(reply, f"refused sender {fromaddr!r}")
            refused = {}
            for recipient in toaddrs:
                reply = SMTPReply.from_smtplib(*connection.rcpt(recipient))
                if reply.code not in (250, 251):
                    refused[recipient] = reply
            if len(refused) == len(toaddrs):
                _reset_quietly(connection)
                details = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused.items())
                error_class = (
                    PermanentDeliveryError
                    if all(reply.is_permanent for reply in refused.values())
                    else TransientDeliveryError
                )
                raise error_class(
                    f"{self.server} refused every recipient: {details}", server=self.server, refused=refused
                )
            if send_data:
                reply = SMTPReply.from_smtplib(*connection.data(message))
                if reply.code != 250:
                    raise self._reply_error(reply, "refused the message")
            return refused
        except DeliveryError:
            raise
        except smtplib.SMTPResponseException as exc:
            raise self._reply_error(SMTPReply.from_smtplib(exc.smtp_code, exc.smtp_error), "refused the message") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise self._error(exc, "connection failed while sending") from exc

    def _mail_options(self, connection, fromaddr, toaddrs, message):
        """ESMTP parameters for MAIL FROM: SMTPUTF8, SIZE and BODY (RFC 6531, 1870, 6152)."""
        options = []
        needs_utf8 = not all(address.isascii() for address in (fromaddr, *toaddrs))
        if needs_utf8:
            if not connection.has_extn("smtputf8"):
                raise PermanentDeliveryError(
                    f"{self.server} does not support SMTPUTF8, which the non-ASCII addresses "
                    f"of this message need",
                    server=self.server,
                )
            options.append("SMTPUTF8")
        if connection.has_extn("size"):
            options.append(f"SIZE={len(message)}")
        if connection.has_extn("8bitmime") and not message.isascii():
            options.append("BODY=8BITMIME")
        return options

    def _reply_error(self, reply, what):
        error_class = PermanentDeliveryError if reply.is_permanent else TransientDeliveryError
        return error_class(f"{self.server} {what}: {reply}", reply=reply, server=self.server)

    def _error(self, exc, what):
        """Translate a network or protocol failure without a usable reply; always transient."""
        if isinstance(exc, smtplib.SMTPResponseException):
            return self._reply_error(SMTPReply.from_smtplib(exc.smtp_code, exc.smtp_error), what)
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, socket.timeout):
            detail = f"timed out after {self.timeout:g}s"
        return TransientDeliveryError(f"{self.server} {what}: {detail}", server=self.server)


def _quit_quietly(connection):
    try:
        connection.quit()
    except (OSError, smtplib.SMTPException):
        connection.close()


def _reset_quietly(connection):
    try:
        connection.rset()
    except (OSError, smtplib.SMTPException):
        pass


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
