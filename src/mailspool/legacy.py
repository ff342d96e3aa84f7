"""Queue files written by repoze.sendmail and zope.sendmail, read so that switching loses no mail.

Their queue is a Maildir whose messages carry the envelope in two extra
headers, ``X-Actually-From`` and ``X-Actually-To`` (comma-separated, RFC
2047-encoded as UTF-8), written with the platform's line endings. Their
processors mark a message being sent with a hard link ``.sending-NAME``
and one refused for good with ``.rejected-NAME``, in the same directory.

``convert`` turns such a file into a mailspool envelope and the message
bytes with those two headers removed and line endings made CRLF; the rest
of the message is kept byte for byte.
"""

import email.header
import re

from mailspool.exceptions import QueueFileError

ENVELOPE_HEADERS = (b"x-actually-from", b"x-actually-to")
SENDING_PREFIX = ".sending-"
REJECTED_PREFIX = ".rejected-"
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


def looks_legacy(head):
    """True when ``head`` (the first bytes of a file) starts a message with an X-Actually-To header."""
    header_block = _LINE_ENDING.sub(b"\n", head).split(b"\n\n", 1)[0].lower()
    return b"\nx-actually-to:" in b"\n" + header_block


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
    if b"x-actually-to" not in envelope:
        raise QueueFileError(f"{name}: not a repoze.sendmail/zope.sendmail queue file (no X-Actually-To)", name)
    sender = _header_text(envelope.get(b"x-actually-from"))
    recipients = tuple(address.strip() for address in _header_text(envelope[b"x-actually-to"]).split(",")
                       if address.strip())
    if not recipients:
        raise QueueFileError(f"{name}: X-Actually-To names no recipient", name)
    message = b"".join(line + b"\r\n" for field in kept for line in field) + separator + body
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return sender, recipients, message


def _header_text(lines):
    """The decoded value of a header field given as its raw lines ('' when absent)."""
    if not lines:
        return ""
    raw = b" ".join(line.strip() for line in lines).partition(b":")[2].strip().decode("ascii", "replace")
    parts = []
    for value, charset in email.header.decode_header(raw):
        parts.append(value.decode(charset or "ascii", "replace") if isinstance(value, bytes) else value)
    return "".join(parts)


def message_id(message):
    """The Message-Id of CRLF ``message`` bytes, or "" when it has none."""
    head = message.partition(b"\r\n\r\n")[0]
    match = re.search(rb"(?im)^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", head)
    return match.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace") if match else ""
