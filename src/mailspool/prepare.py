"""Turning what ``send()`` is given into checked envelope addresses and final message bytes.

This is the only place that serialises a message. Everything after it
moves the bytes it returns without parsing or re-serialising them: the
headers are edited as raw lines (add Message-Id and Date, drop Bcc and
Resent-Bcc), line endings are normalised to CRLF once, and the result is
what SMTP DATA sends.
"""

import dataclasses
import email.message
import email.utils
import re
import socket

from mailspool.exceptions import HeaderInjection, InvalidAddress, InvalidMessage, NoRecipients, NotAMessage

_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_TEXT_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext: printable, no colon
_FORBIDDEN_IN_ADDRESS = ("\r", "\n", "\0", "<", ">")
# Octets per line, CRLF not counted (RFC 5321, 4.5.3.1.6; RFC 5322, 2.1.1).
# Servers refuse longer lines for good ("500 Line too long"), so such a
# message is refused here, where the caller can still fix it.
MAX_LINE_LENGTH = 998


@dataclasses.dataclass(frozen=True)
class PreparedMessage:
    """Checked envelope addresses and the final bytes of one message."""

    sender: str
    recipients: tuple
    message_id: str
    data: bytes


# Blind-copy fields: their recipients are envelope recipients only, and the
# fields are removed before the message is sent (RFC 5322, 3.6.3 and 3.6.6).
_BLIND_FIELDS = (b"bcc", b"resent-bcc")


def prepare(fromaddr, toaddrs, message):
    """Check and normalise the arguments of ``IMailDelivery.send``.

    Returns a PreparedMessage. Raises a subclass of ``InvalidMessage``
    (``ValueError``) naming the problem; see ``mailspool.exceptions``.
    """
    sender = _check_address(fromaddr, "sender", allow_empty=True)
    if isinstance(toaddrs, (str, bytes)):
        raise InvalidAddress(f"recipients must be a list of addresses, not a single string: {toaddrs!r}")
    try:
        recipients = tuple(_check_address(addr, "recipient") for addr in toaddrs)
    except TypeError as exc:
        raise InvalidAddress(f"recipients must be a list of addresses, not {type(toaddrs).__name__}") from exc
    if not recipients:
        raise NoRecipients("no recipients: a message needs at least one envelope recipient")
    raw = _message_bytes(message)
    _check_line_lengths(raw, given_as_bytes=isinstance(message, (bytes, bytearray, memoryview)))
    header_lines, body = _split_message(raw)
    header_lines = [line for line in header_lines if line]
    _check_header_lines(header_lines)
    fields = _fields(header_lines)
    fields = [field for field in fields if _field_name(field) not in _BLIND_FIELDS]
    names = {_field_name(field) for field in fields}
    message_id = _existing_message_id(fields)
    if message_id is None:
        message_id = email.utils.make_msgid(domain=_message_id_domain(sender))
        fields.append([b"Message-Id: " + message_id.encode("ascii")])
    if b"date" not in names:
        fields.append([b"Date: " + email.utils.formatdate(localtime=True).encode("ascii")])
    head = b"".join(line + b"\r\n" for field in fields for line in field)
    data = head + b"\r\n" + body
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return PreparedMessage(sender, recipients, message_id, data)


def _check_address(address, role, allow_empty=False):
    if isinstance(address, bytes):
        try:
            address = address.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidAddress(f"{role} address {address!r} is not valid UTF-8") from exc
    if not isinstance(address, str):
        raise InvalidAddress(f"{role} address must be a string, not {type(address).__name__}: {address!r}")
    try:
        address.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. a non-UTF-8 byte decoded with surrogateescape
        raise InvalidAddress(f"{role} address {address!r} cannot be written as UTF-8") from exc
    for bad in _FORBIDDEN_IN_ADDRESS:
        if bad in address:
            raise InvalidAddress(
                f"{role} address {address!r} contains {bad!r}; envelope addresses are bare "
                "addr-specs such as user@example.org, one line, without angle brackets"
            )
    if not address.strip() and not allow_empty:
        raise InvalidAddress(f"{role} address is empty")
    return address.strip()


