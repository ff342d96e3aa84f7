"""SMTPSink: a real SMTP server on 127.0.0.1 that keeps what it receives (aiosmtpd).

For the demo, for development and for tests. Needs the ``demo`` or
``test`` extra (aiosmtpd).
"""

import dataclasses
import socket
import threading

from aiosmtpd.controller import Controller


@dataclasses.dataclass(frozen=True)
class ReceivedMessage:
    """One message as the server got it: envelope and the DATA bytes."""

    sender: str
    recipients: tuple
    data: bytes


class _Recorder:
    """aiosmtpd handler that accepts everything and records it."""

    def __init__(self, sink):
        self.sink = sink

    async def handle_DATA(self, server, session, envelope):
        message = ReceivedMessage(envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content)
        with self.sink._lock:
            self.sink.received.append(message)
        return "250 Message accepted for delivery"


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (aiosmtpd cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SMTPSink:
    """An SMTP server on 127.0.0.1 that accepts every message and keeps it in ``received``.

    Use as a context manager, or call ``start()`` and ``stop()``. ``handler``
    replaces the recording handler (any aiosmtpd handler); ``server_options``
    go to aiosmtpd's ``Controller``, which passes those it does not use
    itself (``ssl_context``) on to its SMTP class (``enable_SMTPUTF8``,
    ``tls_context``, ``authenticator``, ``data_size_limit`` ...).
    """

    def __init__(self, port=None, handler=None, **server_options):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.received = []
        self._lock = threading.Lock()
        self._controller = Controller(
            handler or _Recorder(self), hostname=self.host, port=self.port, **server_options
        )

    def start(self):
        self._controller.start()
        return self

    def stop(self):
        self._controller.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
