"""MaildirQueue on real files: names, claims, settling, poison entries and housekeeping."""

import fcntl
import os
import re
import threading
import time

import pytest

from mailspool.envelope import Attempt, Envelope
from mailspool.exceptions import QueueError, QueueFileError
from mailspool.maildir import MaildirQueue, unique_name
from mailspool.reply import SMTPReply

DATA = b"Subject: x\r\n\r\nbody\r\n"


def enqueue(queue, number=0):
    envelope = Envelope("shop@example.org", ("a@example.org", "b@example.org"), f"<{number}@example.org>", time.time())
    staged = queue.add(envelope, DATA)
    staged.publish()
    return staged.queue_id


def test_unique_names_follow_the_maildir_rules():
    names = {unique_name() for _ in range(2000)}
    assert len(names) == 2000
    for name in names:
        assert re.fullmatch(r"\d+\.M\d{6}P\d+Q\d+R[0-9a-f]{8}\.[A-Za-z0-9._-]+", name), name


def test_a_missing_queue_is_an_error_when_not_creating(tmp_path):
    with pytest.raises(QueueError, match=f"{tmp_path / 'absent'} does not exist"):
        MaildirQueue(tmp_path / "absent", create=False)


def test_staged_messages_are_invisible_until_published(queue):
    envelope = Envelope("shop@example.org", ("a@example.org",), "<s@example.org>", time.time())
    staged = queue.add(envelope, DATA)
    assert list(queue.due()) == []
    staged.publish()
    assert list(queue.due()) == [staged.queue_id]


def test_discard_is_idempotent(queue):
    staged = queue.add(Envelope("", ("a@example.org",), "<d@example.org>", 0.0), DATA)
    staged.discard()
    staged.discard()
    assert os.listdir(os.path.join(queue.path, "tmp")) == []


def test_a_message_is_claimed_once(queue):
    queue_id = enqueue(queue)
    first = queue.claim(queue_id)
    assert first is not None and first.read() == DATA
    assert queue.claim(queue_id) is None
    assert queue.counts()["active"] == 1


def test_threads_racing_claim_each_message_exactly_once(queue):
    ids = [enqueue(queue, number) for number in range(200)]
    claimed = []
    start = threading.Barrier(8)

    def worker():
        start.wait(timeout=30)
        for queue_id in ids:
            claim = queue.claim(queue_id)
            if claim is not None:
                claimed.append(claim.queue_id)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(claimed) == sorted(ids)


def test_complete_removes_the_message_and_its_log(queue):
    claim = queue.claim(enqueue(queue))
    queue.defer(claim, Attempt(at=time.time(), error="451 later"), until=0)
    claim = queue.claim(claim.queue_id)
    queue.complete(claim)
    assert queue.counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}
    assert os.listdir(os.path.join(queue.path, "log")) == []


def test_a_deferred_message_is_due_at_its_time_and_keeps_its_attempts(queue):
    queue_id = enqueue(queue)
    before = os.stat(os.path.join(queue.path, "new", queue_id)).st_ino
    claim = queue.claim(queue_id)
    until = time.time() + 600
    attempt = Attempt(at=time.time(), server="mx:25", accepted=("a@example.org",),
                      refused={"b@example.org": SMTPReply(450, "busy")}, error="")
    queue.defer(claim, attempt, until)

    assert queue.counts()["deferred"] == 1
    assert list(queue.due()) == []
    assert queue.claim(queue_id) is None  # not due yet
    assert list(queue.due(now=until)) == [queue_id]
    claim = queue.claim(queue_id, now=until)
    assert claim.attempts == [attempt]
    assert claim.read() == DATA
    # Deferring moved the same file: the message bytes were not rewritten.
    assert os.stat(claim.path).st_ino == before


def test_fail_keeps_the_message_and_the_reason(queue):
    claim = queue.claim(enqueue(queue))
    queue.fail(claim, Attempt(at=time.time(), error="550 no such user"))
    assert queue.counts()["failed"] == 1
    assert list(queue.due()) == []
    with open(os.path.join(queue.path, "log", claim.queue_id), "rb") as log_file:
        assert Attempt.from_line(log_file.readline()).error == "550 no such user"


