"""The PostgreSQL queue: an outbox table that commits with the application's own rows.

Install with the ``postgresql`` extra (SQLAlchemy 2 Core, psycopg 3,
zope.sqlalchemy). One table, ``mailspool_message``, holds every message
with its envelope, state, due time, attempt history and lease; a second,
``mailspool_schema``, holds the schema version (docs/scaling.rst shows
both). ``PostgresQueue(url).create_schema()`` or ``mailspool db init``
creates them.

Two ways to enqueue:

- ``PostgresQueue(url_or_engine)`` given to ``QueuedMailDelivery`` joins
  the transaction as a second resource, like the maildir: the row is
  inserted and committed as ``staged`` in ``tpc_vote`` and made ``ready``
  in ``tpc_finish``. A crash between the application's database commit and
  ``tpc_finish`` leaves a staged row (removed by ``cleanup`` after a day
  by the database's clock).
- ``queue.bind(session)`` for an SQLAlchemy session registered with
  zope.sqlalchemy: the row is inserted through that session when
  ``send()`` is called, so it commits or rolls back in the very same
  database commit as the application's rows.

Processors claim rows with ``FOR UPDATE SKIP LOCKED`` and a lease
(``lease_owner``, ``lease_expires``); a processor that dies loses its
claims when the lease expires. Every commit that makes mail ready sends
``NOTIFY mailspool`` (PostgreSQL delivers it only when that transaction
commits), which wakes listening processors on any host.

Every database error is raised as ``QueueError`` (an ``OSError``) naming the
database, never its password.
"""

import collections
import contextlib
import datetime
import json
import logging
import math
import os
import secrets
import select
import socket
import threading
import time

import psycopg
import sqlalchemy
from sqlalchemy import (BigInteger, Column, Index, Integer, LargeBinary, MetaData, Table, Text, and_, func, or_,
                        text)
from sqlalchemy import select as sql_select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from zope.interface import implementer

from mailspool.envelope import Attempt, Envelope, QueueEntry
from mailspool.exceptions import QueueError
from mailspool.interfaces import IClaimedMessage, IMailQueue, IQueueListener, IStagedMessage, ITransactionalMailQueue
from mailspool.maildir import unique_name

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CHANNEL = "mailspool"
DEFAULT_LEASE_SECONDS = 300.0
# Rows leased per claim statement: fewer statements per message, while a
# batch stays small enough to be sent well within its lease.
DEFAULT_CLAIM_BATCH = 4
# A row staged in tpc_vote whose transaction never finished (the process died) is removed this long
# after it was staged, by the database server's clock (its lease_expires), never the hosts' clocks.
STALE_STAGED_SECONDS = 24 * 3600
# The states of IMailQueue; the table also has 'staged' (not yet committed
# by the application) and 'sent' (kept for audit when keep_sent is set).
STATES = ("ready", "active", "deferred", "held", "failed")

metadata = MetaData()

