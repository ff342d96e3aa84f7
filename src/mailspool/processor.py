"""QueueProcessor: turns due queue entries into delivery attempts and settles each outcome.

The processor speaks to storage only through ``IMailQueue`` and to the
network only through ``IMailer``; it never looks at an SMTP reply code
(``SMTPReply.is_permanent`` answers that question for it).

Outcomes of one attempt::

    mailer.send returns {}              -> complete (removed), unless an earlier
                                           attempt had a recipient refused for good
    returns {rcpt: 4xx, ...}            -> deferred; only those recipients are retried
    returns {rcpt: 5xx, ...}            -> failed/ once no 4xx recipient is left
                                           (accepted recipients are never sent it again)
    raises TransientDeliveryError       -> deferred with back-off, failed/ past max_age/max_attempts
    raises PermanentDeliveryError       -> failed/
    anything else (a bug, a bad file)   -> failed/ with the reason; the run goes on
"""

import dataclasses
import logging
import random
import time

from zope.interface import implementer

from mailspool.envelope import Attempt
from mailspool.exceptions import PermanentDeliveryError, QueueFileError, TransientDeliveryError
from mailspool.interfaces import IMailQueue, IMailQueueProcessor
from mailspool.maildir import MaildirQueue

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSummary:
    """What one ``run_once`` did: messages sent, deferred and moved to failed."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0

    def __str__(self):
        return f"{self.sent} sent, {self.deferred} deferred, {self.failed} failed"


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When to retry a transient failure and when to give up.

    The n-th consecutive failure waits ``backoff_min * 2**(n-1)`` seconds,
    capped at ``backoff_max``, shortened by up to ``jitter`` (a fraction) so
    that messages that failed together do not all retry together. A message
    older than ``max_age`` seconds, or with ``max_attempts`` failed attempts
    (``None``: no limit), goes to the failed state instead.
    """

    backoff_min: float = 60.0
    backoff_max: float = 3600.0
    jitter: float = 0.1
    max_age: float = 5 * 24 * 3600.0
    max_attempts: int = None

    def delay(self, failures):
        """Seconds to wait after the ``failures``-th consecutive failure (1-based)."""
        base = min(self.backoff_max, self.backoff_min * 2 ** min(failures - 1, 62))
        return base * (1 - random.uniform(0, self.jitter))

    def gives_up(self, envelope, failures, now):
        """True when the message must not be retried again."""
        too_old = now - envelope.enqueued_at >= self.max_age
        too_many = self.max_attempts is not None and failures >= self.max_attempts
        return too_old or too_many


def recipients_left(envelope, attempts):
    """The recipients that neither got the message nor were refused for good in ``attempts``."""
    settled = set()
    for attempt in attempts:
        settled.update(attempt.accepted)
        settled.update(rcpt for rcpt, reply in attempt.refused.items() if reply.is_permanent)
    return [rcpt for rcpt in envelope.recipients if rcpt not in settled]


@implementer(IMailQueueProcessor)
class QueueProcessor:
    """Deliver what is due in a queue. See ``IMailQueueProcessor``.

    ``queue`` is a directory path or an ``IMailQueue``; the other keyword
    arguments are those of ``RetryPolicy``.
    """

    def __init__(self, queue, mailer, clock=time.time, **retry_settings):
        self.queue = queue if IMailQueue.providedBy(queue) else MaildirQueue(queue)
        self.mailer = mailer
        self.retry_policy = RetryPolicy(**retry_settings)
        self._clock = clock

    def __repr__(self):
        return f"<QueueProcessor {self.queue!r} via {self.mailer!r}>"

    def run_once(self):
        """See ``IMailQueueProcessor.run_once``."""
        summary = RunSummary()
        housekeeping = self.queue.cleanup(self._clock())
        if any(housekeeping.values()):
            log.info("queue housekeeping: %s", housekeeping)
        for queue_id in self.queue.due(self._clock()):
            try:
                claim = self.queue.claim(queue_id, self._clock())
            except QueueFileError as exc:
                log.error("skipping unreadable queue entry %s: %s", queue_id, exc)
                summary.failed += 1
                continue
            if claim is None:
                continue  # another processor has it
            outcome = self._process(claim)
            setattr(summary, outcome, getattr(summary, outcome) + 1)
        if summary.sent or summary.deferred or summary.failed:
            log.info("queue run finished: %s", summary)
        return summary

    def _process(self, claim):
        """Attempt one claimed message and settle it; return 'sent', 'deferred' or 'failed'."""
        message_id = claim.envelope.message_id
        try:
            return self._attempt(claim)
        except Exception as exc:
            log.exception("unexpected error delivering %s (%s); moving it to failed/", message_id, claim.queue_id)
            self.queue.fail(claim, Attempt(at=self._clock(), error=f"unexpected error: {type(exc).__name__}: {exc}"))
            return "failed"

    def _attempt(self, claim):
        envelope = claim.envelope
        recipients = recipients_left(envelope, claim.attempts)
        now = self._clock()
        server = getattr(self.mailer, "server", "")
        try:
            # zope.sendmail-style mailers return None for "all accepted".
            refused = self.mailer.send(envelope.sender, recipients, claim.read()) or {}
        except TransientDeliveryError as exc:
            attempt = Attempt(at=now, server=exc.server or server, refused=exc.refused, error=str(exc))
            return self._retry_later(claim, attempt)
        except PermanentDeliveryError as exc:
            attempt = Attempt(at=now, server=exc.server or server, refused=exc.refused, error=str(exc))
            self.queue.fail(claim, attempt)
            log.error("%s failed permanently: %s", envelope.message_id, exc)
            return "failed"
        accepted = tuple(rcpt for rcpt in recipients if rcpt not in refused)
        attempt = Attempt(at=now, server=server, accepted=accepted, refused=dict(refused))
        if accepted:
            log.info("sent %s (%s) to %d recipient(s) via %s", envelope.message_id, claim.queue_id, len(accepted), server)
        history = [*claim.attempts, attempt]
        if recipients_left(envelope, history):
            return self._retry_later(claim, attempt)
        refused_for_good = _refused_for_good(history)
        if refused_for_good:
            reason = "refused for good: " + "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused_for_good.items())
            self.queue.fail(claim, dataclasses.replace(attempt, error=reason))
            log.error("%s %s", envelope.message_id, reason)
            return "failed"
        self.queue.complete(claim)
        return "sent"

    def _retry_later(self, claim, attempt):
        envelope = claim.envelope
        failures = _consecutive_failures(claim.attempts) + 1
        if self.retry_policy.gives_up(envelope, failures, attempt.at):
            reason = f"gave up after {failures} attempt(s): {attempt.error or 'recipients still refused'}"
            self.queue.fail(claim, dataclasses.replace(attempt, error=reason))
            log.error("%s moved to failed/: %s", envelope.message_id, reason)
            return "failed"
        until = attempt.at + self.retry_policy.delay(failures)
        self.queue.defer(claim, attempt, until)
        log.warning(
            "%s deferred until %s: %s", envelope.message_id,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)), attempt.error or "some recipients deferred",
        )
        return "deferred"


def _refused_for_good(attempts):
    """Recipients refused with a permanent reply in any of ``attempts``, with that reply."""
    return {
        rcpt: reply for attempt in attempts for rcpt, reply in attempt.refused.items() if reply.is_permanent
    }


def _consecutive_failures(attempts):
    """How many attempts in a row, counting back from the last, delivered to nobody new."""
    count = 0
    for attempt in reversed(attempts):
        if attempt.accepted:
            break
        count += 1
    return count
