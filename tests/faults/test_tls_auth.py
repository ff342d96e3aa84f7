"""STARTTLS missing or untrusted, and a refused login: the mail waits in the queue, nothing goes out in clear.

Certificates come from a throwaway trustme CA (conftest.py): a server
certificate from it is what a self-signed certificate is to a client that
has not been told to trust it. A refused login is a configuration problem,
not the message's: the message is deferred, and delivered once the
password is fixed. The password must not appear in any log record
(mailspool's loggers at DEBUG, the SMTP transcript included), in the queue
directory (attempt log), or in what ``mailspool list --json``, ``show`` and
``run -v`` print.
"""

import base64
import json
import logging
import os
import subprocess
import sys

import pytest

SENDER = "shop@example.org"
ALICE = "alice@example.org"
WRONG_PASSWORD = "Wr0ng-Secret-Tk4-Zp"
COMMAND_TIMEOUT = 120  # seconds a command may take on a slow, shared machine


def make_message():
    return (f"From: {SENDER}\r\nTo: {ALICE}\r\nSubject: Over TLS\r\n\r\n"
            "Your parcel is on its way.\r\n").encode("ascii")


def outcome(summary):
    return summary.sent, summary.deferred, summary.failed


# -- 17: STARTTLS ------------------------------------------------------------------------------


def test_starttls_required_but_not_offered_defers_and_sends_nothing_in_clear(
    fault_servers, ca_file, committed, processor_for, clock, queue_entries
):
    server = fault_servers()  # no tls_context: STARTTLS is not offered
    committed(make_message(), [ALICE])
    processor = processor_for(server, tls="starttls", ca_file=ca_file)

    assert outcome(processor.run_once()) == (0, 1, 0)
    clock.advance(3600)
    assert outcome(processor.run_once()) == (0, 1, 0)

    (entry,) = queue_entries("deferred")
    assert f"{server.name} does not offer STARTTLS, which tls='starttls' requires" in entry.last_reply
    assert len(entry.delivery_attempts) == 2
    assert server.handler.mails == 0  # not even the envelope went out in clear
    assert server.handler.received == []


@pytest.mark.parametrize("certificate_name, trust_the_ca", [("127.0.0.1", False), ("mail.example.org", True)],
                         ids=["CA not configured", "certificate for another name"])
def test_an_untrusted_certificate_defers_then_the_right_ca_delivers_once_over_tls(
    certificate_name, trust_the_ca, fault_servers, server_tls_context, ca_file, committed, processor_for, clock,
    queue_entries
):
    # STARTTLS offered but not required: a client falling back to plain text would be served.
    server = fault_servers(tls_context=server_tls_context(certificate_name))
    message = committed(make_message(), [ALICE])
    options = {"ca_file": ca_file} if trust_the_ca else {}

    assert outcome(processor_for(server, tls="starttls", **options).run_once()) == (0, 1, 0)
    (entry,) = queue_entries("deferred")
    assert "certificate verify failed" in entry.last_reply
    assert server.handler.mails == 0

    if certificate_name != "127.0.0.1":
        server = fault_servers(tls_context=server_tls_context("127.0.0.1"), require_starttls=True)
    clock.advance(3600)
    assert outcome(processor_for(server, tls="starttls", ca_file=ca_file).run_once()) == (1, 0, 0)
    assert server.handler.received == [(SENDER, (ALICE,), message.data)]
    assert server.handler.sessions == [(True, False)]  # over TLS


def test_a_certificate_from_the_configured_ca_delivers_over_tls(
    fault_servers, server_tls_context, ca_file, committed, processor_for
):
    server = fault_servers(tls_context=server_tls_context(), require_starttls=True)
    message = committed(make_message(), [ALICE])

    assert outcome(processor_for(server, tls="starttls", ca_file=ca_file).run_once()) == (1, 0, 0)

    assert server.handler.received == [(SENDER, (ALICE,), message.data)]
    assert server.handler.sessions == [(True, False)]


# -- 18: a refused login -----------------------------------------------------------------------


def secret_forms(username, password):
    """The password as it could leak: plain, and as AUTH PLAIN and AUTH LOGIN send it (base64)."""
    return [
        password,
        base64.b64encode(password.encode()).decode(),
        base64.b64encode(f"\0{username}\0{password}".encode()).decode(),
    ]


