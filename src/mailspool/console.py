"""The ``mailspool`` command line; the only module that configures logging."""

import argparse
import logging
import sys


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mailspool",
        description="Transactional mail queue: run, inspect and try out a mailspool queue.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step (DEBUG)")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subcommands.required = True
    demo = subcommands.add_parser(
        "demo",
        help="run the whole job end to end on loopback",
        description=(
            "Start an SMTP sink on 127.0.0.1, commit a few messages through a queued "
            "delivery, abort one transaction, drain the queue and show what the server got."
        ),
    )
    demo.add_argument("--queue", metavar="DIR", help="queue directory to use (default: a temporary one)")
    demo.set_defaults(handler=_run_demo)
    return parser


def _run_demo(arguments):
    from mailspool.demo import run_demo  # imports aiosmtpd, which only the demo needs

    return run_demo(queue_path=arguments.queue)


def main(argv=None):
    """Run the command; return its exit status."""
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiosmtpd logs every SMTP command at INFO; that is our sink's chatter, not ours.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if arguments.verbose else logging.WARNING)
    return arguments.handler(arguments)
