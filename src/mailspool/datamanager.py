"""MailDataManager: joins a message to the two-phase commit of a transaction."""

import itertools
import logging

from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer

log = logging.getLogger(__name__)

_join_order = itertools.count()


@implementer(ISavepointDataManager)
class MailDataManager:
    """Runs one mail operation at the right moments of a commit.

    ``operation`` has three methods, called at most as the transaction
    package dictates:

    - ``vote()`` in ``tpc_vote``: do everything that can fail (stage the
      file, check the server). May raise; the transaction then aborts.
    - ``finish()`` in ``tpc_finish``: make the result visible. Should not
      raise; if it does, the error is logged here and swallowed, because the
      other resources have committed and nothing can be undone.
    - ``abort()`` from ``abort`` or ``tpc_abort``: undo whatever ``vote``
      did. Idempotent; must never raise.

    See ``transaction.interfaces.IDataManager`` for the protocol itself.
    """

    def __init__(self, transaction_manager, operation, description):
        self.transaction_manager = transaction_manager
        self.operation = operation
        self.description = description
        # Why this sort key: the transaction package votes and finishes in
        # sortKey order. A queue write can fail (full disk, read-only
        # directory), so it must vote before any resource that commits
        # irrevocably in its own tpc_vote; zope.sqlalchemy does exactly that
        # and sorts itself last with "~sqlalchemy:". "!" sorts before every
        # letter, digit, "/" and "~", so mail votes first and a failed write
        # still aborts the database. The counter keeps keys unique and the
        # messages of one transaction in the order they were sent.
        self._sort_key = f"!mailspool:{next(_join_order):012d}"

    def __repr__(self):
        return f"<MailDataManager {self.description}>"

    def sortKey(self):
        """See ``IDataManager.sortKey``."""
        return self._sort_key

    def abort(self, transaction):
        """See ``IDataManager.abort``."""
        self.operation.abort()

    def tpc_begin(self, transaction):
        """See ``IDataManager.tpc_begin``. Nothing to prepare."""

    def commit(self, transaction):
        """See ``IDataManager.commit``. All work happens in tpc_vote."""

    def tpc_vote(self, transaction):
        """See ``IDataManager.tpc_vote``. May raise, which aborts the transaction."""
        self.operation.vote()

    def tpc_finish(self, transaction):
        """See ``IDataManager.tpc_finish``. Never raises."""
        try:
            self.operation.finish()
        except Exception:
            log.critical("%s: could not complete after the transaction committed", self.description, exc_info=True)

    def tpc_abort(self, transaction):
        """See ``IDataManager.tpc_abort``."""
        self.operation.abort()

    def savepoint(self):
        """See ``ISavepointDataManager.savepoint``.

        A message sent before the savepoint stays sent when the savepoint
        is rolled back, so rolling back to it changes nothing here. A message
        sent after a savepoint is a data manager that joined after it; the
        transaction package rolls those back by calling ``abort``.
        """
        return _UnchangedSavepoint(self)


class _UnchangedSavepoint:
    """A savepoint whose rollback leaves the message as it is (see ``MailDataManager.savepoint``)."""

    def __init__(self, data_manager):
        self.data_manager = data_manager

    def rollback(self):
        """See ``IDataManagerSavepoint.rollback``."""
