"""SendmailMailer against a real program on disk that behaves like sendmail(8)."""

import os
import stat
import sys
import textwrap

import pytest

from mailspool import QueuedMailDelivery, QueueProcessor
from mailspool.exceptions import PermanentDeliveryError, TransientDeliveryError
from mailspool.mailer import SendmailMailer

MESSAGE = b"From: shop@example.org\r\nSubject: Hi\r\n\r\nHello.\r\n.dot line\r\n"


@pytest.fixture
def fake_sendmail(tmp_path):
    """A sendmail stand-in: records its arguments and input, exits with the status in ./status."""
    script = tmp_path / "sendmail"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, pathlib, sys
        here = pathlib.Path({str(tmp_path)!r})
        data = sys.stdin.buffer.read()
        calls = json.loads((here / "calls.json").read_text()) if (here / "calls.json").exists() else []
        calls.append({{"argv": sys.argv[1:], "input": data.decode("latin-1")}})
        (here / "calls.json").write_text(json.dumps(calls))
        status = int((here / "status").read_text()) if (here / "status").exists() else 0
        if status:
            print("sendmail: simulated failure", file=sys.stderr)
        sys.exit(status)
        """))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    class Fake:
        path = str(script)

        def calls(self):
            import json
            return json.loads((tmp_path / "calls.json").read_text())

        def exit_with(self, status):
            (tmp_path / "status").write_text(str(status))

    return Fake()


def test_the_message_is_piped_with_envelope_arguments_and_lf_endings(fake_sendmail):
    mailer = SendmailMailer(fake_sendmail.path)
    assert mailer.send("shop@example.org", ["a@example.org", "-oQ/evil"], MESSAGE) == {}
    (call,) = fake_sendmail.calls()
    assert call["argv"] == ["-i", "-f", "shop@example.org", "--", "a@example.org", "-oQ/evil"]
    assert call["input"] == MESSAGE.replace(b"\r\n", b"\n").decode()


def test_the_null_sender_is_passed_as_angle_brackets(fake_sendmail):
    SendmailMailer(fake_sendmail.path).send("", ["a@example.org"], MESSAGE)
    assert fake_sendmail.calls()[0]["argv"][:3] == ["-i", "-f", "<>"]


@pytest.mark.parametrize("status", [75, 69, 78])
def test_tempfail_statuses_are_transient(fake_sendmail, status):
    fake_sendmail.exit_with(status)
    with pytest.raises(TransientDeliveryError, match=f"exited {status}.*simulated failure"):
        SendmailMailer(fake_sendmail.path).send("shop@example.org", ["a@example.org"], MESSAGE)


@pytest.mark.parametrize("status", [67, 65, 1])
def test_other_statuses_are_permanent(fake_sendmail, status):
    fake_sendmail.exit_with(status)
    with pytest.raises(PermanentDeliveryError, match=f"exited {status}"):
        SendmailMailer(fake_sendmail.path).send("shop@example.org", ["a@example.org"], MESSAGE)


def test_a_missing_program_is_transient_and_fails_vote(tmp_path):
    mailer = SendmailMailer(str(tmp_path / "no-such-sendmail"))
    with pytest.raises(TransientDeliveryError, match="cannot be run"):
        mailer.send("shop@example.org", ["a@example.org"], MESSAGE)
    with pytest.raises(TransientDeliveryError, match="not an executable"):
        mailer.vote("shop@example.org", ["a@example.org"], MESSAGE)


def test_the_processor_delivers_through_sendmail(fake_sendmail, queue_path, manager):
    with manager:
        QueuedMailDelivery(queue_path, transaction_manager=manager).send(
            "shop@example.org", ["a@example.org"], MESSAGE)
    assert QueueProcessor(queue_path, SendmailMailer(fake_sendmail.path)).run_once().sent == 1
    assert len(fake_sendmail.calls()) == 1
    assert os.listdir(queue_path / "new") == []
