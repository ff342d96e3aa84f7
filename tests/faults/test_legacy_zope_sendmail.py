"""Case 20: a queue left by the real zope.sendmail (and an import killed halfway) is delivered, nothing lost.

tests/functional/test_migration.py covers repoze.sendmail. Here the queue
files are written by zope.sendmail itself (``X-Zope-From``/``X-Zope-To``
as the first two lines, the message as the application gave it), and its
own ``QueueProcessorThread`` makes the ``.rejected-`` files (a 550 from a
real SMTP server) and the ``.sending-`` markers (its mailer dies in the
middle of a send). Files are in ``new/`` and in ``cur/`` (where Maildir
readers move them; zope.sendmail's processor reads both).

The import itself is crash-safe: each legacy file is first renamed to
``tmp/.legacy-NAME``; an importer SIGKILLed at any later point leaves that
file, and the next run imports it (it is never taken for an abandoned
staging file, however old).
"""

import email.message
import os
import signal
import subprocess
import sys
import time

import pytest
import transaction
import zope.sendmail.delivery
import zope.sendmail.mailer
import zope.sendmail.queue

from mailspool import QueueProcessor, SMTPMailer
from mailspool.maildir import MaildirQueue

EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}
LONG_AGO = 4 * 3600  # older than zope.sendmail's MAX_SEND_TIME (3 h): its sender is dead


def zope_message(subject, linesep="\n", body="Hello from the old queue.\n"):
    message = email.message.Message()
    message["From"] = "Shop <shop@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = subject
    message["Message-Id"] = f"<{subject.replace(' ', '-')}@example.org>"
    message.set_payload(body)
    return message.as_bytes(policy=message.policy.clone(linesep=linesep))


def queue_with_zope(queue_path, subjects, sender="shop@example.org",
                    recipients=("alice@example.org", "bob@example.org"), linesep="\n"):
    """Commit one message per subject through zope.sendmail's QueuedMailDelivery (the global transaction)."""
    delivery = zope.sendmail.delivery.QueuedMailDelivery(str(queue_path))
    transaction.begin()
    try:
        for subject in subjects:
            delivery.send(sender, list(recipients), zope_message(subject, linesep))
        transaction.commit()
    except BaseException:
        transaction.abort()
        raise


