"""Queue files written by repoze.sendmail and zope.sendmail, read so that switching loses no mail.

Their queue is a Maildir whose messages carry the envelope in two extra
header lines: repoze.sendmail writes ``X-Actually-From`` and
``X-Actually-To`` (comma-separated, RFC 2047-encoded as UTF-8),
zope.sendmail ``X-Zope-From`` and ``X-Zope-To`` (raw UTF-8, addresses as
``getaddresses`` reads them) as the first two lines; both with whatever
line endings the application gave. Their processors mark a message being
sent with a hard link ``.sending-NAME`` and one refused for good with
``.rejected-NAME``, in the same directory.

``convert`` turns such a file into a mailspool envelope and the message
bytes with those two headers removed and line endings made CRLF; the rest
of the message is kept byte for byte.
"""

import email.header
import email.utils
import re

from mailspool.exceptions import QueueFileError

SENDER_HEADERS = (b"x-actually-from", b"x-zope-from")
RECIPIENT_HEADERS = (b"x-actually-to", b"x-zope-to")
ENVELOPE_HEADERS = SENDER_HEADERS + RECIPIENT_HEADERS
SENDING_PREFIX = ".sending-"
REJECTED_PREFIX = ".rejected-"
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


def looks_legacy(head):
    """True when ``head`` (the first bytes of a file) starts a message with an X-Actually-To or X-Zope-To header."""
    header_block = b"\n" + _LINE_ENDING.sub(b"\n", head).split(b"\n\n", 1)[0].lower()
    return any(b"\n" + name + b":" in header_block for name in RECIPIENT_HEADERS)


def convert(data, name):
    """``(sender, recipients, message_bytes)`` from a legacy queue file; QueueFileError if it is not one."""
    data = _LINE_ENDING.sub(b"\r\n", data)
    head, separator, body = data.partition(b"\r\n\r\n")
    kept, envelope = [], {}
    current = None
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and current is not None:
            current.append(line)
            continue
        name_part = line.partition(b":")[0].strip().lower()
        current = [line]
        if name_part in ENVELOPE_HEADERS:
            envelope[name_part] = current
        else:
            kept.append(current)
    if b"x-actually-to" in envelope:
        sender = _header_text(envelope.get(b"x-actually-from"))
        recipients = tuple(address.strip() for address in _header_text(envelope[b"x-actually-to"]).split(",")
                           if address.strip())
    elif b"x-zope-to" in envelope:
        sender = _header_text(envelope.get(b"x-zope-from"))
        recipients = tuple(address for _, address in email.utils.getaddresses([_header_text(envelope[b"x-zope-to"])])
                           if address)
    else:
        raise QueueFileError(f"{name}: not a repoze.sendmail/zope.sendmail queue file "
                             "(no X-Actually-To or X-Zope-To)", name)
    if not recipients:
        raise QueueFileError(f"{name}: the old queue file names no recipient", name)
    message = b"".join(line + b"\r\n" for field in kept for line in field) + separator + body
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return sender, recipients, message


def _header_text(lines):
    """The decoded value of a header field given as its raw lines ('' when absent)."""
    if not lines:
        return ""
    raw = b" ".join(line.strip() for line in lines).partition(b":")[2].strip().decode("utf-8", "replace")
    parts = []
    for value, charset in email.header.decode_header(raw):
        parts.append(value.decode(charset or "ascii", "replace") if isinstance(value, bytes) else value)
    return "".join(parts)


def message_id(message):
    """The Message-Id of CRLF ``message`` bytes, or "" when it has none."""
    head = message.partition(b"\r\n\r\n")[0]
    match = re.search(rb"(?im)^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", head)
    return match.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace") if match else ""
