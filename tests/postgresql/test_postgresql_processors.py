"""Processors on the PostgreSQL queue: racing processes, a SIGKILL mid-batch, NOTIFY wake-ups, a database restart.

Real processes (``crashkit``), a real PostgreSQL server (conftest.py), a
real aiosmtpd server on 127.0.0.1 counting what it accepts by Message-Id.
"""

import threading
import time

import crashkit
import pytest
import sqlalchemy as sa
import transaction
from harness import wait_for

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.envelope import Envelope
from mailspool.exceptions import QueueError
from mailspool.postgresql import PostgresQueue

EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


@pytest.fixture
def queue(pg_engine):
    queue = PostgresQueue(pg_engine)
    queue.create_schema()
    yield queue
    queue.close()  # returns the connections it keeps for claims


def fill(queue, tag, count):
    """``count`` messages committed through QueuedMailDelivery; returns their Message-Ids."""
    manager = transaction.TransactionManager(explicit=True)
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    with manager:
        for number in range(count):
            delivery.send("shop@example.org", ["alice@example.org"], crashkit.message(tag, number))
    return {crashkit.message_id(tag, number) for number in range(count)}


RACER = """
from mailspool import QueueProcessor, SMTPMailer
from mailspool.postgresql import PostgresQueue

url, port = sys.argv[1], int(sys.argv[2])
processor = QueueProcessor(PostgresQueue(url), SMTPMailer("127.0.0.1", port, tls="none", timeout=60))
print("ready", flush=True)
sys.stdin.readline()  # released together, so that they really contend
summary = processor.run_once()
print(f"done {summary.sent} {summary.deferred} {summary.failed}", flush=True)
"""


def test_four_processes_racing_on_2000_rows_deliver_each_message_exactly_once(
        spawn, queue, postgres_url, smtp_sink):
    expected = fill(queue, "race", 2000)
    racers = [spawn(RACER, postgres_url, smtp_sink.port) for _ in range(4)]
    for racer in racers:
        racer.wait_for("ready")
    for racer in racers:
        racer.process.stdin.write(b"go\n")
        racer.close_stdin()
    sent = [int(racer.wait_for("done").split()[1]) for racer in racers]

    received = crashkit.received_ids(smtp_sink)
    assert set(received) == expected
    assert set(received.values()) == {1}  # no row claimed twice
    assert sum(sent) == 2000 and all(sent)  # each took a share
    assert queue.counts() == EMPTY


PARKED_PROCESSOR = """
import time
from mailspool import QueueProcessor, SMTPMailer
from mailspool.postgresql import PostgresQueue

url, port, park_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
queue = PostgresQueue(url, lease_seconds=30)
completed = []
real_complete = queue.complete

def complete(claim):
    if len(completed) + 1 == park_at:
        print("parked", claim.queue_id, flush=True)  # the server answered 250; the row is still there
        time.sleep(600)
    real_complete(claim)
    completed.append(claim.queue_id)

queue.complete = complete
QueueProcessor(queue, SMTPMailer("127.0.0.1", port, tls="none", timeout=60)).run_once()
"""


