"""The delivery log: one logfmt line per delivery attempt, for operators and log shippers.

Lines go to the ``mailspool.deliveries`` logger at INFO (WARNING for
deferrals, ERROR for failures); point a handler at it (the ``mailspool``
command's ``delivery_log`` setting does) to get a file of them. Fields, in
this order, always present::

    time=2026-11-23T18:30:00.123Z message_id=<…> queue_id=… sender=… recipients=a@x,b@y
    outcome=sent|partial|deferred|failed server=host:port attempt=2 delay=61.2 reply="…"

``outcome=partial`` means some recipients got the message in this attempt
while others were refused. ``delay`` is seconds since the message was
queued. ``reply`` holds the error or the refused recipients' replies, empty
on success. Message bodies and credentials never appear.
"""

import datetime
import logging

log = logging.getLogger("mailspool.deliveries")

_LEVELS = {"sent": logging.INFO, "partial": logging.WARNING, "deferred": logging.WARNING, "failed": logging.ERROR}


def logfmt_value(value):
    """Quote ``value`` for logfmt when it needs it (spaces, quotes, ``=``, or empty)."""
    text = str(value)
    if text and not any(char in text for char in ' "=\\\t\r\n'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def record_attempt(claim, attempt, outcome, attempt_number):
    """Write the delivery-log line for one attempt. Never raises."""
    if not log.isEnabledFor(_LEVELS[outcome]):
        return  # nobody listens: do not build the line
    try:
        envelope = claim.envelope
        if attempt.error:
            reply = attempt.error
        else:
            reply = "; ".join(f"{rcpt}: {refusal}" for rcpt, refusal in attempt.refused.items())
        fields = [
            ("time", datetime.datetime.fromtimestamp(attempt.at, datetime.timezone.utc)
             .strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"),
            ("message_id", envelope.message_id),
            ("queue_id", claim.queue_id),
            ("sender", envelope.sender),
            ("recipients", ",".join(envelope.recipients)),
            ("outcome", outcome),
            ("server", attempt.server),
            ("attempt", attempt_number),
            ("delay", f"{attempt.at - envelope.enqueued_at:.1f}"),
            ("reply", reply),
        ]
        log.log(_LEVELS[outcome], " ".join(f"{key}={logfmt_value(value)}" for key, value in fields))
    except Exception:  # the log must never break delivery
        logging.getLogger(__name__).exception("could not write a delivery-log line")