def test_release_makes_the_message_due_again(queue):
    claim = queue.claim(enqueue(queue))
    queue.release(claim)
    assert list(queue.due()) == [claim.queue_id]
    assert queue.claim(claim.queue_id) is not None


@pytest.mark.parametrize("content, reason", [
    (b"", "not a mailspool queue file"),
    (b"MAILSPOOL 1\n{\"sender\": \"a\"", "truncated"),
    (b"MAILSPOOL 1\n{\"sender\": \"a\"}\nbody", "envelope is not valid"),
    (b"MAILSPOOL 9\n{}\n", "format '9' is not supported"),
    (bytes(range(256)) * 4, "not a mailspool queue file"),
])
def test_an_unreadable_file_is_moved_to_failed_with_the_reason(queue, content, reason):
    good = enqueue(queue)
    with open(os.path.join(queue.path, "new", "0.bad"), "wb") as bad_file:
        bad_file.write(content)

    with pytest.raises(QueueFileError, match=reason):
        queue.claim("0.bad")
    assert os.listdir(os.path.join(queue.path, "failed")) == ["0.bad"]
    with open(os.path.join(queue.path, "log", "0.bad"), "rb") as log_file:
        assert reason in Attempt.from_line(log_file.readline()).error
    assert queue.claim(good) is not None


