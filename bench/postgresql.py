"""The PostgreSQL queue against the maildir, side by side in one run (run by hand).

    .venv/bin/python bench/postgresql.py                    # starts a throwaway PostgreSQL 15
    .venv/bin/python bench/postgresql.py --url postgresql://user@host/db --rows 100000

Four measurements, each printed as a table and as one verdict line:

1. durable enqueue: one message per transaction, each with an application
   row in PostgreSQL (``INSERT INTO orders``), committed through
   ``transaction`` with zope.sqlalchemy. The maildir (a second resource:
   stage + fsync in vote, rename in finish) against the PostgreSQL queue
   bound to the same session (the row and the mail in one commit).
2. drain into a local aiosmtpd sink (its own process): ``mailspool``'s
   ``QueueProcessor.run_once()`` in 1 and in 4 processes on each queue,
   plus the maildir's 1 process with 4 workers (the target's reference).
3. commit -> delivered latency through LISTEN/NOTIFY: a daemon
   (``run_forever`` with a one-hour poll, so only NOTIFY can wake it) in a
   child process; messages committed one at a time, 50 ms apart; latency is
   the sink's receive time minus the commit's return time (one clock, one
   machine). Median and p99.
4. ``mailspool status`` and ``mailspool list --limit 100`` on a table of
   ``--rows`` rows (1,000,000 by default; filled by ``INSERT ... SELECT
   generate_series``, not timed).

Targets: 4-process drain >= 0.8 x the maildir's 4-worker rate; NOTIFY
latency median <= 20 ms; status on 1,000,000 rows under a second.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import sqlalchemy as sa
import transaction
from sqlalchemy.orm import sessionmaker
from zope.sqlalchemy import mark_changed, register

from mailspool import QueuedMailDelivery
from mailspool.maildir import MaildirQueue
from mailspool.postgresql import PostgresQueue
from mailspool.sink import SMTPSink

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # drain.py's sink process
sys.path.insert(0, os.path.join(HERE, os.pardir, "tests"))  # the test suite's throwaway PostgreSQL server
from drain import Sink  # noqa: E402

HEAD = (b"From: bench@example.org\r\nTo: user@example.org\r\nSubject: outbox benchmark %d\r\n"
        b"Message-Id: <outbox-%d-%d@example.org>\r\n\r\n")
BODY = (b"y" * 76 + b"\r\n") * 25


def message(number, tag):
    """About 2 KB; the Message-Id is unique per (tag, number)."""
    return HEAD % (number, tag, number) + BODY


# -- 1. enqueue --------------------------------------------------------------------------------------------------


def enqueue(engine, target, count):
    """Commit ``count`` transactions of one order row and one mail; return commits per second."""
    manager = transaction.TransactionManager(explicit=True)
    factory = sessionmaker(bind=engine)
    started = time.perf_counter()
    for number in range(count):
        session = factory()
        register(session, transaction_manager=manager)
        queue = target.bind(session, manager) if isinstance(target, PostgresQueue) else target
        delivery = QueuedMailDelivery(queue, transaction_manager=manager)
        with manager:
            session.execute(sa.text("INSERT INTO orders (number) VALUES (:n)"), {"n": number})
            mark_changed(session, manager)
            delivery.send("bench@example.org", ["user@example.org"], message(number, 1))
        session.close()
    return count / (time.perf_counter() - started)


# -- 2. drain ----------------------------------------------------------------------------------------------------

DRAIN_CHILD = r"""
import sys
from mailspool import QueueProcessor, SMTPMailer
from mailspool.delivery import open_queue
location, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
processor = QueueProcessor(open_queue(location), SMTPMailer("127.0.0.1", port, tls="none", timeout=30), workers=workers)
print("ready", flush=True)
sys.stdin.readline()
summary = processor.run_once()
print(summary.sent, flush=True)
"""


def fill(location, count, tag):
    manager = transaction.TransactionManager(explicit=True)
    queue = PostgresQueue(location) if location.startswith("postgresql") else MaildirQueue(location)
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    for start in range(0, count, 500):
        with manager:
            for number in range(start, min(count, start + 500)):
                delivery.send("bench@example.org", ["user@example.org"], message(number, tag))
    if isinstance(queue, PostgresQueue):
        queue.close()
    os.sync()


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(parts):
    """CPU time (user + system) used so far by each part's processes, in one pass over /proc (Linux).

    ``parts`` maps a name to ``wanted(pid, command name)``; returns name -> seconds.
    """
    totals = dict.fromkeys(parts, 0.0)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                command, fields = stat.read().split(" (", 1)[1].rsplit(") ", 1)
        except (OSError, ValueError):
            continue  # gone meanwhile
        for part, wanted in parts.items():
            if wanted(int(name), command):
                utime, stime = fields.split()[11:13]
                totals[part] += (int(utime) + int(stime)) / _TICKS
    return totals


def drain(location, sink, processes, workers, count):
    """Time ``processes`` processes of ``workers`` workers draining ``count`` messages.

    Returns (msg/s, CPU microseconds per message by part: the processors,
    the PostgreSQL server's processes, the sink), the CPU taken from /proc
    when the drain starts and ends.
    """
    children = [subprocess.Popen([sys.executable, "-c", DRAIN_CHILD, location, str(sink.port), str(workers)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(processes)]
    pids = {child.pid for child in children}
    parts = {
        "processors": lambda pid, command: pid in pids,
        "PostgreSQL": lambda pid, command: command == "postgres",
        "sink": lambda pid, command: pid == sink.pid,
    }
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise SystemExit("a drain child did not start")
        sink.reset()
        before = cpu_seconds(parts)
        started = time.perf_counter()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        sent = sum(int(child.stdout.readline()) for child in children)
        seconds = time.perf_counter() - started
        after = cpu_seconds(parts)
        cpu = {part: (after[part] - before[part]) / count * 1e6 for part in parts}
    finally:
        for child in children:
            child.stdin.close()
            child.wait(60)
    received = sink.stats()["messages"]
    if sent != count or received != count:
        raise SystemExit(f"FAILED CHECK: {location}: {sent} sent, {received} received, {count} expected")
    return count / seconds, cpu


# -- 3. latency --------------------------------------------------------------------------------------------------

DAEMON_CHILD = r"""
import sys
from mailspool import QueueProcessor, SMTPMailer
from mailspool.postgresql import PostgresQueue
processor = QueueProcessor(PostgresQueue(sys.argv[1]), SMTPMailer("127.0.0.1", int(sys.argv[2]), tls="none"))
processor.run_forever(poll_interval=3600)
"""


class TimedHandler:
    def __init__(self):
        self.arrived = {}

    async def handle_DATA(self, server, session, envelope):
        self.arrived[envelope.original_content.split(b"Message-Id: ", 1)[1].split(b"\r\n", 1)[0]] = time.time()
        return "250 OK"


def latency(url, count, gap):
    handler = TimedHandler()
    queue = PostgresQueue(url)
    manager = transaction.TransactionManager(explicit=True)
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    committed = {}
    with SMTPSink(handler=handler) as sink:
        daemon = subprocess.Popen([sys.executable, "-c", DAEMON_CHILD, url, str(sink.port)])
        try:
            time.sleep(3)  # the daemon starts and LISTENs
            for number in range(count):
                with manager:
                    message_id = delivery.send("bench@example.org", ["user@example.org"], message(number, 3))
                committed[message_id.encode()] = time.time()
                time.sleep(gap)
            deadline = time.monotonic() + 60
            while len(handler.arrived) < count and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            daemon.terminate()
            daemon.wait(60)
    queue.close()
    if len(handler.arrived) != count:
        raise SystemExit(f"FAILED CHECK: {len(handler.arrived)} of {count} delivered")
    return sorted((handler.arrived[mid] - at) * 1000 for mid, at in committed.items())


# -- 4. a large table --------------------------------------------------------------------------------------------

FILL_SQL = """
INSERT INTO mailspool_message (queue_id, state, sender, recipients, message_id, data, size, created_at, due_at,
                               attempt_count, attempts, last_attempt_at)
SELECT 'bench-' || n,
       (ARRAY['ready', 'ready', 'ready', 'deferred', 'failed'])[1 + n % 5],
       'bench@example.org', ARRAY['user' || n || '@example.org'], '<' || n || '@example.org>',
       convert_to(repeat('x', 2000), 'UTF8'), 2000,
       now() - n * interval '1 second', now() + (n % 5) * interval '10 minutes',
       CASE WHEN n % 5 >= 3 THEN 1 ELSE 0 END,
       CASE WHEN n % 5 >= 3 THEN '[{"at": 1795400000, "server": "smtp.example.org:25", "accepted": [],
            "refused": {}, "error": "451 4.3.0 try later"}]'::jsonb ELSE '[]'::jsonb END,
       CASE WHEN n % 5 >= 3 THEN now() - n * interval '1 millisecond' END
