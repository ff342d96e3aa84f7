"""The PostgreSQL queue: enqueue in the application's own commit, and the processor on top of it.

A real throwaway PostgreSQL server (conftest.py), a real aiosmtpd server on
127.0.0.1, real transactions through zope.sqlalchemy.
"""

import time

import sqlalchemy as sa
import pytest
import transaction
from sqlalchemy.orm import sessionmaker
from zope.sqlalchemy import mark_changed, register

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.envelope import Envelope
from mailspool.exceptions import QueueError, TransactionNotBegun
from mailspool.postgresql import PostgresQueue
from mailspool.sink import free_port as find_free_port

SENDER = "shop@example.org"
EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


@pytest.fixture
def free_port():
    return find_free_port()


def message(number):
    return b"Subject: order %d\r\nMessage-Id: <order-%d@example.org>\r\n\r\nThanks.\r\n" % (number, number)


@pytest.fixture
def queue(pg_engine):
    queue = PostgresQueue(pg_engine)
    queue.create_schema()
    yield queue
    queue.close()  # returns the connections it keeps for claims


@pytest.fixture
def orders(pg_engine):
    """An application table; its unique constraint is checked only at commit (DEFERRABLE INITIALLY DEFERRED)."""
    with pg_engine.begin() as connection:
        connection.execute(sa.text(
            "CREATE TABLE orders (id serial PRIMARY KEY, number int NOT NULL, "
            "CONSTRAINT orders_number_unique UNIQUE (number) DEFERRABLE INITIALLY DEFERRED)"))

    def numbers():
        with pg_engine.begin() as connection:
            return sorted(connection.execute(sa.text("SELECT number FROM orders")).scalars())

    return numbers


@pytest.fixture
def app(pg_engine, queue, manager):
    """A pyramid_tm-style request: a session registered with zope.sqlalchemy on an explicit manager."""
    sessions = []

    def request():
        session = sessionmaker(bind=pg_engine)()
        register(session, transaction_manager=manager)
        sessions.append(session)
        return session, QueuedMailDelivery(queue.bind(session, manager), transaction_manager=manager)

    yield request
    for session in sessions:
        session.close()


def place_order(session, number, manager):
    session.execute(sa.text("INSERT INTO orders (number) VALUES (:number)"), {"number": number})
    mark_changed(session, manager)


def queued_subjects(queue):
    return sorted(queue.read_message(entry.queue_id).split(b"\r\n")[0] for entry in queue.entries())


# -- enqueue in the application's commit ---------------------------------------------------------------------


def test_the_mail_and_the_application_row_commit_together(app, manager, queue, orders):
    session, delivery = app()
    with manager:
        place_order(session, 1, manager)
        delivery.send(SENDER, ["alice@example.org"], message(1))

    assert orders() == [1]
    assert queue.counts() == dict(EMPTY, ready=1)
    assert queued_subjects(queue) == [b"Subject: order 1"]


def test_a_rollback_leaves_neither(app, manager, queue, orders):
    session, delivery = app()
    with pytest.raises(RuntimeError):
        with manager:
            place_order(session, 1, manager)
            delivery.send(SENDER, ["alice@example.org"], message(1))
            raise RuntimeError("the view failed")

    assert orders() == []
    assert queue.counts() == EMPTY


def test_a_savepoint_rollback_removes_the_mail_sent_after_it_only(app, manager, queue, orders):
    session, delivery = app()
    with manager:
        place_order(session, 1, manager)
        delivery.send(SENDER, ["alice@example.org"], message(1))
        savepoint = manager.savepoint()
        place_order(session, 2, manager)
        delivery.send(SENDER, ["alice@example.org"], message(2))
        savepoint.rollback()

    assert orders() == [1]
    assert queued_subjects(queue) == [b"Subject: order 1"]


def test_a_constraint_violation_at_commit_leaves_neither(app, manager, queue, orders):
    session, delivery = app()
    with manager:
        place_order(session, 1, manager)
    session, delivery = app()
    with pytest.raises(sa.exc.IntegrityError):
        with manager:
            place_order(session, 1, manager)  # the duplicate is only found by COMMIT
            delivery.send(SENDER, ["alice@example.org"], message(2))

    assert orders() == [1]
    assert queue.counts() == EMPTY


def test_send_outside_a_transaction_is_refused(app, manager, queue):
    _, delivery = app()
    with pytest.raises(TransactionNotBegun):
        delivery.send(SENDER, ["alice@example.org"], message(1))
    assert queue.counts() == EMPTY


# -- enqueue with a connection of its own (a URL or an engine) --------------------------------------------------


