"""Message and Attachment: pyramid_mailer's message builder, on the standard library's EmailMessage.

Code written for ``pyramid_mailer.message.Message`` works unchanged::

    message = Message(subject="Welcome", sender="shop@example.org",
                      recipients=["alice@example.org"], bcc=["audit@example.org"],
                      body="Hello Alice", html="<p>Hello <b>Alice</b></p>",
                      attachments=[Attachment("terms.pdf", "application/pdf", pdf_bytes)])
    delivery.send(message.sender, message.send_to, message.to_message())

``to_message()`` returns an ``email.message.EmailMessage``: body and html
become multipart/alternative, an attachment with a ``content_id`` next to
an html part becomes an inline image of a multipart/related, text parts
get the narrowest charset that fits, long and non-ASCII headers are folded
and encoded. Bcc addresses are recipients (``send_to``) and never headers.
"""

import email.message
import email.policy
import email.utils

from mailspool.exceptions import HeaderInjection, InvalidMessage


class Attachment:
    """A file to attach (pyramid_mailer's Attachment).

    ``data`` is bytes, text, or a file object (read once, when needed).
    ``content_type`` may carry parameters (``"text/plain; charset=utf-8"``);
    when absent it is guessed from ``filename``. ``disposition`` is
    ``'attachment'`` (default) or ``'inline'``; ``content_id`` makes an
    inline image addressable from HTML as ``cid:...``.
    ``transfer_encoding`` is accepted for compatibility; the email package
    chooses base64 or quoted-printable itself.
    """

    def __init__(self, filename=None, content_type=None, data=None, disposition=None,
                 transfer_encoding=None, content_id=None):
        self.filename = filename
        self.content_type = content_type
        self.disposition = disposition or "attachment"
        self.transfer_encoding = transfer_encoding or "base64"
        self.content_id = content_id
        self._data = data

    @property
    def data(self):
        if hasattr(self._data, "read"):
            self._data = self._data.read()
        return self._data

    def _type(self):
        content_type = self.content_type
        if not content_type:
            import mimetypes

            content_type = (mimetypes.guess_type(self.filename or "")[0] if self.filename else None) \
                or "application/octet-stream"
        main, _, rest = content_type.partition(";")
        maintype, _, subtype = main.strip().lower().partition("/")
        params = {}
        for item in rest.split(";"):
            key, equals, value = item.partition("=")
            if equals:
                params[key.strip().lower()] = value.strip().strip("'\"")
        return maintype, subtype or "octet-stream", params

    def add_to(self, part, related_to=None):
        """Attach to ``part`` (an EmailMessage); inline with a content id into ``related_to`` when given."""
        maintype, subtype, params = self._type()
        data = self.data
        options = {}
        if self.filename:
            options["filename"] = self.filename
        if self.content_id:
            options["cid"] = f"<{self.content_id.strip('<>')}>"
        disposition = self.disposition.split(";")[0].strip()
        if maintype == "text":
            text = data.decode(params.get("charset", "utf-8")) if isinstance(data, bytes) else data
            adder = related_to.add_related if related_to is not None else part.add_attachment
            adder(text, subtype=subtype, disposition=disposition, **options)
            return
        payload = data.encode("utf-8") if isinstance(data, str) else data
        adder = related_to.add_related if related_to is not None else part.add_attachment
        adder(payload, maintype=maintype, subtype=subtype, disposition=disposition, **options)


class Message:
    """An email to build (pyramid_mailer's Message). See the module docstring."""

    def __init__(self, subject=None, recipients=None, body=None, html=None, sender=None, cc=None, bcc=None,
                 extra_headers=None, attachments=None):
        self.subject = subject or ""
        self.sender = sender
        self.body = body
        self.html = html
        self.recipients = list(recipients or [])
        self.attachments = list(attachments or [])
        self.cc = list(cc or [])
        self.bcc = list(bcc or [])
        self.extra_headers = dict(extra_headers or {})

    @property
    def send_to(self):
        """Every envelope recipient: To, Cc and Bcc, each once, in that order."""
        return list(dict.fromkeys([*self.recipients, *self.cc, *self.bcc]))

    def add_recipient(self, recipient):
        self.recipients.append(recipient)

    def add_cc(self, recipient):
        self.cc.append(recipient)

    def add_bcc(self, recipient):
        self.bcc.append(recipient)

    def attach(self, attachment):
        self.attachments.append(attachment)

    def is_bad_headers(self):
        """True when the subject, an address or an extra header contains CR, LF or NUL."""
        values = [self.subject, self.sender or "", *self.send_to, *map(str, self.extra_headers.keys()),
                  *map(str, self.extra_headers.values())]
        return any(char in value for value in values for char in "\r\n\0")

    def validate(self):
        """Raise ``InvalidMessage`` (a ValueError) naming what is missing, ``HeaderInjection`` for bad headers."""
        if not self.send_to:
            raise InvalidMessage("the message has no recipients (recipients, cc or bcc)")
        if not self.body and not self.html:
            raise InvalidMessage("the message has no body and no html")
        if not self.sender:
            raise InvalidMessage("the message has no sender")
        if self.is_bad_headers():
            raise HeaderInjection("a header of the message (subject, sender, a recipient or an extra header) "
                                  "contains CR, LF or NUL")

    def to_message(self):
        """Validate and return the ``email.message.EmailMessage``. Raises as ``validate``."""
        self.validate()
        addresses = [self.sender, *self.send_to]
        needs_utf8 = not all(email.utils.parseaddr(address)[1].isascii() for address in addresses)
        message = email.message.EmailMessage(policy=email.policy.SMTPUTF8 if needs_utf8 else email.policy.SMTP)
        message["From"] = self.sender
        if self.recipients:
            message["To"] = ", ".join(self.recipients)
        if self.cc:
            message["Cc"] = ", ".join(self.cc)
        message["Subject"] = self.subject
        self._set_content(message)
        for name, value in self.extra_headers.items():
            if name in message:
                message.replace_header(name, value)
            else:
                message[name] = value
        return message

    def _set_content(self, message):
        body, html = _text_of(self.body), _text_of(self.html)
        if body is not None:
            message.set_content(body)
            if html is not None:
                message.add_alternative(html, subtype="html")
        else:
            message.set_content(html, subtype="html")
        html_part = message.get_body(("html",)) if html is not None else None
        for attachment in self.attachments:
            inline_image = attachment.content_id and html_part is not None
            attachment.add_to(message, related_to=html_part if inline_image else None)


def _text_of(part):
    """Body and html may be text, bytes (UTF-8) or an Attachment (pyramid_mailer allows that)."""
    if part is None:
        return None
    if isinstance(part, Attachment):
        part = part.data
    return part.decode("utf-8") if isinstance(part, bytes) else part