def queue_directory_text(queue_path):
    """Every file under the queue directory (messages, attempt logs), as text."""
    texts = []
    for directory, _, names in os.walk(queue_path):
        for name in names:
            with open(os.path.join(directory, name), "rb") as stream:
                texts.append(stream.read().decode("utf-8", "replace"))
    return "\n".join(texts)


def mailspool_command(tmp_path, queue_path, *args, **settings):
    """Run ``python -m mailspool ARGS`` with a configuration file of its own; return the CompletedProcess."""
    config_path = tmp_path / "mailspool.ini"
    values = {"queue_path": str(queue_path), **settings}
    config_path.write_text("[mailspool]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()),
                           encoding="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "mailspool", *args], env=dict(os.environ, MAILSPOOL_CONFIG=str(config_path)),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8", errors="replace",
        timeout=COMMAND_TIMEOUT, check=False,
    )


@pytest.fixture
def auth_server(fault_servers, server_tls_context, auth_options):
    return fault_servers(**auth_options(server_tls_context()))


def test_a_refused_login_defers_and_the_password_appears_nowhere(
    auth_server, auth_credentials, ca_file, committed, processor_for, clock, queue_path, queue_entries, caplog,
    tmp_path
):
    username, right_password = auth_credentials
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="mailspool.transcript")
    message = committed(make_message(), [ALICE])
    processor = processor_for(auth_server, tls="starttls", ca_file=ca_file, username=username,
                              password=WRONG_PASSWORD)

    assert outcome(processor.run_once()) == (0, 1, 0)
    clock.advance(3600)
    assert outcome(processor.run_once()) == (0, 1, 0)

    (entry,) = queue_entries("deferred")
    assert f"refused the login of '{username}': 535" in entry.last_reply
    assert auth_server.handler.mails == 0
    transcript = [r.getMessage() for r in caplog.records if r.name == "mailspool.transcript"]
    assert any("C: AUTH PLAIN <credentials redacted>" in line for line in transcript)  # the check is not vacuous
    assert any(" S: 535 " in line for line in transcript)
    listing = mailspool_command(tmp_path, queue_path, "list", "--json")
    assert listing.returncode == 0, listing
    assert json.loads(listing.stdout)[0]["last_reply"] == entry.last_reply
    shown = mailspool_command(tmp_path, queue_path, "show", entry.queue_id)
    assert shown.returncode == 0, shown
    everywhere = {
        "log records": "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records),
        "queue directory": queue_directory_text(queue_path),
        "list --json": listing.stdout + listing.stderr,
        "show": shown.stdout + shown.stderr,
    }
    for where, text in everywhere.items():
        for secret in secret_forms(username, WRONG_PASSWORD):
            assert secret not in text, f"the password ({secret!r}) appears in the {where}"

    # The operator fixes the password: the message that waited is delivered, once.
    clock.advance(3600)
    fixed = processor_for(auth_server, tls="starttls", ca_file=ca_file, username=username,
                          password=right_password)
    assert outcome(fixed.run_once()) == (1, 0, 0)
    assert auth_server.handler.received == [(SENDER, (ALICE,), message.data)]
    assert auth_server.handler.sessions == [(True, True)]


def test_the_command_never_prints_the_password_of_a_refused_login(
    auth_server, auth_credentials, ca_file, committed, queue_path, tmp_path
):
    username = auth_credentials[0]
    committed(make_message(), [ALICE])
    settings = {
        "smtp_host": auth_server.host, "smtp_port": auth_server.port, "smtp_tls": "starttls",
        "smtp_ca_file": ca_file, "smtp_username": username, "smtp_password": WRONG_PASSWORD,
        "smtp_timeout": "30", "smtp_debug": "true",
    }

    run = mailspool_command(tmp_path, queue_path, "run", "--once", "-v", **settings)
    listing = mailspool_command(tmp_path, queue_path, "list", "--json", **settings)

    assert run.returncode == 75, run  # deferred
    assert "AUTH PLAIN <credentials redacted>" in run.stderr  # the transcript was on
    assert f"refused the login of '{username}': 535" in run.stderr
    assert json.loads(listing.stdout)[0]["state"] == "deferred"
    for text in (run.stdout, run.stderr, listing.stdout, listing.stderr, queue_directory_text(queue_path)):
        for secret in secret_forms(username, WRONG_PASSWORD):
            assert secret not in text
    assert auth_server.handler.mails == 0
