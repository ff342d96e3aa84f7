"""The ``mailspool`` command, run as a real process against real queues and real SMTP servers.

Every command runs as ``python -m mailspool`` in a subprocess whose
``$MAILSPOOL_CONFIG`` names a configuration file in the test's temporary
directory (the ``cli`` fixture), so /etc/mailspool.ini never leaks in.
Messages are committed through ``QueuedMailDelivery`` with an explicit
transaction manager, as an application would; the servers are the aiosmtpd
fixtures of conftest.py. No assertion depends on how fast the machine is:
waits for an outcome are bounded polls with generous limits, and the two
short sleeps only let time pass where the outcome does not depend on it.
"""

import argparse
import datetime
import email
import email.policy
import json
import os
import pty
import signal
import smtplib
import stat
import subprocess
import sys
import threading
import time

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailspool import MaildirQueue, QueuedMailDelivery
from mailspool.console import build_parser
from mailspool.envelope import Envelope
from mailspool.prepare import prepare
from mailspool.sink import SMTPSink, free_port

EX_OK, EX_FAILED, EX_USAGE, EX_NOINPUT, EX_TEMPFAIL, EX_CONFIG = 0, 1, 64, 66, 75, 78
NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL = 0, 1, 2

COMMAND_TIMEOUT = 120  # seconds one command may take on a slow, shared machine
DAEMON_TIMEOUT = 60  # seconds a daemon may take to react (its poll interval is far longer)
STOP_TIMEOUT = 30  # seconds a process may take to exit after SIGTERM
IDLE_POLL = "poll_interval=600"  # a daemon that only reacts to the doorbell and signals within a test

SENDER = "shop@example.org"
ALICE = "alice@example.org"
BOB = "bob@example.org"
EMPTY = {"ready": 0, "active": 0, "deferred": 0, "held": 0, "failed": 0}

USERNAME = "mailer"
PASSWORD = "Zq8-cli-secret-Xv3"


# -- running the command ---------------------------------------------------------------


class Mailspool:
    """Runs ``python -m mailspool`` with a configuration file of its own (never /etc/mailspool.ini).

    ``configure(server, **settings)`` rewrites the file: queue_path, the
    server's address, no TLS, and any other settings given. Without a
    server, smtp_port names a port nobody listens on.
    """

    def __init__(self, directory, queue_path):
        self.directory = directory
        self.queue_path = queue_path
        self.config_path = directory / "mailspool.ini"
        self.env = dict(os.environ, MAILSPOOL_CONFIG=str(self.config_path))
        self.daemons = []
        self.configure()

    def configure(self, server=None, **settings):
        values = {
            "queue_path": str(self.queue_path),
            "smtp_host": "127.0.0.1",
            "smtp_port": str(server.port if server is not None else free_port()),
            "smtp_tls": "none",
            "smtp_timeout": "30",
            **settings,
        }
        self.write_config("[mailspool]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()))

    def write_config(self, text):
        self.config_path.write_text(text, encoding="utf-8")

    @staticmethod
    def command(*args):
        return [sys.executable, "-m", "mailspool", *map(str, args)]

    def __call__(self, *args, input=None, env=None):
        """Run a command to its end; return the CompletedProcess (text; its repr shows both outputs)."""
        return subprocess.run(
            self.command(*args), input=input, stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True, text=True, encoding="utf-8", errors="replace",
            env=self.env if env is None else env, timeout=COMMAND_TIMEOUT, check=False,
        )

    def json(self, *args):
        result = self(*args, "--json")
        assert result.returncode == EX_OK, result
        return json.loads(result.stdout)

    def start(self, *args):
        """Start a long-running command (``run --daemon``, ``debug-server``); stopped at teardown."""
        daemon = Background(self.command(*args), self.env, self.directory / f"process-{len(self.daemons)}")
        self.daemons.append(daemon)
        return daemon


class Background:
    """A command running in the background, its output going to files the test can read at any time."""

    def __init__(self, command, env, prefix):
        self.stdout_path = prefix.with_suffix(".out")
        self.stderr_path = prefix.with_suffix(".err")
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)

    @property
    def stdout(self):
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self):
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def describe(self):
        return f"exit status {self.process.poll()}\n--- stdout:\n{self.stdout}\n--- stderr:\n{self.stderr}"

    def wait_for(self, condition, what, timeout=DAEMON_TIMEOUT):
        """Poll ``condition`` until true; fail (showing the output) on timeout or if the process ends."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"the process ended while waiting for {what}:\n{self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout}s:\n{self.describe()}")
            time.sleep(0.05)

    def send_signal(self, signum):
        self.process.send_signal(signum)

    def stop(self, signum=signal.SIGTERM):
        """Send ``signum`` and return the exit status (failing if the process does not end in time)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_TIMEOUT}s after {signum.name}:\n{self.describe()}")

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_TIMEOUT)


@pytest.fixture
def cli(tmp_path, queue_path):
    mailspool = Mailspool(tmp_path, queue_path)
    yield mailspool
    for daemon in mailspool.daemons:
        daemon.kill()


# -- messages and queues ---------------------------------------------------------------


def message(subject="Hello", to=ALICE):
    return f"From: Shop <{SENDER}>\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()


def commit(queue_path, manager, subject="Hello", recipients=(ALICE,)):
    """Commit one message through a queued delivery; return its Message-Id."""
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        return delivery.send(SENDER, list(recipients), message(subject, recipients[0]))


def commit_many(queue_path, manager, count, subject="Bulk"):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)
    with manager:
        return [delivery.send(SENDER, [ALICE], message(f"{subject} {number}")) for number in range(count)]


