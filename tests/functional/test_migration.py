"""A queue written by the real repoze.sendmail is delivered by mailspool, with nothing lost."""

import email.message
import gc
import os
import subprocess
import sys
import time

import pytest
import repoze.sendmail.delivery
import repoze.sendmail.mailer
import repoze.sendmail.queue
import transaction

from mailspool import QueueProcessor, SMTPMailer
from mailspool.maildir import MaildirQueue


def repoze_message(subject, body="Hello from the old queue.\n"):
    message = email.message.Message()
    message["From"] = "Shop <shop@example.org>"
    message["To"] = "alice@example.org"
    message["Subject"] = subject
    message.set_payload(body)
    return message


def queue_with_repoze(queue_path, subjects, recipients=("alice@example.org", "bob@example.org")):
    delivery = repoze.sendmail.delivery.QueuedMailDelivery(str(queue_path))
    manager = transaction.TransactionManager()
    delivery.transaction_manager = manager
    with manager:
        for subject in subjects:
            delivery.send("shop@example.org", list(recipients), repoze_message(subject))


def subjects_received(handler_received):
    return sorted(data.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for _, _, data in handler_received)


def test_mailspool_run_delivers_a_repoze_queue_with_the_envelope_headers_stripped(queue_path, scripted_server):
    queue_with_repoze(queue_path, ["first", "second"])
    assert sorted(os.listdir(queue_path)) == ["cur", "new", "tmp"]
    config = queue_path.parent / "mailspool.ini"
    config.write_text("[mailspool]\n")

    result = subprocess.run(
        [sys.executable, "-m", "mailspool", "run", "--once", "--config", str(config), "-o", "smtp_tls=none",
         "-o", "smtp_host=127.0.0.1", "-o", f"smtp_port={scripted_server.port}", str(queue_path)],
        capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    received = scripted_server.handler.received
    assert subjects_received(received) == ["first", "second"]
    for sender, recipients, data in received:
        assert sender == "shop@example.org"
        assert recipients == ("alice@example.org", "bob@example.org")
        assert b"X-Actually" not in data
        assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF throughout
    assert MaildirQueue(queue_path).counts() == {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}
    assert os.listdir(queue_path / "new") == [] and os.listdir(queue_path / "cur") == []


# repoze.sendmail's mailer leaves its socket open after a 550; collected here, not our leak.
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
def test_rejected_and_sending_files_are_kept_or_cleared_as_their_meaning_says(queue_path, scripted_server):
    # A message repoze.sendmail's own processor refused for good: it leaves a .rejected- file.
    scripted_server.handler.data_replies = ["550 5.7.1 refused"]
    queue_with_repoze(queue_path, ["rejected by repoze"])
    repoze_mailer = repoze.sendmail.mailer.SMTPMailer("127.0.0.1", scripted_server.port, no_tls=True)
    repoze.sendmail.queue.QueueProcessor(repoze_mailer, str(queue_path)).send_messages()
    del repoze_mailer
    gc.collect()
    assert any(name.startswith(".rejected-") for name in os.listdir(queue_path / "new") + os.listdir(
        queue_path / "cur"))

    # A message whose repoze.sendmail processor died long ago while sending: a stale .sending- link.
    queue_with_repoze(queue_path, ["was being sent"])
    (name,) = [n for n in os.listdir(queue_path / "new") if not n.startswith(".")]
    marker = queue_path / "new" / f".sending-{name}"
    os.link(queue_path / "new" / name, marker)
    long_ago = time.time() - 4 * 3600
    os.utime(marker, (long_ago, long_ago))

    # A marker whose message is gone: repoze sent it and died before removing the marker.
    (queue_path / "cur" / ".sending-1234.already-sent").write_bytes(b"x")

    processor = QueueProcessor(MaildirQueue(queue_path), SMTPMailer(scripted_server.host, scripted_server.port,
                                                                    tls="none"))
    summary = processor.run_once()

    assert summary.sent == 1
    assert subjects_received(scripted_server.handler.received) == ["was being sent"]
    (failed,) = list(processor.queue.entries(["failed"]))
    assert "refused for good by repoze.sendmail" in failed.last_reply
    assert processor.queue.read_message(failed.queue_id).count(b"rejected by repoze") == 1
    leftovers = [n for d in ("new", "cur", "tmp") for n in os.listdir(queue_path / d)]
    assert leftovers == []


def test_a_young_sending_marker_is_left_to_the_old_processor(queue_path, scripted_server):
    queue_with_repoze(queue_path, ["in flight elsewhere"])
    (name,) = os.listdir(queue_path / "new")
    os.link(queue_path / "new" / name, queue_path / "new" / f".sending-{name}")

    summary = QueueProcessor(MaildirQueue(queue_path), SMTPMailer(scripted_server.host, scripted_server.port,
                                                                  tls="none")).run_once()

    assert summary.sent == 0 and scripted_server.handler.received == []
    assert name in os.listdir(queue_path / "new")


def test_non_ascii_envelopes_survive_the_import(queue_path, scripted_server):
    queue_with_repoze(queue_path, ["utf-8"], recipients=("zoë@example.org",))

    QueueProcessor(MaildirQueue(queue_path), SMTPMailer(scripted_server.host, scripted_server.port,
                                                        tls="none")).run_once()

    ((sender, recipients, _),) = scripted_server.handler.received
    assert recipients == ("zoë@example.org",)


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe not a message at all"])
def test_a_broken_file_in_the_old_queue_is_set_aside(queue_path, scripted_server, garbage):
    queue_with_repoze(queue_path, ["good"])
    (queue_path / "cur" / "1.broken").write_bytes(garbage)

    summary = QueueProcessor(MaildirQueue(queue_path), SMTPMailer(scripted_server.host, scripted_server.port,
                                                                  tls="none")).run_once()

    assert summary.sent == 1
    assert os.listdir(queue_path / "failed") == ["1.broken"]
