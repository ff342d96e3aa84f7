"""Header injection and NUL bytes: refused by ``send()`` itself, with an error naming the field; nothing queued.

Every way a message reaches mailspool is tried: envelope addresses, the
``mailspool.Message`` builder (through the pyramid_mailer-style
``Mailer.send_to_queue``, which takes the builder itself), standard
library message objects (both policies, ``Header`` objects, ``set_raw``,
MIME parts) and raw bytes. The errors are ``InvalidMessage`` subclasses,
so ``except ValueError`` catches them.

Raw bytes are the caller's own composition: mailspool can refuse a line
that is not a header, or a NUL, but an injected line that *is* a
well-formed header is indistinguishable from one the caller meant. What
still holds for them is tested last: headers never add recipients (the
envelope is explicit) and a ``Bcc`` line never reaches the server.
"""

import email.header
import email.message
import email.mime.multipart
import email.mime.text
import email.policy

import pytest

from mailspool import Message, QueuedMailDelivery
from mailspool.exceptions import HeaderInjection, InvalidAddress, InvalidMessage
from mailspool.maildir import MaildirQueue
from mailspool.pyramid import Mailer

SENDER = "shop@example.org"
ALICE = "alice@example.org"
EVIL = "evil@example.net"
EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}
BREAKS = {"CRLF": "\r\n", "LF": "\n", "CR": "\r"}
BAD_CHARACTERS = {**BREAKS, "NUL": "\0"}


def nothing_queued(queue_path):
    return MaildirQueue(queue_path).counts() == EMPTY


@pytest.fixture
def send(queue_path, manager):
    """``send(fromaddr, toaddrs, message)`` inside a transaction that commits if send() returns."""
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)

    def send(fromaddr, toaddrs, message):
        with manager:
            return delivery.send(fromaddr, toaddrs, message)

    return send


def compat32_message(subject="Hello"):
    message = email.message.Message()
    message["From"] = SENDER
    message["To"] = ALICE
    message["Subject"] = subject
    message.set_payload("Hello Alice.\n")
    return message


# -- envelope addresses ----------------------------------------------------------------------


@pytest.mark.parametrize("character", BAD_CHARACTERS.values(), ids=BAD_CHARACTERS.keys())
@pytest.mark.parametrize("role", ["sender", "recipient"])
def test_a_line_break_or_nul_in_an_envelope_address_is_refused_at_send(role, character, send, queue_path):
    bad = f"{ALICE}{character}RCPT TO:<{EVIL}>"
    fromaddr, toaddrs = (bad, [ALICE]) if role == "sender" else (SENDER, [ALICE, bad])

    with pytest.raises(InvalidAddress) as info:
        send(fromaddr, toaddrs, b"Subject: hi\r\n\r\nbody\r\n")

    assert isinstance(info.value, ValueError)
    assert f"{role} address" in str(info.value)
    assert f"contains {character[0]!r}" in str(info.value)
    assert nothing_queued(queue_path)


# -- the mailspool.Message builder -------------------------------------------------------------


def builder_with(field, character):
    fields = {"subject": "Your order", "sender": SENDER, "recipients": [ALICE], "body": "Hello Alice."}
    injected = f"{character}Bcc: {EVIL}"
    if field == "extra header value":
        fields["extra_headers"] = {"X-Campaign": "spring" + injected}
    elif field == "extra header name":
        fields["extra_headers"] = {"X-Campaign" + injected: "spring"}
    elif field in ("recipients", "cc", "bcc"):
        fields[field] = [ALICE + injected] if field == "recipients" else ["carol@example.org" + injected]
    else:
        fields[field] += injected
    return Message(**fields)


@pytest.mark.parametrize("character", BAD_CHARACTERS.values(), ids=BAD_CHARACTERS.keys())
@pytest.mark.parametrize("field", ["subject", "sender", "recipients", "cc", "bcc", "extra header value",
                                   "extra header name"])
def test_a_line_break_or_nul_in_a_builder_field_is_refused_at_send(field, character, queue_path, manager):
    mailer = Mailer.from_settings({"mail.queue_path": str(queue_path)}).bind(transaction_manager=manager)

    with pytest.raises(HeaderInjection) as info:
        with manager:
            mailer.send_to_queue(builder_with(field, character))

    assert isinstance(info.value, ValueError)
    assert "contains CR, LF or NUL" in str(info.value)
    assert nothing_queued(queue_path)


# -- standard library message objects -------------------------------------------------------------


def injected_subject(character):
    return compat32_message(f"Hello{character}Bcc: {EVIL}")


def injected_blank_line():
    return compat32_message("Hello\r\n\r\nThis text would become the body")


def injected_header_object():
    message = compat32_message()
    message.replace_header("Subject", email.header.Header(f"Hello\r\nBcc: {EVIL}"))
    return message


def injected_header_name():
    message = compat32_message()
    message[f"X-Campaign\r\nBcc: {EVIL}\r\nX-Rest"] = "spring"
    return message


