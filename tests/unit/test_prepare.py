"""What send() accepts, what it refuses, and how it normalises messages."""

import email.message
import email.policy

import pytest

from mailspool import QueuedMailDelivery
from mailspool.exceptions import HeaderInjection, InvalidAddress, InvalidMessage, NoRecipients, NotAMessage
from mailspool.prepare import prepare

MESSAGE = b"From: shop@example.org\r\nTo: alice@example.org\r\nSubject: Hi\r\n\r\nHello.\r\n"


def headers_of(data):
    return data.partition(b"\r\n\r\n")[0].split(b"\r\n")


@pytest.fixture
def delivery(queue_path, manager):
    manager.begin()
    yield QueuedMailDelivery(queue_path, transaction_manager=manager)
    manager.abort()


# -- bad input: each refused from send(), before anything is queued -----------

def test_empty_recipient_list(delivery):
    with pytest.raises(NoRecipients, match="no recipients"):
        delivery.send("shop@example.org", [], MESSAGE)


def test_recipients_given_as_a_single_string(delivery):
    with pytest.raises(InvalidAddress, match="not a single string"):
        delivery.send("shop@example.org", "alice@example.org", MESSAGE)


@pytest.mark.parametrize("bad", ["\r", "\n", "\r\n", "\0"])
def test_cr_lf_or_nul_in_a_recipient(delivery, bad):
    with pytest.raises(InvalidAddress, match="recipient address"):
        delivery.send("shop@example.org", [f"alice@example.org{bad}RCPT TO:<evil@example.net>"], MESSAGE)


@pytest.mark.parametrize("bad", ["\r", "\n", "\0"])
def test_cr_lf_or_nul_in_the_sender(delivery, bad):
    with pytest.raises(InvalidAddress, match="sender address"):
        delivery.send(f"shop@example.org{bad}", ["alice@example.org"], MESSAGE)


def test_an_empty_recipient_address(delivery):
    with pytest.raises(InvalidAddress, match="recipient address is empty"):
        delivery.send("shop@example.org", ["alice@example.org", " "], MESSAGE)


def test_a_display_name_in_an_envelope_address(delivery):
    with pytest.raises(InvalidAddress, match="bare addr-specs"):
        delivery.send("shop@example.org", ["Alice <alice@example.org>"], MESSAGE)


def test_header_injection_in_a_message_object(delivery):
    message = email.message.Message()
    message["From"] = "shop@example.org"
    message["Subject"] = "Hello\r\nBcc: victim@example.net"
    message.set_payload("body")
    with pytest.raises(HeaderInjection, match="'Subject'.*new header"):
        delivery.send("shop@example.org", ["alice@example.org"], message)


def test_header_injection_with_a_trailing_newline(delivery):
    message = email.message.Message()
    message["Subject"] = "Hello\n"
    message.set_payload("body")
    with pytest.raises(HeaderInjection, match="'Subject'"):
        delivery.send("shop@example.org", ["alice@example.org"], message)


def test_nul_in_a_header_of_a_message_object(delivery):
    message = email.message.Message()
    message["Subject"] = "Hello\0world"
    message.set_payload("body")
    with pytest.raises(HeaderInjection, match="NUL"):
        delivery.send("shop@example.org", ["alice@example.org"], message)


def test_header_injection_in_bytes(delivery):
    injected = b"From: shop@example.org\r\nSubject: Hi\r\n<script>\r\n\r\nbody\r\n"
    with pytest.raises(HeaderInjection, match="line 3 is not 'Name: value'"):
        delivery.send("shop@example.org", ["alice@example.org"], injected)


def test_nul_in_bytes(delivery):
    with pytest.raises(InvalidMessage, match="NUL byte at offset"):
        delivery.send("shop@example.org", ["alice@example.org"], MESSAGE.replace(b"Hello", b"Hel\0lo"))


@pytest.mark.parametrize("not_a_message", [None, 42, "From: a@b\r\n\r\nstr is not bytes", {"Subject": "x"}])
def test_not_a_message(delivery, not_a_message):
    with pytest.raises(NotAMessage, match="must be an email.message.Message or bytes") as raised:
        delivery.send("shop@example.org", ["alice@example.org"], not_a_message)
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, TypeError)


