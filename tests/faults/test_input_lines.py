"""Long lines, bare-LF line endings and lines starting with a dot: delivered intact, or refused at send.

What "intact" can honestly mean: SMTP carries lines of at most 998 octets
(RFC 5321, 4.5.3.1.6), and servers refuse longer ones for good (aiosmtpd:
``500 Line too long``). A message *object* with a long line is encoded
once, at send, by the email package (quoted-printable or base64): its
bytes arrive exactly as queued and its text decodes to what was given.
Bytes cannot be re-encoded without changing them, so bytes (or an object
that serialises to a long line) with a line over 998 octets are refused by
``send()``, naming the line, instead of being queued only to fail at
delivery. Bare LF (and bare CR) line endings become CRLF at send; nothing
else in the bytes changes. Dot-stuffing happens on the wire only: the
server, having undone it, holds exactly the queued bytes.
"""

import email
import email.message
import email.policy

import pytest

from mailspool import QueuedMailDelivery
from mailspool.exceptions import InvalidMessage
from mailspool.maildir import MaildirQueue

SENDER = "shop@example.org"
ALICE = "alice@example.org"
EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}
# Given, so that send() adds nothing and the queued bytes can be predicted exactly.
FIXED_HEADERS = "Message-Id: <lines@example.org>\r\nDate: Mon, 23 Nov 2026 18:30:00 +0000\r\n"


def raw_message(body, line_ending="\r\n"):
    head = f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: Lines\r\n{FIXED_HEADERS}\r\n"
    return (head + body).replace("\r\n", line_ending).encode("utf-8")


def refused_at_send(queue_path, manager, message):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with pytest.raises(InvalidMessage) as info:
        with manager:
            delivery.send(SENDER, [ALICE], message)
    assert MaildirQueue(queue_path).counts() == EMPTY
    return str(info.value)


def deliver(server, processor_for):
    summary = processor_for(server).run_once()
    assert (summary.sent, summary.deferred, summary.failed) == (1, 0, 0)
    ((_, _, data),) = server.handler.received
    return data


# -- long lines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("character", ["x", "é"], ids=["ASCII", "UTF-8"])
def test_a_2000_character_line_in_a_message_object_is_encoded_at_send_and_arrives_intact(
    character, fault_server, committed, processor_for
):
    line = character * 2000
    message = email.message.EmailMessage()
    message["From"] = SENDER
    message["Subject"] = "One long line"
    message.set_content(f"Before\n{line}\nAfter\n")
    queued = committed(message, [ALICE])

    data = deliver(fault_server, processor_for)

    assert data == queued.data
    assert max(len(wire_line) for wire_line in data.split(b"\r\n")) <= 78
    arrived = email.message_from_bytes(data, policy=email.policy.default)
    assert arrived.get_content().replace("\r\n", "\n") == f"Before\n{line}\nAfter\n"


@pytest.mark.parametrize("line_ending", ["\r\n", "\n"], ids=["CRLF", "LF"])
def test_a_2000_character_line_in_bytes_is_refused_at_send_naming_the_line(line_ending, queue_path, manager):
    message = raw_message("A short first line.\r\n" + "x" * 2000 + "\r\nA short last line.\r\n", line_ending)

    error = refused_at_send(queue_path, manager, message)

    # Lines 1-5 are headers, 6 is the blank line, 7 the first body line.
    assert "line 8 of the message is 2000 bytes long" in error
    assert "at most 998" in error
    assert "email.message.EmailMessage" in error


def test_a_message_object_that_serialises_to_a_2000_character_line_is_refused_at_send(queue_path, manager):
    message = email.message.Message()  # compat32: set_payload applies no transfer encoding
    message["From"] = SENDER
    message["Subject"] = "One long line"
    message.set_payload("Before\n" + "y" * 2000 + "\nAfter\n")

    error = refused_at_send(queue_path, manager, message)

    assert "line 5 of the serialised message is 2000 bytes long" in error
    assert "at most 998" in error
    assert "transfer encoding" in error


def test_an_over_long_header_line_is_refused_at_send(queue_path, manager):
    message = raw_message("body\r\n").replace(b"Subject: Lines", b"Subject: " + b"s" * 1200)

    error = refused_at_send(queue_path, manager, message)

    assert "line 3 of the message is 1209 bytes long" in error


@pytest.mark.parametrize("first", ["x", "."], ids=["plain", "dot-stuffed to 999 on the wire"])
def test_a_998_octet_line_in_bytes_arrives_intact(first, fault_server, committed, processor_for):
    line = first + "x" * 997
    message = raw_message(f"Before\r\n{line}\r\nAfter\r\n")
    queued = committed(message, [ALICE])

    assert queued.data == message
    assert deliver(fault_server, processor_for) == message


def test_a_999_octet_line_in_bytes_is_refused(queue_path, manager):
    error = refused_at_send(queue_path, manager, raw_message("x" * 999 + "\r\n"))

    assert "line 7 of the message is 999 bytes long" in error


# -- line endings and dots ----------------------------------------------------------------------------


DOT_LINES = "\r\n".join([
    "First line.",
    ".",
    "..",
    "...",
    ".hidden",
    " .",
    ". ",
    "",
    ".",
    "",
    "Last line but one.",
    ".",  # the very last line, without a line ending: send() adds one
])


@pytest.mark.parametrize("line_ending", ["\r\n", "\n", "\r"], ids=["CRLF", "bare LF", "bare CR"])
def test_lines_starting_with_a_dot_arrive_intact_whatever_the_line_endings(
    line_ending, fault_server, committed, processor_for
):
    message = raw_message(DOT_LINES, line_ending)
    queued = committed(message, [ALICE])

    assert queued.data == raw_message(DOT_LINES + "\r\n")  # CRLF everywhere, nothing else changed
    assert deliver(fault_server, processor_for) == queued.data


def test_bare_lf_lines_of_a_longer_message_arrive_as_the_same_lines(fault_server, committed, processor_for):
    body = "".join(f"{'.' if number % 7 == 0 else ''}Line {number}: " + "abc " * (number % 40) + "\n"
                   for number in range(2000))
    message = raw_message(body, "\n")
    queued = committed(message, [ALICE])

    data = deliver(fault_server, processor_for)

    assert data == queued.data
    assert data.count(b"\r\n") == message.count(b"\n")
    assert data.replace(b"\r\n", b"\n") == message


def test_lines_starting_with_a_dot_in_a_message_object_arrive_intact(fault_server, committed, processor_for):
    text = ".\n..\n.hidden\nmiddle\n.\nend\n"
    message = email.message.EmailMessage()
    message["From"] = SENDER
    message["Subject"] = "Dots"
    message.set_content(text)
    queued = committed(message, [ALICE])

    data = deliver(fault_server, processor_for)

    assert data == queued.data
    arrived = email.message_from_bytes(data, policy=email.policy.default)
    assert arrived.get_content().replace("\r\n", "\n") == text
