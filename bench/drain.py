#!/usr/bin/env python3
"""Drain benchmark: how fast does a full queue empty into an SMTP server?

Run by hand, never by the test suite (see docs/benchmarks.rst)::

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install -e '/work/main[demo]' repoze.sendmail
    /tmp/benchvenv/bin/python bench/drain.py

Contenders, side by side in one run, each draining the same messages
(about 2 KB each, CRLF line endings, valid headers) into an aiosmtpd sink
on 127.0.0.1:

1. raw smtplib: ``SMTP.sendmail`` in a loop over ONE connection, messages
   from memory, no queue at all (the upper limit);
2. mailspool ``QueueProcessor(..., workers=1).run_once()``;
3. mailspool with ``workers=4``;
4. repoze.sendmail's ``QueueProcessor(mailer, path).send_messages()``
   (only when repoze.sendmail can be imported).

Two phases: "local" (the sink answers at once) and "remote" (the sink
delays its replies by ``--delay-ms``, emulating a smarthost across a
network; see ``--delay-on`` for exactly which replies).

Only the draining is timed. Every contender gets a freshly filled queue
(filled through the library's own transactional delivery), and the sink's
count of received messages is checked against the expected number before
a rate is reported.

The sink runs in a separate process, as a real server would, so the
client being measured has the interpreter to itself. It accepts lines of
any length (up to 1 MiB) in DATA: repoze.sendmail sends bare-LF data, which
aiosmtpd otherwise reads as one over-long line and refuses with
"500 Line too long". The same sink serves every contender.
"""

import argparse
import asyncio
import cProfile
import datetime
import email
import email.utils
import faulthandler
import importlib
import io
import json
import multiprocessing
import os
import platform
import pstats
import re
import shlex
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata

HOST = "127.0.0.1"
SENDER = "bench@example.org"
SEQ_HEADER = re.compile(rb"X-Bench-Seq: (\d+)")
SINK_TIMEOUT = 30.0  # seconds to wait for any answer from the sink process
SMTP_TIMEOUT = 10.0  # socket timeout of every SMTP client here

# -- the messages ---------------------------------------------------------------


def make_messages(count, size, tag):
    """``count`` distinct messages of exactly ``size`` bytes: (sender, [recipient], bytes)."""
    date = email.utils.formatdate(localtime=False)
    filler = "The quick brown fox jumps over the lazy dog, again and again. " * 2
    messages = []
    for number in range(count):
        head = (
            "From: Drain Benchmark <bench@example.org>\r\n"
            f"To: Recipient {number} <rcpt{number}@example.net>\r\n"
            f"Subject: drain benchmark message {number} of {count}\r\n"
            f"Date: {date}\r\n"
            f"Message-ID: <drain.{number}.{tag}@example.org>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "Content-Transfer-Encoding: 7bit\r\n"
            f"X-Bench-Seq: {number}\r\n"
            "\r\n"
        )
        lines = []
        length = len(head)
        line_number = 0
        while length < size:
            room = size - length - 2  # characters left before CRLF
            text = f"{number:06d}/{line_number:03d} {filler}"[: max(1, min(70, room))]
            lines.append(text + "\r\n")
            length += len(text) + 2
            line_number += 1
        data = (head + "".join(lines)).encode("ascii")
        messages.append((SENDER, [f"rcpt{number}@example.net"], data))
    return messages