def _message_bytes(message):
    """Serialise ``message`` once, with CRLF line endings."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        data = bytes(message)
    elif isinstance(message, email.message.Message):
        _check_message_headers(message)
        try:
            data = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
        except (ValueError, TypeError, UnicodeError) as exc:
            raise InvalidMessage(f"the message cannot be serialised: {exc}") from exc
    else:
        raise NotAMessage(
            f"message must be an email.message.Message or bytes, not {type(message).__name__}"
        )
    if not data.strip():
        raise InvalidMessage("the message is empty")
    nul_offset = data.find(b"\0")
    if nul_offset >= 0:
        raise InvalidMessage(f"the message contains a NUL byte at offset {nul_offset}")
    return _LINE_ENDING.sub(b"\r\n", data)


def _check_line_lengths(data, given_as_bytes):
    """Refuse a line longer than SMTP can carry, naming it: it would only fail at delivery."""
    if len(data) <= MAX_LINE_LENGTH:
        return
    lines = data.split(b"\r\n")
    if max(map(len, lines)) <= MAX_LINE_LENGTH:
        return
    number = next(number for number, line in enumerate(lines, 1) if len(line) > MAX_LINE_LENGTH)
    if given_as_bytes:
        where = "the message"
        advice = ("pass an email.message.EmailMessage instead of bytes: set_content() gives long lines "
                  "a transfer encoding (quoted-printable) that keeps them intact")
    else:
        where = "the serialised message"
        advice = ("give the part a transfer encoding that wraps lines (quoted-printable or base64), "
                  "as EmailMessage.set_content() does")
    raise InvalidMessage(
        f"line {number} of {where} is {len(lines[number - 1])} bytes long; SMTP allows at most "
        f"{MAX_LINE_LENGTH} per line (RFC 5321, 4.5.3.1.6) and servers refuse longer ones: {advice}"
    )


def _check_message_headers(message):
    """Refuse header names and values, in every MIME part, that would break out of their line when serialised.

    A line break is only allowed as folding: followed by a space or tab and
    more text on the continuation line. The values are checked as stored
    (``raw_items``): the modern policies' ``items()`` shows them with line
    breaks removed, but a value stored with ``set_raw`` is written out with
    its line breaks.
    """
    for part in message.walk():
        for name, value in part.raw_items():
            if any(char in str(name) for char in "\r\n\0"):
                raise HeaderInjection(f"header name {name!r} contains CR, LF or NUL")
            text = str(value)
            if "\0" in text:
                raise HeaderInjection(f"header {name!r} contains a NUL byte")
            continuation_lines = _TEXT_LINE_BREAK.split(text)[1:]
            for line in continuation_lines:
                if line[:1] not in (" ", "\t") or not line.strip():
                    raise HeaderInjection(
                        f"header {name!r} contains a line break that would start a new header: {text!r}")


def _split_message(data):
    """Split CRLF ``data`` into header lines (without CRLF) and the body after the blank line."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        if data.startswith(b"\r\n"):
            return [], data[2:]
        head, body = data.rstrip(b"\r\n"), b""
    return head.split(b"\r\n"), body


def _check_header_lines(lines):
    if not lines:
        raise InvalidMessage("the message has no headers")
    for number, line in enumerate(lines, 1):
        if line[:1] in (b" ", b"\t"):
            if number == 1:
                raise InvalidMessage("the message starts with a continuation line")
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise HeaderInjection(
                f"header line {number} is not 'Name: value' (a line break injected into a header?): {line[:80]!r}"
            )


def _fields(lines):
    """Group header lines into fields: a field is its first line and its continuation lines."""
    fields = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


def _field_name(field):
    return field[0].partition(b":")[0].strip().lower()


def _existing_message_id(fields):
    for field in fields:
        if _field_name(field) == b"message-id":
            value = b" ".join(line.strip() for line in field)[len(b"message-id:"):].strip()
            return value.decode("utf-8", "replace")
    return None


def _message_id_domain(sender):
    """The sender's domain keeps Message-Ids from leaking internal host names."""
    domain = sender.rpartition("@")[2]
    if domain and domain.isascii() and "@" in sender:
        return domain
    return socket.gethostname()
