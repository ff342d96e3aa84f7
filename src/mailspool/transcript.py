"""SMTP transcripts: the whole dialog on the ``mailspool.transcript`` logger, secrets and bodies left out.

Enabled by setting that logger to DEBUG; the setting is read when a
connection is opened (a connection opened without it costs nothing per
line), so it applies from the next connection on. Lines look like::

    127.0.0.1:2525 C: MAIL FROM:<shop@example.org> SIZE=347
    127.0.0.1:2525 S: 250 OK
    127.0.0.1:2525 C: AUTH PLAIN <credentials redacted>
    127.0.0.1:2525 C: <message data, 347 bytes>

Everything the client sends after ``AUTH`` and while the server is asking
for more (334) is redacted; message data is replaced by its size.
"""

import logging
import smtplib

log = logging.getLogger("mailspool.transcript")


class TranscriptMixin:
    """Logs what an ``smtplib.SMTP`` connection sends and receives, redacting secrets."""

    _transcript_server = ""
    _last_reply_code = 0

    def _transcript_enabled(self):
        return log.isEnabledFor(logging.DEBUG)

    def send(self, s):
        if self._transcript_enabled():
            log.debug("%s C: %s", self._transcript_server, self._client_line_for_log(s))
        super().send(s)

    def getreply(self):
        code, text = super().getreply()
        self._last_reply_code = code
        if self._transcript_enabled():
            for line in text.decode("utf-8", "replace").split("\n") or [""]:
                log.debug("%s S: %s %s", self._transcript_server, code, line)
        return code, text

    def _client_line_for_log(self, data):
        raw = data if isinstance(data, bytes) else data.encode("utf-8", "replace")
        if self._last_reply_code == 354:
            self._last_reply_code = 0
            return f"<message data, {len(raw)} bytes>"
        if self._last_reply_code == 334:
            return "<credentials redacted>"
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        verb, _, rest = line.partition(" ")
        if verb.upper() == "AUTH":
            mechanism = rest.split(" ", 1)[0]
            return f"AUTH {mechanism} <credentials redacted>" if " " in rest else line
        return line


class TranscriptSMTP(TranscriptMixin, smtplib.SMTP):
    """``smtplib.SMTP`` with a redacted transcript."""


class TranscriptSMTP_SSL(TranscriptMixin, smtplib.SMTP_SSL):
    """``smtplib.SMTP_SSL`` with a redacted transcript."""


def new_connection(server, implicit_tls=False, **options):
    """An unconnected ``smtplib.SMTP`` (``SMTP_SSL`` for ``implicit_tls``) for ``options``.

    It logs a transcript, its lines prefixed with ``server``, when the
    ``mailspool.transcript`` logger is at DEBUG now; otherwise it is
    smtplib's own class, without the cost of a check on every line.
    """
    if not log.isEnabledFor(logging.DEBUG):
        return smtplib.SMTP_SSL(**options) if implicit_tls else smtplib.SMTP(**options)
    connection = TranscriptSMTP_SSL(**options) if implicit_tls else TranscriptSMTP(**options)
    connection._transcript_server = server
    return connection