# -- the sink (runs in its own process) --------------------------------------------


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (aiosmtpd 1.4 cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def sink_main(conn, port, delay, delay_on):
    """Serve SMTP on ``port`` until told to stop; answer 'reset'/'stats'/'stop' on ``conn``."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    class Counter:
        def __init__(self):
            self.lock = threading.Lock()
            self.reset()

        def reset(self):
            with self.lock:
                self.messages = 0
                self.bytes = 0
                self.seqs = set()
                self.duplicates = 0
                self.unnumbered = 0
                self.bare_lf = 0
                self.connections = 0

        def record(self, data):
            found = SEQ_HEADER.search(data, 0, 4096)
            with self.lock:
                self.messages += 1
                self.bytes += len(data)
                if data.count(b"\n") != data.count(b"\r\n"):
                    self.bare_lf += 1  # some line ends in a bare LF
                if found is None:
                    self.unnumbered += 1
                elif int(found.group(1)) in self.seqs:
                    self.duplicates += 1
                else:
                    self.seqs.add(int(found.group(1)))

        def stats(self):
            with self.lock:
                return {"messages": self.messages, "bytes": self.bytes, "unique": len(self.seqs),
                        "duplicates": self.duplicates, "unnumbered": self.unnumbered,
                        "bare_lf": self.bare_lf, "connections": self.connections}

    counter = Counter()
    hook_delay = delay if delay_on == "hooks" else 0.0
    reply_delay = delay if delay_on == "every-reply" else 0.0

    class Recorder:
        """Accepts everything and counts it. The only hook: DATA."""

        async def handle_DATA(self, server, session, envelope):
            counter.record(envelope.original_content)
            if hook_delay:
                await asyncio.sleep(hook_delay)
            return "250 OK accepted"

    class DelayingRecorder(Recorder):
        """Also delays the EHLO, MAIL and RCPT replies (aiosmtpd calls only hooks that exist)."""

        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            session.host_name = hostname
            await asyncio.sleep(hook_delay)
            return responses

        async def handle_MAIL(self, server, session, envelope, address, mail_options):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            await asyncio.sleep(hook_delay)
            return "250 OK"

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            await asyncio.sleep(hook_delay)
            return "250 OK"

    class BenchSMTP(SMTP):
        # aiosmtpd reads DATA with readuntil(b"\r\n") and refuses any "line"
        # longer than line_length_limit (1001, RFC 5321) with "500 Line too
        # long". Bare-LF data (repoze.sendmail) has no CRLF until the final
        # "\r\n.\r\n", so the whole message is one line. aiosmtpd 1.4 has no
        # constructor option for this; the class attribute also sizes the
        # StreamReader buffer. Commands are still capped by command_size_limit.
        line_length_limit = 1 << 20

        def connection_made(self, transport):
            with counter.lock:
                counter.connections += 1
            super().connection_made(transport)

        async def push(self, status):
            # every-reply mode: one delay per complete reply (the last line of
            # a multi-line reply), greeting, 354 and RSET/QUIT included.
            if reply_delay:
                text = status if isinstance(status, str) else status.decode("ascii", "replace")
                if text[3:4] != "-":
                    await asyncio.sleep(reply_delay)
            await super().push(status)

    class BenchController(Controller):
        def factory(self):
            return BenchSMTP(self.handler, **self.SMTP_kwargs)

    handler = DelayingRecorder() if hook_delay else Recorder()
    controller = BenchController(handler, hostname=HOST, port=port, ready_timeout=SINK_TIMEOUT)
    controller.start()
    counter.reset()  # the controller's own readiness probe connected once
    conn.send(("ready", port))
    parent = os.getppid()
    try:
        while True:
            if not conn.poll(5.0):
                if os.getppid() != parent:
                    return  # the benchmark died; do not linger
                continue
            command = conn.recv()
            if command == "reset":
                counter.reset()
                conn.send("ok")
            elif command == "stats":
                conn.send(counter.stats())
            elif command == "stop":
                conn.send("bye")
                return
    finally:
        controller.stop()


class Sink:
    """The parent's handle on the sink process. Every wait is bounded."""

    def __init__(self, delay, delay_on):
        self.host = HOST
        self.port = free_port()
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=sink_main, args=(child_conn, self.port, delay, delay_on),
                                        name="drain-bench-sink", daemon=True)

    def __enter__(self):
        self._process.start()
        answer = self._ask(None)
        if answer != ("ready", self.port):
            raise RuntimeError(f"sink did not start: {answer!r}")
        return self

    def __exit__(self, *exc_info):
        try:
            if self._process.is_alive():
                self._ask("stop")
        except Exception:
            pass
        self._process.join(SINK_TIMEOUT)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

    def _ask(self, command):
        if command is not None:
            self._conn.send(command)
        if not self._conn.poll(SINK_TIMEOUT):
            raise TimeoutError(f"the sink process did not answer {command!r} within {SINK_TIMEOUT:g}s")
        return self._conn.recv()

    @property
    def pid(self):
        """The sink process's id (bench/postgresql.py reads its CPU time)."""
        return self._process.pid

    def reset(self):
        self._ask("reset")

    def stats(self):
        return self._ask("stats")