def test_given_a_url_the_queue_joins_the_transaction_and_an_abort_leaves_nothing(postgres_url, queue, manager,
                                                                                 request):
    delivery = QueuedMailDelivery(postgres_url, transaction_manager=manager)
    assert isinstance(delivery.queue, PostgresQueue)
    request.addfinalizer(delivery.queue.close)
    with pytest.raises(RuntimeError):
        with manager:
            delivery.send(SENDER, ["alice@example.org"], message(1))
            raise RuntimeError("the view failed")
    assert queue.counts() == EMPTY

    with manager:
        delivery.send(SENDER, ["alice@example.org"], message(2))
    assert queued_subjects(queue) == [b"Subject: order 2"]


def test_an_unreachable_database_fails_the_commit_with_a_clear_error(manager, free_port, request):
    queue = PostgresQueue(f"postgresql://mailspool:secret-pw@127.0.0.1:{free_port}/nowhere")
    request.addfinalizer(queue.close)
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    committed = []
    with pytest.raises(QueueError) as info:
        with manager:
            delivery.send(SENDER, ["alice@example.org"], message(1))
            manager.get().addAfterCommitHook(lambda status: committed.append(status))

    assert f"127.0.0.1:{free_port}/nowhere" in str(info.value)
    assert "secret-pw" not in str(info.value)
    assert committed == [False]


def test_a_queue_without_its_schema_says_how_to_create_it(pg_engine, manager):
    delivery = QueuedMailDelivery(PostgresQueue(pg_engine), transaction_manager=manager)
    with pytest.raises(QueueError, match="mailspool db init"):
        with manager:
            delivery.send(SENDER, ["alice@example.org"], message(1))


# -- the processor on PostgreSQL --------------------------------------------------------------------------------


def commit(queue, manager, count, recipients=("alice@example.org",)):
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    with manager:
        for number in range(count):
            delivery.send(SENDER, list(recipients), message(number))


def test_the_processor_delivers_defers_and_fails_as_on_the_maildir(queue, manager, scripted_server, clock):
    commit(queue, manager, 1, recipients=("alice@example.org", "bob@example.org", "carol@example.org"))
    scripted_server.handler.rcpt_replies = {"bob@example.org": "550 5.1.1 no such user",
                                            "carol@example.org": "450 4.2.1 mailbox busy"}
    processor = QueueProcessor(queue, SMTPMailer(scripted_server.host, scripted_server.port, tls="none"),
                               clock=clock)

    first = processor.run_once()
    assert (first.sent, first.deferred, first.failed) == (0, 1, 0)
    (entry,) = queue.entries(["deferred"])
    assert entry.due_at > clock() and "carol@example.org: 450" in entry.last_reply
    assert processor.run_once().deferred == 0  # not due yet: a due time, not a sleep

    scripted_server.handler.rcpt_replies = {"bob@example.org": "550 5.1.1 no such user"}
    clock.advance(3600)
    second = processor.run_once()

    assert (second.sent, second.deferred, second.failed) == (0, 0, 1)  # bob refused for good
    received = [(sender, recipients) for sender, recipients, _ in scripted_server.handler.received]
    assert received == [(SENDER, ("alice@example.org",)), (SENDER, ("carol@example.org",))]
    (failed,) = queue.entries(["failed"])
    assert "bob@example.org: 550" in failed.last_reply
    assert queue.counts() == dict(EMPTY, failed=1)