def injected_with_set_raw(character):
    message = email.message.EmailMessage()
    message["From"] = SENDER
    message.set_content("Hello Alice.\n")
    # set_raw skips the policy's check; items() even hides the line break.
    message.set_raw("Subject", f"Hello{character}To: {EVIL}")
    return message


def injected_into_a_mime_part():
    message = email.mime.multipart.MIMEMultipart()
    message["From"] = SENDER
    message["Subject"] = "Hello"
    part = email.mime.text.MIMEText("Hello Alice.\n")
    part["Content-Description"] = "greeting\r\nContent-Disposition: attachment; filename=invoice.exe"
    message.attach(part)
    return message


def nul_in_a_header(policy):
    message = email.message.EmailMessage(policy=policy)
    message["From"] = SENDER
    message["Subject"] = "Hello\0there"
    message.set_content("Hello Alice.\n")
    return message


STDLIB_INJECTIONS = {
    "compat32 subject CRLF": lambda: injected_subject("\r\n"),
    "compat32 subject LF": lambda: injected_subject("\n"),
    "compat32 subject CR": lambda: injected_subject("\r"),
    "compat32 blank line": injected_blank_line,
    "Header object": injected_header_object,
    "header name": injected_header_name,
    "EmailMessage set_raw CRLF": lambda: injected_with_set_raw("\r\n"),
    "EmailMessage set_raw LF": lambda: injected_with_set_raw("\n"),
    "MIME part header": injected_into_a_mime_part,
    "compat32 NUL": lambda: compat32_message("Hello\0there"),
    "EmailMessage NUL": lambda: nul_in_a_header(email.policy.default),
}


@pytest.mark.parametrize("make", STDLIB_INJECTIONS.values(), ids=STDLIB_INJECTIONS.keys())
def test_a_line_break_or_nul_in_a_message_object_header_is_refused_at_send(make, send, queue_path):
    with pytest.raises(HeaderInjection) as info:
        send(SENDER, [ALICE], make())

    assert isinstance(info.value, ValueError)
    assert "header" in str(info.value)
    assert nothing_queued(queue_path)


def test_the_email_package_itself_refuses_a_line_break_in_an_emailmessage_header():
    """Setting the header the ordinary way never gets as far as send(): also a ValueError."""
    message = email.message.EmailMessage()
    with pytest.raises(ValueError):
        message["Subject"] = f"Hello\r\nBcc: {EVIL}"


def test_a_nul_in_a_message_object_body_is_refused_at_send(send, queue_path):
    message = email.message.EmailMessage()
    message["From"] = SENDER
    message.set_content("Hello\0Alice.\n")  # short ASCII text: sent as 7bit, the NUL as it is

    with pytest.raises(InvalidMessage, match="NUL byte at offset"):
        send(SENDER, [ALICE], message)
    assert nothing_queued(queue_path)


# -- raw bytes ---------------------------------------------------------------------------------


RAW_INJECTIONS = {
    "a line that is not a header": (b"Subject: Hello\r\nBcc evil@example.net\r\n\r\nbody\r\n", HeaderInjection,
                                    "header line 2 is not 'Name: value'"),
    "bare CR then a non-header": (b"Subject: Hello\rwhatever\r\n\r\nbody\r\n", HeaderInjection,
                                  "header line 2 is not 'Name: value'"),
    "a continuation first": (b" Subject: Hello\r\n\r\nbody\r\n", InvalidMessage, "continuation line"),
    "NUL in a header": (b"Subject: Hello\0there\r\n\r\nbody\r\n", InvalidMessage, "NUL byte at offset 14"),
    "NUL in the body": (b"Subject: Hello\r\n\r\nbo\0dy\r\n", InvalidMessage, "NUL byte at offset 20"),
}


@pytest.mark.parametrize("data, error, text", RAW_INJECTIONS.values(), ids=RAW_INJECTIONS.keys())
def test_a_malformed_header_or_nul_in_raw_bytes_is_refused_at_send(data, error, text, send, queue_path):
    with pytest.raises(error) as info:
        send(SENDER, [ALICE], data)

    assert isinstance(info.value, ValueError)
    assert text in str(info.value)
    assert nothing_queued(queue_path)


def test_a_refused_send_leaves_the_rest_of_the_transaction_alone(queue_path, manager, fault_server, processor_for):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        with pytest.raises(ValueError):
            delivery.send(SENDER, [ALICE], injected_subject("\r\n"))
        delivery.send(SENDER, [ALICE], compat32_message("The good one"))

    assert processor_for(fault_server).run_once().sent == 1
    ((_, recipients, data),) = fault_server.handler.received
    assert recipients == (ALICE,)
    assert b"Subject: The good one\r\n" in data


def test_header_lines_in_raw_bytes_never_add_recipients_and_bcc_never_reaches_the_server(
    committed, fault_server, processor_for
):
    data = (f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: Hello\r\nTo: {EVIL}\r\nCc: {EVIL}\r\n"
            f"Bcc: {EVIL}\r\n\r\nbody\r\n").encode()
    message = committed(data, [ALICE])

    assert processor_for(fault_server).run_once().sent == 1

    assert fault_server.handler.received == [(SENDER, (ALICE,), message.data)]
    assert b"Bcc" not in message.data
