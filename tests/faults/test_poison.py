"""Case 11: what is not a message never blocks the queue and is never followed out of it."""

import os

import pytest

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.envelope import Attempt, Envelope
from mailspool.maildir import MaildirQueue

GOOD = b"From: shop@example.org\r\nSubject: good {n}\r\nMessage-Id: <good-{n}@example.org>\r\n\r\nbody\r\n"
VALID_PREFIX = Envelope("shop@example.org", ("a@example.org",), "<x@example.org>", 0.0).to_bytes()

POISON = {
    "corrupt-envelope": b"MAILSPOOL 1\n{\"sender\": 1, this is not json}\nSubject: x\r\n\r\nbody\r\n",
    "truncated": VALID_PREFIX[: len(VALID_PREFIX) // 2],
    "empty": b"",
    "binary-garbage": bytes(range(256)) * 64,
    "future-format": b"MAILSPOOL 7\n{}\nSubject: x\r\n\r\n",
}


def commit_good(queue_path, manager, count):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        for number in range(count):
            delivery.send("shop@example.org", ["a@example.org"], GOOD.replace(b"{n}", b"%d" % number))


def reasons(queue_path):
    found = {}
    for name in os.listdir(queue_path / "failed"):
        with open(queue_path / "log" / name, "rb") as log_file:
            found[name] = Attempt.from_line(log_file.readline()).error
    return found


@pytest.mark.parametrize("state_dir", ["new", "deferred"])
def test_bad_files_are_moved_aside_with_a_reason_and_the_rest_is_delivered(scripted_server, queue_path, manager,
                                                                           state_dir):
    commit_good(queue_path, manager, 3)
    for name, content in POISON.items():
        path = queue_path / state_dir / f"0.{name}"
        path.write_bytes(content)
        os.utime(path, (0, 0))  # due long ago, when in deferred/
    processor = QueueProcessor(queue_path, SMTPMailer(scripted_server.host, scripted_server.port, tls="none"))

    summary = processor.run_once()

    assert summary.sent == 3 and summary.failed == len(POISON)
    assert len(scripted_server.handler.received) == 3
    found = reasons(queue_path)
    assert set(found) == {f"0.{name}" for name in POISON}
    assert "envelope is not valid" in found["0.corrupt-envelope"]
    assert "truncated" in found["0.truncated"]
    assert "not a mailspool queue file" in found["0.empty"]
    assert "not a mailspool queue file" in found["0.binary-garbage"]
    assert "format '7' is not supported" in found["0.future-format"]
    for name, content in POISON.items():
        assert (queue_path / "failed" / f"0.{name}").read_bytes() == content  # kept, untouched
    assert processor.run_once().failed == 0  # set aside once, not again and again


def test_a_directory_where_a_message_should_be_is_moved_aside(scripted_server, queue_path, manager):
    commit_good(queue_path, manager, 1)
    (queue_path / "new" / "0.a-directory").mkdir()
    (queue_path / "new" / "0.a-directory" / "inside").write_bytes(b"kept")

    summary = QueueProcessor(queue_path, SMTPMailer(scripted_server.host, scripted_server.port,
                                                    tls="none")).run_once()

    assert (summary.sent, summary.failed) == (1, 1)
    assert (queue_path / "failed" / "0.a-directory" / "inside").read_bytes() == b"kept"
    assert "not a regular file" in reasons(queue_path)["0.a-directory"]


@pytest.mark.parametrize("target_kind", ["file", "directory", "dangling"])
def test_a_symlink_is_never_followed_out_of_the_queue(scripted_server, queue_path, manager, tmp_path, target_kind):
    outside = tmp_path / "outside"
    if target_kind == "file":
        outside.write_bytes(VALID_PREFIX + b"Subject: must never be sent\r\n\r\nsecret\r\n")
    elif target_kind == "directory":
        outside.mkdir()
    commit_good(queue_path, manager, 1)
    os.symlink(outside, queue_path / "new" / "0.link")
    before = outside.read_bytes() if target_kind == "file" else None

    summary = QueueProcessor(queue_path, SMTPMailer(scripted_server.host, scripted_server.port,
                                                    tls="none")).run_once()

    assert (summary.sent, summary.failed) == (1, 1)
    assert [b"secret" in data for _, _, data in scripted_server.handler.received] == [False]
    assert os.path.islink(queue_path / "failed" / "0.link")
    assert "symbolic link" in reasons(queue_path)["0.link"]
    if target_kind == "file":
        assert outside.read_bytes() == before  # neither read for sending nor moved nor changed
    assert os.path.lexists(outside) == (target_kind != "dangling")


def test_status_and_list_report_bad_entries_without_failing(queue_path, manager):
    commit_good(queue_path, manager, 1)
    (queue_path / "new" / "0.garbage").write_bytes(b"\x00\x01")
    entries = {entry.queue_id: entry for entry in MaildirQueue(queue_path).entries()}
    assert entries["0.garbage"].envelope is None and "not a mailspool" in entries["0.garbage"].problem
    assert sum(entry.envelope is not None for entry in entries.values()) == 1


def test_a_file_that_becomes_unreadable_after_the_claim_is_failed_with_the_reason(scripted_server, queue_path,
                                                                                  manager):
    commit_good(queue_path, manager, 1)
    queue = MaildirQueue(queue_path)
    (queue_id,) = queue.due()
    claim = queue.claim(queue_id)
    os.truncate(claim.path, 10)  # the file shrinks under the processor (disk trouble, an operator)
    processor = QueueProcessor(queue, SMTPMailer(scripted_server.host, scripted_server.port, tls="none"))

    outcome = processor._process(claim)

    assert outcome == "failed"
    assert queue.counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 1}
    assert "the message is gone (file truncated to 10 bytes)" in reasons(queue_path)[queue_id]
    assert scripted_server.handler.mails == 0  # nothing half-sent
