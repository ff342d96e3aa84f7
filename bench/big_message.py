"""Memory and time for one big message (25 MB by default) through the processor (run by hand).

    .venv/bin/python bench/big_message.py            # 25 MB, 3 rounds
    .venv/bin/python bench/big_message.py --size-mb 50 --rounds 1

The message is committed with ``QueuedMailDelivery`` (set-up, not timed),
then a child process runs ``QueueProcessor(queue, SMTPMailer(...)).run_once()``
against an aiosmtpd sink in this process (DATA limit raised above the
size). Each child measures itself, so the sink's memory is never counted:

* peak RSS growth: the peak RSS (``VmHWM`` in /proc/self/status; Linux)
  after the run minus the peak before it (the interpreter, mailspool and
  smtplib already imported), in multiples of the message size.
  ``ru_maxrss`` would not do: it survives ``exec``, so a child starts with
  the peak of the (large) parent it was forked from;
* a second child runs under ``tracemalloc`` and splits the Python
  allocations: what is held when the mailer's DATA step
  (``mailspool.mailer._send_data``) is entered (the message read from the
  queue file) and the peak inside it (dot-stuffing and the terminating
  ``.CRLF``); tracemalloc slows the run, so its child is not timed;
* time of ``run_once()`` (best of the rounds), and for comparison plain
  ``smtplib.SMTP.sendmail`` of the same bytes from memory (also in a child).

Two bodies: lines of which one in 50 starts with "." (dot-stuffing makes
one more copy), and the same without any leading dot (the message is then
sent as it is).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import transaction

from mailspool import QueuedMailDelivery
from mailspool.maildir import MaildirQueue
from mailspool.sink import SMTPSink

PROCESSOR_CHILD = r"""
import json, sys, time
from mailspool import QueueProcessor, SMTPMailer
queue_path, host, port, traced = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "traced"
result = {}
if traced:
    import tracemalloc
    from mailspool import mailer
    tracemalloc.start()
    original_send_data = mailer._send_data
    def send_data(connection, message):
        result["held_at_data_entry"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        reply = original_send_data(connection, message)
        result["peak_inside_data"] = tracemalloc.get_traced_memory()[1]
        return reply
    mailer._send_data = send_data
processor = QueueProcessor(queue_path, SMTPMailer(host, port, tls="none", timeout=300))
if traced:
    result["before_run"] = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
def peak_rss():
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child starts with its parent's peak.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
baseline = peak_rss()
started = time.perf_counter()
summary = processor.run_once()
result["seconds"] = time.perf_counter() - started
result["rss_growth"] = peak_rss() - baseline
if traced:
    result["peak_in_run"] = tracemalloc.get_traced_memory()[1]
result["sent"] = summary.sent
print(json.dumps(result))
"""

SMTPLIB_CHILD = r"""
import json, smtplib, sys, time
path, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path, "rb") as stream:
    message = stream.read()
def peak_rss():
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child starts with its parent's peak.
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
baseline = peak_rss()
started = time.perf_counter()
connection = smtplib.SMTP(host, port, timeout=300)
connection.sendmail("shop@example.org", ["alice@example.org"], message)
connection.quit()
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "rss_growth": peak_rss() - baseline}))
"""


def big_message(size, dots):
    head = (b"From: shop@example.org\r\nTo: alice@example.org\r\nSubject: big\r\n"
            b"Message-Id: <big-%d@example.org>\r\nContent-Type: text/plain\r\n\r\n" % time.time_ns())
    lead = [b"." if dots and number % 50 == 0 else b"x" for number in range(1000)]
    block = b"".join(b"%s%074d\r\n" % (lead[number], number) for number in range(1000))
    lines = (size - len(head)) // 77
    return head + (block * (lines // 1000 + 1))[: lines * 77]


def run_child(script, *arguments):
    result = subprocess.run([sys.executable, "-c", script, *map(str, arguments)], capture_output=True, text=True,
                            timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"child failed:\n{result.stderr}")
    return json.loads(result.stdout.splitlines()[-1])


def one_round(scratch, sink, message, traced):
    queue_path = tempfile.mkdtemp(prefix="queue-", dir=scratch)
    manager = transaction.TransactionManager(explicit=True)
    with manager:
        QueuedMailDelivery(queue_path, transaction_manager=manager).send(
            "shop@example.org", ["alice@example.org"], message)
    (entry,) = MaildirQueue(queue_path).entries(["ready"])
    queued = MaildirQueue(queue_path).read_message(entry.queue_id)  # with the Date header send() added
    os.sync()
    sink.received.clear()
    result = run_child(PROCESSOR_CHILD, queue_path, sink.host, sink.port, "traced" if traced else "plain")
    if result["sent"] != 1 or len(sink.received) != 1 or sink.received[0].data != queued:
        raise SystemExit(f"FAILED CHECK: not delivered whole: {result}")
    sink.received.clear()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=25.0, help="message size in MiB (25)")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    size = int(options.size_mb * 1024 * 1024)
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"message: {size:,} bytes ({options.size_mb:g} MiB), {options.rounds} round(s), best time / max memory")
    with tempfile.TemporaryDirectory(prefix="mailspool-big-") as scratch, \
            SMTPSink(data_size_limit=4 * size) as sink:
        for dots, label in ((True, "1 line in 50 starts with '.'"), (False, "no line starts with '.'")):
            message = big_message(size, dots)
            plain = [one_round(scratch, sink, message, traced=False) for _ in range(options.rounds)]
            traced = one_round(scratch, sink, message, traced=True)
            path = os.path.join(scratch, "message.eml")
            with open(path, "wb") as stream:
                stream.write(message)
            raw = [run_child(SMTPLIB_CHILD, path, sink.host, sink.port) for _ in range(options.rounds)]
            sink.received.clear()
            n = len(message)
            print(f"\n{label}:")
            print(f"  mailspool run_once:   {min(r['seconds'] for r in plain):6.2f} s "
                  f"(median {statistics.median(r['seconds'] for r in plain):.2f} s), "
                  f"peak RSS growth {max(r['rss_growth'] for r in plain) / n:.2f} x message")
            print(f"  smtplib.sendmail:     {min(r['seconds'] for r in raw):6.2f} s "
                  f"(median {statistics.median(r['seconds'] for r in raw):.2f} s), "
                  f"peak RSS growth {max(r['rss_growth'] for r in raw) / n:.2f} x message "
                  "(message already in memory, not counted)")
            print(f"  tracemalloc (mailspool child): held when the DATA step starts "
                  f"{(traced['held_at_data_entry'] - traced['before_run']) / n:.2f} x, "
                  f"peak inside it {(traced['peak_inside_data'] - traced['before_run']) / n:.2f} x, "
                  f"peak of the whole run {(traced['peak_in_run'] - traced['before_run']) / n:.2f} x message")


if __name__ == "__main__":
    main()
