"""Non-ASCII text and addresses: delivered byte for byte as committed, or failed for good with a clear reason.

Servers with and without SMTPUTF8 (aiosmtpd's ``enable_SMTPUTF8``; both
offer 8BITMIME). "Never mangled" is checked by comparing the bytes the
server received with the bytes the queue holds, and by parsing what
arrived back into the text that was given.
"""

import email
import email.message
import email.policy

import pytest

from mailspool import Message
from mailspool.maildir import MaildirQueue
from mailspool.pyramid import Mailer

SENDER = "shop@example.org"
ALICE = "alice@example.org"
DAYS = 24 * 3600

SUBJECT = "Grüße aus Köln – ☕ 東京への招待"
BODY = "Schöne Grüße, Zoë!\nВаш заказ отправлен. 您的订单已发货。\n"
HTML = "<p>Schöne Grüße, <b>Zoë</b>! 您的订单已发货。</p>\n"
FROM_NAME = "Zoë Ölund"
TO_NAME = "Jürgen Groß"


@pytest.fixture(params=[True, False], ids=["SMTPUTF8", "no-SMTPUTF8"])
def server(request, fault_servers):
    return fault_servers(enable_SMTPUTF8=request.param)


def offers_smtputf8(server):
    return server.smtp_options["enable_SMTPUTF8"]


def queued_from_builder(message, queue_path, manager):
    mailer = Mailer.from_settings({"mail.queue_path": str(queue_path)}).bind(transaction_manager=manager)
    with manager:
        return mailer.send_to_queue(message)


def parse(data):
    """The message as a reader sees it: headers read as UTF-8 (RFC 6532), bodies decoded by their charset."""
    headers = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    whole = email.message_from_bytes(data, policy=email.policy.default)
    return headers, whole


def text(part):
    return part.get_content().replace("\r\n", "\n")


def test_utf8_names_subject_and_body_from_the_builder_arrive_byte_identical(
    server, queue_path, manager, processor_for, queue_entries
):
    builder = Message(subject=SUBJECT, sender=f"{FROM_NAME} <{SENDER}>", recipients=[f"{TO_NAME} <{ALICE}>"],
                      body=BODY, html=HTML)
    queued_from_builder(builder, queue_path, manager)
    (entry,) = queue_entries("ready")
    committed = MaildirQueue(queue_path).read_message(entry.queue_id)

    assert processor_for(server).run_once().sent == 1

    ((sender, recipients, data),) = server.handler.received
    assert (sender, recipients, data) == (SENDER, (ALICE,), committed)
    headers, arrived = parse(data)
    assert headers["Subject"] == SUBJECT
    assert headers["From"].addresses[0].display_name == FROM_NAME
    assert headers["To"].addresses[0].display_name == TO_NAME
    assert text(arrived.get_body(("plain",))) == BODY
    assert text(arrived.get_body(("html",))) == HTML
    # ASCII addresses: the headers are RFC 2047 encoded, so no server needs SMTPUTF8 for them.
    assert data.split(b"\r\n\r\n", 1)[0].isascii()
    assert not any("SMTPUTF8" in options for options in server.handler.mail_options)


def test_utf8_headers_in_raw_bytes_arrive_byte_identical_over_smtputf8_or_fail_for_good_without_it(
    server, committed, processor_for, queue_entries
):
    # UTF-8 in header fields (RFC 6532) needs SMTPUTF8 even with ASCII addresses; the
    # message is never re-encoded to fit a server without it.
    data = (f"From: {FROM_NAME} <{SENDER}>\r\nTo: {TO_NAME} <{ALICE}>\r\nSubject: {SUBJECT}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\n" + BODY.replace("\n", "\r\n")).encode("utf-8")
    message = committed(data, [ALICE])

    summary = processor_for(server).run_once()

    if offers_smtputf8(server):
        assert summary.sent == 1
        assert server.handler.received == [(SENDER, (ALICE,), message.data)]
        headers, arrived = parse(message.data)
        assert (headers["Subject"], text(arrived)) == (SUBJECT, BODY)
        assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(server.handler.mail_options[0])
    else:
        assert (summary.sent, summary.failed) == (0, 1)
        (entry,) = queue_entries("failed")
        assert "does not support SMTPUTF8, which the UTF-8 header fields of this message need" in entry.last_reply
        assert server.handler.mails == 0


