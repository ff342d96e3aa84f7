"""How long `mailspool list` and `mailspool status` take on a large queue (run by hand).

    .venv/bin/python bench/list_queue.py --messages 20000

Fills a fresh queue in a temporary directory with messages in every state
(ready, deferred with an attempt log, failed), then times the commands as a
user runs them (a new process each, output to /dev/null), best of three.
The fill writes queue files in format 1 directly, without fsync: it is
set-up, not what is measured.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

from mailspool.envelope import Attempt, Envelope
from mailspool.maildir import STATE_DIRS, MaildirQueue, unique_name
from mailspool.reply import SMTPReply

BODY = b"From: shop@example.org\r\nSubject: benchmark\r\n\r\n" + b"x" * 2000 + b"\r\n"


def fill(queue, count):
    now = time.time()
    for number in range(count):
        queue_id = unique_name()
        state = ("ready", "deferred", "failed")[number % 3]
        envelope = Envelope("shop@example.org", (f"user{number}@example.org", "audit@example.org"),
                            f"<{number}@example.org>", now - number)
        path = os.path.join(queue.path, STATE_DIRS[state], queue_id)
        with open(path, "wb") as stream:
            stream.write(envelope.to_bytes() + BODY)
        if state != "ready":
            attempt = Attempt(at=now, server="smtp.example.org:25",
                              refused={envelope.recipients[0]: SMTPReply(450, "4.2.1 mailbox busy")})
            with open(os.path.join(queue.path, "log", queue_id), "wb") as log_file:
                log_file.write(attempt.to_line())
        if state == "deferred":
            os.utime(path, (now + 600, now + 600))


def best_of(runs, command):
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
        timings.append(time.perf_counter() - started)
    return min(timings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    options = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="mailspool-bench-") as scratch:
        queue = MaildirQueue(os.path.join(scratch, "queue"))
        started = time.perf_counter()
        fill(queue, options.messages)
        print(f"filled {options.messages} messages in {time.perf_counter() - started:.1f}s")
        config = os.path.join(scratch, "empty.ini")
        with open(config, "w") as ini:
            ini.write("[mailspool]\n")
        base = [sys.executable, "-m", "mailspool"]
        startup = best_of(options.runs, [*base, "--help"])
        print(f"{'command':<32} {'best of ' + str(options.runs):>12}")
        print(f"{'mailspool --help (start-up)':<32} {startup:>11.2f}s")
        for label, arguments in (("mailspool list", ["list"]), ("mailspool list --json", ["list", "--json"]),
                                 ("mailspool status --json", ["status", "--json"]),
                                 ("mailspool list --state failed", ["list", "--state", "failed"])):
            seconds = best_of(options.runs, [*base, *arguments, "--config", config, queue.path])
            print(f"{label:<32} {seconds:>11.2f}s")


if __name__ == "__main__":
    main()