def test_delivered_rows_are_deleted_or_kept_for_audit(pg_engine, manager, smtp_sink, clock):
    queue = PostgresQueue(pg_engine, keep_sent=3600)
    queue.create_schema()
    commit(queue, manager, 2)
    QueueProcessor(queue, SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none"), clock=clock).run_once()

    with pg_engine.begin() as connection:
        kept = connection.execute(sa.text("SELECT count(*) FROM mailspool_message WHERE state = 'sent'")).scalar()
    assert kept == 2 and queue.counts() == EMPTY
    assert queue.cleanup(now=clock() + 60)["sent_rows_purged"] == 0
    assert queue.cleanup(now=clock() + 3700)["sent_rows_purged"] == 2


def test_operators_hold_release_retry_and_delete(queue, manager):
    commit(queue, manager, 2)
    first, second = (entry.queue_id for entry in queue.entries())

    assert queue.hold(first) == "ready"
    assert queue.counts() == dict(EMPTY, ready=1, held=1)
    assert queue.unhold(first) == "held"
    assert queue.requeue(first) is None  # ready already
    assert queue.delete(second) == "ready"
    assert queue.delete(second) is None
    assert queue.entry(second) is None
    assert queue.counts() == dict(EMPTY, ready=1)


def test_the_postgresql_queue_keeps_the_contracts_of_record(queue, manager, app):
    from zope.interface.verify import verifyObject

    from mailspool.interfaces import (IClaimedMessage, IMailQueue, IQueueListener, IStagedMessage,
                                      ITransactionalMailQueue)

    session, _ = app()
    assert verifyObject(IMailQueue, queue)
    assert verifyObject(ITransactionalMailQueue, queue.bind(session, manager))
    staged = queue.add(Envelope(SENDER, ("alice@example.org",), "<contract@example.org>", time.time()), message(1))
    assert verifyObject(IStagedMessage, staged)
    staged.publish()
    assert verifyObject(IClaimedMessage, queue.claim_next())
    listener = queue.listener()
    try:
        assert verifyObject(IQueueListener, listener)
    finally:
        listener.close()


def test_a_retry_deferred_before_the_clock_went_back_is_claimed_but_a_scheduled_message_waits(queue, manager):
    from mailspool.envelope import Attempt

    commit(queue, manager, 1)
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    with manager:
        delivery.send(SENDER, ["bob@example.org"], message(7), delay=3 * 86400)  # scheduled, never attempted
    claim = queue.claim_next()
    now = time.time()
    queue.defer(claim, Attempt(at=now, error="451 4.3.0 try later"), until=now + 86400 + 60)  # a day "back"

    assert queue.claim_next(now, max_wait=3900) is not None  # further ahead than any back-off: due now
    assert queue.claim_next(now, max_wait=3900) is None  # the scheduled one keeps its time
    assert queue.counts() == dict(EMPTY, active=1, deferred=1)


def test_messages_claimed_ahead_are_given_back_when_a_run_stops_early(queue, manager):
    commit(queue, manager, 6)

    class StopAfterFirst:
        def send(self, fromaddr, toaddrs, message):
            processor.stop()
            return {}

    processor = QueueProcessor(queue, StopAfterFirst())
    summary = processor.run_once()

    assert summary.sent == 1
    assert queue.counts() == dict(EMPTY, ready=5)  # not held by leases until they run out


def test_a_row_claimed_ahead_whose_lease_is_half_gone_is_given_back_not_sent(pg_engine, manager):
    queue = PostgresQueue(pg_engine, lease_seconds=100, claim_batch=2)
    queue.create_schema()
    commit(queue, manager, 2)
    now = time.time()
    first = queue.claim_next(now)

    second = queue.claim_next(now + 60)  # the row leased ahead at `now` has 40 s of 100 left

    assert second is not None and second.queue_id != first.queue_id
    assert second.lease_expires_at == pytest.approx(now + 160)  # claimed afresh, not the stale lease
    queue.close()


def test_a_claim_connection_the_server_dropped_is_replaced_on_the_next_call(pg_engine, manager):
    queue = PostgresQueue(pg_engine, claim_batch=1)
    queue.create_schema()
    commit(queue, manager, 2)
    first = queue.claim_next()  # this thread now keeps a connection for claims
    with pg_engine.connect(), pg_engine.connect():
        pass  # two more connections in the queue's pool
    admin_engine = sa.create_engine(pg_engine.url)  # not the queue's pool: all that pool holds goes stale
    with admin_engine.connect() as admin:  # as a database restart would
        admin.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    admin_engine.dispose()
    try:
        with pytest.raises(QueueError, match="PostgreSQL queue"):
            queue.complete(first)

        second = queue.claim_next()

        assert second is not None and second.queue_id != first.queue_id
        queue.complete(second)
        assert queue.counts() == dict(EMPTY, active=1)  # the first stays leased until its lease runs out
    finally:
        queue.close()


def test_removals_work_on_a_claim_connection_taken_again_from_the_pool(pg_engine, manager):
    queue = PostgresQueue(pg_engine, claim_batch=1)
    queue.create_schema()
    commit(queue, manager, 2)
    try:
        for _ in range(2):  # two runs; the second gets the pooled connection the first prepared the removal on
            queue.complete(queue.claim_next())
            queue.release_unused()

        assert queue.counts() == EMPTY
    finally:
        queue.close()


def test_removals_survive_a_pool_that_deallocates_prepared_statements(postgres_url, manager):
    engine = sa.create_engine(postgres_url)

    @sa.event.listens_for(engine, "checkout")
    def deallocate_all(dbapi_connection, record, proxy):  # as a pool reset with DISCARD ALL would
        dbapi_connection.execute("DEALLOCATE ALL")
        dbapi_connection.commit()

    queue = PostgresQueue(engine, claim_batch=1)
    queue.create_schema()
    commit(queue, manager, 2)
    try:
        for _ in range(2):
            queue.complete(queue.claim_next())
            queue.release_unused()

        assert queue.counts() == EMPTY
    finally:
        queue.close()
        engine.dispose()