def test_an_8bit_body_to_a_server_without_8bitmime_fails_for_good_unaltered(
    fault_servers, committed, processor_for, queue_entries, queue_path
):
    server = fault_servers(enable_SMTPUTF8=True)
    server.handler.hidden_extensions = {"8BITMIME"}
    data = (f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: plain header\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            "\r\n" + BODY.replace("\n", "\r\n")).encode("utf-8")
    message = committed(data, [ALICE])

    summary = processor_for(server).run_once()

    assert (summary.sent, summary.failed) == (0, 1)
    (entry,) = queue_entries("failed")
    assert "does not support 8BITMIME, which the 8-bit data of this message needs" in entry.last_reply
    assert server.handler.mails == 0
    assert MaildirQueue(queue_path).read_message(entry.queue_id) == message.data  # kept as committed


INTERNATIONAL_ADDRESSES = {
    "recipient 用户@例子.广告": ("shop@example.org", "用户@例子.广告"),
    "recipient zoë@example.org": ("shop@example.org", "zoë@example.org"),
    "sender zoë@example.org": ("zoë@example.org", "alice@example.org"),
}


@pytest.mark.parametrize("sender, recipient", INTERNATIONAL_ADDRESSES.values(), ids=INTERNATIONAL_ADDRESSES.keys())
def test_an_internationalised_address_is_delivered_with_smtputf8_or_fails_for_good_without_it(
    sender, recipient, server, committed, processor_for, clock, queue_entries
):
    message = email.message.EmailMessage(policy=email.policy.SMTPUTF8)
    message["From"] = f"{FROM_NAME} <{sender}>"
    message["To"] = recipient
    message["Subject"] = SUBJECT
    message.set_content(BODY)
    queued = committed(message, [recipient], sender=sender)
    processor = processor_for(server)

    summary = processor.run_once()

    if offers_smtputf8(server):
        assert (summary.sent, summary.failed) == (1, 0)
        assert server.handler.received == [(sender, (recipient,), queued.data)]
        assert "SMTPUTF8" in server.handler.mail_options[0]
        headers, arrived = parse(server.handler.received[0][2])
        assert headers["To"].addresses[0].addr_spec == recipient
        assert (headers["Subject"], text(arrived)) == (SUBJECT, BODY)
    else:
        assert (summary.sent, summary.failed) == (0, 1)
        (entry,) = queue_entries("failed")
        assert "does not support SMTPUTF8, which the non-ASCII addresses of this message need" in entry.last_reply
        assert server.handler.mails == 0  # refused before MAIL: no address went out mangled
        clock.advance(10 * DAYS)
        assert processor.run_once().sent == 0
        assert server.handler.received == []


def test_an_internationalised_address_from_the_builder_is_delivered_over_smtputf8(
    fault_servers, queue_path, manager, processor_for, queue_entries
):
    server = fault_servers(enable_SMTPUTF8=True)
    recipient = "用户@例子.广告"
    builder = Message(subject=SUBJECT, sender=f"{FROM_NAME} <{SENDER}>", recipients=[f"用户 <{recipient}>"],
                      body=BODY)
    queued_from_builder(builder, queue_path, manager)
    (entry,) = queue_entries("ready")
    committed = MaildirQueue(queue_path).read_message(entry.queue_id)

    assert processor_for(server).run_once().sent == 1

    assert server.handler.received == [(SENDER, (recipient,), committed)]
    headers, arrived = parse(committed)
    assert headers["To"].addresses[0].addr_spec == recipient
    assert (headers["Subject"], text(arrived)) == (SUBJECT, BODY)
