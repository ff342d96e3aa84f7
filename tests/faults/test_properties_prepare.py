"""Case 21 (b): property-based tests of what send() accepts and what it makes of it (mailspool.prepare).

* An envelope address containing CR, LF, NUL or angle brackets is refused
  with InvalidAddress, as sender or as recipient, as str or as bytes.
* Whatever bytes are given, prepare() either refuses them with an
  InvalidMessage (a ValueError) or returns data that: uses CRLF and only
  CRLF, ends with CRLF, has a header block made only of "Name: value" and
  continuation lines that the standard library parses into the same
  fields, has no Bcc header, carries exactly one Message-Id (the one
  returned) and one Date; and prepare() returns its own output unchanged.
* A header value with a line break that would start a new header is
  refused (HeaderInjection), never turned into an extra header.

Hypothesis runs derandomized with a fixed number of examples.
"""

import email.message
import email.parser
import email.policy
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailspool.exceptions import HeaderInjection, InvalidAddress, InvalidMessage
from mailspool.prepare import prepare

QUICK = settings(max_examples=300, deadline=None, derandomize=True, database=None)

SENDER, RECIPIENTS = "shop@example.org", ["alice@example.org"]
FORBIDDEN = ["\r", "\n", "\0", "<", ">"]
HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+:.*|[ \t].*", re.DOTALL)

address_text = st.text(st.characters(codec="utf-8"), max_size=30)


@st.composite
def addresses_with_a_forbidden_character(draw):
    before, after = draw(address_text), draw(address_text)
    return before + draw(st.sampled_from(FORBIDDEN)) + after


@QUICK
@given(addresses_with_a_forbidden_character(), st.booleans(), st.booleans())
def test_an_address_with_cr_lf_nul_or_brackets_is_refused(bad, as_sender, as_bytes):
    address = bad.encode("utf-8") if as_bytes else bad
    sender, recipients = (address, RECIPIENTS) if as_sender else (SENDER, ["ok@example.org", address])

    with pytest.raises(InvalidAddress):
        prepare(sender, recipients, b"Subject: x\r\n\r\nbody\r\n")


@QUICK
@given(address_text.filter(lambda a: not any(c in a for c in FORBIDDEN) and a.strip()))
def test_any_other_address_is_kept_stripped(address):
    prepared = prepare(address, [address], b"Subject: x\r\n\r\nbody\r\n")

    assert prepared.sender == address.strip() and prepared.recipients == (address.strip(),)


@pytest.mark.parametrize("as_sender", [True, False])
def test_an_address_that_cannot_be_written_as_utf8_is_refused(as_sender):
    bad = "caf\udce9@example.org"  # b"caf\xe9@..." decoded with surrogateescape
    sender, recipients = (bad, RECIPIENTS) if as_sender else (SENDER, [bad])

    with pytest.raises(InvalidAddress):
        prepare(sender, recipients, b"Subject: x\r\n\r\nbody\r\n")


# -- messages ------------------------------------------------------------------

line_endings = st.sampled_from([b"\r\n", b"\n", b"\r"])
header_names = st.one_of(
    st.sampled_from([b"Subject", b"From", b"To", b"Bcc", b"BCC", b"bcc", b"Cc", b"Message-Id", b"Date",
                     b"X-Bcc-Note", b"Message-ID"]),
    st.binary(min_size=1, max_size=12).filter(lambda name: re.fullmatch(rb"[\x21-\x39\x3b-\x7e]+", name)),
)
header_values = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"), max_size=40).map(
    lambda value: value.encode("utf-8"))


@st.composite
def raw_messages(draw):
    """A message as bytes, with mixed line endings, folded headers and any body (sometimes plain garbage)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        line = draw(header_names) + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + draw(header_values)
        for _ in range(draw(st.integers(0, 2))):  # folding
            line += draw(line_endings) + draw(st.sampled_from([b" ", b"\t"])) + draw(header_values)
        lines.append(line)
    message = b"".join(line + draw(line_endings) for line in lines)
    message += draw(line_endings)
    body = draw(st.binary(max_size=120) | st.lists(header_values, max_size=4).map(b"\n".join))
    return message + body


def header_block(data):
    return data.partition(b"\r\n\r\n")[0]


def fields(data):
    """(lower-case name, raw lines) of each header field, as prepare's output is laid out."""
    found = []
    for line in header_block(data).split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            found[-1][1].append(line)
        else:
            found.append((line.partition(b":")[0].lower(), [line]))
    return found


@QUICK
@given(raw_messages())
def test_an_accepted_message_is_crlf_without_bcc_parses_and_prepares_to_itself(message):
    try:
        prepared = prepare(SENDER, RECIPIENTS, message)
    except InvalidMessage:
        return  # refused, with a reason: fine (checked separately below for what must be accepted)
    data = prepared.data

    assert data.endswith(b"\r\n")
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    assert b"\0" not in data
    for line in header_block(data).split(b"\r\n"):
        assert HEADER_LINE.fullmatch(line), line
    names = [name for name, _ in fields(data)]
    assert b"bcc" not in names
    given_ids = [name.lower() for name in re.findall(rb"(?m)^([\x21-\x39\x3b-\x7e]+):", header_block(data))]
    # One Message-Id is added when there is none; duplicates given by the caller are kept as given.
    assert names.count(b"message-id") == max(1, given_ids.count(b"message-id")) and b"date" in names
    parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data, headersonly=True)
    assert [name.lower().encode("ascii", "surrogateescape") for name in parsed.keys()] == names
    assert prepare(prepared.sender, prepared.recipients, data) == prepared  # idempotent


@QUICK
@given(raw_messages())
def test_a_message_with_headers_and_no_nul_is_never_refused_for_its_line_endings(message):
    assume(b"\0" not in message and message.strip())
    head = re.split(rb"\r\n\r\n|\n\n|\r\r|\r\n\n|\n\r\n", message, maxsplit=1)[0]
    first = re.split(rb"\r\n|\r|\n", head)[0]
    assume(re.fullmatch(rb"[\x21-\x39\x3b-\x7e]+:.*", first, re.DOTALL))
    assume(all(HEADER_LINE.fullmatch(line) for line in re.split(rb"\r\n|\r|\n", head) if line))

    prepare(SENDER, RECIPIENTS, message)  # does not raise


@QUICK
@given(st.sampled_from(["\r\n", "\n", "\r"]), st.text(st.characters(codec="ascii", exclude_characters="\r\n\0"),
                                                      min_size=1, max_size=20).filter(lambda s: s[0] not in " \t"))
def test_a_line_break_that_would_start_a_header_is_refused_never_sent(line_break, injected):
    message = email.message.Message()
    message["From"] = SENDER
    message["Subject"] = f"Hello{line_break}{injected}"
    message.set_payload("body\n")

    with pytest.raises(HeaderInjection):
        prepare(SENDER, RECIPIENTS, message)


@QUICK
@given(st.lists(st.sampled_from(["Bcc", "BCC", "bcc"]), min_size=1, max_size=3),
       st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"), max_size=30))
def test_bcc_given_in_a_message_object_never_reaches_the_queued_bytes(names, value):
    message = email.message.Message()  # compat32, like most applications' messages: several Bcc are possible
    message["From"] = SENDER
    message["Subject"] = "Hi"
    for name in names:
        message[name] = "hidden@example.org"
    message.set_payload(value or "body", charset="utf-8")

    data = prepare(SENDER, RECIPIENTS + ["hidden@example.org"], message).data

    assert b"hidden@example.org" not in header_block(data)
    assert b"bcc" not in [name for name, _ in fields(data)]