def drop_silently(queue_path, subject):
    """Put a message in new/ as a commit does, but without ringing the doorbell; return its Message-Id."""
    prepared = prepare(SENDER, [ALICE], message(subject))
    envelope = Envelope(prepared.sender, prepared.recipients, prepared.message_id, time.time())
    MaildirQueue(queue_path).add(envelope, prepared.data).publish()
    return prepared.message_id


def queue_id_of(queue_path, message_id):
    (queue_id,) = [entry.queue_id for entry in MaildirQueue(queue_path, create=False).entries()
                   if entry.envelope.message_id == message_id]
    return queue_id


def counts(queue_path):
    return MaildirQueue(queue_path, create=False).counts()


def states(cli):
    """``{message_id: state}`` as ``mailspool list --json`` reports them."""
    return {entry["message_id"]: entry["state"] for entry in cli.json("list")}


def received_data(server):
    """The DATA bytes a server accepted: SMTPSink keeps ReceivedMessage, ScriptedHandler tuples."""
    received = getattr(server, "handler", server).received
    return [item.data if hasattr(item, "data") else item[2] for item in received]


def subjects(server):
    return [email.message_from_bytes(data, policy=email.policy.default)["Subject"] for data in received_data(server)]


def listeners(queue_path):
    """Names of the doorbell FIFOs of the processors waiting on a queue."""
    wakeup = queue_path / "wakeup"
    if not wakeup.is_dir():
        return set()
    return {path.name for path in wakeup.iterdir() if stat.S_ISFIFO(path.lstat().st_mode)}


def parse_time(text):
    return datetime.datetime.fromisoformat(text).timestamp()


# -- run --once ------------------------------------------------------------------------


def test_run_once_exits_0_when_everything_was_sent(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_sink)
    commit(queue_path, manager, "first")
    commit(queue_path, manager, "second")

    result = cli("run", "--once")

    assert result.returncode == EX_OK, result
    assert sorted(subjects(smtp_sink)) == ["first", "second"]
    assert counts(queue_path) == EMPTY