def test_a_symlink_is_set_aside_and_never_followed(queue, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    os.symlink(outside, os.path.join(queue.path, "new", "1.link"))

    with pytest.raises(QueueFileError, match="symbolic link"):
        queue.claim("1.link")
    assert os.path.islink(os.path.join(queue.path, "failed", "1.link"))
    assert outside.read_bytes() == b"secret"


def test_a_directory_is_set_aside(queue):
    os.mkdir(os.path.join(queue.path, "new", "2.dir"))
    with pytest.raises(QueueFileError, match="not a regular file"):
        queue.claim("2.dir")
    assert os.path.isdir(os.path.join(queue.path, "failed", "2.dir"))


def test_dot_files_are_ignored(queue):
    with open(os.path.join(queue.path, "new", ".hidden"), "wb") as hidden:
        hidden.write(b"x")
    assert list(queue.due()) == []
    assert queue.counts()["ready"] == 0


def claim_as_other_host(queue, queue_id, silent_for):
    """Put a message where a processor on another host sharing the directory would have claimed it."""
    host_dir = os.path.join(queue.path, "active", "other-host.example")
    os.makedirs(host_dir, exist_ok=True)
    path = os.path.join(host_dir, queue_id)
    os.rename(os.path.join(queue.path, "new", queue_id), path)
    then = time.time() - silent_for
    os.utime(path, (then, then))
    return path


def test_a_claim_on_another_host_returns_only_once_it_is_stale(tmp_path):
    queue = MaildirQueue(tmp_path / "queue", stale_claim_timeout=300)
    fresh = enqueue(queue, 1)
    stale = enqueue(queue, 2)
    claim_as_other_host(queue, fresh, silent_for=10)
    claim_as_other_host(queue, stale, silent_for=301)

    assert queue.cleanup()["dead_claims_released"] == 1
    assert list(queue.due()) == [stale]
    assert queue.counts()["active"] == 1


def test_a_locked_claim_is_never_taken_however_old(tmp_path):
    queue = MaildirQueue(tmp_path / "queue", stale_claim_timeout=300)
    path = claim_as_other_host(queue, enqueue(queue), silent_for=3600)
    holder = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert queue.cleanup()["dead_claims_released"] == 0
    finally:
        os.close(holder)
    assert queue.cleanup()["dead_claims_released"] == 1


def test_renew_moves_the_claims_heartbeat_forward(queue):
    claim = queue.claim(enqueue(queue))
    old = time.time() - 1000
    os.utime(claim.path, (old, old))
    queue.renew(claim)
    assert os.stat(claim.path).st_mtime > old + 900


def test_a_scheduled_message_waits_in_deferred_until_its_time(queue):
    not_before = time.time() + 3600
    envelope = Envelope("shop@example.org", ("a@example.org",), "<later@example.org>", time.time(), not_before)
    staged = queue.add(envelope, DATA)
    staged.publish()

    assert queue.counts()["deferred"] == 1
    assert list(queue.due()) == []
    assert queue.claim(staged.queue_id) is None
    claim = queue.claim(staged.queue_id, now=not_before)
    assert claim.envelope.not_before == not_before


def test_entries_describe_every_state_without_reading_bodies(queue):
    ready = enqueue(queue, 1)
    deferred = queue.claim(enqueue(queue, 2))
    queue.defer(deferred, Attempt(at=time.time(), error="451 later"), until=time.time() + 600)
    failed = queue.claim(enqueue(queue, 3))
    queue.fail(failed, Attempt(at=time.time(), error="550 no"))
    active = queue.claim(enqueue(queue, 4))
    with open(os.path.join(queue.path, "new", "9.broken"), "wb") as broken:
        broken.write(b"garbage")

    by_id = {entry.queue_id: entry for entry in queue.entries()}

    assert by_id[ready].state == "ready" and by_id[ready].envelope.message_id == "<1@example.org>"
    assert by_id[ready].size == len(DATA)
    assert by_id[deferred.queue_id].state == "deferred" and by_id[deferred.queue_id].last_reply == "451 later"
    assert by_id[deferred.queue_id].due_at > time.time() + 500
    assert not by_id[deferred.queue_id].scheduled
    assert by_id[failed.queue_id].state == "failed" and by_id[failed.queue_id].last_reply == "550 no"
    assert by_id[active.queue_id].state == "active"
    assert "not a mailspool queue file" in by_id["9.broken"].problem
    assert [e.queue_id for e in queue.entries(["failed"])] == [failed.queue_id]
    assert queue.entry(failed.queue_id).state == "failed"
    assert queue.entry("no-such-id") is None
    assert queue.read_message(ready) == DATA


def test_requeue_a_failed_message_keeps_its_history(queue):
    claim = queue.claim(enqueue(queue))
    queue.fail(claim, Attempt(at=time.time(), refused={"a@example.org": SMTPReply(550, "no")}, error="550 no"))

    assert queue.requeue(claim.queue_id) == "failed"

    assert list(queue.due()) == [claim.queue_id]
    attempts = queue.claim(claim.queue_id).attempts
    assert [a.requeued for a in attempts] == [False, True]
    assert attempts[0].error == "550 no"


def test_hold_and_unhold(queue):
    queue_id = enqueue(queue)
    assert queue.hold(queue_id) == "ready"
    assert list(queue.due()) == [] and queue.claim(queue_id) is None
    assert queue.counts()["held"] == 1
    assert queue.hold(queue_id) is None
    assert queue.unhold(queue_id) == "held"
    assert list(queue.due()) == [queue_id]


def test_delete_removes_the_message_and_its_log_but_never_a_claimed_one(queue):
    deleted = queue.claim(enqueue(queue, 1))
    queue.fail(deleted, Attempt(at=time.time(), error="550"))
    active = queue.claim(enqueue(queue, 2))

    assert queue.delete(deleted.queue_id) == "failed"
    assert queue.delete(active.queue_id) is None
    assert queue.entry(deleted.queue_id) is None
    assert os.listdir(os.path.join(queue.path, "log")) == []
    assert queue.counts()["active"] == 1


@pytest.mark.parametrize("bad_id", ["../new", "", ".", "..", "a/b", ".hidden"])
def test_operator_actions_refuse_ids_that_are_paths(queue, bad_id):
    enqueue(queue)
    assert queue.delete(bad_id) is None
    assert queue.hold(bad_id) is None
    assert queue.requeue(bad_id) is None
    assert queue.entry(bad_id) is None
