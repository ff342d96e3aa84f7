"""The ``mailspool`` command line; the only module that configures logging.

Exit statuses follow sysexits(3) where one fits: 0 success, 1 a message
moved to failed (``run``) or an operator action that does not apply to a
message's state, 64 usage, 65 bad message data, 66 no such queue entry, 75
temporary failure (deferred mail, unwritable queue), 78 configuration
error. ``status`` with age thresholds uses the monitoring
convention 0/1/2 (OK/WARNING/CRITICAL).
"""

import argparse
import datetime
import email.parser
import email.policy
import email.utils
import getpass
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

import transaction

from mailspool import config
from mailspool.delivery import QueuedMailDelivery, is_database_url
from mailspool.exceptions import ConfigError, DeliveryError, InvalidMessage, QueueError
from mailspool.prepare import prepare
from mailspool.processor import QueueProcessor

log = logging.getLogger(__name__)

EX_OK, EX_FAILED, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL, EX_CONFIG = 0, 1, 64, 65, 66, 75, 78
NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL = 0, 1, 2
STATES = ("ready", "active", "deferred", "held", "failed")
PROGRESS_THRESHOLD = 300  # messages; below this a run is over before a counter helps
SENDMAIL_HELP = ("mailspool sendmail [-t] [-f SENDER] [-F NAME] [-i] [-oi] [-C CONFIG] [RECIPIENT...]; "
                 "other sendmail flags (-odi, -oem, -B 8BITMIME, ...) are accepted and ignored.")


