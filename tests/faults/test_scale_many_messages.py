"""Case 16: a queue with many messages (5,000 here; bench/many_messages.py measures 100,000).

``mailspool status`` and ``mailspool list`` still answer, and the processor
starts delivering without reading every queue file first: when the mailer
is asked to send the first message, the processor must have opened only a
handful of queue files (the one it claimed), not all of them. The count is
taken by wrapping ``os.open`` and ``open`` in this process, so it does not
depend on timing.

The queue is filled by ``harness.fill_queue``, as bench/many_messages.py fills
one: format-1 files written directly (no fsync; set-up, not what is tested),
in every state.
"""

import builtins
import json
import os
import subprocess
import sys

import pytest
from harness import FILL_SHARES, fill_queue

from mailspool import QueueProcessor
from mailspool.maildir import STATE_DIRS, MaildirQueue

COUNT = 5000


@pytest.fixture(scope="module")
def big_queue(tmp_path_factory):
    queue = MaildirQueue(tmp_path_factory.mktemp("many") / "queue")
    fill_queue(queue, COUNT, body_size=500)
    return queue


def expected_counts():
    return {"ready": COUNT * 3 // 5, "active": 0, "deferred": COUNT // 5, "held": 0, "failed": COUNT // 5}


def run_cli(queue, *arguments):
    config = os.path.join(os.path.dirname(queue.path), "empty.ini")
    with open(config, "w") as ini:
        ini.write("[mailspool]\n")
    result = subprocess.run([sys.executable, "-m", "mailspool", *arguments, "--config", config, queue.path],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_answers_on_a_large_queue(big_queue):
    status = json.loads(run_cli(big_queue, "status", "--json"))

    assert status["counts"] == expected_counts()
    assert status["last_error"]["error"].endswith("450 4.2.1 mailbox busy")


def test_list_answers_on_a_large_queue(big_queue):
    listed = json.loads(run_cli(big_queue, "list", "--json"))

    assert len(listed) == COUNT
    assert {state: sum(1 for entry in listed if entry["state"] == state) for state in FILL_SHARES} == \
        {state: count for state, count in expected_counts().items() if state in FILL_SHARES}
    assert all(entry["problem"] is None for entry in listed)


class OpenCounter:
    """Which queue files (in new/, deferred/, failed/) this process has opened, by name."""

    def __init__(self, queue):
        self.directories = tuple(os.path.join(queue.path, STATE_DIRS[state]) + os.sep
                                 for state in ("ready", "deferred", "failed"))
        self.names = set()

    def note(self, path):
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.fsdecode(path)
            if path.startswith(self.directories):
                self.names.add(os.path.basename(path))


class FirstSendProbe:
    """A mailer that accepts, records how many queue files had been opened at its first send, and stops the run."""

    def __init__(self, counter):
        self.counter = counter
        self.opened_at_first_send = None
        self.processor = None

    def send(self, fromaddr, toaddrs, message):
        if self.opened_at_first_send is None:
            self.opened_at_first_send = len(self.counter.names)
            self.processor.stop()  # the run returns once this message is settled
        return {}


def test_the_first_delivery_comes_before_every_file_has_been_opened(big_queue, monkeypatch):
    counter = OpenCounter(big_queue)
    real_os_open, real_open = os.open, builtins.open

    def counting_os_open(path, *args, **kwargs):
        counter.note(path)
        return real_os_open(path, *args, **kwargs)

    def counting_open(file, *args, **kwargs):
        counter.note(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting_os_open)
    monkeypatch.setattr(builtins, "open", counting_open)
    mailer = FirstSendProbe(counter)
    processor = QueueProcessor(big_queue, mailer)
    mailer.processor = processor

    summary = processor.run_once()
    monkeypatch.undo()

    assert summary.sent == 1
    # The claimed file itself, and nothing like one open per queued message.
    assert mailer.opened_at_first_send is not None and mailer.opened_at_first_send <= 5, \
        f"{mailer.opened_at_first_send} of {COUNT} queue files opened before the first send"
