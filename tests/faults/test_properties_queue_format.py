"""Case 21 (a): property-based tests of the queue-file format and of the retry bookkeeping.

Envelope.to_bytes / from_prefix / read_from and Attempt.to_line / from_line
must round-trip anything an application can put in them (non-ASCII,
JSON-hostile characters, envelopes longer than the first read), both in
memory and through a real MaildirQueue. Hypothesis runs derandomized with a
fixed number of examples, so CI sees the same cases on every run.
"""

import io
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailspool.envelope import PREFIX_CHUNK, Attempt, Envelope
from mailspool.maildir import MaildirQueue
from mailspool.processor import RetryPolicy, recipients_left
from mailspool.reply import SMTPReply

QUICK = settings(max_examples=200, deadline=None, derandomize=True, database=None)
ON_DISK = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

# Any Unicode text that can be encoded (lone surrogates cannot be written
# as UTF-8; prepare() refuses them before they reach an envelope — see
# test_properties_prepare.py), with the characters JSON and line-based
# parsing care about made likely.
TRICKY = st.sampled_from(["\n", "\r", "\0", '"', "\\", "\u2028", "\x85", "é", "😀", "\ufeff", "}", "{"])
text = st.lists(st.one_of(st.characters(), TRICKY), max_size=40).map("".join)
times = st.floats(min_value=-1e10, max_value=1e11, allow_nan=False, allow_infinity=False)
envelopes = st.builds(
    Envelope,
    sender=text,
    recipients=st.lists(text, min_size=1, max_size=5).map(tuple),
    message_id=text,
    enqueued_at=times,
    not_before=st.none() | times,
)
message_bytes = st.binary(max_size=300)
replies = st.builds(SMTPReply, code=st.integers(min_value=200, max_value=599), text=text)
attempts = st.builds(
    Attempt,
    at=times,
    server=text,
    accepted=st.lists(text, max_size=3).map(tuple),
    refused=st.dictionaries(text, replies, max_size=3),
    error=text,
    requeued=st.booleans(),
)


@QUICK
@given(envelopes, message_bytes)
def test_an_envelope_round_trips_through_its_prefix(envelope, message):
    prefix = envelope.to_bytes()
    assert prefix.startswith(b"MAILSPOOL 1\n") and prefix.count(b"\n") == 2  # two lines, whatever the text

    parsed, offset = Envelope.from_prefix(prefix + message, "q")

    assert parsed == envelope
    assert offset == len(prefix)


@QUICK
@given(envelopes, message_bytes, st.integers(min_value=0, max_value=3 * PREFIX_CHUNK))
def test_read_from_leaves_the_stream_at_the_first_message_byte_even_past_the_first_chunk(envelope, message, padding):
    # Padding the message id makes envelopes longer than the first read (PREFIX_CHUNK).
    envelope = Envelope(envelope.sender, envelope.recipients, envelope.message_id + "x" * padding,
                        envelope.enqueued_at, envelope.not_before)
    stream = io.BytesIO(envelope.to_bytes() + message)

    assert Envelope.read_from(stream, "q") == envelope
    assert stream.read() == message


@ON_DISK
@given(envelopes, message_bytes, st.integers(min_value=0, max_value=3 * PREFIX_CHUNK))
def test_read_at_finds_the_first_message_byte_of_a_file_even_past_the_first_chunk(envelope, message, padding):
    envelope = Envelope(envelope.sender, envelope.recipients, envelope.message_id + "x" * padding,
                        envelope.enqueued_at, envelope.not_before)
    with tempfile.TemporaryFile() as file:
        file.write(envelope.to_bytes() + message)
        file.flush()
        parsed, offset = Envelope.read_at(file.fileno(), "q")
        file.seek(offset)
        assert (parsed, file.read()) == (envelope, message)


@QUICK
@given(attempts)
def test_an_attempt_is_one_line_and_round_trips(attempt):
    line = attempt.to_line()
    assert line.endswith(b"\n") and len(line.splitlines()) == 1  # the log is split into lines as bytes

    assert Attempt.from_line(line) == attempt


@ON_DISK
@given(envelopes, st.binary(min_size=1, max_size=300), st.lists(attempts, min_size=1, max_size=3))
def test_what_the_queue_stores_is_what_it_gives_back(envelope, message, history):
    # (An empty message is refused by prepare(), and a claim reads an empty one as truncated.)
    with tempfile.TemporaryDirectory() as scratch:
        queue = MaildirQueue(os.path.join(scratch, "queue"))
        staged = queue.add(envelope, message)
        staged.publish()
        queue_id = staged.queue_id
        entry = queue.entry(queue_id)
        assert entry.envelope == envelope and entry.size == len(message)

        for number, attempt in enumerate(history):
            claim = queue.claim(queue_id, now=float("inf"))  # whatever its due time
            assert claim.envelope == envelope and claim.read() == message
            assert claim.attempts == history[:number]
            queue.defer(claim, attempt, until=1_000_000.0 + number)

        claim = queue.claim(queue_id, now=float("inf"))
        assert claim.attempts == history
        assert tuple(queue.entry(queue_id).attempts) == tuple(history)
        assert queue.read_message(queue_id) == message
        queue.complete(claim)
        assert queue.counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}


addresses = st.sampled_from(["a@example.org", "b@example.org", "c@example.org", "zoë@example.org"])
outcomes = st.builds(
    Attempt,
    at=st.just(0.0),
    accepted=st.lists(addresses, max_size=2).map(tuple),
    refused=st.dictionaries(addresses, st.sampled_from([SMTPReply(450, "busy"), SMTPReply(550, "no such user")]),
                            max_size=2),
    requeued=st.booleans(),
)


@QUICK
@given(st.lists(addresses, min_size=1, max_size=4, unique=True), st.lists(outcomes, max_size=6))
def test_recipients_left_never_resends_to_an_accepted_recipient(recipients, history):
    envelope = Envelope("shop@example.org", tuple(recipients), "<x@example.org>", 0.0)
    accepted = {rcpt for attempt in history for rcpt in attempt.accepted}

    left = recipients_left(envelope, history)

    assert set(left) <= set(recipients) and not set(left) & accepted
    assert left == [rcpt for rcpt in recipients if rcpt in left]  # envelope order kept
    last_requeue = max((i for i, a in enumerate(history) if a.requeued), default=-1)
    for attempt in history[last_requeue + 1:]:
        for rcpt, reply in attempt.refused.items():
            if reply.is_permanent:
                assert rcpt not in left
    if not history:
        assert left == recipients


@QUICK
@given(st.floats(min_value=0.001, max_value=1e6), st.floats(min_value=0.001, max_value=1e7),
       st.floats(min_value=0.0, max_value=1.0), st.integers(min_value=1, max_value=10_000))
def test_no_back_off_is_longer_than_longest_wait(backoff_min, backoff_max, jitter, failures):
    # The clock-jump rule (test_clock_jumps.py) treats a retry due further ahead than
    # longest_wait as set by a clock that went back; a real back-off must never be that long.
    policy = RetryPolicy(backoff_min=backoff_min, backoff_max=backoff_max, jitter=jitter)

    delay = policy.delay(failures)

    assert 0 <= delay <= policy.backoff_max < policy.longest_wait
    assert delay >= min(backoff_max, backoff_min * 2 ** min(failures - 1, 62)) * (1 - jitter) * (1 - 1e-9)