def visible(directory):
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def dotted(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def move_to_cur(queue_path, name):
    os.rename(queue_path / "new" / name, queue_path / "cur" / name)


def mailspool(queue_path, server, **options):
    return QueueProcessor(MaildirQueue(queue_path), SMTPMailer(server.host, server.port, tls="none"), **options)


def subject_of(data):
    return data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


def received_by_subject(handler):
    return {subject_of(data): (sender, recipients, data) for sender, recipients, data in handler.received}


def zope_processor(queue_path, server, mailer=None):
    thread = zope.sendmail.queue.QueueProcessorThread()
    thread.setQueuePath(str(queue_path))
    thread.setMailer(mailer or zope.sendmail.mailer.SMTPMailer(server.host, server.port, no_tls=True))
    return thread


def test_zope_sendmail_files_in_new_and_cur_are_delivered_with_their_envelope(queue_path, scripted_server):
    queue_with_zope(queue_path, ["lf one", "lf two"])
    queue_with_zope(queue_path, ["crlf"], linesep="\r\n")
    queue_with_zope(queue_path, ["names"], sender="zoë@example.org",
                    recipients=('"Doe, John" <john@example.org>', "Zoë <zoe@example.org>", "carol@example.org"))
    assert sorted(os.listdir(queue_path)) == ["cur", "new", "tmp"]
    first = visible(queue_path / "new")[0]
    assert (queue_path / "new" / first).read_bytes().startswith(b"X-Zope-From: ")
    move_to_cur(queue_path, first)

    summary = mailspool(queue_path, scripted_server).run_once()

    assert summary.sent == 4 and summary.failed == 0
    got = received_by_subject(scripted_server.handler)
    assert sorted(got) == ["crlf", "lf one", "lf two", "names"]
    assert got["lf one"][:2] == ("shop@example.org", ("alice@example.org", "bob@example.org"))
    assert got["names"][:2] == ("zoë@example.org", ("john@example.org", "zoe@example.org", "carol@example.org"))
    for subject, (_, _, data) in got.items():
        assert b"X-Zope" not in data
        assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
        assert f"Message-Id: <{subject.replace(' ', '-')}@example.org>\r\n".encode() in data  # kept as written
        assert data.endswith(b"\r\n\r\nHello from the old queue.\r\n")
    assert MaildirQueue(queue_path).counts() == EMPTY
    assert os.listdir(queue_path / "new") == os.listdir(queue_path / "cur") == os.listdir(queue_path / "tmp") == []


def test_rejected_files_made_by_zope_sendmail_are_kept_as_failed_never_sent(queue_path, scripted_server):
    queue_with_zope(queue_path, ["rejected in new", "rejected in cur"])
    move_to_cur(queue_path, [n for n in visible(queue_path / "new")
                             if b"rejected in cur" in (queue_path / "new" / n).read_bytes()][0])
    scripted_server.handler.data_replies = ["550 5.7.1 refused", "550 5.7.1 refused"]
    zope_processor(queue_path, scripted_server).run(forever=False)  # zope.sendmail's own processor
    assert [name.startswith(".rejected-") for name in dotted(queue_path / "new") + dotted(queue_path / "cur")] \
        == [True, True]
    assert visible(queue_path / "new") == visible(queue_path / "cur") == []
    queue_with_zope(queue_path, ["still to send"])

    summary = mailspool(queue_path, scripted_server).run_once()

    assert summary.sent == 1 and sorted(received_by_subject(scripted_server.handler)) == ["still to send"]
    queue = MaildirQueue(queue_path)
    failed = list(queue.entries(["failed"]))
    assert sorted(subject_of(queue.read_message(entry.queue_id)) for entry in failed) == \
        ["rejected in cur", "rejected in new"]
    for entry in failed:
        assert "refused for good by repoze.sendmail/zope.sendmail" in entry.last_reply
        assert entry.envelope.recipients == ("alice@example.org", "bob@example.org")
        assert b"X-Zope" not in queue.read_message(entry.queue_id)
    # A second run neither sends them nor imports them again.
    assert mailspool(queue_path, scripted_server).run_once().sent == 0
    assert len(list(queue.entries(["failed"]))) == 2 and scripted_server.handler.data_attempts == 3
    assert [n for d in ("new", "cur", "tmp") for n in os.listdir(queue_path / d)] == []


class DiesWhileSending:
    """A zope.sendmail mailer whose process dies in the middle of send() (SystemExit gets past its handlers)."""

    def send(self, fromaddr, toaddrs, message):
        raise SystemExit("killed while sending")


@pytest.mark.parametrize("directory", ["new", "cur"])
def test_sending_markers_left_by_zope_sendmail_are_respected_then_recovered(queue_path, scripted_server, directory):
    queue_with_zope(queue_path, ["interrupted"])
    (name,) = visible(queue_path / "new")
    if directory == "cur":
        move_to_cur(queue_path, name)
    with pytest.raises(SystemExit):
        zope_processor(queue_path, scripted_server, DiesWhileSending()).run(forever=False)
    where = queue_path / directory
    assert dotted(where) == [f".sending-{name}"] and visible(where) == [name]  # what the dead sender left

    # A fresh marker: an old processor may still be sending it. Leave it alone.
    assert mailspool(queue_path, scripted_server).run_once().sent == 0
    assert visible(where) == [name] and scripted_server.handler.received == []

    # Older than MAX_SEND_TIME: its sender is dead. Deliver it once, remove the marker.
    old = time.time() - LONG_AGO
    os.utime(where / f".sending-{name}", (old, old))
    assert mailspool(queue_path, scripted_server).run_once().sent == 1
    assert sorted(received_by_subject(scripted_server.handler)) == ["interrupted"]
    assert os.listdir(where) == [] and MaildirQueue(queue_path).counts() == EMPTY


def test_a_marker_whose_message_is_gone_is_cleared(queue_path, scripted_server):
    queue_with_zope(queue_path, ["sent by zope"])
    (name,) = visible(queue_path / "new")
    os.link(queue_path / "new" / name, queue_path / "new" / f".sending-{name}")
    # zope.sendmail sent it and unlinked the message, then died before unlinking its marker.
    zope_processor(queue_path, scripted_server).run(forever=False)  # skips it: the marker is fresh
    os.unlink(queue_path / "new" / name)

    assert mailspool(queue_path, scripted_server).run_once().sent == 0
    assert os.listdir(queue_path / "new") == [] and scripted_server.handler.received == []


# -- the import killed halfway ------------------------------------------------------

KILLER = r"""
import os, signal, sys
from mailspool import maildir

point = sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "taken":  # renamed to tmp/.legacy-NAME, nothing else done
    maildir.MaildirQueue._import_pending = lambda self, *args: die()
elif point == "staged":  # converted and written to tmp/ as a queue file, not published
    maildir.StagedFile.publish = lambda self: die()
elif point == "published":  # published to new/, tmp/.legacy-NAME not yet removed
    publish = maildir.StagedFile.publish
    def publish_and_die(self):
        publish(self)
        die()
    maildir.StagedFile.publish = publish_and_die
maildir.MaildirQueue(sys.argv[1]).cleanup()
print("import finished without being killed")
"""


@pytest.mark.parametrize("point, deliveries", [("taken", 1), ("staged", 1), ("published", 2)])
def test_an_import_killed_halfway_is_finished_by_the_next_run(queue_path, scripted_server, clock, point,
                                                               deliveries):
    queue_with_zope(queue_path, ["half imported"])
    (name,) = visible(queue_path / "new")

    child = subprocess.run([sys.executable, "-c", KILLER, str(queue_path), point], capture_output=True, text=True,
                           timeout=120)

    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert dotted(queue_path / "tmp") == [f".legacy-{name}"]
    published = visible(queue_path / "new")
    assert len(published) == (1 if point == "published" else 0) and name not in published
    # Killed long ago: the leftover is older than any staging file may live, and is still imported.
    two_days_ago = clock.now - 2 * 24 * 3600
    os.utime(queue_path / "tmp" / f".legacy-{name}", (two_days_ago, two_days_ago))

    summary = mailspool(queue_path, scripted_server, clock=clock).run_once()

    assert summary.sent == deliveries  # "published": at-least-once, the copy already published is sent too
    assert [subject_of(data) for _, _, data in scripted_server.handler.received] == ["half imported"] * deliveries
    assert MaildirQueue(queue_path).counts() == EMPTY
    clock.advance(2 * 24 * 3600)  # the abandoned staging file of "staged" goes after a day, the rest is gone
    mailspool(queue_path, scripted_server, clock=clock).run_once()
    assert os.listdir(queue_path / "tmp") == [] and os.listdir(queue_path / "new") == []