class UsageError(Exception):
    """Bad command-line usage: the message is printed and the exit status is 64."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors exit 64 (EX_USAGE) like every other usage error here."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


# -- the parser ---------------------------------------------------------------------

def build_parser():
    common = _ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", metavar="FILE",
                        help=f"configuration file (default: ${config.CONFIG_ENVIRONMENT_VARIABLE}, "
                             f"then {config.DEFAULT_CONFIG_PATH})")
    common.add_argument("-o", "--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override a setting of the [mailspool] section (repeatable)")
    verbosity = common.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log every step (DEBUG)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log only errors")

    def queue_argument(subparser):
        subparser.add_argument("queue", nargs="?", metavar="QUEUE",
                               help="queue directory or postgresql:// URL (default: queue_path or queue_url)")
        subparser.add_argument("-Q", "--queue", dest="queue_option", metavar="QUEUE", help="the same as QUEUE")

    def queue_option(subparser):
        subparser.add_argument("-Q", "--queue", metavar="QUEUE",
                               help="queue directory or postgresql:// URL (default: queue_path or queue_url)")

    parser = _ArgumentParser(
        prog="mailspool",
        description="Transactional mail queue: run, inspect and repair a mailspool queue.",
        epilog="Every command takes --help. Exit statuses: see docs/cli.rst.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser("run", parents=[common], help="deliver the queue (once, or as a daemon)",
                              description="Deliver what is due. --once (the default) drains the queue and "
                                          "exits: 0 nothing failed, 75 something was deferred, 1 something "
                                          "moved to failed. --daemon keeps running: SIGTERM/SIGINT stop after "
                                          "the current message, SIGHUP re-reads the configuration, SIGUSR1 "
                                          "rescans at once.")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="drain what is due and exit (for cron; the default)")
    mode.add_argument("--daemon", action="store_true", help="keep running, woken at each commit")
    run.add_argument("--workers", type=int, metavar="N", help="parallel connections (setting: workers)")
    queue_argument(run)
    run.set_defaults(handler=command_run)

    status = commands.add_parser("status", parents=[common], help="counts, oldest message, next retry",
                                 description="Summarise the queue. With --warn-age/--crit-age, exit 0/1/2 "
                                             "(OK/WARNING/CRITICAL) by the age of the oldest undelivered "
                                             "message, for monitoring.")
    status.add_argument("--json", action="store_true", help="machine-readable output (see docs/cli.rst)")
    status.add_argument("--warn-age", type=config.duration, metavar="AGE", help="WARNING when older (90s, 15m, 2h)")
    status.add_argument("--crit-age", type=config.duration, metavar="AGE", help="CRITICAL when older")
    queue_argument(status)
    status.set_defaults(handler=command_status)

    listing = commands.add_parser("list", parents=[common], help="one line per message, like mailq",
                                  description="List messages: queue id, state, age, size, attempts, next "
                                              "attempt, sender, recipient count, last reply.")
    listing.add_argument("--state", choices=STATES, action="append", help="only this state (repeatable)")
    listing.add_argument("--json", action="store_true", help="machine-readable output (see docs/cli.rst)")
    listing.add_argument("--limit", type=int, metavar="N", help="at most N messages, oldest first")
    queue_argument(listing)
    listing.set_defaults(handler=command_list)

    show = commands.add_parser("show", parents=[common], help="envelope, headers and attempts of a message")
    show.add_argument("ids", nargs="+", metavar="ID")
    queue_option(show)
    show.set_defaults(handler=command_show)

    retry = commands.add_parser("retry", parents=[common], help="make messages due now",
                                description="Make deferred, held or failed messages due now. Failed ones "
                                            "keep their history; recipients that already got them do not "
                                            "get them again.")
    retry.add_argument("ids", nargs="*", metavar="ID")
    retry.add_argument("--all-failed", action="store_true", help="every failed message")
    retry.add_argument("--all-deferred", action="store_true", help="every deferred message")
    queue_option(retry)
    retry.set_defaults(handler=command_retry)

    for name, verb in (("hold", "set messages aside until released"), ("release", "release held messages")):
        subparser = commands.add_parser(name, parents=[common], help=verb)
        subparser.add_argument("ids", nargs="+", metavar="ID")
        queue_option(subparser)
        subparser.set_defaults(handler=command_hold if name == "hold" else command_release)

    delete = commands.add_parser("delete", parents=[common], help="remove messages for good",
                                 description="Remove messages (not those being delivered). Asks for "
                                             "confirmation on a terminal; elsewhere --yes is required.")
    delete.add_argument("ids", nargs="+", metavar="ID")
    delete.add_argument("-y", "--yes", action="store_true", help="do not ask")
    queue_option(delete)
    delete.set_defaults(handler=command_delete)

    send_test = commands.add_parser("send-test", parents=[common], help="send a test message, show the dialog",
                                    description="Send one test message straight through the configured "
                                                "server, printing the SMTP dialog (credentials redacted). "
                                                "Exit 0 if it was accepted, 1 if not.")
    send_test.add_argument("--to", required=True, metavar="ADDR", help="recipient")
    send_test.add_argument("--from", dest="sender", metavar="ADDR", help="sender (default: default_sender)")
    send_test.set_defaults(handler=command_send_test)

    commands.add_parser(
        "sendmail", help="sendmail-compatible: queue a message read from standard input",
        description=SENDMAIL_HELP,
        add_help=False,
    )

    debug_server = commands.add_parser("debug-server", parents=[common], help="an SMTP sink that prints messages",
                                       description="Listen on 127.0.0.1 and print every message received.")
    debug_server.add_argument("--port", type=int, default=1025, help="port (default 1025)")
    debug_server.set_defaults(handler=command_debug_server)

    db = commands.add_parser("db", parents=[common], help="PostgreSQL queue: create its tables",
                             description="db init: create the PostgreSQL queue's tables and indexes if they are "
                                         "missing (idempotent).")
    db.add_argument("action", choices=["init"])
    queue_argument(db)
    db.set_defaults(handler=command_db)

    move = commands.add_parser("move", parents=[common], help="move every message to another queue",
                               description="Move every message of the queue to the queue --to names (a maildir "
                                           "directory or a postgresql:// URL), keeping ids, states and attempt "
                                           "history. Safe to run again after an interruption.")
    move.add_argument("--to", required=True, metavar="QUEUE", help="target queue directory or postgresql:// URL")
    queue_argument(move)
    move.set_defaults(handler=command_move)

    demo = commands.add_parser("demo", parents=[common], help="run the whole job end to end on loopback",
                               description="Start an SMTP sink on 127.0.0.1, commit a few messages through a "
                                           "queued delivery, abort one transaction, drain the queue and show "
                                           "what the server got.")
    demo.add_argument("--queue", metavar="DIR", help="queue directory to use (default: a temporary one)")
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv=None):
    """Run the command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sendmail"]:
        return sendmail_main(argv[1:])
    arguments = build_parser().parse_args(argv)
    try:
        settings = load_settings(arguments)
        configure_logging(arguments, settings)
        return arguments.handler(arguments, settings)
    except BrokenPipeError:
        # The reader went away (`mailspool list | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK
    except QueueError as exc:
        print(f"mailspool: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except ConfigError as exc:
        print(f"mailspool: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except UsageError as exc:
        print(f"mailspool {arguments.command}: {exc}", file=sys.stderr)
        return EX_USAGE


def load_settings(arguments):
    overrides = {}
    for item in getattr(arguments, "set", []):
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"command line: -o {item!r} is not KEY=VALUE", key=key)
        overrides[key.strip()] = value
    queue = getattr(arguments, "queue", None) or getattr(arguments, "queue_option", None)
    if queue and arguments.command != "demo":
        # A directory or a postgresql:// URL; either replaces both settings of the file.
        overrides["queue_url"], overrides["queue_path"] = (queue, "") if is_database_url(queue) else ("", queue)
    if getattr(arguments, "workers", None) is not None:
        overrides["workers"] = str(arguments.workers)
    return config.load(getattr(arguments, "config", None), overrides)


def configure_logging(arguments, settings):
    level = settings.log_level
    if getattr(arguments, "verbose", False):
        level = "DEBUG"
    elif getattr(arguments, "quiet", False):
        level = "ERROR"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(level)  # again on SIGHUP, so not through basicConfig
    # aiosmtpd logs every SMTP command at INFO; that is a sink's chatter, not ours.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    config.configure_delivery_log(settings)


def open_queue(settings):
    """The configured queue, which must exist; QueueError becomes a ConfigError naming the path."""
    key = "queue_url" if settings.queue_url else "queue_path"
    try:
        queue = settings.make_queue(create=False)
        verify = getattr(queue, "verify", None)  # a database queue: reachable, with its tables?
        if verify is not None:
            verify()
        return queue
    except QueueError as exc:
        raise ConfigError(f"{key} ({settings.sources.get(key, 'settings')}): {exc}", key=key) from exc


# -- run ------------------------------------------------------------------------------

def command_run(arguments, settings):
    if arguments.daemon:
        return run_daemon(arguments, settings)
    queue = open_queue(settings)
    progress = ProgressDisplay(sys.stderr) if sys.stderr.isatty() else None
    processor = QueueProcessor(queue, settings.make_mailer(), progress=progress, **settings.processor_options())
    try:
        with _signals_stop(processor):
            summary = processor.run_once()
    except QueueError as exc:  # e.g. a read-only queue: nothing was lost, try again later
        print(f"mailspool run: cannot use the queue: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    if progress is not None:
        progress.finish()
    log.info("run finished: %s", summary)
    if summary.failed:
        return EX_FAILED
    if summary.deferred:
        return EX_TEMPFAIL
    return EX_OK


class _signals_stop:
    """While active, SIGTERM and SIGINT make ``processor`` stop after the messages in hand."""

    def __init__(self, processor):
        self.processor = processor
        self.previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self._stop)
        return self

    def _stop(self, signum, frame):
        log.info("%s received: stopping after the current message", signal.Signals(signum).name)
        self.processor.stop()

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run_daemon(arguments, settings):
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the configuration, SIGUSR1 rescans the queue now.

    The handlers stay installed for the daemon's whole life, so a SIGTERM
    during a reload stops it cleanly too.
    """
    state = {"processor": None, "reload": False, "stop": False}

    def build(current):
        return QueueProcessor(open_queue(current), current.make_mailer(), **current.processor_options())

    def on_stop(signum, frame):
        log.info("%s received: stopping after the current message", signal.Signals(signum).name)
        state["stop"] = True
        state["processor"].stop()

    def on_hup(signum, frame):
        log.info("SIGHUP received: re-reading the configuration after the current message")
        state["reload"] = True
        state["processor"].stop()

    def on_usr1(signum, frame):
        log.info("SIGUSR1 received: rescanning the queue")
        state["processor"].wake()

    state["processor"] = build(settings)
    handlers = {signal.SIGTERM: on_stop, signal.SIGINT: on_stop, signal.SIGHUP: on_hup, signal.SIGUSR1: on_usr1}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        while not state["stop"]:
            log.info("daemon watching %r (poll every %gs)", state["processor"].queue, settings.poll_interval)
            state["processor"].run_forever(settings.poll_interval)
            if state["stop"] or not state["reload"]:
                break
            state["reload"] = False
            try:
                new_settings = load_settings(arguments)
                new_processor = build(new_settings)
            except (ConfigError, QueueError) as exc:
                log.error("configuration not re-read, keeping the old one: %s", exc)
                continue
            settings, state["processor"] = new_settings, new_processor
            configure_logging(arguments, settings)
            log.info("configuration re-read")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("daemon stopped")
    return EX_OK


class ProgressDisplay:
    """A one-line counter with rate and ETA, for runs on a terminal."""

    def __init__(self, stream):
        self.stream = stream
        self.started = time.monotonic()
        self.shown = False

    def __call__(self, summary, total):
        if total < PROGRESS_THRESHOLD:
            return
        done = summary.sent + summary.deferred + summary.failed + summary.skipped
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = done / elapsed
        eta = (total - done) / rate if rate else 0
        self.stream.write(f"\r{done}/{total} messages ({summary.sent} sent, {summary.deferred} deferred, "
                          f"{summary.failed} failed), {rate:.0f}/s, ETA {eta:.0f}s ")
        self.stream.flush()
        self.shown = True

    def finish(self):
        if self.shown:
            self.stream.write("\n")


# -- status and list -------------------------------------------------------------------------

def _iso(timestamp):
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(timespec="seconds")


def _age(seconds):
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def queue_name(queue):
    """How messages name a queue: its directory, or its database URL without the password."""
    return getattr(queue, "path", None) or getattr(queue, "name", None) or repr(queue)


def queue_status(queue, now):
    """The ``status --json`` document (shape documented in docs/cli.rst).

    A queue that offers ``summary()`` (PostgreSQL: a few indexed queries)
    answers for itself; otherwise every entry's envelope is read.
    """
    summary = getattr(queue, "summary", None)
    if summary is not None:
        found = summary()
        oldest = found["oldest_enqueued_at"]
        last_error = found["last_error"]
        if last_error is not None:
            last_error = dict(last_error, at=_iso(last_error.pop("at_epoch")))
        return {
            "queue": queue_name(queue), "counts": found["counts"], "scheduled": found["scheduled"],
            "oldest_age_seconds": None if oldest is None else round(now - oldest, 1),
            "next_retry_at": _iso(found["next_retry_at"]), "last_error": last_error,
        }
    counts = dict.fromkeys(STATES, 0)
    oldest, next_retry, last_error, scheduled = None, None, None, 0
    for entry in queue.entries():
        counts[entry.state] += 1
        if entry.envelope is None:
            continue
        if entry.state in ("ready", "active", "deferred") and not entry.scheduled:
            oldest = entry.envelope.enqueued_at if oldest is None else min(oldest, entry.envelope.enqueued_at)
        if entry.scheduled:
            scheduled += 1
        elif entry.state == "deferred":
            next_retry = entry.due_at if next_retry is None else min(next_retry, entry.due_at)
        attempts = entry.delivery_attempts
        if attempts and entry.last_reply and (last_error is None or attempts[-1].at > last_error["at_epoch"]):
            last_error = {"queue_id": entry.queue_id, "message_id": entry.envelope.message_id,
                          "at_epoch": attempts[-1].at, "error": entry.last_reply}
    if last_error is not None:
        last_error["at"] = _iso(last_error.pop("at_epoch"))
    return {
        "queue": queue_name(queue),
        "counts": counts,
        "scheduled": scheduled,
        "oldest_age_seconds": None if oldest is None else round(now - oldest, 1),
        "next_retry_at": _iso(next_retry),
        "last_error": last_error,
    }


def command_status(arguments, settings):
    queue = open_queue(settings)
    document = queue_status(queue, time.time())
    age = document["oldest_age_seconds"] or 0
    verdict, code = "OK", NAGIOS_OK
    if arguments.crit_age is not None and age > arguments.crit_age:
        verdict, code = "CRITICAL", NAGIOS_CRITICAL
    elif arguments.warn_age is not None and age > arguments.warn_age:
        verdict, code = "WARNING", NAGIOS_WARNING
    checking = arguments.warn_age is not None or arguments.crit_age is not None
    document["check"] = {"status": verdict, "warn_age": arguments.warn_age, "crit_age": arguments.crit_age}
    if arguments.json:
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        counts = document["counts"]
        print(f"queue {document['queue']}")
        print("  " + ", ".join(f"{counts[state]} {state}" for state in STATES)
              + (f" ({document['scheduled']} scheduled)" if document["scheduled"] else ""))
        if document["oldest_age_seconds"] is not None:
            print(f"  oldest undelivered message: {_age(document['oldest_age_seconds'])} old")
        if document["next_retry_at"]:
            print(f"  next retry: {document['next_retry_at']}")
        if document["last_error"]:
            error = document["last_error"]
            print(f"  last error: {error['at']} {error['queue_id']}: {error['error']}")
        if checking:
            print(f"MAILSPOOL {verdict} - oldest undelivered message {_age(age)} old")
    return code if checking else EX_OK


def entry_document(entry, now):
    """One message of ``list --json`` (shape documented in docs/cli.rst)."""
    envelope = entry.envelope
    return {
        "queue_id": entry.queue_id,
        "state": entry.state,
        "scheduled": entry.scheduled,
        "message_id": envelope.message_id if envelope else None,
        "sender": envelope.sender if envelope else None,
        "recipients": list(envelope.recipients) if envelope else [],
        "age_seconds": round(now - envelope.enqueued_at, 1) if envelope else None,
        "size": entry.size,
        "attempts": len(entry.delivery_attempts),
        "next_attempt_at": _iso(entry.due_at) if entry.state == "deferred" else None,
        "last_reply": entry.last_reply or None,
        "problem": entry.problem or None,
    }


def write_json_array(documents, write):
    """Write ``documents`` as the JSON array ``json.dumps(list(documents), indent=1)`` makes, plus a newline.

    One document at a time: a list of 100,000 messages is never held in
    memory as a whole.
    """
    separator = "[\n "
    for document in documents:
        write(separator + json.dumps(document, indent=1, ensure_ascii=False).replace("\n", "\n "))
        separator = ",\n "
    write("[]\n" if separator.startswith("[") else "\n]\n")


def command_list(arguments, settings):
    queue = open_queue(settings)
    now = time.time()
    entries = queue.entries(arguments.state, limit=arguments.limit)
    if arguments.json:
        write_json_array((entry_document(entry, now) for entry in entries), sys.stdout.write)
        return EX_OK
    write = sys.stdout.write
    count = 0
    for entry in entries:
        count += 1
        envelope = entry.envelope
        if envelope is None:
            write(f"{entry.queue_id}  {entry.state:<8}  unreadable: {entry.problem}\n")
            continue
        state = "scheduled" if entry.scheduled else entry.state
        next_attempt = _iso(entry.due_at) if entry.state == "deferred" else "-"
        write(f"{entry.queue_id}  {state:<9} {_age(now - envelope.enqueued_at):>5} {entry.size:>8}B "
              f"{len(entry.delivery_attempts):>2} tries  next {next_attempt}  <{envelope.sender}> -> "
              f"{len(envelope.recipients)} rcpt\n")
        if entry.last_reply:
            write(f"    ({entry.last_reply})\n")  # as mailq does: the reason on its own line
    if count == 0:
        print("queue is empty" if not arguments.state else f"no {'/'.join(arguments.state)} messages")
    return EX_OK


def command_show(arguments, settings):
    queue = open_queue(settings)
    status = EX_OK
    for queue_id in arguments.ids:
        entry = queue.entry(queue_id)
        if entry is None:
            print(f"mailspool show: no message {queue_id!r} in {queue_name(queue)}", file=sys.stderr)
            status = EX_NOINPUT
            continue
        print(f"queue id:    {entry.queue_id}")
        print(f"state:       {'scheduled' if entry.scheduled else entry.state}")
        if entry.envelope is None:
            print(f"problem:     {entry.problem}")
            continue
        envelope = entry.envelope
        print(f"message id:  {envelope.message_id}")
        print(f"sender:      <{envelope.sender}>")
        print(f"recipients:  {', '.join(envelope.recipients)}")
        print(f"queued:      {_iso(envelope.enqueued_at)}")
        if entry.due_at is not None:
            print(f"due:         {_iso(entry.due_at)}")
        print(f"size:        {entry.size} bytes")
        print("headers:")
        head = queue.read_message(queue_id).split(b"\r\n\r\n", 1)[0]
        for name, value in email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head).items():
            print(f"  {name}: {value}")
        print(f"attempts ({len(entry.delivery_attempts)}):")
        for attempt in entry.attempts:
            if attempt.requeued:
                print(f"  {_iso(attempt.at)}  requeued by an operator")
                continue
            accepted = f" accepted: {', '.join(attempt.accepted)};" if attempt.accepted else ""
            refused = "".join(f" {rcpt}: {reply};" for rcpt, reply in attempt.refused.items())
            print(f"  {_iso(attempt.at)}  {attempt.server or '-'} {accepted}{refused} {attempt.error}".rstrip())
        print()
    return status


# -- repair -----------------------------------------------------------------------------

def _apply(queue, ids, action, verb):
    """Run ``action`` on each id; exit 66 for unknown ids, 1 for messages in a state it does not apply to."""
    status = EX_OK
    for queue_id in ids:
        former = action(queue_id)
        if former is not None:
            print(f"{queue_id}: {verb} (was {former})")
            continue
        entry = queue.entry(queue_id)
        if entry is None:
            print(f"mailspool: {queue_id}: no such message in {queue_name(queue)}", file=sys.stderr)
            status = EX_NOINPUT
        else:
            print(f"mailspool: {queue_id}: is {entry.state}, so it cannot be {verb}", file=sys.stderr)
            status = max(status, EX_FAILED) if status != EX_NOINPUT else status
    return status


def command_retry(arguments, settings):
    queue = open_queue(settings)
    ids = list(arguments.ids)
    states = [state for state, wanted in (("failed", arguments.all_failed), ("deferred", arguments.all_deferred))
              if wanted]
    ids += [entry.queue_id for entry in queue.entries(states)] if states else []
    if not ids:
        if states:
            print(f"no {' or '.join(states)} messages")
            return EX_OK
        raise UsageError("give message ids, --all-failed or --all-deferred")
    status = _apply(queue, ids, queue.requeue, "requeued")
    queue.announce()
    return status


def command_hold(arguments, settings):
    queue = open_queue(settings)
    return _apply(queue, arguments.ids, queue.hold, "held")


def command_release(arguments, settings):
    queue = open_queue(settings)
    status = _apply(queue, arguments.ids, queue.unhold, "released")
    queue.announce()
    return status


def command_delete(arguments, settings):
    queue = open_queue(settings)
    if not arguments.yes:
        if not sys.stdin.isatty():
            raise UsageError("refusing to delete without --yes when not on a terminal")
        answer = input(f"Delete {len(arguments.ids)} message(s) for good? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EX_OK
    return _apply(queue, arguments.ids, queue.delete, "deleted")


# -- db, move -------------------------------------------------------------------------

def command_db(arguments, settings):
    if not is_database_url(settings.queue_location or ""):
        raise UsageError("mailspool db init needs a postgresql:// queue (QUEUE, -Q or queue_url)")
    queue = settings.make_queue()
    queue.create_schema()
    print(f"mailspool tables ready in {queue_name(queue)}")
    return EX_OK


def command_move(arguments, settings):
    from mailspool.move import move_queue

    source = open_queue(settings)
    to_url = is_database_url(arguments.to)
    target_settings = config.parse({"queue_url": arguments.to if to_url else "",
                                    "queue_path": "" if to_url else arguments.to},
                                   {"queue_path": "--to", "queue_url": "--to"}, base=settings)
    target = target_settings.make_queue(create=True)
    if queue_name(source) == queue_name(target):
        raise UsageError("the source and the target are the same queue")
    done = move_queue(source, target)
    target.announce()
    print(f"moved {done['moved']} message(s) from {queue_name(source)} to {queue_name(target)}"
          + (f"; {done['already_there']} were there already (removed from the source)" if done["already_there"]
             else "")
          + (f"; {done['in_flight']} being delivered were left: run the move again once processors are stopped"
             if done["in_flight"] else ""))
    return EX_TEMPFAIL if done["in_flight"] else EX_OK


# -- send-test, sendmail, debug-server, demo ------------------------------------------

def _default_sender(settings):
    return settings.default_sender or f"{getpass.getuser()}@{socket.getfqdn()}"


def command_send_test(arguments, settings):
    sender = arguments.sender or _default_sender(settings)
    now = email.utils.formatdate(localtime=True)
    message = (f"From: mailspool <{sender}>\r\nTo: {arguments.to}\r\nSubject: mailspool test message\r\n"
               f"Date: {now}\r\n\r\nThis test message was sent by `mailspool send-test` on "
               f"{socket.gethostname()} at {now}.\r\n").encode("utf-8")
    try:
        prepared = prepare(sender, [arguments.to], message)
    except InvalidMessage as exc:
        raise UsageError(str(exc)) from exc
    transcript = logging.getLogger("mailspool.transcript")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    transcript.addHandler(handler)
    transcript.setLevel(logging.DEBUG)
    transcript.propagate = False
    mailer = settings.make_mailer()
    try:
        refused = mailer.send(prepared.sender, prepared.recipients, prepared.data) or {}
    except DeliveryError as exc:
        print(f"FAILED: {exc}")
        return EX_FAILED
    finally:
        transcript.removeHandler(handler)
    if refused:
        print("FAILED: " + "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused.items()))
        return EX_FAILED
    print(f"OK: {prepared.message_id} accepted by {getattr(mailer, 'server', 'the mailer')}")
    return EX_OK


def sendmail_main(argv):
    """``mailspool sendmail``: read a message on standard input and queue it (see parse_sendmail_arguments)."""
    try:
        options = parse_sendmail_arguments(argv)
    except UsageError as exc:
        print(f"mailspool sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    if options["help"]:
        print(f"usage: {SENDMAIL_HELP}")
        return EX_OK
    try:
        settings = config.load(options["config"])
        # sendmail(8) is silent when it works: warnings and errors only, unless DEBUG is asked for.
        level = "DEBUG" if settings.log_level == "DEBUG" else "WARNING"
        logging.basicConfig(level=level, stream=sys.stderr, format="mailspool sendmail: %(levelname)s %(message)s")
        if not settings.queue_location:
            raise ConfigError("no queue_path (or queue_url) in the [mailspool] section of the configuration",
                              key="queue_path")
    except ConfigError as exc:
        print(f"mailspool sendmail: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    data = read_sendmail_input(sys.stdin.buffer, options["ignore_dots"])
    sender = options["sender"] if options["sender"] is not None else _default_sender(settings)
    recipients = list(options["recipients"])
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head + b"\n\n")
    if options["extract_recipients"]:
        for field in ("To", "Cc", "Bcc"):
            recipients += [address for _, address in email.utils.getaddresses(headers.get_all(field, []))
                           if address]
    if not recipients:
        print("mailspool sendmail: no recipients (give them as arguments, or -t)", file=sys.stderr)
        return EX_USAGE
    if "From" not in headers:
        # The null sender cannot be a From address; the local default is the honest author.
        author = sender or _default_sender(settings)
        data = b"From: " + email.utils.formataddr((options["full_name"] or "", author)).encode("utf-8") + b"\n" + data
    manager = transaction.TransactionManager(explicit=True)
    try:
        delivery = QueuedMailDelivery(settings.make_queue(create=True), transaction_manager=manager)
        with manager:
            message_id = delivery.send(sender, list(dict.fromkeys(recipients)), data)
    except InvalidMessage as exc:
        print(f"mailspool sendmail: message refused: {exc}", file=sys.stderr)
        return EX_DATAERR
    except QueueError as exc:
        print(f"mailspool sendmail: cannot queue: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    log.debug("queued %s", message_id)
    return EX_OK


# Flags that sendmail clients pass and that mean nothing here; those with a
# value take the next argument when it is not attached (-B 8BITMIME).
_IGNORED_FLAGS_WITH_VALUE = set("BNRVXhLpO")
_IGNORED_FLAGS = set("vUmnGsedA")


def parse_sendmail_arguments(argv):
    """Parse sendmail(8) arguments the way cron daemons, PHP and scripts pass them; UsageError if unknown."""
    options = {"sender": None, "full_name": None, "extract_recipients": False, "ignore_dots": False,
               "config": None, "recipients": [], "help": False}
    arguments = list(argv)
    while arguments:
        argument = arguments.pop(0)
        if argument == "--":
            options["recipients"] += arguments
            break
        if argument == "--help":
            options["help"] = True  # like every other subcommand (not a sendmail(8) flag)
            continue
        if not argument.startswith("-") or argument == "-":
            options["recipients"].append(argument)
            continue
        flag, attached = argument[1:2], argument[2:]

        def value():
            if attached:
                return attached
            if not arguments:
                raise UsageError(f"{argument} needs a value")
            return arguments.pop(0)

        if flag == "t":
            options["extract_recipients"] = True
        elif flag == "i":
            options["ignore_dots"] = True
        elif flag == "o":
            if attached == "i":
                options["ignore_dots"] = True  # -oi; other -oX options are ignored
        elif flag == "f" or flag == "r":
            sender = value()
            options["sender"] = "" if sender in ("<>", "") else sender.strip("<>")
        elif flag == "F":
            options["full_name"] = value()
        elif flag == "C":
            options["config"] = value()
        elif flag == "b":
            if attached not in ("m", ""):
                raise UsageError(f"{argument}: only -bm (deliver mail) is supported")
        elif flag in _IGNORED_FLAGS_WITH_VALUE:
            value()
        elif flag in _IGNORED_FLAGS:
            pass
        else:
            raise UsageError(f"unknown option {argument}")
    return options


def read_sendmail_input(stream, ignore_dots):
    """The message on ``stream``; without -i a line holding only "." ends it, as in sendmail."""
    if ignore_dots:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


def command_debug_server(arguments, settings):
    from mailspool.sink import SMTPSink  # aiosmtpd is needed by this command only

    class Printer:
        async def handle_DATA(self, server, session, envelope):
            print(f"---------- message from <{envelope.mail_from}> to {', '.join(envelope.rcpt_tos)} "
                  f"({len(envelope.original_content)} bytes)")
            print(envelope.original_content.decode("utf-8", "replace").replace("\r\n", "\n"), flush=True)
            return "250 Message accepted"

    stopped = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stopped.set())
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with SMTPSink(port=arguments.port, handler=Printer()) as sink:
            print(f"debug SMTP server listening on {sink.host}:{sink.port}; Ctrl-C stops it", flush=True)
            while not stopped.wait(0.5):
                pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print("debug SMTP server stopped", flush=True)
    return EX_OK


def command_demo(arguments, settings):
    from mailspool.demo import run_demo  # imports aiosmtpd, which only the demo needs
    from mailspool.maildir import MaildirQueue

    if arguments.queue and os.path.isdir(arguments.queue):
        counts = MaildirQueue(arguments.queue).counts()
        if any(counts.values()):
            raise UsageError(f"{arguments.queue} already holds messages ({counts}); the demo needs an empty queue")
    return run_demo(queue_path=arguments.queue)
