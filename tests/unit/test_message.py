"""mailspool.Message: pyramid_mailer's builder API on EmailMessage."""

import email
import email.policy
import io

import pytest

from mailspool.exceptions import HeaderInjection, InvalidMessage
from mailspool.message import Attachment, Message
from mailspool.prepare import prepare


def parsed(message):
    return email.message_from_bytes(message.to_message().as_bytes(), policy=email.policy.default)


def test_plain_text_message():
    result = parsed(Message(subject="Hi", sender="shop@example.org", recipients=["a@example.org"], body="Hello"))
    assert (result["From"], result["To"], result["Subject"]) == ("shop@example.org", "a@example.org", "Hi")
    assert result.get_content_type() == "text/plain"
    assert result.get_content().strip() == "Hello"


def test_body_and_html_make_multipart_alternative():
    result = parsed(Message(subject="Hi", sender="s@example.org", recipients=["a@example.org"],
                            body="plain", html="<p>rich</p>"))
    assert result.get_content_type() == "multipart/alternative"
    assert result.get_body(("plain",)).get_content().strip() == "plain"
    assert result.get_body(("html",)).get_content().strip() == "<p>rich</p>"


def test_inline_image_with_content_id_is_related_to_the_html():
    logo = Attachment("logo.png", "image/png", b"\x89PNG\r\n", disposition="inline", content_id="logo")
    result = parsed(Message(sender="s@example.org", recipients=["a@example.org"], body="plain",
                            html='<img src="cid:logo">', attachments=[logo]))
    related = [part for part in result.walk() if part.get_content_type() == "multipart/related"]
    assert len(related) == 1
    image = [part for part in related[0].iter_parts() if part.get_content_type() == "image/png"][0]
    assert image["Content-ID"] == "<logo>"
    assert image.get_content() == b"\x89PNG\r\n"


def test_attachments_from_bytes_text_and_files():
    message = Message(sender="s@example.org", recipients=["a@example.org"], body="see attached")
    message.attach(Attachment("report.pdf", "application/pdf", b"%PDF-1.4"))
    message.attach(Attachment("notes.txt", "text/plain; charset=utf-8", "Grüße"))
    message.attach(Attachment("data.bin", data=io.BytesIO(b"\x00\x01")))
    result = parsed(message)
    attachments = {part.get_filename(): part for part in result.iter_attachments()}
    assert attachments["report.pdf"].get_content() == b"%PDF-1.4"
    assert attachments["notes.txt"].get_content().strip() == "Grüße"
    assert attachments["data.bin"].get_content_type() == "application/octet-stream"
    assert attachments["data.bin"].get_content() == b"\x00\x01"


def test_non_ascii_names_and_long_subjects_are_encoded_and_folded():
    subject = " ".join(["Grüße"] * 30)
    message = Message(subject=subject, sender="Café Müller <shop@example.org>",
                      recipients=["Zoë Ærøskøbing <zoe@example.org>"], body="Schöne Grüße")
    raw = message.to_message().as_bytes()
    head = raw.split(b"\r\n\r\n")[0]
    assert head.isascii()
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    result = email.message_from_bytes(raw, policy=email.policy.default)
    assert result["Subject"] == subject
    assert result["From"].addresses[0].display_name == "Café Müller"
    assert result.get_content().strip() == "Schöne Grüße"


def test_bcc_is_a_recipient_and_never_a_header():
    message = Message(sender="s@example.org", recipients=["a@example.org"], cc=["c@example.org"],
                      bcc=["hidden@example.org"], body="x")
    assert message.send_to == ["a@example.org", "c@example.org", "hidden@example.org"]
    assert b"hidden@" not in message.to_message().as_bytes()


def test_extra_headers_are_added_or_replace():
    message = Message(subject="old", sender="s@example.org", recipients=["a@example.org"], body="x",
                      extra_headers={"X-Campaign": "winter", "Subject": "new"})
    result = parsed(message)
    assert (result["X-Campaign"], result["Subject"]) == ("winter", "new")


@pytest.mark.parametrize("kwargs, match", [
    ({"sender": "s@example.org", "body": "x"}, "no recipients"),
    ({"sender": "s@example.org", "recipients": ["a@example.org"]}, "no body"),
    ({"recipients": ["a@example.org"], "body": "x"}, "no sender"),
])
def test_incomplete_messages_are_refused(kwargs, match):
    with pytest.raises(InvalidMessage, match=match):
        Message(**kwargs).to_message()


@pytest.mark.parametrize("field", ["subject", "sender", "recipients", "extra_headers"])
def test_line_breaks_in_headers_are_refused(field):
    values = {"subject": "Hi", "sender": "s@example.org", "recipients": ["a@example.org"], "body": "x"}
    injected = "x\r\nBcc: victim@example.net"
    values[field] = {"X-Note": injected} if field == "extra_headers" else (
        [injected] if field == "recipients" else injected)
    message = Message(**values)
    assert message.is_bad_headers()
    with pytest.raises(HeaderInjection):
        message.to_message()


def test_the_built_message_passes_send_checks():
    message = Message(subject="Hi", sender="shop@example.org", recipients=["a@example.org"], body="x",
                      html="<p>x</p>")
    prepared = prepare("shop@example.org", message.send_to, message.to_message())
    assert prepared.data.count(b"\r\n") > 5