# -- the contenders --------------------------------------------------------------


class RawSMTPLib:
    key = "raw"
    label = "raw smtplib, 1 connection"

    def fill(self, path, messages):
        self.messages = messages

    def prepare(self, path, host, port):
        def drain():
            with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT) as connection:
                for sender, recipients, data in self.messages:
                    connection.sendmail(sender, recipients, data)
        return drain

    def left(self, path):
        return None


class RawSMTPLibRset(RawSMTPLib):
    """Diagnostic: raw smtplib plus one RSET before every message but the first (as mailspool does)."""

    key = "raw-rset"
    label = "(diag) raw smtplib + RSET"

    def prepare(self, path, host, port):
        def drain():
            with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT) as connection:
                for index, (sender, recipients, data) in enumerate(self.messages):
                    if index:
                        connection.rset()
                    connection.sendmail(sender, recipients, data)
        return drain


class Mailspool:
    def __init__(self, workers, key=None, label=None, workdir=None):
        self.workers = workers
        self.workdir = workdir  # None: the benchmark's own directory
        self.key = key or f"mailspool-{workers}"
        self.label = label or f"mailspool, {workers} worker{'s' if workers > 1 else ''}"

    def fill(self, path, messages):
        import transaction
        from mailspool import QueuedMailDelivery

        manager = transaction.TransactionManager(explicit=True)
        delivery = QueuedMailDelivery(path, transaction_manager=manager)
        with manager:
            for sender, recipients, data in messages:
                delivery.send(sender, recipients, data)

    def prepare(self, path, host, port):
        from mailspool import QueueProcessor, SMTPMailer

        mailer = SMTPMailer(host, port, tls="none", timeout=SMTP_TIMEOUT)
        processor = QueueProcessor(path, mailer, workers=self.workers)
        self.summary = None

        def drain():
            self.summary = processor.run_once()
        return drain

    def left(self, path):
        from mailspool.maildir import MaildirQueue

        counts = MaildirQueue(path, create=False).counts()
        return sum(counts.values())

    def problems(self, expected):
        summary = getattr(self, "summary", None)
        if summary is not None and summary.sent != expected:
            return f"run_once: {summary}"
        return ""


class Repoze:
    key = "repoze"
    label = "repoze.sendmail"

    def fill(self, path, messages):
        import transaction
        from repoze.sendmail.delivery import QueuedMailDelivery

        manager = transaction.TransactionManager()
        delivery = QueuedMailDelivery(path, transaction_manager=manager)
        with manager:
            for sender, recipients, data in messages:
                # repoze.sendmail takes email.message.Message objects, as an
                # application would hand it.
                delivery.send(sender, recipients, email.message_from_bytes(data))

    def prepare(self, path, host, port):
        from repoze.sendmail.mailer import SMTPMailer
        from repoze.sendmail.queue import QueueProcessor

        processor = QueueProcessor(SMTPMailer(hostname=host, port=port, no_tls=True), path)
        return processor.send_messages

    def left(self, path):
        return sum(1 for sub in ("new", "cur") for name in os.listdir(os.path.join(path, sub)))


def repoze_available():
    try:
        importlib.import_module("repoze.sendmail.queue")
    except ImportError as exc:
        return False, str(exc)
    return True, metadata.version("repoze.sendmail")


# -- running ------------------------------------------------------------------------


