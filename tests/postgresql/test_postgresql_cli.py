"""``mailspool`` subcommands on a PostgreSQL queue (``QUEUE`` as a URL, or ``queue_url``), and ``mailspool move``.

Each command runs as ``python -m mailspool`` in a subprocess, as an
operator runs it; a real PostgreSQL server and a real SMTP server.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
import transaction

from mailspool import QueuedMailDelivery
from mailspool.envelope import Attempt
from mailspool.maildir import MaildirQueue
from mailspool.postgresql import PostgresQueue
from mailspool.reply import SMTPReply

EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


@pytest.fixture
def mailspool(tmp_path):
    """Run ``python -m mailspool ARGS`` with an empty configuration file; return the CompletedProcess."""
    config = tmp_path / "empty.ini"
    config.write_text("[mailspool]\n")

    def run(*args, config_text=None):
        if config_text is not None:
            config.write_text(config_text)
        env = dict(os.environ, MAILSPOOL_CONFIG=str(config))
        return subprocess.run([sys.executable, "-m", "mailspool", *map(str, args)], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture
def queue(postgres_url, request):
    queue = PostgresQueue(postgres_url)
    request.addfinalizer(queue.close)
    return queue


def commit(queue, count, tag="cli", **send_options):
    manager = transaction.TransactionManager(explicit=True)
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    with manager:
        for number in range(count):
            delivery.send("shop@example.org", ["alice@example.org"],
                          b"Subject: %s %d\r\nMessage-Id: <%s-%d@example.org>\r\n\r\nbody\r\n"
                          % (tag.encode(), number, tag.encode(), number), **send_options)


def test_db_init_creates_the_schema_once_and_again_harmlessly(mailspool, postgres_url, queue):
    first = mailspool("db", "init", postgres_url)
    again = mailspool("db", "init", postgres_url)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert queue.counts() == EMPTY


def test_commands_on_a_queue_without_its_schema_say_how_to_create_it(mailspool, postgres_url):
    result = mailspool("status", postgres_url)

    assert result.returncode == 78
    assert "mailspool db init" in result.stderr


def test_status_list_show_hold_release_retry_delete_and_run_on_postgresql(mailspool, postgres_url, queue, smtp_sink):
    queue.create_schema()
    commit(queue, 3)
    first, second, third = (entry.queue_id for entry in queue.entries())
    config = f"[mailspool]\nqueue_url = {postgres_url}\nsmtp_host = 127.0.0.1\nsmtp_port = {smtp_sink.port}\n" \
             "smtp_tls = none\n"

    status = mailspool("status", "--json", config_text=config)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["counts"] == dict(EMPTY, ready=3)
    assert "@" in document["queue"] and document["oldest_age_seconds"] >= 0

    listed = mailspool("list", "--json", "--limit", "2", config_text=config)
    assert [entry["queue_id"] for entry in json.loads(listed.stdout)] == [first, second]
    shown = mailspool("show", second, config_text=config)
    assert shown.returncode == 0 and "<cli-1@example.org>" in shown.stdout

    assert mailspool("hold", first, config_text=config).returncode == 0
    assert mailspool("delete", "--yes", third, config_text=config).returncode == 0
    assert queue.counts() == dict(EMPTY, ready=1, held=1)

    run = mailspool("run", "--once", config_text=config)
    assert run.returncode == 0, run.stderr
    assert len(smtp_sink.received) == 1
    assert mailspool("release", first, config_text=config).returncode == 0
    assert mailspool("run", "--once", config_text=config).returncode == 0
    assert len(smtp_sink.received) == 2
    assert queue.counts() == EMPTY
    assert mailspool("show", first, config_text=config).returncode == 66  # delivered, gone


def test_retry_makes_a_failed_message_ready_again(mailspool, postgres_url, queue):
    queue.create_schema()
    commit(queue, 1)
    claim = queue.claim_next()
    queue.fail(claim, Attempt(at=claim.envelope.enqueued_at, server="smtp.example.org:25",
                              refused={"alice@example.org": SMTPReply(550, "5.1.1 no such user")}))
    listed = json.loads(mailspool("list", "--json", "--state", "failed", postgres_url).stdout)
    assert "550 5.1.1 no such user" in listed[0]["last_reply"]

    retried = mailspool("retry", "-Q", postgres_url, claim.queue_id)

    assert retried.returncode == 0, retried.stderr
    (entry,) = queue.entries()
    assert entry.state == "ready" and entry.attempts[-1].requeued


def fill_every_state(queue):
    """One message in each state a move carries (ready, scheduled, deferred with history, held, failed)."""
    commit(queue, 3, tag="every")
    commit(queue, 1, tag="scheduled", delay=3600)
    ready_ids = [entry.queue_id for entry in queue.entries(["ready"])]
    queue.hold(ready_ids[0])
    deferred = queue.claim(ready_ids[1])
    queue.defer(deferred, Attempt(at=deferred.envelope.enqueued_at, server="smtp.example.org:25",
                                  refused={"alice@example.org": SMTPReply(450, "4.2.1 busy")}),
                until=deferred.envelope.enqueued_at + 600)
    failed = queue.claim(ready_ids[2])
    queue.fail(failed, Attempt(at=failed.envelope.enqueued_at, error="550 5.7.1 refused"))
    commit(queue, 1, tag="ready")


def snapshot(queue):
    """What must survive a move, per queue id: (state, envelope without times, attempts, bytes), and the times.

    The times (enqueued, not before, due) are compared to 10 µs: PostgreSQL
    keeps microseconds, a float epoch a little more.
    """
    exact, times = {}, {}
    for entry in queue.entries():
        envelope = entry.envelope
        exact[entry.queue_id] = (entry.state, dataclasses.replace(envelope, enqueued_at=0, not_before=None),
                                 entry.attempts, queue.read_message(entry.queue_id))
        times[entry.queue_id] = (envelope.enqueued_at, envelope.not_before or 0,
                                 entry.due_at if entry.state == "deferred" else 0)
    return exact, times


def assert_same_messages(queue, before):
    exact, times = snapshot(queue)
    assert exact == before[0]
    assert times == {queue_id: pytest.approx(moments, abs=1e-5) for queue_id, moments in before[1].items()}


def test_move_a_maildir_into_postgresql_and_back_keeps_every_message_and_its_state(
        mailspool, tmp_path, postgres_url, queue):
    maildir = MaildirQueue(tmp_path / "queue")
    fill_every_state(maildir)
    before = snapshot(maildir)
    assert {state for state, *_ in before[0].values()} == {"ready", "deferred", "held", "failed"}
    assert mailspool("db", "init", postgres_url).returncode == 0

    there = mailspool("move", maildir.path, "--to", postgres_url)

    assert there.returncode == 0, there.stderr
    assert "moved 5 message(s)" in there.stdout
    assert maildir.counts() == EMPTY and os.listdir(os.path.join(maildir.path, "log")) == []
    assert_same_messages(queue, before)

    back = mailspool("move", postgres_url, "--to", maildir.path)

    assert back.returncode == 0, back.stderr
    assert queue.counts() == EMPTY
    assert_same_messages(maildir, before)


def test_a_move_out_of_postgresql_with_keep_sent_leaves_no_sent_rows(mailspool, tmp_path, postgres_url, queue):
    queue.create_schema()
    commit(queue, 2, tag="audited")
    maildir = MaildirQueue(tmp_path / "queue")

    result = mailspool("move", postgres_url, "--to", maildir.path, config_text="[mailspool]\nkeep_sent = 5d\n")

    assert result.returncode == 0, result.stderr
    assert maildir.counts() == dict(EMPTY, ready=2)
    with queue.engine.connect() as connection:  # moved, not delivered: nothing is kept as 'sent'
        assert connection.execute(sa.text("SELECT state FROM mailspool_message")).scalars().all() == []


def test_a_move_run_again_after_an_interruption_writes_nothing_twice(mailspool, tmp_path, postgres_url, queue):
    maildir = MaildirQueue(tmp_path / "queue")
    commit(maildir, 3, tag="again")
    queue.create_schema()
    (entry, *_) = maildir.entries()
    # As if a move died after writing this message to PostgreSQL, before removing it from the maildir:
    queue.insert_entry(entry.queue_id, entry.state, entry.envelope, maildir.read_message(entry.queue_id), ())

    result = mailspool("move", maildir.path, "--to", postgres_url)

    assert result.returncode == 0, result.stderr
    assert "1 were there already" in result.stdout
    assert queue.counts() == dict(EMPTY, ready=3) and maildir.counts() == EMPTY