def test_a_processor_killed_mid_run_loses_its_claim_until_the_lease_expires_with_one_duplicate_at_most(
        spawn, queue, postgres_url, smtp_sink):
    expected = fill(queue, "killed", 20)
    child = spawn(PARKED_PROCESSOR, postgres_url, smtp_sink.port, 5)
    killed_id = child.wait_for("parked").split()[1]
    killed_message_id = queue.entry(killed_id).envelope.message_id
    child.kill()
    killed_at = time.time()
    counts = queue.counts()
    held = counts["active"]  # the message in flight, and those the dead processor had claimed ahead
    assert 1 <= held <= 4 and counts == dict(EMPTY, ready=16 - held, active=held)

    restarted = QueueProcessor(queue, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none"))
    assert restarted.run_once().sent == 16 - held
    assert queue.counts() == dict(EMPTY, active=held)  # the lease still holds them ...

    after_the_lease = QueueProcessor(queue, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none"),
                                     clock=lambda: killed_at + 31)
    assert after_the_lease.run_once().sent == held  # ... until it runs out

    received = crashkit.received_ids(smtp_sink)
    assert set(received) == expected  # nothing lost
    assert {mid: count for mid, count in received.items() if count > 1} == {killed_message_id: 2}
    assert queue.counts() == EMPTY


def test_a_daemon_is_woken_by_notify_without_polling(queue, smtp_sink):
    processor = QueueProcessor(queue, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none"))
    thread = threading.Thread(target=processor.run_forever, kwargs={"poll_interval": 3600}, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: processor._listener is not None, timeout=60)
        expected = fill(queue, "notify", 1)  # another connection commits; only NOTIFY can tell the daemon

        assert wait_for(lambda: set(crashkit.received_ids(smtp_sink)) == expected, timeout=60)
    finally:
        processor.stop()
        thread.join(60)
    assert not thread.is_alive()


@pytest.fixture
def own_server(postgres_server):
    """A cluster of this test's own, which it may restart (never the session's shared one)."""
    from pgserver import PostgresServer

    if postgres_server.bindir == "":
        pytest.skip("restarting needs a throwaway server, not MAILSPOOL_TEST_POSTGRESQL_URL")
    with PostgresServer() as server:
        yield server


def test_a_daemon_survives_a_postgresql_restart_and_delivers_what_was_committed_after_it(own_server, smtp_sink,
                                                                                         caplog):
    queue = PostgresQueue(own_server.url("postgres"))
    queue.create_schema()
    processor = QueueProcessor(queue, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none"))
    thread = threading.Thread(target=processor.run_forever, kwargs={"poll_interval": 3600}, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: processor._listener is not None, timeout=60)
        before = fill(queue, "before-restart", 2)
        assert wait_for(lambda: set(crashkit.received_ids(smtp_sink)) == before, timeout=60)

        own_server.restart()
        after = fill(queue, "after-restart", 2)  # only the LISTEN connection, reopened, can wake the daemon

        assert wait_for(lambda: set(crashkit.received_ids(smtp_sink)) == before | after, timeout=120)
    finally:
        processor.stop()
        thread.join(60)
        queue.close()
    assert not thread.is_alive()
    assert any("lost the LISTEN connection" in record.getMessage() for record in caplog.records)
    assert set(crashkit.received_ids(smtp_sink).values()) == {1}


# An application on the URL (second-resource) mode, killed between tpc_vote and tpc_finish:
# the mail row was committed as 'staged' in tpc_vote and is never published.
KILLED_COMMIT = """
import transaction
from crashkit import ParkingResource
from mailspool import QueuedMailDelivery
from mailspool.postgresql import PostgresQueue

manager = transaction.TransactionManager(explicit=True)
delivery = QueuedMailDelivery(PostgresQueue(sys.argv[1]), transaction_manager=manager)
manager.begin()
delivery.send("shop@example.org", ["alice@example.org"], b"Subject: never published\\r\\n\\r\\nbody\\r\\n")
manager.get().join(ParkingResource(manager, "tpc_vote"))
manager.commit()
"""


def test_an_application_killed_between_vote_and_finish_leaves_a_staged_row_that_is_never_sent_and_goes_in_a_day(
        spawn, queue, postgres_url, smtp_sink):
    child = spawn(KILLED_COMMIT, postgres_url)
    child.wait_for("parked in tpc_vote")
    child.kill()

    with queue.engine.connect() as connection:
        staged = connection.execute(sa.text("SELECT count(*) FROM mailspool_message WHERE state = 'staged'")).scalar()
    assert staged == 1 and queue.counts() == EMPTY  # committed in tpc_vote, invisible to processors
    summary = QueueProcessor(queue, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")).run_once()
    assert (summary.sent, summary.failed) == (0, 0) and smtp_sink.received == []

    assert queue.cleanup(now=time.time())["stale_staging_removed"] == 0  # could still be a live commit
    # The deadline is on the database's clock: a processor clock two days ahead changes nothing.
    assert queue.cleanup(now=time.time() + 2 * 24 * 3600)["stale_staging_removed"] == 0
    with queue.engine.begin() as connection:
        deadline = connection.execute(sa.text(
            "SELECT extract(epoch FROM lease_expires - now()) FROM mailspool_message WHERE state = 'staged'")).scalar()
        assert 24 * 3600 - 600 < deadline <= 24 * 3600
        connection.execute(sa.text(  # as if that day had passed on the database's clock
            "UPDATE mailspool_message SET lease_expires = now() - interval '1 second' WHERE state = 'staged'"))
    assert queue.cleanup()["stale_staging_removed"] == 1
    with queue.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM mailspool_message")).scalar() == 0


def test_a_commit_from_an_application_whose_clock_is_days_behind_is_not_taken_for_an_abandoned_one(queue):
    two_days_ago = time.time() - 2 * 24 * 3600  # the application's clock: created_at is written from it
    staged = queue.add(Envelope("shop@example.org", ("alice@example.org",), "<late-clock@example.org>",
                                two_days_ago), b"Subject: late clock\r\n\r\nbody\r\n")

    assert queue.cleanup()["stale_staging_removed"] == 0  # between tpc_vote and tpc_finish
    staged.publish()

    assert queue.counts() == dict(EMPTY, ready=1)


def test_a_row_staged_before_staging_deadlines_existed_goes_a_day_after_it_was_created(queue):
    staged = queue.add(Envelope("shop@example.org", ("alice@example.org",), "<old@example.org>", time.time()),
                       b"Subject: old\r\n\r\nbody\r\n")
    with queue.engine.begin() as connection:  # as an earlier release wrote it: no deadline
        connection.execute(sa.text("UPDATE mailspool_message SET lease_expires = NULL WHERE state = 'staged'"))

    assert queue.cleanup()["stale_staging_removed"] == 0
    assert queue.cleanup(now=time.time() + 24 * 3600 + 60)["stale_staging_removed"] == 1
    with pytest.raises(QueueError, match="staged row was gone"):
        staged.publish()  # its transaction finishing only now: said loudly, not silently lost

