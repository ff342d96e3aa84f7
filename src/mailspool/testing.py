"""Test doubles: ``config.include('mailspool.testing')`` and ``DummyMailer``.

``DummyMailer`` records instead of sending, and honours the transaction:
a message sent in a request whose transaction aborts never appears.
``outbox`` holds what was sent (``send``, ``send_sendmail``,
``send_immediately``...), ``queue`` what was queued (``send_to_queue``);
both are lists of the Message objects given, shared by every
``bind()``-ing of the mailer. Messages are validated (and given
``mail.default_sender``) as the real mailer does. Example, a Pyramid view
test::

    def test_signup_sends_a_welcome(app):         # app: a WebTest TestApp whose
        app.post("/signup", {"email": "a@example.org"})   # config included
        mailer = app.app.registry.getUtility(IPyramidMailer)  # mailspool.testing
        assert [m.subject for m in mailer.queue] == ["Welcome"]
"""

import transaction
from zope.interface import implementer

from mailspool.datamanager import MailDataManager
from mailspool.interfaces import IPyramidMailer
from mailspool.pyramid import _set_mailer, settings_from_pyramid


class _Record:
    """Append at commit, forget on abort (see ``MailDataManager``)."""

    def __init__(self, records, message):
        self.records = records
        self.message = message

    def vote(self):
        pass

    def finish(self):
        self.records.append(self.message)

    def abort(self):
        pass


@implementer(IPyramidMailer)
class DummyMailer:
    """Records messages, honouring the transaction. See the module docstring and ``IPyramidMailer``."""

    def __init__(self, transaction_manager=None, outbox=None, queue=None, default_sender=None):
        self.transaction_manager = transaction_manager if transaction_manager is not None else transaction.manager
        self.outbox = [] if outbox is None else outbox
        self.queue = [] if queue is None else queue
        self.default_sender = default_sender

    def bind(self, transaction_manager=None):
        """See ``IPyramidMailer.bind``; the records are shared."""
        return DummyMailer(transaction_manager, self.outbox, self.queue, self.default_sender)

    def _check(self, message):
        """What the real mailer does first: fill in the default sender and validate."""
        if not message.sender and self.default_sender:
            message.sender = self.default_sender
        message.validate()

    def _at_commit(self, records, message):
        self._check(message)
        self.transaction_manager.get().join(
            MailDataManager(self.transaction_manager, _Record(records, message), "DummyMailer"))

    def send(self, message):
        """See ``IPyramidMailer.send``: recorded in ``outbox`` at commit."""
        self._at_commit(self.outbox, message)

    def send_to_queue(self, message):
        """See ``IPyramidMailer.send_to_queue``: recorded in ``queue`` at commit."""
        self._at_commit(self.queue, message)

    def send_sendmail(self, message):
        """See ``IPyramidMailer.send_sendmail``: recorded in ``outbox`` at commit."""
        self._at_commit(self.outbox, message)

    def send_immediately(self, message, fail_silently=False):
        """See ``IPyramidMailer.send_immediately``: recorded in ``outbox`` now."""
        self._check(message)
        self.outbox.append(message)

    def send_immediately_sendmail(self, message, fail_silently=False):
        """See ``IPyramidMailer.send_immediately_sendmail``: recorded in ``outbox`` now."""
        self._check(message)
        self.outbox.append(message)


def includeme(config):
    """Register a ``DummyMailer`` as the application's mailer (and ``request.mailer``).

    ``mail.default_sender`` is honoured as the real mailer honours it.
    """
    default_sender = settings_from_pyramid(config.registry.settings).default_sender
    _set_mailer(config, DummyMailer(default_sender=default_sender))
