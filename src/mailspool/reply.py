"""SMTP replies as values: the one place that knows what a reply code means."""

from typing import NamedTuple


class SMTPReply(NamedTuple):
    """A server's reply: the three-digit code and its text (RFC 5321, 4.2).

    ``code`` is 0 when there was no reply at all (the connection broke).
    """

    code: int
    text: str

    @property
    def is_permanent(self):
        """True for 5xx: the same command will fail again (RFC 5321, 4.2.1)."""
        return 500 <= self.code <= 599

    @classmethod
    def from_smtplib(cls, code, text):
        """Build from smtplib's ``(code, bytes-or-str)`` pairs."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return cls(int(code), text)

    def __str__(self):
        return f"{self.code} {self.text}" if self.code else self.text