def test_an_empty_message(delivery):
    with pytest.raises(InvalidMessage, match="empty"):
        delivery.send("shop@example.org", ["alice@example.org"], b"\r\n")


def test_refused_input_leaves_the_transaction_untouched(delivery, manager, queue_path):
    with pytest.raises(NoRecipients):
        delivery.send("shop@example.org", [], MESSAGE)
    assert manager.get()._resources == []


# -- normalisation -------------------------------------------------------------

def test_message_id_and_date_are_added_when_absent():
    prepared = prepare("shop@example.org", ["alice@example.org"], MESSAGE)
    headers = headers_of(prepared.data)
    assert f"Message-Id: {prepared.message_id}".encode() in headers
    assert prepared.message_id.startswith("<") and prepared.message_id.endswith("@example.org>")
    assert any(line.startswith(b"Date: ") for line in headers)


def test_an_existing_message_id_and_date_are_kept():
    message = b"Message-ID: <mine@example.org>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nx\r\n"
    prepared = prepare("shop@example.org", ["alice@example.org"], message)
    assert prepared.message_id == "<mine@example.org>"
    assert prepared.data == message


def test_bcc_is_removed_including_its_continuation_lines():
    message = (
        b"From: shop@example.org\r\nBcc: hidden@example.org,\r\n other@example.org\r\n"
        b"To: alice@example.org\r\nbcc: lower@example.org\r\n\r\nBcc: in the body stays\r\n"
    )
    prepared = prepare("shop@example.org", ["alice@example.org", "hidden@example.org"], message)
    head, _, body = prepared.data.partition(b"\r\n\r\n")
    assert b"hidden" not in head and b"other@" not in head and b"lower@" not in head
    assert body == b"Bcc: in the body stays\r\n"
    assert prepared.recipients == ("alice@example.org", "hidden@example.org")


def test_resent_bcc_is_removed_like_bcc():
    message = (
        b"Resent-From: desk@example.org\r\nResent-To: alice@example.org\r\n"
        b"Resent-Bcc: hidden@example.org,\r\n other@example.org\r\nSubject: forwarded\r\n\r\nbody\r\n"
    )
    prepared = prepare("desk@example.org", ["alice@example.org", "hidden@example.org"], message)
    head = prepared.data.partition(b"\r\n\r\n")[0]
    assert b"hidden" not in head and b"other@" not in head
    assert b"Resent-To: alice@example.org" in head and b"Subject: forwarded" in head


def test_bare_lf_and_bare_cr_become_crlf_and_the_end_gets_one():
    prepared = prepare("shop@example.org", ["alice@example.org"], b"Subject: x\n\nline 1\rline 2\nlast")
    assert prepared.data.endswith(b"\r\n\r\nline 1\r\nline 2\r\nlast\r\n")
    assert b"\n" not in prepared.data.replace(b"\r\n", b"")


def test_folded_headers_are_accepted_and_kept():
    message = email.message.Message()
    message["Subject"] = "a very long subject\r\n continued on a second line"
    message.set_payload("body")
    prepared = prepare("shop@example.org", ["alice@example.org"], message)
    assert b"Subject: a very long subject\r\n continued on a second line\r\n" in prepared.data


def test_non_ascii_addresses_and_headers_are_accepted():
    message = email.message.EmailMessage(policy=email.policy.SMTPUTF8)
    message["From"] = "Zoë <zoë@exämple.org>"
    message["To"] = "用户@例子.广告"
    message["Subject"] = "Grüße"
    message.set_content("Hallo")
    prepared = prepare("zoë@exämple.org", ["用户@例子.广告"], message)
    assert prepared.recipients == ("用户@例子.广告",)
    assert "Grüße".encode() in prepared.data


def test_the_null_sender_is_allowed():
    assert prepare("", ["alice@example.org"], MESSAGE).sender == ""


def test_byte_addresses_are_decoded():
    assert prepare(b"shop@example.org", [b"alice@example.org"], MESSAGE).recipients == ("alice@example.org",)