message_table = Table(
    "mailspool_message", metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("queue_id", Text, nullable=False, unique=True),
    Column("state", Text, nullable=False),
    Column("sender", Text, nullable=False),
    Column("recipients", ARRAY(Text), nullable=False),
    Column("message_id", Text, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", TIMESTAMP(timezone=True), nullable=False),
    Column("not_before", TIMESTAMP(timezone=True)),
    Column("due_at", TIMESTAMP(timezone=True), nullable=False),
    Column("attempt_count", Integer, nullable=False, server_default="0"),
    Column("attempts", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("last_attempt_at", TIMESTAMP(timezone=True)),
    Column("lease_owner", Text),
    Column("lease_expires", TIMESTAMP(timezone=True)),
    Column("settled_at", TIMESTAMP(timezone=True)),
    sqlalchemy.CheckConstraint(
        "state IN ('staged', 'ready', 'active', 'deferred', 'held', 'failed', 'sent')", name="mailspool_state"),
)
# What claims look for, oldest first; partial indexes stay small.
Index("mailspool_message_ready", message_table.c.due_at, message_table.c.id,
      postgresql_where=message_table.c.state == "ready")
Index("mailspool_message_deferred", message_table.c.due_at, message_table.c.id,
      postgresql_where=message_table.c.state == "deferred")
Index("mailspool_message_state", message_table.c.state)
Index("mailspool_message_created", message_table.c.created_at)
Index("mailspool_message_scheduled", message_table.c.due_at,
      postgresql_where=sqlalchemy.and_(message_table.c.state == "deferred", message_table.c.attempt_count == 0))
Index("mailspool_message_last_attempt", message_table.c.last_attempt_at,
      postgresql_where=message_table.c.last_attempt_at.isnot(None))
Index("mailspool_message_lease", message_table.c.lease_expires, postgresql_where=message_table.c.state == "active")

schema_table = Table(
    "mailspool_schema", metadata,
    Column("version", Integer, nullable=False),
)

_COLUMNS_BUT_DATA = [column for column in message_table.c if column.name != "data"]

# Joined into a claim or a removal so that its commit does not wait for the WAL
# flush (``synchronous_commit`` off for that transaction alone) in the same
# round trip: a database crash can undo such a commit, which only ever means a
# message is claimed (and maybe sent) once more, never that one is lost.
_ASYNCHRONOUS_COMMIT = sql_select(
    func.set_config("synchronous_commit", "off", True).label("setting")).subquery("asynchronous_commit")

# Wakes the processors that LISTEN; PostgreSQL delivers it only if the transaction commits.
_NOTIFY = text("SELECT pg_notify(:channel, '')").bindparams(channel=CHANNEL)

# The processor's hot path, written out (claim_next, complete); see _claimable_groups for the kinds.
_CLAIM_SQL = """
UPDATE mailspool_message SET state = 'active', lease_owner = %(owner)s, lease_expires = %(lease_expires)s
FROM (SELECT set_config('synchronous_commit', 'off', true) AS setting) AS asynchronous_commit
WHERE asynchronous_commit.setting IS NOT NULL AND id IN (
    SELECT id FROM mailspool_message WHERE {where} ORDER BY {order} LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
RETURNING queue_id, sender, recipients, message_id, created_at, not_before, attempts, data, id
"""
_READY = _CLAIM_SQL.format(where="state = 'ready'", order="due_at, id")
_DEFERRED_DUE = _CLAIM_SQL.format(where="state = 'deferred' AND due_at <= %(now)s", order="due_at, id")
_CLOCK_BACK = _CLAIM_SQL.format(where="state = 'deferred' AND due_at > %(far)s AND attempt_count > 0",
                                order="due_at, id")
_ABANDONED = _CLAIM_SQL.format(where="state = 'active' AND lease_expires < %(now)s", order="lease_expires")
_CLAIM_DUE = (_READY, _DEFERRED_DUE, _ABANDONED)
_CLAIM_DUE_OR_CLOCK_BACK = (_READY, _DEFERRED_DUE, _CLOCK_BACK, _ABANDONED)
_CLAIM_ANY_TIME = (_READY, _CLAIM_SQL.format(where="state = 'deferred'", order="due_at, id"),
                   _CLAIM_SQL.format(where="state = 'active' AND lease_expires < now()", order="lease_expires"))
# Run once per delivered message, as a statement prepared on each hot connection (see _HotConnections.remove).
_REMOVE_STATEMENT = b"mailspool_remove"
_REMOVE_SQL = b"""
DELETE FROM mailspool_message
USING (SELECT set_config('synchronous_commit', 'off', true) AS setting) AS asynchronous_commit
WHERE asynchronous_commit.setting IS NOT NULL AND queue_id = $1 AND lease_owner = $2
"""


def _ts(epoch):
    return None if epoch is None else datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)


def _epoch(moment):
    return None if moment is None else moment.timestamp()


def engine_for(url_or_engine):
    """An SQLAlchemy engine for a URL (``postgresql://`` uses psycopg 3) or the engine given."""
    if isinstance(url_or_engine, sqlalchemy.engine.Engine):
        return url_or_engine
    url = sqlalchemy.engine.make_url(str(url_or_engine))
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return sqlalchemy.create_engine(url)


@implementer(IStagedMessage)
class StagedRow:
    """A row committed as ``staged`` in tpc_vote; ``publish`` makes it ready. See ``IStagedMessage``."""

    def __init__(self, queue, queue_id, not_before):
        self.queue = queue
        self.queue_id = queue_id
        self.not_before = not_before

    def publish(self):
        """See ``IStagedMessage.publish``: staged -> ready (or deferred until its time), and NOTIFY.

        Raises ``QueueError`` if the row is gone: nothing can bring the
        message back then, and the caller logs it loudly.
        """
        state = "deferred" if self.not_before is not None and self.not_before > time.time() else "ready"
        with self.queue._transaction() as connection:
            published = connection.execute(
                message_table.update()
                .where(message_table.c.queue_id == self.queue_id, message_table.c.state == "staged")
                .values(state=state)).rowcount
            if state == "ready":
                connection.execute(_NOTIFY)
        if published != 1:
            raise QueueError(f"{self.queue_id}: the staged row was gone when its transaction finished "
                             "(removed by hand, or by cleanup a day after it was staged); this message is lost",
                             self.queue.name)

    def discard(self):
        """See ``IStagedMessage.discard``. Never raises."""
        try:
            with self.queue._transaction() as connection:
                connection.execute(message_table.delete().where(
                    message_table.c.queue_id == self.queue_id, message_table.c.state == "staged"))
        except Exception:
            log.exception("could not remove staged row %s; cleanup() removes it within a day", self.queue_id)


def _check_result(result):
    """Raise the psycopg error a libpq result carries, if it is not a success."""
    if result.status not in (psycopg.pq.ExecStatus.COMMAND_OK, psycopg.pq.ExecStatus.TUPLES_OK):
        raise psycopg.errors.error_from_result(result)


class _HotConnections:
    """One autocommit connection per thread for the statements a processor runs per message.

    ``claim_next`` and ``complete`` run a few thousand times a second
    across processors; through a pool checkout, an isolation-level switch
    and SQLAlchemy's execution layer each cost about three times the
    statement's own client work. Here each thread keeps one connection
    from the engine's pool (so its connect arguments apply) in AUTOCOMMIT,
    and runs the written-out statements on psycopg's cursor directly,
    fetching rows in binary (``bytea`` as bytes, not hex). ``close``
    returns them all to the pool (the processor calls it after each run,
    through ``release_unused``); a connection that fails is invalidated,
    and its replacement is checked with a ``SELECT 1`` when it is taken.
    The removal, one per delivered message, goes further down: see ``remove``.
    """

    def __init__(self, queue):
        self._queue = queue
        self._by_thread = {}  # thread id -> (SQLAlchemy connection, psycopg cursor on it)
        self._lock = threading.Lock()

    def execute(self, statement, parameters, fetch=False):
        """Run one statement (committed by itself); its rows if ``fetch``. Raises ``QueueError``."""
        thread = threading.get_ident()
        held = self._by_thread.get(thread) or self._take(thread)
        try:
            held[1].execute(statement, parameters, binary=fetch)
            return held[1].fetchall() if fetch else None
        except (psycopg.Error, SQLAlchemyError) as exc:
            raise self._failed(thread, exc) from exc

    def remove(self, queue_id, owner):
        """Delete the row ``queue_id`` if ``owner`` holds its lease (committed by itself). Raises ``QueueError``.

        Through libpq directly, as a statement this connection prepared
        once: psycopg's cursor would convert the query and adapt the
        parameters on every call, which costs more client CPU than the
        statement itself (twice as much, measured in a loop). The one
        round trip and its commit are the same.
        """
        thread = threading.get_ident()
        held = self._by_thread.get(thread) or self._take(thread)
        pooled = held[0].connection
        pgconn = pooled.driver_connection.pgconn
        prepared = pooled.info  # kept with the pooled connection across checkouts, dropped with it
        values = [queue_id.encode(), owner.encode()]
        try:
            if not prepared.get(_REMOVE_STATEMENT):
                _check_result(pgconn.prepare(_REMOVE_STATEMENT, _REMOVE_SQL, None))
                prepared[_REMOVE_STATEMENT] = True
            try:
                _check_result(pgconn.exec_prepared(_REMOVE_STATEMENT, values))
            except psycopg.errors.InvalidSqlStatementName:  # someone ran DEALLOCATE ALL (or DISCARD ALL) on it
                _check_result(pgconn.prepare(_REMOVE_STATEMENT, _REMOVE_SQL, None))
                _check_result(pgconn.exec_prepared(_REMOVE_STATEMENT, values))
        except psycopg.Error as exc:
            raise self._failed(thread, exc) from exc

    def _failed(self, thread, exc):
        """Invalidate ``thread``'s connection after ``exc`` (the pool replaces it); the QueueError to raise."""
        self._give_back(thread, invalidate=True)
        return self._queue._error(exc)

    def _take(self, thread):
        """Check out ``thread``'s connection and a cursor on it. Raises ``QueueError``."""
        queue = self._queue
        if not queue._schema_checked:
            queue.verify()
        for try_number in (1, 2):
            connection = None
            try:
                connection = queue.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                # Through SQLAlchemy, once per checkout: a connection the server dropped (a restart)
                # fails here, which makes SQLAlchemy discard the pool's other stale ones too.
                connection.exec_driver_sql("SELECT 1")
                break
            except SQLAlchemyError as exc:
                if connection is not None:
                    connection.close()
                stale = isinstance(exc, DBAPIError) and exc.connection_invalidated
                if not stale or try_number == 2:
                    raise queue._error(exc) from exc
        held = (connection, connection.connection.driver_connection.cursor())
        with self._lock:
            self._by_thread[thread] = held
        return held

    def _give_back(self, thread, invalidate=False):
        with self._lock:
            held = self._by_thread.pop(thread, None)
        if held is None:
            return
        connection, cursor = held
        try:
            cursor.close()
            if invalidate:
                connection.invalidate()
            connection.close()
        except (psycopg.Error, SQLAlchemyError):
            pass  # already broken; the pool replaces it

    def close(self):
        """Return every thread's connection to the pool. Never raises."""
        with self._lock:
            threads = list(self._by_thread)
        for thread in threads:
            self._give_back(thread)


@implementer(IClaimedMessage)
class ClaimedRow:
    """A row leased by this processor. See ``IClaimedMessage``."""

    def __init__(self, queue_id, envelope, attempts, data, lease_owner, lease_expires_at):
        self.queue_id = queue_id
        self.envelope = envelope
        self.attempts = attempts
        self._data = data
        self.lease_owner = lease_owner
        self.lease_expires_at = lease_expires_at

    def read(self):
        """See ``IClaimedMessage.read``: the bytes came with the claim."""
        return self._data

    def __repr__(self):
        return f"<ClaimedRow {self.queue_id} leased by {self.lease_owner}>"


@implementer(IMailQueue)
class PostgresQueue:
    """An ``IMailQueue`` in a PostgreSQL table (see the module docstring).

    ``database`` is a URL (``postgresql://user@host/db``) or an SQLAlchemy
    engine. ``lease_seconds`` is how long a claim lasts without renewal
    (the processor renews it every quarter of that while a message is
    sent). ``keep_sent`` seconds: keep delivered rows (state ``sent``, with
    their history) that long for audit; 0 deletes them at once.
    ``claim_batch``: rows a processor leases per claim statement (see
    ``claim_next``). Each thread that claims keeps one pooled connection
    for its claims and removals until ``release_unused()`` or ``close()``.
    """

    def __init__(self, database, lease_seconds=DEFAULT_LEASE_SECONDS, keep_sent=0, claim_batch=DEFAULT_CLAIM_BATCH):
        self._owns_engine = not isinstance(database, sqlalchemy.engine.Engine)
        self.engine = engine_for(database)
        self.lease_seconds = float(lease_seconds)
        self.claim_renewal_interval = self.lease_seconds / 4
        self.keep_sent = float(keep_sent)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._schema_checked = False
        self.claim_batch = int(claim_batch)
        self._ahead = collections.deque()  # leased by claim_next, not handed out yet
        self._ahead_lock = threading.Lock()
        self._hot_connections = _HotConnections(self)

    @property
    def name(self):
        """The database URL without its password (for messages and logs)."""
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self):
        return f"<PostgresQueue {self.name}>"

    def close(self):
        """Close the pooled connections of an engine this queue created from a URL (not of one it was given)."""
        self._hot_connections.close()
        if self._owns_engine:
            self.engine.dispose()

    # -- schema ----------------------------------------------------------------

    def create_schema(self):
        """Create the tables and indexes if missing and record the schema version. Idempotent.

        Raises ``QueueError`` if the database cannot be reached or holds a
        different schema version.
        """
        with self._transaction(check_schema=False) as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(7307417)"))  # one creator at a time
            metadata.create_all(connection)
            found = connection.execute(sql_select(schema_table.c.version)).scalars().all()
            if not found:
                connection.execute(schema_table.insert().values(version=SCHEMA_VERSION))
            elif found != [SCHEMA_VERSION]:
                raise QueueError(f"{self.name}: mailspool schema version {found} found, this release "
                                 f"uses {SCHEMA_VERSION}", self.name)
        self._schema_checked = True

    def verify(self):
        """Connect and check the schema version; QueueError saying what is wrong (and how to fix it) if not."""
        with self._transaction(check_schema=False, single_statement=True) as connection:
            self._check_schema(connection)

    def _check_schema(self, connection):
        try:
            found = connection.execute(sql_select(schema_table.c.version)).scalars().all()
        except sqlalchemy.exc.ProgrammingError:
            found = []
        if found != [SCHEMA_VERSION]:
            raise QueueError(
                f"{self.name}: no mailspool schema version {SCHEMA_VERSION} here "
                f"(found {found or 'none'}); create it with 'mailspool db init' or PostgresQueue.create_schema()",
                self.name)
        self._schema_checked = True

    @contextlib.contextmanager
    def _transaction(self, check_schema=True, single_statement=False):
        """A connection in a transaction that commits on success; database errors become QueueError.

        ``single_statement``: no transaction around, each statement commits
        by itself in one round trip (claims and removals, which are single
        statements anyway).
        """
        if check_schema and not self._schema_checked:
            self.verify()
        try:
            with self.engine.connect() as connection:
                if single_statement:
                    yield connection.execution_options(isolation_level="AUTOCOMMIT")
                else:
                    with connection.begin():
                        yield connection
        except SQLAlchemyError as exc:
            raise self._error(exc) from exc

    def _error(self, exc):
        reason = getattr(exc, "orig", None) or exc
        first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        return QueueError(f"PostgreSQL queue {self.name}: {first_line}", self.name)

    # -- enqueue ---------------------------------------------------------------

    def add(self, envelope, data):
        """See ``IMailQueue.add``: a ``staged`` row, committed now, invisible to processors.

        Its ``lease_expires`` is a day ahead on the database's clock: until
        then ``cleanup`` leaves it alone, however far the application's or
        the processor's clock is off (``created_at`` is the application's).
        """
        queue_id = unique_name()
        staging_deadline = func.now() + datetime.timedelta(seconds=STALE_STAGED_SECONDS)
        with self._transaction() as connection:
            connection.execute(message_table.insert().values(
                {**_row_values(queue_id, "staged", envelope, data), "lease_expires": staging_deadline}))
        return StagedRow(self, queue_id, envelope.not_before)

    def bind(self, session, transaction_manager=None):
        """This queue writing through ``session`` (SQLAlchemy, registered with zope.sqlalchemy).

        The returned queue's ``insert`` adds the row in the session's
        transaction; ``QueuedMailDelivery`` given it enqueues at ``send()``.
        ``transaction_manager`` is the one the session is registered with
        (pyramid_tm's ``request.tm``; default: the global one, as in
        zope.sqlalchemy).
        """
        return SessionQueue(self, session, transaction_manager)

    # -- processing ------------------------------------------------------------

    def _claimable_groups(self, now, max_wait):
        """The kinds of rows a processor may claim at ``now``, in the order they are taken.

        Ready rows (whatever the clocks say: ``due_at`` only orders them),
        deferred rows that are due, retries due further ahead than any
        back-off (the clock went back, see ``IMailQueue.due``), and claims
        whose lease ran out. Each kind is one range of a partial index.
        ``now`` may be ``math.inf``: every deferred row is due then
        (``mailspool move``).
        """
        c = message_table.c
        by_due = (c.due_at, c.id)
        abandoned = and_(c.state == "active", c.lease_expires < (func.now() if now == math.inf else _ts(now)))
        if now == math.inf:
            return [(c.state == "ready", by_due), (c.state == "deferred", by_due), (abandoned, (c.lease_expires,))]
        groups = [(c.state == "ready", by_due), (and_(c.state == "deferred", c.due_at <= _ts(now)), by_due)]
        if max_wait is not None:
            groups.append((and_(c.state == "deferred", c.due_at > _ts(now + max_wait), c.attempt_count > 0), by_due))
        groups.append((abandoned, (c.lease_expires,)))
        return groups

    def _claimable(self, now, max_wait):
        """Rows a processor may claim at ``now`` (see ``_claimable_groups``)."""
        return or_(*(where for where, _ in self._claimable_groups(now, max_wait)))

    def due(self, now=None, max_wait=None):
        """See ``IMailQueue.due``: ready and due rows, oldest due first, unleased ones only."""
        now = time.time() if now is None else now
        with self._transaction() as connection:
            rows = connection.execute(
                sql_select(message_table.c.queue_id).where(self._claimable(now, max_wait))
                .order_by(message_table.c.due_at, message_table.c.id)).scalars().all()
        return iter(rows)

    def claim(self, queue_id, now=None, max_wait=None):
        """See ``IMailQueue.claim``: one UPDATE of a row locked with ``FOR UPDATE SKIP LOCKED``."""
        now = time.time() if now is None else now
        candidate = (sql_select(message_table.c.id)
                     .where(message_table.c.queue_id == queue_id, self._claimable(now, max_wait))
                     .with_for_update(skip_locked=True).scalar_subquery())
        return self._lease(candidate, now)

    def claim_next(self, now=None, max_wait=None):
        """Claim the message due first that nobody holds; None when nothing is due.

        The processor uses this where a queue offers it: concurrent
        processors each take different rows (``SKIP LOCKED``) instead of
        contending for the same ids from the same list. Rows are leased
        ``claim_batch`` at a time, by one statement that commits by itself
        without waiting for the WAL flush (see ``_ASYNCHRONOUS_COMMIT``),
        and handed out one per call; the kinds of rows of
        ``_claimable_groups`` are tried in turn. A leased row whose lease is
        more than half gone by the time it is handed out is given back
        instead (it was not renewed while it waited). ``release_unused``
        gives back what is left at the end of a run.
        """
        now = time.time() if now is None else now
        while True:
            with self._ahead_lock:
                claim = self._ahead.popleft() if self._ahead else None
            if claim is None:
                break
            if now == math.inf or claim.lease_expires_at - now > self.lease_seconds / 2:
                return claim
            self._give_back([claim])
        if now == math.inf:  # (see _claimable_groups) the lease runs from the present
            kinds, parameters, lease_from = _CLAIM_ANY_TIME, {}, time.time()
        else:
            kinds = _CLAIM_DUE if max_wait is None else _CLAIM_DUE_OR_CLOCK_BACK
            parameters = {"now": _ts(now), "far": _ts(now + (max_wait or 0))}
            lease_from = now
        lease_expires_at = lease_from + self.lease_seconds
        parameters.update(owner=self.owner, lease_expires=_ts(lease_expires_at), batch=self.claim_batch)
        for statement in kinds:
            rows = self._hot_connections.execute(statement, parameters, fetch=True)
            if rows:
                break
        if not rows:
            return None
        claims = [self._claimed(row[:8], lease_expires_at) for row in sorted(rows, key=lambda row: row[-1])]
        with self._ahead_lock:
            self._ahead.extend(claims[1:])
        return claims[0]

    def release_unused(self):
        """Give back the rows ``claim_next`` leased ahead and did not hand out, and the connections held for them.

        A processor calls it after each run. Raises ``QueueError`` if the
        rows cannot be given back (their leases return them).
        """
        self._hot_connections.close()
        with self._ahead_lock:
            unused, self._ahead = list(self._ahead), collections.deque()
        if unused:
            self._give_back(unused)

    def _give_back(self, claims):
        with self._transaction(single_statement=True) as connection:
            connection.execute(
                message_table.update()
                .where(message_table.c.queue_id.in_([claim.queue_id for claim in claims]),
                       message_table.c.lease_owner == self.owner, message_table.c.state == "active")
                .values(state="ready", lease_owner=None, lease_expires=None))

    def _lease(self, candidate, now):
        """Lease the row ``candidate`` (an id subquery) finds; a ClaimedRow or None.

        One statement committed by itself, without waiting for the WAL
        flush (see ``_ASYNCHRONOUS_COMMIT``).
        """
        if now == math.inf:  # (see _claimable_groups) the lease runs from the present
            now = time.time()
        c = message_table.c
        with self._transaction(single_statement=True) as connection:
            row = connection.execute(
                message_table.update().where(c.id == candidate, _ASYNCHRONOUS_COMMIT.c.setting.isnot(None))
                .values(state="active", lease_owner=self.owner, lease_expires=_ts(now + self.lease_seconds))
                .returning(c.queue_id, c.sender, c.recipients, c.message_id, c.created_at, c.not_before,
                           c.attempts, c.data)).first()
        return None if row is None else self._claimed(row, now + self.lease_seconds)

    def _claimed(self, row, lease_expires_at):
        queue_id, sender, recipients, message_id, created_at, not_before, attempts, data = row
        envelope = Envelope(sender, tuple(recipients), message_id, _epoch(created_at), _epoch(not_before))
        return ClaimedRow(queue_id, envelope, _attempts(attempts), bytes(data), self.owner, lease_expires_at)

    def _settle(self, claim, **values):
        """Update a claimed row, if this processor still holds it; QueueError if the lease was lost."""
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires", None)
        with self._transaction() as connection:
            result = connection.execute(
                message_table.update()
                .where(message_table.c.queue_id == claim.queue_id, message_table.c.lease_owner == claim.lease_owner,
                       message_table.c.state == "active")
                .values(**values))
        if result.rowcount != 1:
            raise QueueError(f"{claim.queue_id}: the lease of {claim.lease_owner} was lost (it expired and another "
                             "processor took the message)", self.name)

    def renew(self, claim):
        """See ``IMailQueue.renew``."""
        self._settle(claim, lease_owner=claim.lease_owner, lease_expires=_ts(time.time() + self.lease_seconds))

    def complete(self, claim):
        """See ``IMailQueue.complete``: the row is deleted, or kept as ``sent`` when ``keep_sent`` is set."""
        if self.keep_sent > 0:
            self._settle(claim, state="sent", settled_at=_ts(time.time()))
            return
        # As for claims: a crash that undoes this can only mean one more delivery, never a lost one.
        self._hot_connections.remove(claim.queue_id, claim.lease_owner)

    def discard(self, claim):
        """See ``IMailQueue.discard``: the row is deleted, whatever ``keep_sent`` says."""
        self._hot_connections.remove(claim.queue_id, claim.lease_owner)

    def defer(self, claim, attempt, until):
        """See ``IMailQueue.defer``: a due time, not a sleep."""
        self._settle(claim, state="deferred", due_at=_ts(until), **_appended(attempt))

    def fail(self, claim, attempt):
        """See ``IMailQueue.fail``."""
        self._settle(claim, state="failed", settled_at=_ts(attempt.at), **_appended(attempt))

    def release(self, claim):
        """See ``IMailQueue.release``."""
        self._settle(claim, state="ready", due_at=func.least(message_table.c.due_at, func.now()))

    def cleanup(self, now=None):
        """See ``IMailQueue.cleanup``: staged rows a day old, claims whose lease ran out, expired sent rows.

        Staged rows go when their deadline on the database's clock has
        passed (``now`` is not used for them; rows staged before there was
        a deadline go a day after their ``created_at``).
        """
        now = time.time() if now is None else now
        with self._transaction() as connection:
            c = message_table.c
            staged = connection.execute(message_table.delete().where(c.state == "staged", or_(
                c.lease_expires < func.now(),  # by the database's clock (see add)
                and_(c.lease_expires.is_(None), c.created_at < _ts(now - STALE_STAGED_SECONDS))))).rowcount
            released = connection.execute(
                message_table.update()
                .where(message_table.c.state == "active", message_table.c.lease_expires < _ts(now))
                .values(state="ready", lease_owner=None, lease_expires=None)).rowcount
            purged = connection.execute(message_table.delete().where(
                message_table.c.state == "sent",
                message_table.c.settled_at < _ts(now - self.keep_sent))).rowcount
        if released:
            log.warning("%d claim(s) whose lease ran out were released (a processor died or hung)", released)
        return {"stale_staging_removed": staged, "dead_claims_released": released, "sent_rows_purged": purged}

    # -- notifications ---------------------------------------------------------

    def announce(self):
        """See ``IMailQueue.announce``: NOTIFY (the publishing commit already sent one). Never raises."""
        try:
            with self._transaction() as connection:
                connection.execute(_NOTIFY)
        except Exception as exc:
            log.warning("could not notify processors: %s", exc)

    def listener(self):
        """See ``IMailQueue.listener``: a connection of its own that LISTENs."""
        return NotifyListener(self)

    # -- inspection and operators ----------------------------------------------

    def counts(self):
        """See ``IMailQueue.counts``: one indexed GROUP BY."""
        with self._transaction() as connection:
            found = dict(connection.execute(
                sql_select(message_table.c.state, func.count()).group_by(message_table.c.state)).all())
        return {state: found.get(state, 0) for state in STATES}

    def summary(self):
        """What ``mailspool status`` shows, from indexed queries (no row is read whole).

        ``{"counts", "scheduled", "oldest_enqueued_at", "next_retry_at",
        "last_error": {"queue_id", "message_id", "at_epoch", "error"} or None}``.
        """
        c = message_table.c
        scheduled_row = and_(c.state == "deferred", c.attempt_count == 0)
        with self._transaction() as connection:
            found = dict(connection.execute(sql_select(c.state, func.count()).group_by(c.state)).all())
            scheduled = connection.execute(sql_select(func.count()).where(scheduled_row)).scalar()
            oldest = connection.execute(sql_select(func.min(c.created_at)).where(
                c.state.in_(("ready", "active", "deferred")), ~scheduled_row)).scalar()
            next_retry = connection.execute(sql_select(func.min(c.due_at)).where(
                c.state == "deferred", c.attempt_count > 0)).scalar()
            last = connection.execute(
                sql_select(*_COLUMNS_BUT_DATA)
                .where(c.last_attempt_at.isnot(None), c.state.in_(("ready", "deferred", "held", "failed")))
                .order_by(c.last_attempt_at.desc()).limit(1)).first()
        last_error = None
        if last is not None:
            entry = _entry(last)
            if entry.last_reply:
                last_error = {"queue_id": entry.queue_id, "message_id": entry.envelope.message_id,
                              "at_epoch": entry.delivery_attempts[-1].at, "error": entry.last_reply}
        return {"counts": {state: found.get(state, 0) for state in STATES}, "scheduled": scheduled,
                "oldest_enqueued_at": _epoch(oldest), "next_retry_at": _epoch(next_retry), "last_error": last_error}

    def entries(self, states=None, limit=None):
        """See ``IMailQueue.entries`` (``limit``: at most that many, oldest first)."""
        query = sql_select(*_COLUMNS_BUT_DATA).where(message_table.c.state.in_(tuple(states or STATES)))
        query = query.order_by(message_table.c.created_at, message_table.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self._transaction() as connection:
            rows = connection.execute(query).all()
        return iter([_entry(row) for row in rows])

    def entry(self, queue_id):
        """See ``IMailQueue.entry``."""
        with self._transaction() as connection:
            row = connection.execute(sql_select(*_COLUMNS_BUT_DATA).where(
                message_table.c.queue_id == queue_id, message_table.c.state.in_(STATES))).first()
        return None if row is None else _entry(row)

    def read_message(self, queue_id):
        """See ``IMailQueue.read_message``."""
        with self._transaction() as connection:
            data = connection.execute(sql_select(message_table.c.data).where(
                message_table.c.queue_id == queue_id, message_table.c.state.in_(STATES))).scalar()
        if data is None:
            raise KeyError(queue_id)
        return bytes(data)

    def _move(self, queue_id, sources, target, note_if_failed=None, **values):
        """Move ``queue_id`` from one of ``sources`` to ``target``; return the state it was in, or None.

        ``note_if_failed`` (an Attempt) is appended to the history when the message was failed.
        """
        with self._transaction() as connection:
            before = connection.execute(
                sql_select(message_table.c.state).where(message_table.c.queue_id == queue_id,
                                                        message_table.c.state.in_(sources))
                .with_for_update()).scalar()
            if before is None:
                return None
            if before == "failed" and note_if_failed is not None:
                values.update(_appended(note_if_failed))
            connection.execute(message_table.update().where(message_table.c.queue_id == queue_id)
                               .values(state=target, **values))
            if target == "ready":
                connection.execute(_NOTIFY)
        log.info("message %s moved from %s to %s", queue_id, before, target)
        return before

    def requeue(self, queue_id, now=None):
        """See ``IMailQueue.requeue``."""
        now = time.time() if now is None else now
        record = Attempt(at=now, error="requeued by an operator", requeued=True)
        return self._move(queue_id, ("failed", "deferred", "held"), "ready", note_if_failed=record,
                          due_at=_ts(now), settled_at=None)

    def hold(self, queue_id):
        """See ``IMailQueue.hold``."""
        return self._move(queue_id, ("ready", "deferred"), "held")

    def unhold(self, queue_id):
        """See ``IMailQueue.unhold``."""
        return self._move(queue_id, ("held",), "ready", due_at=func.now())

    def delete(self, queue_id):
        """See ``IMailQueue.delete``: never a message being delivered."""
        with self._transaction() as connection:
            before = connection.execute(
                message_table.delete()
                .where(message_table.c.queue_id == queue_id,
                       message_table.c.state.in_(("ready", "deferred", "held", "failed")))
                .returning(message_table.c.state)).scalar()
        if before is not None:
            log.warning("message %s deleted from %s by an operator", queue_id, before)
        return before

    def insert_entry(self, queue_id, state, envelope, data, attempts, due_at=None):
        """Insert a message under its existing ``queue_id`` (``mailspool move``); False if already there."""
        values = _row_values(queue_id, state, envelope, data)
        values.update(attempts=_jsonb(attempts), attempt_count=sum(1 for a in attempts if not a.requeued))
        if due_at is not None:
            values["due_at"] = _ts(due_at)
        statement = (postgresql_insert(message_table).values(values)
                     .on_conflict_do_nothing(index_elements=["queue_id"]).returning(message_table.c.id))
        with self._transaction() as connection:
            inserted = connection.execute(statement).first() is not None
            if inserted and state == "ready":
                connection.execute(_NOTIFY)
        return inserted


@implementer(ITransactionalMailQueue)
class SessionQueue:
    """A ``PostgresQueue`` writing through the application's SQLAlchemy session (``PostgresQueue.bind``).

    Everything but ``insert`` is the underlying queue's.
    """

    def __init__(self, queue, session, transaction_manager=None):
        self.queue = queue
        self.session = session
        self.transaction_manager = transaction_manager

    def __getattr__(self, name):
        return getattr(self.queue, name)

    def __repr__(self):
        return f"<SessionQueue {self.queue.name} via {self.session!r}>"

    def insert(self, envelope, data):
        """See ``ITransactionalMailQueue.insert``."""
        queue_id = unique_name()
        state = "deferred" if envelope.not_before is not None and envelope.not_before > time.time() else "ready"
        try:
            self.session.execute(message_table.insert().values(_row_values(queue_id, state, envelope, data)))
            if state == "ready":
                self.session.execute(_NOTIFY)
        except SQLAlchemyError as exc:
            raise self.queue._error(exc) from exc
        # zope.sqlalchemy commits a session only when it knows it wrote something;
        # Core statements do not tell it (ORM flushes do). Imported here: it
        # brings in the ORM, which the commands never need.
        from zope.sqlalchemy import mark_changed

        if self.transaction_manager is None:
            mark_changed(self.session)
        else:
            mark_changed(self.session, self.transaction_manager)
        return queue_id


@implementer(IQueueListener)
class NotifyListener:
    """LISTEN on a connection of its own; ``wait`` returns on NOTIFY or ``wake``. See ``IQueueListener``.

    A lost connection is reopened on the next ``wait`` with back-off
    (1 second doubling to 60), logged once per outage; while it is down,
    ``wait`` sleeps its timeout (the poll goes on).
    """

    def __init__(self, queue):
        self.queue = queue
        self._connection = None
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._retry_at = 0.0
        self._backoff = 1.0
        self._closed = False
        self._lock = threading.Lock()
        self._connect()

    def _connect(self):
        import psycopg

        url = self.queue.engine.url
        try:
            self._connection = psycopg.connect(
                host=url.host, port=url.port, user=url.username, password=url.password, dbname=url.database,
                autocommit=True, connect_timeout=10, **url.query)
            self._connection.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as exc:
            self._connection = None
            if self._backoff == 1.0:
                log.warning("cannot LISTEN on %s (%s); polling, retrying the connection", self.queue.name,
                            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 60.0)
            return False
        if self._backoff > 1.0:
            log.warning("listening on %s again", self.queue.name)
        self._backoff = 1.0
        return True

    def wait(self, timeout):
        """See ``IQueueListener.wait``."""
        deadline = time.monotonic() + timeout
        if self._connection is None and time.monotonic() >= self._retry_at:
            if self._connect():
                return True  # mail committed while we were away was not heard: look now
        connection = self._connection
        readable = [self._wake_read] + ([connection.fileno()] if connection is not None else [])
        if connection is None:
            readable_timeout = max(0.0, min(deadline, self._retry_at) - time.monotonic())
        else:
            readable_timeout = max(0.0, deadline - time.monotonic())
        try:
            ready, _, _ = select.select(readable, [], [], readable_timeout)
        except (OSError, ValueError):
            ready = []
        if self._wake_read in ready:
            self._drain_wakeups()
            return True
        if connection is not None and ready:
            return self._take_notifies(connection)
        return False

    def _take_notifies(self, connection):
        import psycopg

        try:
            heard = False
            for _ in connection.notifies(timeout=0, stop_after=1000):
                heard = True
            return heard
        except (psycopg.Error, OSError) as exc:
            log.warning("lost the LISTEN connection to %s (%s); reconnecting", self.queue.name,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            self._drop_connection()
            self._retry_at = time.monotonic() + self._backoff
            return True  # look at the queue: the processor's own errors say more

    def _drain_wakeups(self):
        try:
            while os.read(self._wake_read, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def wake(self):
        """See ``IQueueListener.wake``. Never raises (safe in signal handlers)."""
        try:
            os.write(self._wake_write, b"w")
        except OSError:
            pass

    def _drop_connection(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass

    def close(self):
        """See ``IQueueListener.close``."""
        if self._closed:
            return
        self._closed = True
        self._drop_connection()
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass


def _row_values(queue_id, state, envelope, data):
    due = envelope.not_before if envelope.not_before is not None else envelope.enqueued_at
    return {
        "queue_id": queue_id, "state": state, "sender": envelope.sender, "recipients": list(envelope.recipients),
        "message_id": envelope.message_id, "data": bytes(data), "size": len(data),
        "created_at": _ts(envelope.enqueued_at), "not_before": _ts(envelope.not_before), "due_at": _ts(due),
    }


def _jsonb(attempts):
    """Attempts as a JSONB array (the same records as the maildir's attempt log lines)."""
    return sqlalchemy.literal([json.loads(attempt.to_line()) for attempt in attempts], type_=JSONB)


def _appended(attempt):
    """Column updates that append ``attempt`` to the history (and count it, unless it is a requeue)."""
    values = {"attempts": message_table.c.attempts.op("||")(_jsonb([attempt]))}
    if not attempt.requeued:
        values.update(attempt_count=message_table.c.attempt_count + 1, last_attempt_at=_ts(attempt.at))
    return values


def _attempts(records):
    found = []
    for record in records or ():
        try:
            found.append(Attempt.from_line(json.dumps(record)))
        except (ValueError, KeyError, TypeError):
            log.warning("skipping a damaged attempt record: %r", record)
    return tuple(found)


def _entry(row):
    envelope = Envelope(row.sender, tuple(row.recipients), row.message_id, _epoch(row.created_at),
                        _epoch(row.not_before))
    due_at = _epoch(row.due_at) if row.state in ("deferred", "active") else None
    return QueueEntry(queue_id=row.queue_id, state=row.state, envelope=envelope, attempts=_attempts(row.attempts),
                      due_at=due_at, size=row.size)
