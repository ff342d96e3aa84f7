"""Case 15: a 25 MB message is delivered to a real SMTP server, and the processor's memory stays bounded.

The message is committed through ``QueuedMailDelivery`` in this process;
the processor runs in a child process (``mailspool.QueueProcessor`` with
an ``SMTPMailer``) that reports its own peak RSS before and after the run
(``VmHWM`` from /proc/self/status; not ``ru_maxrss``, which survives
``exec`` and so starts at the forking parent's peak), so neither the
test's nor the server's memory is counted. The server is aiosmtpd
(``SMTPSink``) in this process, with a DATA limit above the message size.

The bound is 3 x the message size over the child's baseline: the
processor holds the message once (read from the queue file), and the
mailer's DATA step makes one more transient copy, for dot-stuffing, since
lines here start with "." (it was 4 x when smtplib's ``data()`` also
joined the end-of-data line to a copy). bench/big_message.py measures
the exact figures (2.0 x for this message).
"""

import json
import os
import subprocess
import sys

import pytest

from mailspool import QueuedMailDelivery
from mailspool.maildir import MaildirQueue
from mailspool.sink import SMTPSink

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM (Linux)")

SIZE = 25 * 1024 * 1024
LIMIT_FACTOR = 3


def big_message(size):
    """About ``size`` bytes: headers, then 77-byte lines, one in 50 starting with a dot (dot-stuffing)."""
    head = (b"From: shop@example.org\r\nTo: alice@example.org\r\nSubject: big\r\n"
            b"Message-Id: <big@example.org>\r\nContent-Type: text/plain\r\n\r\n")
    block = b"".join(b"%s%074d\r\n" % (b"." if number % 50 == 0 else b"x", number) for number in range(1000))
    lines = (size - len(head)) // 77
    return head + (block * (lines // 1000 + 1))[: lines * 77]


CHILD = r"""
import json, sys, time
from mailspool import QueueProcessor, SMTPMailer

queue_path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
processor = QueueProcessor(queue_path, SMTPMailer(host, port, tls="none", timeout=120))
def peak_rss():
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child starts with its parent's peak.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
baseline = peak_rss()
started = time.monotonic()
summary = processor.run_once()
seconds = time.monotonic() - started
print(json.dumps({"sent": summary.sent, "deferred": summary.deferred, "failed": summary.failed,
                  "baseline": baseline, "peak": peak_rss(), "seconds": seconds}))
"""


@pytest.fixture
def big_sink():
    with SMTPSink(data_size_limit=4 * SIZE) as sink:
        yield sink


def test_a_25_mb_message_is_delivered_with_bounded_memory(queue_path, manager, big_sink):
    message = big_message(SIZE)
    assert SIZE - 100 < len(message) <= SIZE and message.count(b"\r\n.") > 1000
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        delivery.send("shop@example.org", ["alice@example.org"], message)
    (entry,) = MaildirQueue(queue_path).entries(["ready"])
    queued = MaildirQueue(queue_path).read_message(entry.queue_id)
    assert len(queued) >= SIZE - 100

    child = subprocess.run([sys.executable, "-c", CHILD, str(queue_path), big_sink.host, str(big_sink.port)],
                           capture_output=True, text=True, timeout=600)

    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.splitlines()[-1])
    assert (report["sent"], report["deferred"], report["failed"]) == (1, 0, 0), child.stderr
    (received,) = big_sink.received
    assert received.recipients == ("alice@example.org",)
    assert received.data == queued  # byte for byte, dot-stuffing undone by the server
    del received, queued, message
    growth = report["peak"] - report["baseline"]
    assert growth < LIMIT_FACTOR * SIZE, (
        f"processor peak RSS grew by {growth / SIZE:.1f} x the message size ({report})")
    assert MaildirQueue(queue_path).counts()["ready"] == 0
