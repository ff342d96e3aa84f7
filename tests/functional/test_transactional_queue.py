"""A message reaches the queue if and only if its transaction commits (real files, real transactions)."""

import email.message
import os
import stat

import pytest
import transaction
from transaction.interfaces import NoTransaction

from mailspool import QueuedMailDelivery
from mailspool.envelope import Envelope
from mailspool.exceptions import QueueError, TransactionNotBegun

MESSAGE = (
    b"From: shop@example.org\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: Hello\r\n"
    b"Message-Id: <fixed-1@example.org>\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Body line one.\r\n"
    b".A line starting with a dot.\r\n"
)


def files_in(queue_path, subdir):
    return sorted(os.listdir(queue_path / subdir))


def read_queue_file(path):
    with open(path, "rb") as stream:
        envelope = Envelope.read_from(stream, str(path))
        return envelope, stream.read()


class RaisingDataManager:
    """A second resource whose vote fails, like a database refusing to commit."""

    def __init__(self, manager):
        self.transaction_manager = manager

    def sortKey(self):
        return "~raising"

    def abort(self, txn):
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def tpc_vote(self, txn):
        raise RuntimeError("the database refused to commit")


def test_commit_puts_exactly_one_file_with_the_exact_bytes_in_the_ready_part(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        message_id = delivery.send("shop@example.org", ["alice@example.org", "bob@example.org"], MESSAGE)

    assert message_id == "<fixed-1@example.org>"
    ready = files_in(queue_path, "new")
    assert len(ready) == 1
    envelope, data = read_queue_file(queue_path / "new" / ready[0])
    assert data == MESSAGE
    assert envelope.sender == "shop@example.org"
    assert envelope.recipients == ("alice@example.org", "bob@example.org")
    assert envelope.message_id == message_id
    assert files_in(queue_path, "tmp") == []


def test_abort_leaves_nothing_anywhere(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    manager.begin()
    delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
    manager.abort()

    for subdir in ("tmp", "new", "active", "deferred", "failed", "log"):
        assert files_in(queue_path, subdir) == [], subdir


def test_nothing_is_visible_before_the_commit(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
        assert files_in(queue_path, "new") == []
        assert files_in(queue_path, "tmp") == []
    assert len(files_in(queue_path, "new")) == 1


def test_two_messages_in_one_transaction_are_both_queued(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        first = delivery.send("shop@example.org", ["alice@example.org"], MESSAGE.replace(b"fixed-1", b"fixed-a"))
        second = delivery.send("shop@example.org", ["bob@example.org"], MESSAGE.replace(b"fixed-1", b"fixed-b"))

    ready = files_in(queue_path, "new")
    assert len(ready) == 2
    ids = {read_queue_file(queue_path / "new" / name)[0].message_id for name in ready}
    assert ids == {first, second}


def test_savepoint_rollback_drops_only_the_message_sent_after_it(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager as txn:
        kept = delivery.send("shop@example.org", ["alice@example.org"], MESSAGE.replace(b"fixed-1", b"kept"))
        savepoint = txn.savepoint()
        delivery.send("shop@example.org", ["bob@example.org"], MESSAGE.replace(b"fixed-1", b"dropped"))
        savepoint.rollback()

    ready = files_in(queue_path, "new")
    assert [read_queue_file(queue_path / "new" / name)[0].message_id for name in ready] == [kept]


def test_savepoint_rollback_then_sending_again_queues_the_new_message(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager as txn:
        savepoint = txn.savepoint()
        delivery.send("shop@example.org", ["bob@example.org"], MESSAGE.replace(b"fixed-1", b"dropped"))
        savepoint.rollback()
        sent_again = delivery.send("shop@example.org", ["bob@example.org"], MESSAGE.replace(b"fixed-1", b"again"))

    ready = files_in(queue_path, "new")
    assert [read_queue_file(queue_path / "new" / name)[0].message_id for name in ready] == [sent_again]


def test_a_failing_vote_of_another_resource_queues_nothing(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    manager.begin()
    delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
    manager.get().join(RaisingDataManager(manager))
    with pytest.raises(RuntimeError, match="refused to commit"):
        manager.commit()
    manager.abort()

    for subdir in ("tmp", "new"):
        assert files_in(queue_path, subdir) == [], subdir


def test_an_unwritable_queue_raises_in_vote_and_aborts_the_other_resources(queue_path, manager):
    """The queue votes first, so a database that commits in its own vote is not committed."""
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    (queue_path / "tmp").rmdir()
    (queue_path / "tmp").write_text("a file where the staging directory should be")
    database_votes = []

    class RecordingDataManager(RaisingDataManager):
        def tpc_vote(self, txn):
            database_votes.append(txn)

    manager.begin()
    delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
    manager.get().join(RecordingDataManager(manager))
    with pytest.raises(QueueError, match=str(queue_path)) as raised:
        manager.commit()
    manager.abort()

    assert isinstance(raised.value, OSError)
    assert database_votes == []
    assert files_in(queue_path, "new") == []


def test_bare_lf_bytes_are_queued_with_crlf(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        delivery.send("shop@example.org", ["alice@example.org"], MESSAGE.replace(b"\r\n", b"\n"))

    (name,) = files_in(queue_path, "new")
    assert read_queue_file(queue_path / "new" / name)[1] == MESSAGE


def test_an_email_message_object_is_queued(queue_path, manager):
    message = email.message.EmailMessage()
    message["From"] = "Zoë <shop@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = "Grüße"
    message.set_content("Schöne Grüße\n")
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        message_id = delivery.send("shop@example.org", ["alice@example.org"], message)

    (name,) = files_in(queue_path, "new")
    envelope, data = read_queue_file(queue_path / "new" / name)
    assert envelope.message_id == message_id
    assert b"\r\nMessage-Id: " + message_id.encode() + b"\r\n" in data
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße"
    assert parsed.get_content().splitlines() == ["Schöne Grüße"]


def test_queue_files_are_private(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)

    (name,) = files_in(queue_path, "new")
    assert stat.S_IMODE(os.stat(queue_path / "new" / name).st_mode) == 0o600
    for subdir in ("", "tmp", "new", "active", "deferred", "hold", "failed", "log"):
        assert stat.S_IMODE(os.stat(queue_path / subdir).st_mode) & 0o077 == 0, subdir


def test_explicit_manager_joins_its_own_transaction_not_the_global_one(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    transaction.manager.begin()
    try:
        with manager:
            delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
        assert len(files_in(queue_path, "new")) == 1
    finally:
        transaction.manager.abort()
    assert len(files_in(queue_path, "new")) == 1


def test_sending_outside_a_begun_explicit_transaction_is_a_clear_error(queue_path, manager):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with pytest.raises(TransactionNotBegun, match="no transaction was begun") as raised:
        delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
    assert isinstance(raised.value, NoTransaction)
    assert isinstance(raised.value, RuntimeError)
    assert files_in(queue_path, "tmp") == []


def test_the_default_manager_is_the_global_one(queue_path):
    delivery = QueuedMailDelivery(queue_path)
    with transaction.manager:
        delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
    assert len(files_in(queue_path, "new")) == 1


def test_a_queue_path_that_is_a_file_is_refused_naming_it(tmp_path):
    not_a_directory = tmp_path / "queue"
    not_a_directory.write_text("")
    with pytest.raises(QueueError, match=f"{not_a_directory}.*not a directory"):
        QueuedMailDelivery(not_a_directory)