def run_one(contender, messages, sink, workdir, watchdog):
    """Fill a fresh queue, drain it under the clock, check the sink; return a result dict."""
    path = tempfile.mkdtemp(prefix=f"{contender.key}-", dir=getattr(contender, "workdir", None) or workdir)
    queue_path = os.path.join(path, "queue")
    if isinstance(contender, Repoze):
        os.makedirs(queue_path)
        for sub in ("new", "cur", "tmp"):
            os.mkdir(os.path.join(queue_path, sub))
    faulthandler.dump_traceback_later(watchdog, exit=True)
    try:
        contender.fill(queue_path, messages)
        os.sync()  # the fill's writeback must not run during the timed drain
        drain = contender.prepare(queue_path, sink.host, sink.port)
        sink.reset()
        started = time.perf_counter()
        drain()
        seconds = time.perf_counter() - started
        stats = sink.stats()
        left = contender.left(queue_path)
    finally:
        faulthandler.cancel_dump_traceback_later()
    shutil.rmtree(path, ignore_errors=True)
    expected = len(messages)
    problems = []
    if stats["messages"] != expected:
        problems.append(f"sink received {stats['messages']}, expected {expected}")
    if stats["unique"] != expected:
        problems.append(f"{stats['unique']} distinct messages, {stats['duplicates']} duplicates, "
                        f"{stats['unnumbered']} without X-Bench-Seq")
    if left:
        problems.append(f"{left} left in the queue")
    extra = getattr(contender, "problems", lambda expected: "")(expected)
    if extra:
        problems.append(extra)
    return {
        "contender": contender.key, "label": contender.label, "messages": expected,
        "seconds": seconds, "rate": expected / seconds, "received": stats["messages"],
        "connections": stats["connections"], "bare_lf": stats["bare_lf"], "left": left,
        "ok": not problems, "problems": "; ".join(problems),
    }


def run_phase(name, contenders, messages, delay, delay_on, rounds, workdir, watchdog, out):
    """Run every contender ``rounds`` times (interleaved) against one sink; return results by key."""
    results = {contender.key: [] for contender in contenders}
    with Sink(delay, delay_on) as sink:
        out(f"  sink on {sink.host}:{sink.port} (own process), "
            + (f"replies delayed {delay * 1000:g} ms ({delay_on})" if delay else "no delay"))
        for round_number in range(rounds):
            for contender in contenders:
                result = run_one(contender, messages, sink, workdir, watchdog)
                results[contender.key].append(result)
                status = "ok" if result["ok"] else "PROBLEM: " + result["problems"]
                out(f"  [{name} {round_number + 1}/{rounds}] {contender.label:<30} "
                    f"{result['seconds']:7.3f} s {result['rate']:8.1f} msg/s  "
                    f"received {result['received']}/{result['messages']} "
                    f"over {result['connections']} connection(s)"
                    + (f", {result['bare_lf']} with bare-LF lines" if result["bare_lf"] else "") + f"  {status}")
    return results


def summarise(results, contenders):
    rows = []
    for contender in contenders:
        runs = results[contender.key]
        rates = [run["rate"] for run in runs]
        rows.append({
            "key": contender.key, "label": contender.label, "messages": runs[0]["messages"],
            "received": "/".join(str(run["received"]) for run in runs) if len(runs) > 1 else str(runs[0]["received"]),
            "connections": runs[-1]["connections"],
            "seconds": statistics.median(run["seconds"] for run in runs),
            "rate": statistics.median(rates), "low": min(rates), "high": max(rates), "rates": rates,
            "ok": all(run["ok"] for run in runs),
            "problems": "; ".join(run["problems"] for run in runs if run["problems"]),
        })
    return rows


