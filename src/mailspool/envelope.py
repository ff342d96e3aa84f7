"""The queued-file format: envelope and attempt records around untouched message bytes.

A queue file (format 1, see docs/queue.rst) is::

    MAILSPOOL 1\\n                  <- magic and format version
    {"sender": ..., ...}\\n         <- the envelope, one line of UTF-8 JSON
    <message bytes>               <- exactly the bytes DATA will send (CRLF)

The message bytes are never parsed or re-serialised after enqueue; the
header lines are read without touching them. Attempt records live in a
separate append-only log (one JSON object per line) so that a retry never
rewrites the message.
"""

import dataclasses
import json
import os

from mailspool.exceptions import QueueFileError
from mailspool.reply import SMTPReply

MAGIC = b"MAILSPOOL"
FORMAT_VERSION = 1
# Envelopes are small; the cap keeps a corrupt file from being read whole
# into memory while looking for the end of the envelope line.
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
# Read this much at first: envelopes are nearly always far smaller.
PREFIX_CHUNK = 16 * 1024


@dataclasses.dataclass(frozen=True)
class Envelope:
    """Who a queued message is from and to, when it was queued and when it may be sent.

    ``not_before`` (Unix time) is set for scheduled messages; ``None``
    means as soon as possible.
    """

    sender: str
    recipients: tuple
    message_id: str
    enqueued_at: float
    not_before: float = None

    def to_bytes(self):
        """Return the file prefix for this envelope: magic line and JSON line."""
        record = {
            "sender": self.sender,
            "recipients": list(self.recipients),
            "message_id": self.message_id,
            "enqueued_at": self.enqueued_at,
        }
        if self.not_before is not None:
            record["not_before"] = self.not_before
        envelope_line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        return b"%s %d\n%s\n" % (MAGIC, FORMAT_VERSION, envelope_line.encode("utf-8"))

    @classmethod
    def read_from(cls, stream, name):
        """Read the prefix from a seekable binary ``stream``; return the Envelope.

        Leaves the stream positioned at the first byte of the message.
        ``name`` is used in errors. Raises ``QueueFileError`` naming what is
        wrong when the prefix is missing, truncated or not format 1.
        """
        envelope, offset = cls.from_prefix(_prefix_bytes(lambda size, start: stream.read(size)), name)
        stream.seek(offset)
        return envelope

    @classmethod
    def read_at(cls, fd, name):
        """Read the prefix of the file open as ``fd``; return ``(envelope, offset of the message)``.

        Reads with ``pread`` from the start of the file (the descriptor's
        position is left alone), one call for nearly every envelope. Raises
        ``QueueFileError`` as ``read_from`` does, OSError when the file
        cannot be read.
        """
        return cls.from_prefix(_prefix_bytes(lambda size, start: os.pread(fd, size, start)), name)

    @classmethod
    def from_prefix(cls, head, name):
        """Parse the first bytes of a queue file; return ``(envelope, offset of the message)``.

        ``head`` must hold at least the two prefix lines when the file does.
        Raises ``QueueFileError`` as ``read_from`` does.
        """
        magic_end = head.find(b"\n", 0, 64)
        if magic_end < 0 or not head.startswith(MAGIC + b" "):
            raise QueueFileError(f"{name}: not a mailspool queue file (no {MAGIC.decode()} line)", name)
        version = head[len(MAGIC) + 1:magic_end].strip()
        if version != b"%d" % FORMAT_VERSION:
            raise QueueFileError(
                f"{name}: queue file format {version.decode('ascii', 'replace')!r} "
                f"is not supported (this release reads format {FORMAT_VERSION})",
                name,
            )
        envelope_end = head.find(b"\n", magic_end + 1, magic_end + 1 + MAX_ENVELOPE_BYTES)
        if envelope_end < 0:
            raise QueueFileError(f"{name}: envelope line is truncated", name)
        try:
            record = json.loads(head[magic_end + 1:envelope_end])
            envelope = cls(
                sender=str(record["sender"]),
                recipients=tuple(str(r) for r in record["recipients"]),
                message_id=str(record["message_id"]),
                enqueued_at=float(record["enqueued_at"]),
                not_before=None if record.get("not_before") is None else float(record["not_before"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise QueueFileError(f"{name}: envelope is not valid: {exc}", name) from exc
        return envelope, envelope_end + 1


def _prefix_bytes(read):
    """The first bytes of a queue file, enough to hold its two prefix lines when it has them.

    ``read(size, start)`` returns up to ``size`` bytes from offset
    ``start``, and is called with consecutive ranges from 0. Reads
    ``PREFIX_CHUNK`` first, then doubles, up to ``MAX_ENVELOPE_BYTES``.
    """
    head = read(PREFIX_CHUNK, 0)
    while head.count(b"\n") < 2 and len(head) < MAX_ENVELOPE_BYTES:
        more = read(len(head), len(head))
        if not more:
            break
        head += more
    return head


@dataclasses.dataclass(frozen=True)
class Attempt:
    """What happened when a processor tried to deliver a message once.

    ``refused`` maps each recipient the server refused individually to its
    reply; ``accepted`` lists those that got the message. ``error`` is a
    one-line reason when the attempt as a whole failed. A record with
    ``requeued`` set is not an attempt but an operator's retry: recipients
    refused for good before it are tried again, with a fresh back-off.
    """

    at: float
    server: str = ""
    accepted: tuple = ()
    refused: dict = dataclasses.field(default_factory=dict)
    error: str = ""
    requeued: bool = False

    def to_line(self):
        """Return the attempt as one line of JSON (bytes, newline-terminated)."""
        record = {
            "at": self.at,
            "server": self.server,
            "accepted": list(self.accepted),
            "refused": {rcpt: list(reply) for rcpt, reply in self.refused.items()},
            "error": self.error,
        }
        if self.requeued:
            record["requeued"] = True
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"

    @classmethod
    def from_line(cls, line):
        """Parse one line written by ``to_line``. Raises ``ValueError`` if it is not one."""
        record = json.loads(line)
        return cls(
            at=float(record["at"]),
            server=str(record.get("server", "")),
            accepted=tuple(record.get("accepted", ())),
            refused={rcpt: SMTPReply(int(code), str(text)) for rcpt, (code, text) in record.get("refused", {}).items()},
            error=str(record.get("error", "")),
            requeued=bool(record.get("requeued", False)),
        )


@dataclasses.dataclass(frozen=True)
class QueueEntry:
    """One message as inspection sees it (``IMailQueue.entries``), whatever the storage.

    ``envelope`` is None when the entry cannot be read; ``problem`` then
    says why. ``due_at`` is when a deferred or scheduled message is due.
    ``size`` is the size of the stored message in bytes.
    """

    queue_id: str
    state: str
    envelope: Envelope = None
    attempts: tuple = ()
    due_at: float = None
    size: int = 0
    problem: str = ""

    @property
    def scheduled(self):
        """Deferred before any attempt: sent later on purpose."""
        return self.state == "deferred" and not any(not a.requeued for a in self.attempts)

    @property
    def delivery_attempts(self):
        """The attempts proper (operator requeues are not attempts)."""
        return [attempt for attempt in self.attempts if not attempt.requeued]

    @property
    def last_reply(self):
        """The last attempt's error or refusals, in one line; "" before any attempt."""
        attempts = self.delivery_attempts
        if not attempts:
            return ""
        last = attempts[-1]
        return last.error or "; ".join(f"{rcpt}: {reply}" for rcpt, reply in last.refused.items())
