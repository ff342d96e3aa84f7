"""A queue of 100,000 messages: `mailspool status`, `mailspool list`, and the processor's first delivery (run by hand).

    .venv/bin/python bench/many_messages.py                    # 100,000 messages
    .venv/bin/python bench/many_messages.py --messages 20000   # the 20,000 of the list target

Fills a fresh queue in a temporary directory with ``fill_queue`` of
tests/harness.py (format-1 files written directly, without fsync: set-up,
not measured): 3/5 ready, 1/5 deferred ten minutes ahead with an attempt
log, 1/5 failed; 2 KB messages, two recipients each. Then, each in a
new process as a user or cron runs them, best of ``--runs``:

* ``mailspool status`` and ``mailspool list`` (text and ``--json``, output
  to /dev/null): wall time and the child's peak RSS (``ru_maxrss`` from
  ``wait4``; it includes the peak of this small parent, printed first);
* the processor: ``QueueProcessor(queue, mailer).run_once()`` where the
  mailer accepts at once and stops the run at its first ``send()``: the
  time from ``run_once()`` to that first send; then, in the same child,
  the two steps that precede the first send timed on their own: the
  housekeeping (``cleanup()``, run before every pass) and listing what
  is due (``due()``).

The queue is left untouched by the first-delivery runs (the one message
sent is re-added), so every run sees the same 100,000 messages. Set
PYTHONPATH to another checkout's src/ to measure that code instead.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from mailspool.maildir import MaildirQueue

# The fill is the test suite's (tests/faults/test_scale_many_messages.py uses it too).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from harness import fill_queue  # noqa: E402

FIRST_DELIVERY_CHILD = r"""
import json, os, shutil, sys, time
from mailspool import QueueProcessor
from mailspool.maildir import MaildirQueue

queue = MaildirQueue(sys.argv[1])
result = {}

class FirstSend:
    processor = None
    def send(self, fromaddr, toaddrs, message):
        if "first_send" not in result:
            result["first_send"] = time.perf_counter() - started
            self.processor.stop()
        return {}

mailer = FirstSend()
processor = QueueProcessor(queue, mailer)
mailer.processor = processor
# Keep a copy of the message that will be sent first (the oldest ready one), to put it back afterwards.
first = min(name for name in os.listdir(queue._path("new", "")) if not name.startswith("."))
shutil.copy2(queue._path("new", first), sys.argv[2])
started = time.perf_counter()
summary = processor.run_once()  # first, so that nothing before it in this process has read the queue
result["run_once_total"] = time.perf_counter() - started
result["sent"] = summary.sent
shutil.move(sys.argv[2], queue._path("new", first))

started = time.perf_counter()
queue.cleanup()
result["cleanup"] = time.perf_counter() - started
started = time.perf_counter()
due = list(queue.due())
result["due"] = time.perf_counter() - started
result["due_count"] = len(due)
print(json.dumps(result))
"""


def timed_child(command, stdout=subprocess.DEVNULL):
    """Run ``command``; return (seconds, peak RSS bytes of the child, stdout or None)."""
    with tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=errors)
        output = process.stdout.read() if stdout == subprocess.PIPE else None
        _, status, usage = os.wait4(process.pid, 0)  # (wait4, not wait: it gives the child's rusage)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.stdout is not None:
            process.stdout.close()
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"{command} failed ({process.returncode}):\n{errors.read().decode(errors='replace')}")
    return seconds, usage.ru_maxrss * 1024, output


def peak_rss_of_this_process():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the queue is made (system temp dir)")
    options = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    import mailspool
    print(f"mailspool from {os.path.dirname(mailspool.__file__)}")
    scratch = tempfile.mkdtemp(prefix="mailspool-many-", dir=options.dir)
    try:
        queue = MaildirQueue(os.path.join(scratch, "queue"))
        started = time.perf_counter()
        fill_queue(queue, options.messages)
        os.sync()
        counts = queue.counts()
        print(f"filled {options.messages:,} messages ({counts}) in {time.perf_counter() - started:.1f}s")
        print(f"this (parent) process's peak RSS: {peak_rss_of_this_process() / 2**20:.0f} MiB")
        config = os.path.join(scratch, "empty.ini")
        with open(config, "w") as ini:
            ini.write("[mailspool]\n")
        base = [sys.executable, "-m", "mailspool"]
        print(f"\n{'command':<34} {'best of ' + str(options.runs):>12} {'peak RSS':>10}")
        rows = [("mailspool --help (start-up)", ["--help"])]
        rows += [(f"mailspool {' '.join(arguments)}", [*arguments, "--config", config, queue.path])
                 for arguments in (["status"], ["status", "--json"], ["list"], ["list", "--json"])]
        for label, arguments in rows:
            results = [timed_child([*base, *arguments]) for _ in range(options.runs)]
            print(f"{label:<34} {min(r[0] for r in results):>11.2f}s {max(r[1] for r in results) / 2**20:>7.0f} MiB")

        spare = os.path.join(scratch, "first-message")
        results = []
        for _ in range(options.runs):
            _, rss, output = timed_child([sys.executable, "-c", FIRST_DELIVERY_CHILD, queue.path, spare],
                                         stdout=subprocess.PIPE)
            results.append((json.loads(output), rss))
        best = min(results, key=lambda pair: pair[0]["first_send"])
        print(f"\nprocessor, {options.messages:,} messages ({best[0]['due_count']:,} due), best of {options.runs}:")
        print(f"  cleanup() alone (housekeeping before every pass): {best[0]['cleanup']:.2f}s")
        print(f"  due() alone (listing what is due):                {best[0]['due']:.2f}s")
        print(f"  run_once() until the first send():                {best[0]['first_send']:.2f}s "
              f"(child peak RSS {max(r[1] for r in results) / 2**20:.0f} MiB)")
        if not all(result["sent"] == 1 for result, _ in results) or queue.counts() != counts:
            raise SystemExit(f"FAILED CHECK: {results} {queue.counts()} != {counts}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