def table(rows, reference_key, rounds):
    """An RST simple table (readable as it is, pasteable into the docs)."""
    reference = next((row["rate"] for row in rows if row["key"] == reference_key), None)
    header = ["contender", "messages", "received", "conns", "seconds", "msg/s", "x raw", "checked"]
    if rounds > 1:
        header[4:6] = ["seconds (med)", "msg/s (med)", "msg/s range"]
    body = []
    for row in rows:
        cells = [row["label"], str(row["messages"]), row["received"], str(row["connections"]),
                 f"{row['seconds']:.3f}", f"{row['rate']:.0f}"]
        if rounds > 1:
            cells.append(f"{row['low']:.0f}-{row['high']:.0f}")
        cells.append(f"{row['rate'] / reference:.2f}" if reference else "-")
        cells.append("ok" if row["ok"] else "FAILED")
        body.append(cells)
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]
    rule = "  ".join("=" * width for width in widths)
    lines = [rule, "  ".join(cell.ljust(width) for cell, width in zip(header, widths)).rstrip(), rule]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in body]
    lines.append(rule)
    return "\n".join(lines)


def paired(rows, key, reference_key):
    """Per-round ratios key/reference (rounds are interleaved, so each pair ran close in time)."""
    rates = {row["key"]: row["rates"] for row in rows}
    ratios = [mine / theirs for mine, theirs in zip(rates[key], rates[reference_key])]
    return "per round: " + ", ".join(f"{ratio:.2f}" for ratio in ratios)


def verdicts(local_rows, remote_rows):
    lines = []
    rate = {row["key"]: row for row in local_rows}
    if "raw" in rate and "mailspool-1" in rate:
        ratio = rate["mailspool-1"]["rate"] / rate["raw"]["rate"]
        met = ratio >= 0.8 and rate["mailspool-1"]["ok"] and rate["raw"]["ok"]
        extra_us = (1 / rate["mailspool-1"]["rate"] - 1 / rate["raw"]["rate"]) * 1e6
        lines.append(f"local: mailspool 1 worker = {ratio:.2f} x raw smtplib (target >= 0.80): "
                     f"{'MET' if met else 'MISSED'} ({paired(local_rows, 'mailspool-1', 'raw')}); "
                     f"{extra_us:.0f} us per message more than raw")
    rate = {row["key"]: row for row in remote_rows}
    if "repoze" in rate and "mailspool-4" in rate:
        ratio = rate["mailspool-4"]["rate"] / rate["repoze"]["rate"]
        met = ratio >= 4 and rate["mailspool-4"]["ok"] and rate["repoze"]["ok"]
        lines.append(f"remote: mailspool 4 workers = {ratio:.2f} x repoze.sendmail (target >= 4): "
                     f"{'MET' if met else 'MISSED'} ({paired(remote_rows, 'mailspool-4', 'repoze')})")
    elif remote_rows:
        lines.append("remote: mailspool 4 workers vs repoze.sendmail: NOT MEASURED (repoze.sendmail missing)")
    return lines


def profile_drains(contenders, messages, sink_args, workdir, watchdog, out, limit):
    """cProfile the client side of some local drains (not the timed runs)."""
    with Sink(*sink_args) as sink:
        for contender in contenders:
            path = tempfile.mkdtemp(prefix=f"profile-{contender.key}-", dir=workdir)
            queue_path = os.path.join(path, "queue")
            faulthandler.dump_traceback_later(watchdog, exit=True)
            try:
                contender.fill(queue_path, messages)
                os.sync()
                drain = contender.prepare(queue_path, sink.host, sink.port)
                sink.reset()
                profiler = cProfile.Profile()
                started = time.perf_counter()
                profiler.runcall(drain)
                seconds = time.perf_counter() - started
                received = sink.stats()["messages"]
            finally:
                faulthandler.cancel_dump_traceback_later()
                shutil.rmtree(path, ignore_errors=True)
            buffer = io.StringIO()
            stats = pstats.Stats(profiler, stream=buffer).strip_dirs()
            stats.sort_stats("tottime").print_stats(limit)
            stats.sort_stats("cumulative").print_stats(limit)
            out(f"\n--- cProfile of {contender.label} ({len(messages)} messages, {seconds:.2f} s under the "
                f"profiler, {received} received; main thread only) ---")
            out("\n".join(line for line in buffer.getvalue().splitlines() if line.strip()))