FROM generate_series(1, :rows) AS n
"""


def big_table(url, rows, runs, scratch):
    config = os.path.join(scratch, "empty.ini")
    with open(config, "w") as ini:
        ini.write("[mailspool]\n")
    queue = PostgresQueue(url)
    queue.create_schema()
    started = time.perf_counter()
    with queue.engine.begin() as connection:
        connection.execute(sa.text(FILL_SQL), {"rows": rows})
    with queue.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sa.text("VACUUM ANALYZE mailspool_message"))
    print(f"  filled {rows:,} rows in {time.perf_counter() - started:.1f}s")
    queue.close()
    results = {}
    for label, args in (("mailspool status", ["status", url]), ("mailspool status --json", ["status", "--json", url]),
                        ("mailspool list --limit 100", ["list", "--limit", "100", url])):
        timings = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mailspool", *args], stdout=subprocess.DEVNULL, check=True,
                           env=dict(os.environ, MAILSPOOL_CONFIG=config))
            timings.append(time.perf_counter() - started)
        results[label] = min(timings)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mailspool", "--help"], stdout=subprocess.DEVNULL, check=True)
    results["mailspool --help (start-up)"] = time.perf_counter() - started
    return results


# -- main --------------------------------------------------------------------------------------------------------


def measure_enqueue(database, scratch, options):
    print("\n1. durable enqueue, one mail + one order row per commit")
    engine = sa.create_engine(database("enqueue"))
    PostgresQueue(engine).create_schema()
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, number int)"))
    maildir_rate = enqueue(engine, MaildirQueue(os.path.join(scratch, "enqueue")), options.enqueue)
    postgres_rate = enqueue(engine, PostgresQueue(engine), options.enqueue)
    engine.dispose()
    print(f"  maildir (second resource):          {maildir_rate:7.0f} commits/s")
    print(f"  PostgreSQL, bound to the session:   {postgres_rate:7.0f} commits/s "
          f"({postgres_rate / maildir_rate:.2f} x maildir)")


def measure_drain(database, scratch, options):
    print(f"\n2. drain {options.drain} messages into a local sink ({options.runs} rounds, contenders interleaved)")
    url = database("drain")
    queue = PostgresQueue(url)
    queue.create_schema()
    queue.close()
    contenders = (
        ("maildir, 1 process", os.path.join(scratch, "drain"), 1, 1),
        ("maildir, 1 process x 4 workers", os.path.join(scratch, "drain"), 1, 4),
        ("maildir, 4 processes", os.path.join(scratch, "drain"), 4, 1),
        ("PostgreSQL, 1 process", url, 1, 1),
        ("PostgreSQL, 1 process x 4 workers", url, 1, 4),
        ("PostgreSQL, 4 processes", url, 4, 1))
    rates = {label: [] for label, *_ in contenders}
    cpu = {label: [] for label, *_ in contenders}
    with Sink(0, "hooks") as sink:
        for round_number in range(options.runs):
            for label, location, processes, workers in contenders:
                fill(location, options.drain, round_number)
                rate, used = drain(location, sink, processes, workers, options.drain)
                rates[label].append(rate)
                cpu[label].append(used)
    for label, *_ in contenders:
        print(f"  {label:<34} median {statistics.median(rates[label]):6.0f} msg/s, best {max(rates[label]):6.0f}"
              f"  (rounds: {', '.join(f'{rate:.0f}' for rate in rates[label])})")
    print("  CPU per message, median of the rounds (processors / PostgreSQL server / sink):")
    for label, *_ in contenders:
        print(f"    {label:<34} " + " / ".join(
            f"{statistics.median(used[part] for used in cpu[label]):4.0f} us" for part in cpu[label][0]))
    for reference in ("maildir, 1 process x 4 workers", "maildir, 4 processes"):
        ratios = [postgresql / maildir for postgresql, maildir in zip(rates["PostgreSQL, 4 processes"], rates[reference])]
        ratio = statistics.median(ratios)
        print(f"  verdict: PostgreSQL 4 processes = {ratio:.2f} x {reference} (median of the rounds' ratios: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; target >= 0.8): {'MET' if ratio >= 0.8 else 'MISSED'}")


def measure_latency(database, scratch, options):
    print(f"\n3. commit -> delivered through NOTIFY, {options.latency} messages 50 ms apart")
    url = database("latency")
    queue = PostgresQueue(url)
    queue.create_schema()
    queue.close()
    latencies = latency(url, options.latency, 0.05)
    median = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(f"  median {median:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms")
    print(f"  verdict: median {median:.1f} ms (target <= 20): {'MET' if median <= 20 else 'MISSED'}")


def measure_big_table(database, scratch, options):
    print(f"\n4. status and list on {options.rows:,} rows (best of {options.runs}, each a new process)")
    results = big_table(database("big"), options.rows, options.runs, scratch)
    for label, seconds in results.items():
        print(f"  {label:<32} {seconds:6.2f} s")
    status = results["mailspool status"]
    print(f"  verdict: status {status:.2f} s (target < 1 s): {'MET' if status < 1 else 'MISSED'}")


MEASUREMENTS = {"1": measure_enqueue, "2": measure_drain, "3": measure_latency, "4": measure_big_table}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing server's database URL (default: start a throwaway one)")
    parser.add_argument("--enqueue", type=int, default=500, help="transactions per contender (500)")
    parser.add_argument("--drain", type=int, default=2000, help="messages per drain (2000)")
    parser.add_argument("--latency", type=int, default=200, help="messages for the latency test (200)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for status/list (1,000,000)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="1,2,3,4", help="which measurements, e.g. 2,4 (default: all)")
    options = parser.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    server = None
    if options.url is None:
        from pgserver import PostgresServer

        server = PostgresServer()
        server.start()
        print(f"  throwaway PostgreSQL on port {server.port} (fsync on)")

    def database(name):
        if server is None:
            return options.url
        server.create_database(name)
        return server.url(name)

    try:
        with tempfile.TemporaryDirectory(prefix="mailspool-pgbench-") as scratch:
            for part in options.only.split(","):
                MEASUREMENTS[part.strip()](database, scratch, options)
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
