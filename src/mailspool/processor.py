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

Three modes share this engine: ``run_once`` (cron), ``run_forever`` (the
daemon) and ``QueueProcessorThread`` (in-process). Each attempt is
reported once, on the delivery log (``mailspool.deliveries``); this
module's own logger carries only details (DEBUG) and unexpected errors.
"""

import contextlib
import dataclasses
import logging
import random
import threading
import time

from zope.interface import implementer

from mailspool import deliverylog, events
from mailspool.envelope import Attempt
from mailspool.exceptions import PermanentDeliveryError, QueueFileError, TransientDeliveryError
from mailspool.interfaces import IMailQueueProcessor
from mailspool.delivery import open_queue

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 30.0
# How far the clocks of hosts sharing a queue may disagree. A retry due
# further ahead than backoff_max plus this was scheduled by a clock that
# has since gone back: it is tried now (see ``RetryPolicy.longest_wait``).
CLOCK_SKEW_ALLOWANCE = 300.0


@dataclasses.dataclass
class RunSummary:
    """What one ``run_once`` did.

    ``sent``: delivered to every recipient; ``deferred``: to be retried;
    ``failed``: moved to the failed state; ``skipped``: listed as due, but
    taken by another processor first or no longer due when claimed.
    """

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    skipped: int = 0

    def __str__(self):
        return f"{self.sent} sent, {self.deferred} deferred, {self.failed} failed, {self.skipped} skipped"


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

    @property
    def longest_wait(self):
        """The longest a deferred message can legitimately wait: ``backoff_max`` plus clock skew between hosts.

        A deferred message due further ahead than this (its clock went back
        after it was deferred) is tried at once, and then waits as usual:
        no message is held for as long as a clock jumped back, and none is
        retried on every run.
        """
        return self.backoff_max + CLOCK_SKEW_ALLOWANCE

    def gives_up(self, queued_at, failures, now):
        """True when a message queued (or requeued) at ``queued_at`` must not be retried again."""
        too_old = now - queued_at >= self.max_age
        too_many = self.max_attempts is not None and failures >= self.max_attempts
        return too_old or too_many


def recipients_left(envelope, attempts):
    """The recipients that neither got the message nor were refused for good in ``attempts``.

    An operator's requeue (``Attempt.requeued``) forgets refusals before it;
    a recipient that got the message never gets it again.
    """
    accepted = set()
    for attempt in attempts:
        accepted.update(attempt.accepted)
    refused = set(_refused_for_good(attempts))
    return [rcpt for rcpt in envelope.recipients if rcpt not in accepted and rcpt not in refused]


@implementer(IMailQueueProcessor)
class QueueProcessor:
    """Deliver what is due in a queue. See ``IMailQueueProcessor``.

    ``queue`` is a directory path or an ``IMailQueue``. ``workers`` threads
    deliver in parallel, each over its own connection (the mailer keeps one
    per thread). ``clock`` returns Unix time (tests move it).
    ``progress(summary, total)``, if given, is called after each message
    of a run (from the worker threads, one at a time). The other keyword
    arguments are those of ``RetryPolicy``.
    """

    def __init__(self, queue, mailer, workers=1, clock=time.time, progress=None, **retry_settings):
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, not {workers!r}")
        self.queue = open_queue(queue)
        self.mailer = mailer
        self.workers = int(workers)
        self.retry_policy = RetryPolicy(**retry_settings)
        self._clock = clock
        self._progress = progress
        self._stopping = threading.Event()
        self._listener = None
        self._in_flight = set()
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<QueueProcessor {self.queue!r} via {self.mailer!r}, {self.workers} worker(s)>"

    # -- modes ---------------------------------------------------------------

    def run_once(self):
        """See ``IMailQueueProcessor.run_once``.

        ``stop()`` from another thread (or a signal handler) makes it return
        once the messages in hand are settled; a ``stop()`` that came before
        the run makes it return at once. Either way the request is used up:
        the next ``run_once`` runs normally.
        """
        try:
            return self._run_pass()
        finally:
            self._stopping.clear()

    def _run_pass(self):
        summary = RunSummary()
        housekeeping = self.queue.cleanup(self._clock())
        if any(housekeeping.values()):
            log.info("queue housekeeping: %s", housekeeping)
        if self._stopping.is_set():
            return summary
        claims, total = self._claims()
        try:
            with self._keeping_claims_alive():
                if self.workers == 1:
                    self._work(claims, summary, total)
                else:
                    threads = [
                        threading.Thread(target=self._work, args=(claims, summary, total),
                                         name=f"mailspool-worker-{number}")
                        for number in range(self.workers)
                    ]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
        finally:
            self._release_unused()
        if summary.sent or summary.deferred or summary.failed:
            log.info("queue run finished: %s", summary)
        return summary

    def _release_unused(self):
        """Give back what the queue leased ahead and was not delivered (a stop came first). Never raises."""
        release_unused = getattr(self.queue, "release_unused", None)
        if release_unused is None:
            return
        try:
            release_unused()
        except OSError as exc:
            log.warning("could not give back messages claimed ahead (their lease returns them): %s", exc)

    def run_forever(self, poll_interval=DEFAULT_POLL_INTERVAL):
        """Run until ``stop()``: drain the queue, then sleep until a commit or ``poll_interval``.

        A commit in this process, or in another process on this host, wakes
        the loop within milliseconds (``IMailQueue.announce``); the poll is
        the safety net (other hosts, scheduled and deferred messages). A
        ``stop()`` that came before the call makes it return at once (a
        signal is never lost in between); the request is then used up.
        """
        try:
            self._listener = self.queue.listener()
        except OSError as exc:
            log.warning("cannot listen for new mail in %r (%s); polling every %gs", self.queue, exc, poll_interval)
        try:
            while not self._stopping.is_set():
                try:
                    self._run_pass()
                except Exception:
                    log.exception("queue run failed; trying again in %gs", poll_interval)
                if self._stopping.is_set():
                    break
                if self._listener is not None:
                    self._listener.wait(poll_interval)
                else:
                    self._stopping.wait(poll_interval)
        finally:
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            self._stopping.clear()

    def stop(self):
        """Ask ``run_once``/``run_forever`` to return after the messages in hand. Never raises."""
        self._stopping.set()
        self.wake()

    def wake(self):
        """Make a sleeping ``run_forever`` look at the queue now. Never raises; safe in signal handlers."""
        listener = self._listener
        if listener is not None:
            listener.wake()

    # -- one worker ------------------------------------------------------------

    def _claims(self):
        """(next_claim, total): a thread-safe callable giving the next claim to deliver, or None when done.

        With a queue that offers ``claim_next`` (PostgreSQL), each call claims
        the next due message nobody holds; ``total`` is then an estimate for
        progress displays. Otherwise the due ids are listed once and claimed
        in turn; instead of a claim, one that cannot be read yields the
        outcome "failed", one taken by someone else "skipped".
        """
        max_wait = self.retry_policy.longest_wait
        claim_next = getattr(self.queue, "claim_next", None)
        if claim_next is not None:
            total = 0
            if self._progress is not None:  # an estimate, only for the display: counting costs a query
                counts = self.queue.counts()
                total = counts["ready"] + counts["deferred"]
            return (lambda: claim_next(self._clock(), max_wait=max_wait)), total
        due_ids = list(self.queue.due(self._clock(), max_wait=max_wait))
        due = iter(due_ids)
        lock = threading.Lock()

        def next_listed():
            with lock:
                queue_id = next(due, None)
            if queue_id is None:
                return None
            try:
                claim = self.queue.claim(queue_id, self._clock(), max_wait=max_wait)
            except QueueFileError as exc:
                log.error("unreadable queue entry %s moved to failed: %s", queue_id, exc)
                return "failed"
            return "skipped" if claim is None else claim  # None: another processor has it, or not due now

        return next_listed, len(due_ids)

    def _work(self, next_claim, summary, total):
        """Deliver claims from ``next_claim`` until it has none (or the processor is stopped)."""
        # One connection per worker for the whole run, where the mailer can.
        session = getattr(self.mailer, "session", contextlib.nullcontext)
        with session():
            while not self._stopping.is_set():
                claim = next_claim()
                if claim is None:
                    return
                outcome = claim if isinstance(claim, str) else self._process_claimed(claim)
                with self._lock:
                    setattr(summary, outcome, getattr(summary, outcome) + 1)
                    if self._progress is not None:
                        self._progress(summary, total)

    def _process_claimed(self, claim):
        with self._lock:
            self._in_flight.add(claim)
        try:
            return self._process(claim)
        finally:
            with self._lock:
                self._in_flight.discard(claim)

    @contextlib.contextmanager
    def _keeping_claims_alive(self):
        """Renew the claims in hand while they are being sent (a 25 MB message takes a while)."""
        done = threading.Event()

        def renew_periodically():
            while not done.wait(self.queue.claim_renewal_interval):
                with self._lock:
                    claims = list(self._in_flight)
                for claim in claims:
                    try:
                        self.queue.renew(claim)
                    except OSError:
                        pass  # settled meanwhile

        renewer = threading.Thread(target=renew_periodically, name="mailspool-claim-renewal", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            done.set()
            renewer.join()

    def _process(self, claim):
        """Attempt one claimed message and settle it; return 'sent', 'deferred' or 'failed'."""
        message_id = claim.envelope.message_id
        try:
            return self._attempt(claim)
        except Exception as exc:
            log.exception("unexpected error delivering %s (%s); moving it to failed/", message_id, claim.queue_id)
            attempt = Attempt(at=self._clock(), error=f"unexpected error: {type(exc).__name__}: {exc}")
            self.queue.fail(claim, attempt)
            deliverylog.record_attempt(claim, attempt, "failed", len(claim.attempts) + 1)
            return "failed"

    def _attempt(self, claim):
        envelope = claim.envelope
        recipients = recipients_left(envelope, claim.attempts)
        now = self._clock()
        if not recipients:
            # Everyone was served or refused for good by earlier attempts
            # (the processor died before settling): settle without sending.
            return self._settle(claim, Attempt(at=now, error="nothing left to send"), [*claim.attempts])
        try:
            data = claim.read()
        except QueueFileError as exc:
            return self._give_up(claim, Attempt(at=now, error=f"unreadable queue file: {exc}"))
        try:
            # zope.sendmail-style mailers return None for "all accepted".
            refused = self.mailer.send(envelope.sender, recipients, data) or {}
        except TransientDeliveryError as exc:
            attempt = Attempt(at=now, server=exc.server or self._server(), refused=exc.refused, error=str(exc))
            return self._retry_later(claim, attempt)
        except PermanentDeliveryError as exc:
            attempt = Attempt(at=now, server=exc.server or self._server(), refused=exc.refused, error=str(exc))
            return self._give_up(claim, attempt)
        accepted = tuple(rcpt for rcpt in recipients if rcpt not in refused)
        attempt = Attempt(at=now, server=self._server(), accepted=accepted, refused=dict(refused))
        if accepted:
            log.debug("sent %s (%s) to %d recipient(s) via %s",
                      envelope.message_id, claim.queue_id, len(accepted), attempt.server)
            events.notify(events.MailSentEvent(envelope.message_id, accepted))
        history = [*claim.attempts, attempt]
        if recipients_left(envelope, history):
            return self._retry_later(claim, attempt)
        return self._settle(claim, attempt, history)

    def _settle(self, claim, attempt, history):
        """Nobody is left to try: complete, or fail if someone was refused for good."""
        refused_for_good = _refused_for_good(history)
        if refused_for_good:
            reason = "refused for good: " + "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused_for_good.items())
            return self._give_up(claim, dataclasses.replace(attempt, error=reason))
        self.queue.complete(claim)
        deliverylog.record_attempt(claim, attempt, "sent", len(history))
        return "sent"

    def _server(self):
        return getattr(self.mailer, "server", "")

    def _give_up(self, claim, attempt):
        self.queue.fail(claim, attempt)
        log.debug("%s moved to failed/: %s", claim.envelope.message_id, attempt.error)
        deliverylog.record_attempt(claim, attempt, "failed", len(claim.attempts) + 1)
        _report_failures(claim, attempt)
        return "failed"

    def _retry_later(self, claim, attempt):
        envelope = claim.envelope
        failures = _consecutive_failures(claim.attempts) + (0 if attempt.accepted else 1)
        if self.retry_policy.gives_up(_age_reference(envelope, claim.attempts), max(failures, 1), attempt.at):
            reason = f"gave up after {len(claim.attempts) + 1} attempt(s): {attempt.error or _refusals(attempt)}"
            return self._give_up(claim, dataclasses.replace(attempt, error=reason))
        until = attempt.at + self.retry_policy.delay(max(failures, 1))
        self.queue.defer(claim, attempt, until)
        log.debug(
            "%s deferred until %s: %s", envelope.message_id,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(until)), attempt.error or _refusals(attempt),
        )
        deliverylog.record_attempt(claim, attempt, "partial" if attempt.accepted else "deferred",
                                   len(claim.attempts) + 1)
        return "deferred"


class QueueProcessorThread(threading.Thread):
    """A processor running in the application's own process (small deployments, development).

    Wakes within milliseconds of a commit made through a delivery on the
    same queue, polls every ``poll_interval`` seconds as a safety net.
    Keyword arguments other than ``poll_interval`` go to ``QueueProcessor``.
    ``stop()`` returns once the messages in hand are settled.
    """

    def __init__(self, queue, mailer, poll_interval=DEFAULT_POLL_INTERVAL, **processor_options):
        super().__init__(name="mailspool-processor", daemon=True)
        self.processor = QueueProcessor(queue, mailer, **processor_options)
        self.poll_interval = poll_interval

    def run(self):
        log.info("queue processor thread started for %r", self.processor.queue)
        self.processor.run_forever(self.poll_interval)
        log.info("queue processor thread stopped")

    def stop(self, timeout=None):
        """Stop the loop and wait (up to ``timeout`` seconds) for the thread to end."""
        self.processor.stop()
        self.join(timeout)


def _report_failures(claim, attempt):
    """One MailFailedEvent per recipient who will not get the message, with that recipient's reason."""
    if claim.envelope is None:
        return
    history = [*claim.attempts, attempt]
    served = {rcpt for past in history for rcpt in past.accepted}
    refused = _refused_for_good(history)
    for recipient in claim.envelope.recipients:
        if recipient not in served:
            reason = str(refused[recipient]) if recipient in refused else attempt.error
            events.notify(events.MailFailedEvent(claim.envelope.message_id, [recipient], reason))


def _refusals(attempt):
    return "; ".join(f"{rcpt}: {reply}" for rcpt, reply in attempt.refused.items()) or "no reason given"


def _since_last_requeue(attempts):
    for index in range(len(attempts) - 1, -1, -1):
        if attempts[index].requeued:
            return attempts[index + 1:]
    return list(attempts)


def _refused_for_good(attempts):
    """Recipients refused with a permanent reply since the last requeue, with that reply."""
    return {
        rcpt: reply
        for attempt in _since_last_requeue(attempts)
        for rcpt, reply in attempt.refused.items()
        if reply.is_permanent
    }


def _consecutive_failures(attempts):
    """How many attempts in a row, back from the last (and since a requeue), delivered to nobody new."""
    count = 0
    for attempt in reversed(_since_last_requeue(attempts)):
        if attempt.accepted:
            break
        count += 1
    return count


def _age_reference(envelope, attempts):
    """Queued time, or the last operator requeue: a retried message gets a new max_age."""
    requeues = [attempt.at for attempt in attempts if attempt.requeued]
    return max([envelope.enqueued_at, *requeues])
