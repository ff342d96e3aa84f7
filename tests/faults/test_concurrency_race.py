"""Several processors drain one queue at once: each of 2,000 messages reaches the server exactly once.

Processors race as threads in one process (separate ``QueueProcessor``
objects, each listing and claiming on its own), as separate processes
(released together, so they really contend for the same files), and as
two overlapping cron runs of ``mailspool run --once``. Every message goes
over SMTP to a real aiosmtpd server on 127.0.0.1, which counts what it
accepts by Message-Id.

The 2,000 messages are committed once per module through
``QueuedMailDelivery`` (a transaction, a write and two fsyncs each), and
each test gets its own queue directory of hard links to those files
(``crashkit.link_queue``), which keeps the module to a few tens of seconds.
"""

import os
import re
import subprocess
import threading

import crashkit
import pytest
import transaction

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer

MESSAGES = 2000
PER_TRANSACTION = 100


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A queue of MESSAGES ready messages, committed the real way; never processed itself."""
    path = tmp_path_factory.mktemp("race-template") / "queue"
    manager = transaction.TransactionManager(explicit=True)
    delivery = QueuedMailDelivery(path, transaction_manager=manager)
    for start in range(0, MESSAGES, PER_TRANSACTION):
        with manager:
            for number in range(start, start + PER_TRANSACTION):
                delivery.send("shop@example.org", ["alice@example.org"], crashkit.message("race", number))
    return path


@pytest.fixture
def race_queue(template, tmp_path):
    """This test's own queue holding the template's MESSAGES messages; returns (path, their Message-Ids)."""
    path = tmp_path / "queue"
    assert crashkit.link_queue(template, path) == MESSAGES
    return path, {crashkit.message_id("race", number) for number in range(MESSAGES)}


def mailer_for(server):
    return SMTPMailer(server.host, server.port, tls="none", timeout=crashkit.TIMEOUT)


def assert_each_delivered_exactly_once(server, expected, queue_path):
    received = crashkit.received_ids(server)
    assert set(received) == expected  # nothing lost, nothing foreign
    duplicates = {mid: count for mid, count in received.items() if count != 1}
    assert duplicates == {}
    crashkit.assert_queue_empty(queue_path)


# -- 5. processors as threads and as processes -----------------------------------------------------------------


@pytest.mark.parametrize("processors", [2, 4, 8])
def test_processors_racing_in_threads_deliver_each_message_exactly_once(race_queue, smtp_sink, processors):
    queue_path, expected = race_queue
    racers = [QueueProcessor(queue_path, mailer_for(smtp_sink)) for _ in range(processors)]
    start = threading.Barrier(processors, timeout=crashkit.TIMEOUT)
    summaries, errors = [], []

    def race(processor):
        try:
            start.wait()
            summaries.append(processor.run_once())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(racer,)) for racer in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(crashkit.TIMEOUT * 2)
    assert not any(thread.is_alive() for thread in threads), "a processor thread did not finish"
    assert errors == []

    assert sum(summary.sent for summary in summaries) == MESSAGES
    assert sum(summary.deferred + summary.failed for summary in summaries) == 0
    assert_each_delivered_exactly_once(smtp_sink, expected, queue_path)


RACER = """
from crashkit import report
from mailspool import QueueProcessor, SMTPMailer

queue_path, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
processor = QueueProcessor(queue_path, SMTPMailer("127.0.0.1", port, tls="none", timeout=120), workers=workers)
print("ready", flush=True)
sys.stdin.readline()  # all racers start together
summary = processor.run_once()
report(sent=summary.sent, deferred=summary.deferred, failed=summary.failed, skipped=summary.skipped)
"""


@pytest.mark.parametrize("processes, workers", [(2, 1), (4, 1), (8, 1), (2, 4)])
def test_processors_racing_as_processes_deliver_each_message_exactly_once(
        spawn, race_queue, smtp_sink, processes, workers):
    queue_path, expected = race_queue
    racers = [spawn(RACER, queue_path, smtp_sink.port, workers) for _ in range(processes)]
    for racer in racers:
        racer.wait_for("ready")
    for racer in racers:
        racer.send(b"go\n")
    results = [racer.result(timeout=crashkit.TIMEOUT * 2) for racer in racers]
    assert [racer.finish() for racer in racers] == [0] * processes

    assert sum(result["sent"] for result in results) == MESSAGES
    assert sum(result["deferred"] + result["failed"] for result in results) == 0
    assert_each_delivered_exactly_once(smtp_sink, expected, queue_path)


# -- 6. overlapping cron runs ------------------------------------------------------------------------------------


def test_two_overlapping_cron_runs_deliver_each_message_once_and_both_exit_zero(race_queue, smtp_sink, tmp_path):
    queue_path, expected = race_queue
    config_path = tmp_path / "mailspool.ini"  # given with --config: /etc/mailspool.ini cannot leak in
    config_path.write_text("[mailspool]\nsmtp_tls = none\nlog_level = INFO\n", encoding="utf-8")
    command = [crashkit.PYTHON, "-m", "mailspool", "run", "--once", str(queue_path), "--config", str(config_path),
               "-o", "smtp_host=127.0.0.1", "-o", f"smtp_port={smtp_sink.port}", "-o", "smtp_timeout=120"]
    env = crashkit.child_env()  # without MAILSPOOL_CONFIG
    # Output goes to files: a full pipe that is read later would stall one run and serialise the race.
    logs = [tmp_path / f"run-{number}.log" for number in (1, 2)]
    with open(logs[0], "wb") as first_log, open(logs[1], "wb") as second_log:
        runs = [subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
                for log in (first_log, second_log)]  # started together, as two cron entries would
        try:
            for run in runs:
                run.wait(timeout=crashkit.TIMEOUT * 2)
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
                    run.wait()

    sent = []
    for run, log in zip(runs, logs):
        text = log.read_text(encoding="utf-8", errors="replace")
        assert run.returncode == 0, text
        for word in ("Traceback", "ERROR", "CRITICAL", "WARNING"):
            assert word not in text, text  # the loser of a race stays quiet
        (finished,) = re.findall(r"mailspool\.console: run finished: (\d+) sent, (\d+) deferred, (\d+) failed", text)
        assert finished[1:] == ("0", "0")
        sent.append(int(finished[0]))
    assert sum(sent) == MESSAGES  # one may have done it all, or they shared it
    assert_each_delivered_exactly_once(smtp_sink, expected, queue_path)
    assert os.listdir(queue_path / "new") == []
