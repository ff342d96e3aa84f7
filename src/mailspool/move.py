"""Moving every message from one queue to another (``mailspool move``): maildir to PostgreSQL and back.

Each message keeps its queue id, state, due time and attempt history. It is
first taken from the source so that no processor delivers it meanwhile
(ready and deferred messages are claimed; held and failed ones are left
alone by processors anyway), then written to the target under its queue
id, and only then removed from the source. A move interrupted at any point
is finished by running it again: a message already in the target is not
written twice (same queue id), it is only removed from the source. Messages
being delivered (claimed by a live processor) are left where they are and
counted; run the move again once processors are stopped.
"""

import logging
import math

log = logging.getLogger(__name__)

MOVABLE_STATES = ("ready", "deferred", "held", "failed")


def move_queue(source, target):
    """Move every message of ``source`` into ``target`` (both IMailQueue with ``insert_entry``).

    Returns ``{"moved": n, "already_there": n, "in_flight": n}``. Raises
    ``QueueError`` (an ``OSError``) if either queue fails; what was moved
    until then stays moved, and the rest is still in the source.
    """
    done = {"moved": 0, "already_there": 0, "in_flight": 0}
    for entry in list(source.entries()):
        if entry.state not in MOVABLE_STATES:
            done["in_flight"] += 1
            continue
        if entry.envelope is None:
            log.warning("not moving unreadable entry %s: %s", entry.queue_id, entry.problem)
            continue
        if entry.state in ("ready", "deferred"):
            claim = source.claim(entry.queue_id, now=math.inf)
            if claim is None:
                done["in_flight"] += 1  # a processor took it since the listing
                continue
            data, envelope, attempts = claim.read(), claim.envelope, claim.attempts
        else:
            claim = None
            try:
                data = source.read_message(entry.queue_id)
            except KeyError:
                continue  # deleted since the listing
            envelope, attempts = entry.envelope, entry.attempts
        try:
            written = target.insert_entry(entry.queue_id, entry.state, envelope, data, attempts,
                                          due_at=entry.due_at)
        except BaseException:
            if claim is not None:
                source.release(claim)
            raise
        done["moved" if written else "already_there"] += 1
        if claim is not None:
            source.discard(claim)
        else:
            source.delete(entry.queue_id)
        log.info("moved %s (%s, %s)", entry.queue_id, entry.envelope.message_id, entry.state)
    return done
