"""QueuedMailDelivery and DirectMailDelivery: ``send()`` inside a transaction."""

import datetime
import logging
import time

import transaction
from transaction.interfaces import NoTransaction
from zope.interface import implementer

from mailspool import events
from mailspool.datamanager import MailDataManager
from mailspool.envelope import Envelope
from mailspool.exceptions import TransactionNotBegun
from mailspool.interfaces import IDirectMailDelivery, IMailQueue, IQueuedMailDelivery, ITransactionalMailQueue
from mailspool.maildir import MaildirQueue
from mailspool.prepare import prepare

log = logging.getLogger(__name__)


class _TransactionalDelivery:
    """What both deliveries share: checking input and joining the right transaction."""

    def __init__(self, transaction_manager=None):
        # The global thread-local manager is only the default; Pyramid apps
        # pass request.tm, an explicit per-request manager.
        self.transaction_manager = transaction_manager if transaction_manager is not None else transaction.manager

    def send(self, fromaddr, toaddrs, message):
        """See ``IMailDelivery.send``."""
        prepared = prepare(fromaddr, toaddrs, message)
        self._join(self._operation(prepared), prepared.message_id)
        return prepared.message_id

    def _join(self, operation, message_id):
        self._current_transaction().join(MailDataManager(self.transaction_manager, operation, message_id))

    def _current_transaction(self):
        try:
            return self.transaction_manager.get()
        except NoTransaction as exc:
            raise TransactionNotBegun(
                "send() needs a transaction: the transaction manager is explicit and no "
                "transaction was begun (call manager.begin() or use 'with manager:')"
            ) from exc


class _QueueOperation:
    """Stage in vote, publish in finish, discard on abort (see ``MailDataManager``)."""

    def __init__(self, queue, prepared, not_before=None):
        self.queue = queue
        self.prepared = prepared
        self.not_before = not_before
        self.staged = None

    def vote(self):
        self.staged = self.queue.add(_envelope(self.prepared, self.not_before), self.prepared.data)

    def finish(self):
        self.staged.publish()
        log.info("queued %s as %s", self.prepared.message_id, self.staged.queue_id)
        self.queue.announce()

    def abort(self):
        if self.staged is not None:
            self.staged.discard()
            self.staged = None


def _envelope(prepared, not_before):
    return Envelope(sender=prepared.sender, recipients=prepared.recipients, message_id=prepared.message_id,
                    enqueued_at=time.time(), not_before=not_before)


@implementer(IQueuedMailDelivery)
class QueuedMailDelivery(_TransactionalDelivery):
    """Queue each message at commit for a processor to deliver. See ``IQueuedMailDelivery``.

    ``queue`` is a directory path (a ``MaildirQueue`` is opened there,
    creating it if missing), a ``postgresql://`` URL (a ``PostgresQueue``;
    needs the ``postgresql`` extra) or any ``IMailQueue``. Raises
    ``QueueError`` naming the path if the directory cannot be used.

    Given an ``ITransactionalMailQueue`` (``PostgresQueue.bind(session)``),
    ``send()`` writes the message through the application's database
    session at once, so it commits in the same database commit as the
    application's rows; no resource of its own joins the transaction.
    """

    def __init__(self, queue, transaction_manager=None):
        super().__init__(transaction_manager)
        self.queue = open_queue(queue)

    @property
    def queuePath(self):
        """The queue directory (zope.sendmail's attribute name)."""
        return getattr(self.queue, "path", None)

    def __repr__(self):
        return f"<QueuedMailDelivery {self.queue!r}>"

    def send(self, fromaddr, toaddrs, message, send_at=None, delay=None):
        """See ``IQueuedMailDelivery.send``."""
        not_before = _not_before(send_at, delay)
        prepared = prepare(fromaddr, toaddrs, message)
        if ITransactionalMailQueue.providedBy(self.queue):
            self._current_transaction()  # the session's writes belong to it
            queue_id = self.queue.insert(_envelope(prepared, not_before), prepared.data)
            log.info("queued %s as %s in the application's transaction", prepared.message_id, queue_id)
        else:
            self._join(_QueueOperation(self.queue, prepared, not_before), prepared.message_id)
        return prepared.message_id


def is_database_url(value):
    """True for a ``postgresql://`` (or ``postgresql+driver://``) URL, as opposed to a queue directory."""
    return isinstance(value, str) and value.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def open_queue(queue, create=True):
    """An ``IMailQueue`` for ``queue``: itself, a ``PostgresQueue`` for a database URL, else a ``MaildirQueue``."""
    if IMailQueue.providedBy(queue):
        return queue
    if is_database_url(queue):
        from mailspool.postgresql import PostgresQueue  # the optional extra, only when asked for

        return PostgresQueue(queue)
    return MaildirQueue(queue, create=create)


def _not_before(send_at, delay):
    """Unix time a scheduled message becomes due, or None; ValueError/TypeError for bad input."""
    if send_at is not None and delay is not None:
        raise ValueError("give send_at or delay, not both")
    if send_at is not None:
        if not isinstance(send_at, datetime.datetime):
            raise TypeError(f"send_at must be a datetime, not {type(send_at).__name__}")
        return send_at.timestamp()  # a naive datetime is local time, as datetime does everywhere
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, datetime.timedelta) else float(delay)
        if seconds < 0:
            raise ValueError(f"delay must not be negative: {delay!r}")
        return time.time() + seconds
    return None


class _DirectOperation:
    """Check with the mailer in vote, send in finish (see ``MailDataManager``)."""

    def __init__(self, mailer, prepared):
        self.mailer = mailer
        self.prepared = prepared

    def vote(self):
        self.mailer.vote(self.prepared.sender, self.prepared.recipients, self.prepared.data)

    def finish(self):
        message_id = self.prepared.message_id
        try:
            # zope.sendmail-style mailers return None for "all accepted".
            refused = self.mailer.send(self.prepared.sender, self.prepared.recipients, self.prepared.data) or {}
        except Exception as exc:
            log.error("direct delivery of %s failed after commit: %s", message_id, exc, exc_info=True)
            events.notify(events.MailFailedEvent(message_id, self.prepared.recipients, str(exc)))
            return
        finally:
            self.abort()  # the commit is over: release the connection vote opened
        accepted = [rcpt for rcpt in self.prepared.recipients if rcpt not in refused]
        log.info("sent %s to %d recipient(s)", message_id, len(accepted))
        events.notify(events.MailSentEvent(message_id, accepted))
        for recipient, reply in refused.items():
            log.error("direct delivery of %s to %s refused: %s", message_id, recipient, reply)
            events.notify(events.MailFailedEvent(message_id, [recipient], str(reply)))

    def abort(self):
        try:
            self.mailer.abort()
        except Exception:
            log.exception("%r failed to abort", self.mailer)


@implementer(IDirectMailDelivery)
class DirectMailDelivery(_TransactionalDelivery):
    """Send each message through ``mailer`` while the transaction commits. See ``IDirectMailDelivery``."""

    def __init__(self, mailer, transaction_manager=None):
        super().__init__(transaction_manager)
        self.mailer = mailer

    def __repr__(self):
        return f"<DirectMailDelivery {self.mailer!r}>"

    def _operation(self, prepared):
        return _DirectOperation(self.mailer, prepared)
