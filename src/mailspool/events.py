"""Events about delivered and failed mail, sent through zope.event when it is installed."""

import logging

from zope.interface import implementer

from mailspool.interfaces import IMailFailedEvent, IMailSentEvent

try:  # zope.event is optional (the ``zope`` extra); without it nobody can subscribe
    import zope.event as _zope_event
except ImportError:  # pragma: no cover - exercised only without the extra installed
    _zope_event = None

log = logging.getLogger(__name__)


@implementer(IMailSentEvent)
class MailSentEvent:
    """See ``IMailSentEvent``."""

    def __init__(self, message_id, recipients):
        self.message_id = message_id
        self.recipients = tuple(recipients)


@implementer(IMailFailedEvent)
class MailFailedEvent:
    """See ``IMailFailedEvent``."""

    def __init__(self, message_id, recipients, reason):
        self.message_id = message_id
        self.recipients = tuple(recipients)
        self.reason = reason


def notify(event):
    """Send ``event`` to zope.event subscribers, if zope.event is installed.

    Never raises: a failing subscriber is logged, because events are sent
    from places (tpc_finish, the processor) that must not fail.
    """
    if _zope_event is None:
        return
    try:
        _zope_event.notify(event)
    except Exception:
        log.exception("a subscriber failed handling %r", event)