def test_run_once_exits_75_when_a_message_was_deferred(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["451 4.3.0 try again later"]
    commit(queue_path, manager)

    result = cli("run", "--once")

    assert result.returncode == EX_TEMPFAIL, result
    assert counts(queue_path) == {**EMPTY, "deferred": 1}


def test_run_once_exits_1_when_a_message_failed_even_if_another_was_deferred(cli, scripted_server, queue_path,
                                                                          manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["451 4.3.0 try again later", "550 5.7.1 rejected by policy"]
    commit(queue_path, manager, "first")
    commit(queue_path, manager, "second")

    result = cli("run", "--once")

    assert result.returncode == EX_FAILED, result
    assert counts(queue_path) == {**EMPTY, "deferred": 1, "failed": 1}


def test_run_once_with_two_workers_uses_two_connections(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    # A slow server: while one worker waits for its DATA reply, the other is sure to take a message.
    scripted_server.handler.data_delay = 0.3
    commit_many(queue_path, manager, 10)

    result = cli("run", "--once", "--workers", "2")

    assert result.returncode == EX_OK, result
    assert sorted(subjects(scripted_server)) == sorted(f"Bulk {number}" for number in range(10))
    assert scripted_server.handler.connections == 2
    assert counts(queue_path) == EMPTY


# -- configuration errors --------------------------------------------------------------


def test_an_unknown_key_in_the_file_is_named_with_the_file_and_line(cli, queue):
    cli.write_config(f"# mailspool\n[mailspool]\nqueue_path = {queue.path}\n\nsmtp_prot = 2525\n")

    result = cli("status")

    assert result.returncode == EX_CONFIG, result
    assert f"{cli.config_path}:5" in result.stderr
    assert "unknown setting 'smtp_prot'" in result.stderr


def test_a_bad_port_in_the_file_is_named_with_the_file_and_line(cli, queue):
    cli.write_config(f"[mailspool]\nqueue_path = {queue.path}\nsmtp_port = 99999\n")

    result = cli("status")

    assert result.returncode == EX_CONFIG, result
    assert f"{cli.config_path}:3" in result.stderr
    assert "smtp_port" in result.stderr and "99999" in result.stderr


@pytest.mark.parametrize("override", ["smtp_port=http", "workers=0", "smtp_tls=maybe", "poll_interval=soon"])
def test_a_bad_override_names_the_command_line(cli, queue, override):
    result = cli("status", "-o", override)

    assert result.returncode == EX_CONFIG, result
    assert "command line" in result.stderr
    assert override.partition("=")[0] in result.stderr


def test_an_override_that_is_not_key_value_is_a_configuration_error(cli, queue):
    result = cli("status", "-o", "smtp_port")

    assert result.returncode == EX_CONFIG, result
    assert "-o 'smtp_port' is not KEY=VALUE" in result.stderr


@pytest.mark.parametrize("command", [("run", "--once"), ("status",), ("list",)])
def test_a_missing_queue_directory_is_a_configuration_error_naming_it(cli, tmp_path, command):
    missing = tmp_path / "no-such-queue"
    cli.configure(queue_path=missing)

    result = cli(*command)

    assert result.returncode == EX_CONFIG, result
    assert str(missing) in result.stderr
    assert not missing.exists()


def test_mailspool_config_naming_a_missing_file_is_a_configuration_error(cli, tmp_path):
    missing = tmp_path / "missing.ini"

    result = cli("status", env=dict(cli.env, MAILSPOOL_CONFIG=str(missing)))

    assert result.returncode == EX_CONFIG, result
    assert "$MAILSPOOL_CONFIG" in result.stderr and str(missing) in result.stderr


def test_config_flag_naming_a_missing_file_is_a_configuration_error(cli, tmp_path):
    missing = tmp_path / "missing.ini"

    result = cli("status", "--config", missing)

    assert result.returncode == EX_CONFIG, result
    assert "--config" in result.stderr and str(missing) in result.stderr


def test_the_config_flag_wins_over_the_environment(cli, tmp_path, queue):
    elsewhere = tmp_path / "elsewhere.ini"
    elsewhere.write_text(f"[mailspool]\nqueue_path = {queue.path}\n", encoding="utf-8")

    result = cli("status", "--config", elsewhere, env=dict(cli.env, MAILSPOOL_CONFIG=str(tmp_path / "missing.ini")))

    assert result.returncode == EX_OK, result
    assert f"queue {queue.path}" in result.stdout


def test_command_line_overrides_win_over_the_file(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_port=1)  # nobody listens there
    commit(queue_path, manager, "overridden")

    result = cli("run", "--once", "-o", f"smtp_port={smtp_sink.port}")

    assert result.returncode == EX_OK, result
    assert subjects(smtp_sink) == ["overridden"]


def test_the_queue_argument_wins_over_queue_path(cli, tmp_path, manager):
    other = tmp_path / "other-queue"
    commit(other, manager)

    result = cli("list", "--json", other)

    assert result.returncode == EX_OK, result
    assert [entry["state"] for entry in json.loads(result.stdout)] == ["ready"]


# -- status ----------------------------------------------------------------------------


def test_status_json_after_a_deferral(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["451 4.3.0 try again later"]
    message_id = commit(queue_path, manager)
    queue_id = queue_id_of(queue_path, message_id)
    before_run = time.time()
    assert cli("run", "--once").returncode == EX_TEMPFAIL

    document = cli.json("status")

    assert set(document) == {"queue", "counts", "scheduled", "oldest_age_seconds", "next_retry_at", "last_error",
                             "check"}
    assert document["queue"] == str(queue_path)
    assert document["counts"] == {**EMPTY, "deferred": 1}
    assert document["scheduled"] == 0
    assert isinstance(document["oldest_age_seconds"], (int, float)) and document["oldest_age_seconds"] >= 0
    assert parse_time(document["next_retry_at"]) > before_run  # backoff_min (60s) after the attempt
    error = document["last_error"]
    assert set(error) == {"queue_id", "message_id", "at", "error"}
    assert (error["queue_id"], error["message_id"]) == (queue_id, message_id)
    assert "451 4.3.0 try again later" in error["error"]
    assert int(before_run) <= parse_time(error["at"]) <= time.time()
    assert document["check"] == {"status": "OK", "warn_age": None, "crit_age": None}


def test_status_json_of_an_empty_queue(cli, queue):
    document = cli.json("status")

    assert document["counts"] == EMPTY
    assert document["oldest_age_seconds"] is None
    assert document["next_retry_at"] is None
    assert document["last_error"] is None


@pytest.mark.parametrize("warn_age, crit_age, expected_status, verdict", [
    ("1h", "2h", NAGIOS_OK, "OK"),
    ("0s", "1h", NAGIOS_WARNING, "WARNING"),
    ("0s", "0s", NAGIOS_CRITICAL, "CRITICAL"),
])
def test_status_age_thresholds_give_monitoring_exit_statuses(cli, queue_path, manager, warn_age, crit_age,
                                                             expected_status, verdict):
    commit(queue_path, manager)
    time.sleep(0.3)  # ages are reported to 0.1s: let the message grow visibly older than "0s"

    text = cli("status", "--warn-age", warn_age, "--crit-age", crit_age)
    document = cli("status", "--json", "--warn-age", warn_age, "--crit-age", crit_age)

    assert text.returncode == expected_status, text
    assert f"MAILSPOOL {verdict} - oldest undelivered message" in text.stdout
    assert document.returncode == expected_status, document
    check = json.loads(document.stdout)["check"]
    assert check["status"] == verdict
    assert (check["warn_age"], check["crit_age"]) == ({"1h": 3600.0, "0s": 0.0}[warn_age],
                                                      {"2h": 7200.0, "1h": 3600.0, "0s": 0.0}[crit_age])


def test_status_check_is_ok_when_nothing_waits(cli, queue):
    result = cli("status", "--warn-age", "0s", "--crit-age", "0s")

    assert result.returncode == NAGIOS_OK, result
    assert "MAILSPOOL OK" in result.stdout


# -- list ------------------------------------------------------------------------------


def test_list_shows_one_line_per_message(cli, queue_path, manager):
    first = queue_id_of(queue_path, commit(queue_path, manager))
    second = queue_id_of(queue_path, commit(queue_path, manager, recipients=(ALICE, BOB)))

    result = cli("list")

    assert result.returncode == EX_OK, result
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line, queue_id, recipients in zip(lines, (first, second), (1, 2)):
        assert line.startswith(queue_id + " ")
        assert " ready " in line and " 0 tries " in line
        assert f"<{SENDER}> -> {recipients} rcpt" in line


def test_list_json_fields(cli, queue_path, manager):
    message_id = commit(queue_path, manager, recipients=(ALICE, BOB))

    (entry,) = cli.json("list")

    assert set(entry) == {"queue_id", "state", "scheduled", "message_id", "sender", "recipients", "age_seconds",
                          "size", "attempts", "next_attempt_at", "last_reply", "problem"}
    assert entry["queue_id"] == queue_id_of(queue_path, message_id)
    assert (entry["state"], entry["scheduled"], entry["message_id"]) == ("ready", False, message_id)
    assert (entry["sender"], entry["recipients"]) == (SENDER, [ALICE, BOB])
    assert entry["age_seconds"] >= 0
    assert entry["size"] == len(MaildirQueue(queue_path).read_message(entry["queue_id"]))
    assert (entry["attempts"], entry["next_attempt_at"], entry["last_reply"], entry["problem"]) == (0, None, None,
                                                                                                   None)


def test_list_json_of_a_deferred_message(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["451 4.3.0 try again later"]
    commit(queue_path, manager)
    before_run = time.time()
    assert cli("run", "--once").returncode == EX_TEMPFAIL

    (entry,) = cli.json("list")

    assert (entry["state"], entry["attempts"]) == ("deferred", 1)
    assert "451 4.3.0 try again later" in entry["last_reply"]
    assert parse_time(entry["next_attempt_at"]) > before_run


def test_list_state_filters(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.rcpt_replies = {BOB: "550 5.1.1 no such user"}
    refused = commit(queue_path, manager, "refused", recipients=(BOB,))
    assert cli("run", "--once").returncode == EX_FAILED
    waiting = commit(queue_path, manager, "waiting")
    failed_id, ready_id = queue_id_of(queue_path, refused), queue_id_of(queue_path, waiting)

    text = cli("list", "--state", "failed")
    document = cli.json("list", "--state", "failed")
    both = cli.json("list", "--state", "failed", "--state", "ready")

    assert text.returncode == EX_OK, text
    assert failed_id in text.stdout and ready_id not in text.stdout
    assert " failed " in text.stdout and "refused every recipient" in text.stdout
    assert [(entry["queue_id"], entry["state"]) for entry in document] == [(failed_id, "failed")]
    assert "550 5.1.1 no such user" in document[0]["last_reply"]
    assert {entry["queue_id"] for entry in both} == {failed_id, ready_id}


def test_list_of_an_empty_queue_says_so(cli, queue):
    result = cli("list")
    held = cli("list", "--state", "held")

    assert (result.returncode, result.stdout.strip()) == (EX_OK, "queue is empty")
    assert (held.returncode, held.stdout.strip()) == (EX_OK, "no held messages")
    assert cli.json("list") == []


# -- show ------------------------------------------------------------------------------


def test_show_gives_envelope_headers_and_attempts(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["451 4.3.0 try again later"]
    message_id = commit(queue_path, manager, "Order 1001 has shipped", recipients=(ALICE, BOB))
    queue_id = queue_id_of(queue_path, message_id)
    assert cli("run", "--once").returncode == EX_TEMPFAIL

    result = cli("show", queue_id)

    assert result.returncode == EX_OK, result
    lines = result.stdout.splitlines()
    for expected in (f"queue id:    {queue_id}", "state:       deferred", f"message id:  {message_id}",
                     f"sender:      <{SENDER}>", f"recipients:  {ALICE}, {BOB}", "headers:",
                     "  Subject: Order 1001 has shipped", f"  To: {ALICE}", "attempts (1):"):
        assert expected in lines, result.stdout
    (attempt,) = [line for line in lines if "451 4.3.0 try again later" in line]
    assert f"127.0.0.1:{scripted_server.port}" in attempt


def test_show_of_an_unknown_id_exits_66_and_still_shows_the_others(cli, queue_path, manager):
    queue_id = queue_id_of(queue_path, commit(queue_path, manager))

    result = cli("show", "1234.nonexistent", queue_id)

    assert result.returncode == EX_NOINPUT, result
    assert "no message '1234.nonexistent'" in result.stderr
    assert f"queue id:    {queue_id}" in result.stdout


# -- retry -----------------------------------------------------------------------------


def test_retry_id_makes_a_deferred_message_due_now(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["451 4.3.0 try again later"]
    message_id = commit(queue_path, manager, "retried")
    queue_id = queue_id_of(queue_path, message_id)
    assert cli("run", "--once").returncode == EX_TEMPFAIL

    result = cli("retry", queue_id)

    assert result.returncode == EX_OK, result
    assert f"{queue_id}: requeued (was deferred)" in result.stdout
    assert states(cli) == {message_id: "ready"}
    # Not due for a minute without the retry; now the next run sends it.
    assert cli("run", "--once").returncode == EX_OK
    assert subjects(scripted_server) == ["retried"]


def test_retry_all_failed_keeps_the_history_and_the_next_run_delivers(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["550 5.7.1 rejected by policy"] * 2
    first = commit(queue_path, manager, "first")
    second = commit(queue_path, manager, "second")
    assert cli("run", "--once").returncode == EX_FAILED
    assert states(cli) == {first: "failed", second: "failed"}

    result = cli("retry", "--all-failed")

    assert result.returncode == EX_OK, result
    assert result.stdout.count("requeued (was failed)") == 2
    entries = cli.json("list")
    assert {entry["message_id"]: (entry["state"], entry["attempts"]) for entry in entries} == {
        first: ("ready", 1), second: ("ready", 1)}  # a requeue is not an attempt
    shown = cli("show", queue_id_of(queue_path, first)).stdout.splitlines()
    attempts = shown[shown.index("attempts (1):") + 1:]
    assert "550 5.7.1 rejected by policy" in attempts[0] and "requeued by an operator" in attempts[1], shown

    run = cli("run", "--once")
    assert run.returncode == EX_OK, run
    assert sorted(subjects(scripted_server)) == ["first", "second"]
    assert counts(queue_path) == EMPTY


def test_retry_all_deferred_leaves_failed_messages_alone(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_replies = ["451 4.3.0 try again later", "550 5.7.1 rejected by policy"]
    commit(queue_path, manager, "first")
    commit(queue_path, manager, "second")
    assert cli("run", "--once").returncode == EX_FAILED
    before = states(cli)
    assert sorted(before.values()) == ["deferred", "failed"]

    result = cli("retry", "--all-deferred")

    assert result.returncode == EX_OK, result
    assert result.stdout.count("requeued (was deferred)") == 1
    after = states(cli)
    assert after == {message_id: {"deferred": "ready", "failed": "failed"}[state]
                     for message_id, state in before.items()}


def test_retry_needs_ids_or_a_selection(cli, queue):
    nothing = cli("retry")
    none_failed = cli("retry", "--all-failed")
    unknown = cli("retry", "1234.nonexistent")

    assert nothing.returncode == EX_USAGE, nothing
    assert "--all-failed" in nothing.stderr
    assert (none_failed.returncode, none_failed.stdout.strip()) == (EX_OK, "no failed messages")
    assert unknown.returncode == EX_NOINPUT, unknown


# -- hold and release ------------------------------------------------------------------


def test_a_held_message_is_not_delivered_until_released(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_sink)
    commit(queue_path, manager, "kept")
    held = commit(queue_path, manager, "held")
    queue_id = queue_id_of(queue_path, held)

    hold = cli("hold", queue_id)
    assert hold.returncode == EX_OK, hold
    assert f"{queue_id}: held (was ready)" in hold.stdout
    assert cli("run", "--once").returncode == EX_OK
    assert subjects(smtp_sink) == ["kept"]
    assert [entry["queue_id"] for entry in cli.json("list", "--state", "held")] == [queue_id]

    release = cli("release", queue_id)
    assert release.returncode == EX_OK, release
    assert f"{queue_id}: released (was held)" in release.stdout
    assert cli("run", "--once").returncode == EX_OK
    assert subjects(smtp_sink) == ["kept", "held"]
    assert counts(queue_path) == EMPTY


def test_hold_and_release_of_unknown_ids_exit_66(cli, queue):
    for command in ("hold", "release"):
        result = cli(command, "1234.nonexistent")
        assert result.returncode == EX_NOINPUT, result
        assert "1234.nonexistent" in result.stderr


# -- delete ----------------------------------------------------------------------------


def test_delete_with_yes_removes_the_message(cli, queue_path, manager):
    kept = commit(queue_path, manager, "kept")
    deleted = queue_id_of(queue_path, commit(queue_path, manager, "deleted"))

    result = cli("delete", deleted, "--yes")

    assert result.returncode == EX_OK, result
    assert f"{deleted}: deleted (was ready)" in result.stdout
    assert states(cli) == {kept: "ready"}


def test_delete_without_yes_off_a_terminal_refuses_and_deletes_nothing(cli, queue_path, manager):
    message_id = commit(queue_path, manager)

    result = cli("delete", queue_id_of(queue_path, message_id))  # standard input is /dev/null

    assert result.returncode == EX_USAGE, result
    assert "--yes" in result.stderr
    assert states(cli) == {message_id: "ready"}


# -- send-test -------------------------------------------------------------------------


def test_send_test_prints_the_dialog_and_exits_0(cli, smtp_sink):
    cli.configure(smtp_sink)

    result = cli("send-test", "--to", ALICE, "--from", SENDER)

    assert result.returncode == EX_OK, result
    server = f"127.0.0.1:{smtp_sink.port}"
    assert f"{server} C: mail FROM:<{SENDER}>" in result.stdout
    assert f"{server} C: rcpt TO:<{ALICE}>" in result.stdout
    assert f"{server} S: 250 " in result.stdout
    assert f"accepted by {server}" in result.stdout.splitlines()[-1]
    (received,) = smtp_sink.received
    assert (received.sender, received.recipients) == (SENDER, (ALICE,))
    assert b"Subject: mailspool test message" in received.data


def test_send_test_exits_1_when_the_server_refuses(cli, scripted_server):
    cli.configure(scripted_server)
    scripted_server.handler.rcpt_replies = {ALICE: "550 5.1.1 no such user"}

    result = cli("send-test", "--to", ALICE, "--from", SENDER)

    assert result.returncode == EX_FAILED, result
    assert "S: 550 5.1.1 no such user" in result.stdout
    assert result.stdout.splitlines()[-1].startswith("FAILED: ")
    assert scripted_server.handler.received == []


def _check_credentials(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (USERNAME.encode(),
                                                                                          PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


def test_send_test_logs_in_and_redacts_the_credentials(cli):
    # AUTH without TLS, on loopback only: the smallest server that asks for a login.
    with SMTPSink(authenticator=_check_credentials, auth_require_tls=False) as server:
        cli.configure(server, smtp_username=USERNAME, smtp_password=PASSWORD)

        result = cli("send-test", "--to", ALICE, "--from", SENDER)

    assert result.returncode == EX_OK, result
    assert "C: AUTH PLAIN <credentials redacted>" in result.stdout
    assert "S: 235 " in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    assert len(server.received) == 1


def test_send_test_never_shows_the_password_when_the_login_fails(cli, smtp_sink):
    cli.configure(smtp_sink, smtp_username=USERNAME, smtp_password=PASSWORD)  # the sink offers no AUTH

    result = cli("send-test", "--to", ALICE, "--from", SENDER)

    assert result.returncode == EX_FAILED, result
    assert "FAILED: " in result.stdout
    assert "AUTH" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    assert smtp_sink.received == []


# -- sendmail --------------------------------------------------------------------------


def sendmail_then_run(cli, sink, *args, input):
    """``mailspool sendmail ARGS < input``, then ``run --once`` to ``sink``; return the sendmail result."""
    cli.configure(sink)
    queued = cli("sendmail", *args, input=input)
    assert queued.returncode == EX_OK, queued
    run = cli("run", "--once")
    assert run.returncode == EX_OK, run
    return queued


def test_sendmail_queues_standard_input_for_the_next_run(cli, smtp_sink, queue_path):
    cli.configure(smtp_sink)
    queued = cli("sendmail", "-i", ALICE, input="Subject: from a script\n\nHello from sendmail.\n")

    assert queued.returncode == EX_OK, queued
    assert counts(queue_path) == {**EMPTY, "ready": 1}
    assert smtp_sink.received == []

    assert cli("run", "--once").returncode == EX_OK
    (received,) = smtp_sink.received
    assert received.recipients == (ALICE,)
    assert b"Subject: from a script\r\n" in received.data
    assert received.data.endswith(b"\r\n\r\nHello from sendmail.\r\n")


def test_sendmail_t_takes_recipients_from_the_headers_and_drops_bcc(cli, smtp_sink):
    sendmail_then_run(cli, smtp_sink, "-t", "-i", input=(
        f"From: {SENDER}\nTo: Alice <{ALICE}>\nCc: {BOB}\nBcc: secret@example.org\nSubject: t\n\nHi.\n"))

    (received,) = smtp_sink.received
    assert set(received.recipients) == {ALICE, BOB, "secret@example.org"}
    assert b"Bcc" not in received.data and b"secret@example.org" not in received.data
    assert f"To: Alice <{ALICE}>".encode() in received.data


def test_sendmail_f_with_empty_brackets_gives_a_null_sender(cli, smtp_sink):
    cli.configure(smtp_sink)
    queued = cli("sendmail", "-f", "<>", "-i", ALICE, input=f"From: {SENDER}\nSubject: bounce\n\nHi.\n")

    assert queued.returncode == EX_OK, queued
    assert [entry["sender"] for entry in cli.json("list")] == [""]
    assert cli("run", "--once").returncode == EX_OK
    (received,) = smtp_sink.received
    assert received.sender == "<>"  # aiosmtpd's spelling of MAIL FROM:<>


def test_sendmail_f_sets_the_envelope_sender(cli, smtp_sink):
    sendmail_then_run(cli, smtp_sink, "-f", "robot@example.org", "-i", ALICE, input="Subject: hi\n\nHi.\n")

    (received,) = smtp_sink.received
    assert received.sender == "robot@example.org"
    assert b"From: robot@example.org\r\n" in received.data  # added, as the message had none


def test_sendmail_F_names_the_added_from_header(cli, smtp_sink):
    sendmail_then_run(cli, smtp_sink, "-F", "Cron Daemon", "-f", "cron@example.org", "-i", ALICE,
                      input="Subject: cron\n\nOutput.\n")

    (received,) = smtp_sink.received
    assert b"From: Cron Daemon <cron@example.org>\r\n" in received.data


def test_sendmail_F_does_not_replace_an_existing_from_header(cli, smtp_sink):
    sendmail_then_run(cli, smtp_sink, "-F", "Cron Daemon", "-i", ALICE,
                      input=f"From: Shop <{SENDER}>\nSubject: cron\n\nOutput.\n")

    (received,) = smtp_sink.received
    assert received.data.count(b"From: ") == 1
    assert f"From: Shop <{SENDER}>".encode() in received.data


def test_sendmail_accepts_the_flags_cronie_passes(cli, smtp_sink):
    sendmail_then_run(cli, smtp_sink, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "-odi", "user@example.org",
                      input=("From: root (Cron Daemon)\nTo: user@example.org\n"
                             "Subject: Cron <root@host> run-parts /etc/cron.hourly\n\n.hidden line kept\n"))

    (received,) = smtp_sink.received
    assert received.recipients == ("user@example.org",)
    assert received.data.endswith(b"\r\n\r\n.hidden line kept\r\n")


def test_sendmail_without_i_stops_at_a_lone_dot(cli, smtp_sink):
    sendmail_then_run(cli, smtp_sink, ALICE, input="Subject: dot\n\nbefore\n.\nafter the dot\n")

    (received,) = smtp_sink.received
    assert received.data.endswith(b"\r\n\r\nbefore\r\n")
    assert b"after the dot" not in received.data


def test_sendmail_C_names_the_configuration_file(cli, smtp_sink, tmp_path, queue_path):
    cli.configure(smtp_sink)
    env = dict(cli.env, MAILSPOOL_CONFIG=str(tmp_path / "missing.ini"))

    queued = cli("sendmail", "-C", cli.config_path, "-i", ALICE, input="Subject: hi\n\nHi.\n", env=env)

    assert queued.returncode == EX_OK, queued
    assert counts(queue_path) == {**EMPTY, "ready": 1}


@pytest.mark.parametrize("args", [("-Z", ALICE), ("-bp",), ("-f",)], ids=["unknown flag", "-bp", "-f alone"])
def test_sendmail_usage_errors_exit_64_and_queue_nothing(cli, queue_path, args):
    result = cli("sendmail", *args, input="Subject: hi\n\nHi.\n")

    assert result.returncode == EX_USAGE, result
    assert result.stderr.startswith("mailspool sendmail: ")
    assert not queue_path.exists() or counts(queue_path) == EMPTY


def test_sendmail_without_recipients_exits_64_and_queues_nothing(cli, queue_path):
    result = cli("sendmail", "-t", "-i", input=f"From: {SENDER}\nSubject: nobody\n\nHi.\n")

    assert result.returncode == EX_USAGE, result
    assert "no recipients" in result.stderr
    assert not queue_path.exists() or counts(queue_path) == EMPTY


def test_sendmail_without_a_queue_path_is_a_configuration_error(cli):
    cli.write_config("[mailspool]\nsmtp_tls = none\n")

    result = cli("sendmail", "-i", ALICE, input="Subject: hi\n\nHi.\n")

    assert result.returncode == EX_CONFIG, result
    assert "queue_path" in result.stderr


# -- run --daemon ----------------------------------------------------------------------


def start_daemon(cli, queue_path):
    """``run --daemon`` with a ten-minute poll: within a test it reacts only to the doorbell and signals."""
    MaildirQueue(queue_path)  # the daemon needs an existing queue
    daemon = cli.start("run", "--daemon", "-o", IDLE_POLL)
    daemon.wait_for(lambda: listeners(queue_path), "doorbell FIFO (the daemon listening)")
    return daemon


def test_daemon_delivers_a_commit_at_once_through_the_doorbell(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_sink)
    daemon = start_daemon(cli, queue_path)

    commit(queue_path, manager, "rung")

    daemon.wait_for(lambda: subjects(smtp_sink) == ["rung"], "delivery of the committed message")
    assert daemon.stop() == EX_OK, daemon.describe()
    assert counts(queue_path) == EMPTY
    assert listeners(queue_path) == set()  # its FIFO went with it


def test_daemon_rescans_on_sigusr1(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_sink)
    # Queued before the daemon starts: its first pass sends it. Once the sink has it, that
    # pass has listed what it will send, and nothing rings the doorbell any more.
    commit(queue_path, manager, "first pass")
    MaildirQueue(queue_path)
    daemon = cli.start("run", "--daemon", "-o", IDLE_POLL)
    daemon.wait_for(lambda: subjects(smtp_sink) == ["first pass"], "delivery of the first message")

    message_id = drop_silently(queue_path, "silent")
    queue_id = queue_id_of(queue_path, message_id)
    time.sleep(1)  # not a timing assertion: without a signal the daemon sleeps for ten minutes
    assert (queue_path / "new" / queue_id).exists(), daemon.describe()

    daemon.send_signal(signal.SIGUSR1)

    daemon.wait_for(lambda: subjects(smtp_sink) == ["first pass", "silent"], "delivery after SIGUSR1")
    assert "SIGUSR1 received" in daemon.stderr
    assert daemon.stop() == EX_OK, daemon.describe()


def test_retry_and_release_wake_a_running_daemon(cli, scripted_server, queue_path, manager):
    # Retries wait an hour and the daemon polls every ten minutes: only the doorbell can be quick.
    cli.configure(scripted_server, backoff_min="1h", backoff_max="2h")
    scripted_server.handler.data_replies = ["451 4.3.0 try again later"]
    held_id = queue_id_of(queue_path, commit(queue_path, manager, "held"))
    assert cli("hold", held_id).returncode == EX_OK
    deferred_id = queue_id_of(queue_path, commit(queue_path, manager, "deferred"))
    daemon = cli.start("run", "--daemon", "-o", IDLE_POLL)
    daemon.wait_for(lambda: (queue_path / "deferred" / deferred_id).exists(), "the first attempt to be deferred")

    retry = cli("retry", deferred_id)
    assert retry.returncode == EX_OK, retry
    daemon.wait_for(lambda: subjects(scripted_server) == ["deferred"], "delivery after retry")

    release = cli("release", held_id)
    assert release.returncode == EX_OK, release
    daemon.wait_for(lambda: subjects(scripted_server) == ["deferred", "held"], "delivery after release")
    assert daemon.stop() == EX_OK, daemon.describe()
    assert counts(queue_path) == EMPTY


def test_daemon_stops_on_sigterm_without_losing_anything(cli, scripted_server, queue_path, manager):
    cli.configure(scripted_server)
    scripted_server.handler.data_delay = 0.5  # SIGTERM arrives while a message is being sent
    committed = commit_many(queue_path, manager, 6)
    daemon = cli.start("run", "--daemon", "-o", IDLE_POLL)
    daemon.wait_for(lambda: scripted_server.handler.data_attempts >= 1, "the first DATA")

    assert daemon.stop(signal.SIGTERM) == EX_OK, daemon.describe()

    assert "daemon stopped" in daemon.stderr
    delivered = [email.message_from_bytes(data)["Message-Id"] for data in received_data(scripted_server)]
    waiting = [entry.envelope.message_id for entry in MaildirQueue(queue_path).entries()]
    assert len(delivered) >= 1
    assert sorted(delivered + waiting) == sorted(committed)  # each message once: sent or still queued
    left = counts(queue_path)
    assert left == {**EMPTY, "ready": len(waiting)}  # none stuck in active/, none failed
    assert listeners(queue_path) == set()


def test_daemon_rereads_the_configuration_on_sighup(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_port=free_port())  # nobody listens there
    daemon = start_daemon(cli, queue_path)
    (before,) = listeners(queue_path)

    cli.configure(smtp_sink)
    daemon.send_signal(signal.SIGHUP)
    # The reloaded daemon listens on a new FIFO once it runs with the new settings.
    daemon.wait_for(lambda: listeners(queue_path) - {before}, "a new doorbell FIFO after SIGHUP")
    commit(queue_path, manager, "after reload")

    daemon.wait_for(lambda: subjects(smtp_sink) == ["after reload"], "delivery with the re-read smtp_port")
    assert "configuration re-read" in daemon.stderr
    assert daemon.stop() == EX_OK, daemon.describe()
    assert counts(queue_path) == EMPTY


# -- debug-server ----------------------------------------------------------------------


def test_debug_server_prints_what_it_receives_and_stops_on_sigterm(cli):
    port = free_port()
    server = cli.start("debug-server", "--port", port)
    server.wait_for(lambda: f"listening on 127.0.0.1:{port}" in server.stdout, "the listening line")

    with smtplib.SMTP("127.0.0.1", port, timeout=COMMAND_TIMEOUT) as client:
        client.sendmail(SENDER, [ALICE, BOB], message("Debug me"))

    server.wait_for(lambda: "Subject: Debug me" in server.stdout, "the message on standard output")
    assert f"message from <{SENDER}> to {ALICE}, {BOB}" in server.stdout
    assert server.stop(signal.SIGTERM) == EX_OK, server.describe()
    assert "debug SMTP server stopped" in server.stdout


# -- demo and --help -------------------------------------------------------------------


def test_demo_runs_end_to_end(cli, tmp_path):
    result = cli("demo", "--queue", tmp_path / "demo-queue")

    assert result.returncode == EX_OK, result
    assert "demo finished: everything as promised" in result.stdout


def subcommand_names():
    (subparsers,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return sorted(subparsers.choices)


SUBCOMMANDS = ["db", "debug-server", "delete", "demo", "hold", "list", "move", "release", "retry", "run",
               "send-test", "sendmail", "show", "status"]


def test_the_help_test_covers_every_subcommand():
    assert subcommand_names() == SUBCOMMANDS


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_exits_0(cli, command):
    result = cli(command, "--help")

    assert result.returncode == EX_OK, result
    assert result.stdout.startswith(f"usage: mailspool {command}")


def test_help_of_the_command_lists_the_subcommands(cli):
    result = cli("--help")

    assert result.returncode == EX_OK, result
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.strip()]
    assert set(SUBCOMMANDS) <= set(listed), result.stdout


# -- progress display ------------------------------------------------------------------

PROGRESS_MESSAGES = 301  # above console.PROGRESS_THRESHOLD


def test_no_progress_display_when_stderr_is_not_a_terminal(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_sink)
    commit_many(queue_path, manager, PROGRESS_MESSAGES)

    result = cli("run", "--once")

    assert result.returncode == EX_OK, result
    assert len(smtp_sink.received) == PROGRESS_MESSAGES
    assert "ETA" not in result.stderr and "\r" not in result.stderr


def test_progress_display_on_a_terminal(cli, smtp_sink, queue_path, manager):
    cli.configure(smtp_sink)
    commit_many(queue_path, manager, PROGRESS_MESSAGES)
    master, terminal = pty.openpty()
    chunks = []

    def read_everything():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed its side of the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read_everything, daemon=True)
    try:
        process = subprocess.Popen(cli.command("run", "--once"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=terminal, env=cli.env)
        os.close(terminal)  # the child's copy is the only one left: EOF when it exits
        terminal = None
        reader.start()
        try:
            status = process.wait(COMMAND_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(STOP_TIMEOUT)
        reader.join(COMMAND_TIMEOUT)
    finally:
        if terminal is not None:
            os.close(terminal)
        os.close(master)

    shown = b"".join(chunks).decode("utf-8", "replace")
    assert status == EX_OK, shown
    assert len(smtp_sink.received) == PROGRESS_MESSAGES
    assert f"{PROGRESS_MESSAGES}/{PROGRESS_MESSAGES} messages ({PROGRESS_MESSAGES} sent" in shown
    assert "ETA" in shown


# -- usability details ----------------------------------------------------------


def test_argparse_usage_errors_exit_64_like_the_others(cli, queue_path, manager):
    commit(queue_path, manager)
    result = cli("list", "--state", "bogus")
    assert result.returncode == EX_USAGE, result
    assert "invalid choice" in result.stderr


def test_the_queue_can_be_given_with_an_option_on_every_command(cli, queue_path, manager):
    commit(queue_path, manager)
    cli.configure(queue_path="/nonexistent/elsewhere")
    assert len(cli.json("list", "-Q", queue_path)) == 1
    assert cli.json("status", "--queue", queue_path)["counts"]["ready"] == 1


def test_an_action_on_a_message_in_the_wrong_state_names_the_state(cli, queue_path, manager):
    commit(queue_path, manager)
    (queue_id,) = os.listdir(queue_path / "new")
    result = cli("retry", queue_id)
    assert result.returncode == 1, result
    assert f"{queue_id}: is ready, so it cannot be requeued" in result.stderr


def test_list_shows_the_whole_last_reply_on_its_own_line(cli, scripted_server, queue_path, manager):
    long_reply = "450 4.2.1 " + "mailbox temporarily unavailable, " * 4 + "the end"
    scripted_server.handler.rcpt_replies = {BOB: long_reply}
    commit(queue_path, manager, recipients=(ALICE, BOB))
    cli.configure(scripted_server)
    assert cli("run", "--once").returncode == EX_TEMPFAIL

    lines = cli("list").stdout.splitlines()
    assert len(lines) == 2
    assert lines[1].strip() == f"({BOB}: {long_reply})"


def test_sendmail_is_silent_when_it_works(cli):
    result = cli("sendmail", "-i", ALICE, input="Subject: quiet\n\nbody\n")
    assert result.returncode == EX_OK, result
    assert (result.stdout, result.stderr) == ("", "")


def test_sendmail_with_the_null_sender_adds_a_real_from_address(cli, smtp_sink):
    cli.configure(smtp_sink, default_sender="cron@example.org")
    assert cli("sendmail", "-i", "-f", "<>", ALICE, input="Subject: bounce\n\nbody\n").returncode == EX_OK
    assert cli("run", "--once").returncode == EX_OK
    (received,) = smtp_sink.received
    assert received.sender == "<>"  # how aiosmtpd reports the null reverse-path
    assert b"\r\nFrom: cron@example.org\r\n" in b"\r\n" + received.data


def test_the_demo_refuses_a_queue_that_holds_messages(cli, queue_path, manager):
    commit(queue_path, manager)
    result = cli("demo", "--queue", queue_path)
    assert result.returncode == EX_USAGE, result
    assert "already holds messages" in result.stderr
    assert len(os.listdir(queue_path / "new")) == 1
