"""The DATA payload SMTPMailer writes itself must be exactly what smtplib's ``SMTP.data`` writes.

``SMTPMailer`` dot-stuffs with ``bytes.replace`` instead of smtplib's
regular expression, and writes a large message and its end-of-data line
separately instead of copying the message to join them. Checked here
against smtplib itself, which writes through a connection whose socket
side is replaced by a recorder (the bytes are what matters; a real server
receives them in tests/functional/test_smtp_mailer.py).
"""

import smtplib

from hypothesis import given, settings
from hypothesis import strategies as st

from mailspool.mailer import SEPARATE_END_OF_DATA, _data_payload, _send_data


class RecordingSMTP(smtplib.SMTP):
    """An unconnected smtplib.SMTP that records what it would write and answers 354, then 250."""

    def __init__(self):
        super().__init__()
        self.written = []
        self.replies = [(354, b"go ahead"), (250, b"queued")]

    def send(self, s):
        self.written.append(s.encode("ascii") if isinstance(s, str) else s)  # smtplib's commands are str

    def getreply(self):
        return self.replies.pop(0)


def written_by_smtplib(message):
    connection = RecordingSMTP()
    assert connection.data(message) == (250, b"queued")
    return b"".join(connection.written)


MESSAGE_PIECES = st.lists(st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"x.y", b"\r\n.\r\n"]),
                          max_size=30).map(b"".join)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(MESSAGE_PIECES)
def test_the_data_payload_is_the_bytes_smtplib_writes(message):
    body, end = _data_payload(message)

    assert b"data\r\n" + body + end == written_by_smtplib(message)


def test_a_message_without_a_leading_dot_is_not_copied_to_be_stuffed():
    message = b"Subject: plain\r\n\r\nno line here starts with a dot\r\n"

    body, end = _data_payload(message)

    assert body is message and end == b".\r\n"


def test_a_large_message_is_written_as_it_is_and_the_end_after_it():
    message = b"Subject: large\r\n\r\n" + b"x" * SEPARATE_END_OF_DATA + b"\r\n"
    connection = RecordingSMTP()

    assert _send_data(connection, message) == (250, b"queued")

    assert connection.written[1] is message  # not a copy with the end joined to it
    assert b"".join(connection.written) == written_by_smtplib(message)


def test_a_small_message_is_written_in_one_piece():
    connection = RecordingSMTP()

    _send_data(connection, b"Subject: small\r\n\r\n.dot\r\n")

    assert connection.written == [b"data\r\n", b"Subject: small\r\n\r\n..dot\r\n.\r\n"]


def test_data_refused_raises_as_smtplib_does():
    connection = RecordingSMTP()
    connection.replies = [(554, b"no valid recipients")]

    try:
        _send_data(connection, b"Subject: x\r\n\r\nbody\r\n")
    except smtplib.SMTPDataError as exc:
        assert (exc.smtp_code, exc.smtp_error) == (554, b"no valid recipients")
    else:
        raise AssertionError("SMTPDataError not raised")