class NullMailer:
    """Accepts every message at once: what is left of a drain is the queue's own work."""

    def send(self, fromaddr, toaddrs, message):
        return {}

    def vote(self, fromaddr, toaddrs, message):
        pass

    def abort(self):
        pass


def queue_only(messages, directories, out):
    """Time mailspool's 1-worker drain into a mailer that does nothing, per file system."""
    from mailspool import QueueProcessor

    out(f"\n--- mailspool queue work alone: 1 worker, a mailer that accepts at once, {len(messages)} messages ---")
    for directory in directories:
        path = tempfile.mkdtemp(prefix="queue-only-", dir=directory)
        try:
            queue_path = os.path.join(path, "queue")
            Mailspool(1).fill(queue_path, messages)
            os.sync()
            processor = QueueProcessor(queue_path, NullMailer())
            started = time.perf_counter()
            summary = processor.run_once()
            seconds = time.perf_counter() - started
        finally:
            shutil.rmtree(path, ignore_errors=True)
        out(f"  {directory} ({filesystem_of(directory)}): {seconds:.3f} s, "
            f"{seconds / len(messages) * 1e6:.0f} us per message ({summary})")


def machine_lines(queue_dir):
    lines = []
    now = datetime.datetime.now(datetime.timezone.utc)
    lines.append(f"date: {now:%Y-%m-%d %H:%M} UTC")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    lines.append(f"machine: nproc {affinity} (cpu_count {os.cpu_count()}){', ' + model if model else ''}; "
                 f"{platform.system()} {platform.release()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    lines.append(f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    versions = []
    for name in ("mailspool", "aiosmtpd", "repoze.sendmail", "transaction"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    lines.append("packages: " + ", ".join(versions))
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    if commit:
        lines.append(f"mailspool source: git {commit}")
    lines.append(f"queues in: {queue_dir} ({filesystem_of(queue_dir)})")
    return lines


def filesystem_of(path):
    """The file system type of ``path`` from /proc/mounts (Linux), or '?'."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return "?"
    path = os.path.realpath(path)
    best = ("", "?")
    for entry in entries:
        if len(entry) < 3:
            continue
        mount_point = entry[1]
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best[0]):
            best = (mount_point, entry[2])
    return best[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="messages per contender, local phase (2000)")
    parser.add_argument("--remote-messages", type=int, default=500,
                        help="messages per contender, emulated remote phase (500; 0 skips the phase)")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="reply delay of the emulated remote host (5)")
    parser.add_argument("--delay-on", choices=("hooks", "every-reply"), default="hooks",
                        help="hooks (default): the EHLO, MAIL, RCPT and end-of-DATA replies are delayed; "
                             "every-reply: every reply, greeting, 354, RSET and QUIT included")
    parser.add_argument("--size", type=int, default=2048, help="bytes per message (2048)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds per phase, contenders interleaved; the tables show medians (3)")
    parser.add_argument("--skip-repoze", action="store_true", help="leave repoze.sendmail out")
    parser.add_argument("--skip-local", action="store_true", help="run only the emulated remote phase")
    parser.add_argument("--diagnose", action="store_true",
                        help="add diagnostic local rows: raw smtplib + RSET per message, and mailspool "
                             "1 worker with its queue on tmpfs (/dev/shm)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, cProfile raw smtplib and mailspool 1 worker on a local drain")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--queue-dir", default=None, help="where the queues are made (system temp dir)")
    parser.add_argument("--watchdog", type=float, default=600.0,
                        help="seconds one contender (fill + drain) may take before the run is aborted (600)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.remote_messages < 0 or args.repeat < 1 or args.size < 512:
        parser.error("--messages and --repeat must be >= 1, --remote-messages >= 0, --size >= 512")

    out = print
    workdir = tempfile.mkdtemp(prefix="mailspool-drain-bench-", dir=args.queue_dir)
    out("mailspool drain benchmark")
    for line in machine_lines(workdir):
        out("  " + line)
    command = shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    out(f"  command: {command}")

    contenders = [RawSMTPLib(), Mailspool(1), Mailspool(4)]
    if args.skip_repoze:
        out("  repoze.sendmail: skipped (--skip-repoze)")
    else:
        available, detail = repoze_available()
        if available:
            contenders.append(Repoze())
            out(f"  repoze.sendmail {detail}: included")
        else:
            out(f"  repoze.sendmail: MISSING ({detail}); its rows are left out. "
                "Install it next to mailspool: pip install repoze.sendmail")
    tag = f"{os.getpid()}.{int(time.time())}"
    report = {"machine": machine_lines(workdir), "command": command, "phases": {}}
    local_rows, remote_rows = [], []
    try:
        if not args.skip_local:
            local_contenders = list(contenders)
            if args.diagnose:
                local_contenders.insert(1, RawSMTPLibRset())
                if os.path.isdir("/dev/shm"):
                    tmpfs_one = Mailspool(1, key="mailspool-1-tmpfs", label="(diag) mailspool, 1 worker, tmpfs",
                                          workdir="/dev/shm")
                    local_contenders.insert(3, tmpfs_one)
            messages = make_messages(args.messages, args.size, tag)
            out(f"\nlocal: {len(messages)} messages of {args.size} bytes (CRLF) per contender, sink answers at once")
            results = run_phase("local", local_contenders, messages, 0.0, args.delay_on, args.repeat,
                                workdir, args.watchdog, out)
            if args.diagnose and os.path.isdir("/dev/shm"):
                out("  (diag) tmpfs row: its queue was made under /dev/shm, so fsync costs nothing there")
            local_rows = summarise(results, local_contenders)
            report["phases"]["local"] = {"messages": args.messages, "rows": local_rows, "runs": results}
        if args.remote_messages:
            messages = make_messages(args.remote_messages, args.size, tag + ".r")
            delay = args.delay_ms / 1000
            described = ("EHLO, MAIL, RCPT and end-of-DATA replies" if args.delay_on == "hooks"
                         else "every reply (greeting, EHLO, MAIL, RCPT, 354, end-of-DATA, RSET, QUIT)")
            out(f"\nemulated remote smarthost: {len(messages)} messages of {args.size} bytes per contender "
                f"(fewer than the local {args.messages}: it is slower); {described} delayed {args.delay_ms:g} ms")
            results = run_phase("remote", contenders, messages, delay, args.delay_on, args.repeat,
                                workdir, args.watchdog, out)
            remote_rows = summarise(results, contenders)
            report["phases"]["remote"] = {"messages": args.remote_messages, "delay_ms": args.delay_ms,
                                          "delay_on": args.delay_on, "rows": remote_rows, "runs": results}
        out("")
        if local_rows:
            out(f"Local sink, {args.messages} messages per contender"
                + (f", median of {args.repeat} rounds" if args.repeat > 1 else "") + ":\n")
            out(table(local_rows, "raw", args.repeat))
            out("")
        if remote_rows:
            out(f"Emulated remote smarthost ({args.delay_ms:g} ms, {args.delay_on}), {args.remote_messages} "
                "messages per contender" + (f", median of {args.repeat} rounds" if args.repeat > 1 else "") + ":\n")
            out(table(remote_rows, "raw", args.repeat))
            out("")
        for line in verdicts(local_rows, remote_rows):
            out(line)
        for row in local_rows + remote_rows:
            if not row["ok"]:
                out(f"FAILED CHECK: {row['label']}: {row['problems']}")
        out(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        report["verdicts"] = verdicts(local_rows, remote_rows)
        if args.json:
            with open(args.json, "w") as stream:
                json.dump(report, stream, indent=1, default=str)
        if args.profile:
            messages = make_messages(args.messages, args.size, tag + ".p")
            queue_only(messages, [workdir] + (["/dev/shm"] if os.path.isdir("/dev/shm") else []), out)
            profile_drains([RawSMTPLib(), Mailspool(1)], messages, (0.0, args.delay_on), workdir,
                           args.watchdog, out, args.profile_lines)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(row["ok"] for row in local_rows + remote_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
