"""Doorbell: wakes processors waiting on a queue directory when a commit adds mail.

Each waiting processor owns a named pipe (FIFO) in ``<queue>/wakeup/``,
named ``<host>.<pid>.<number>``. Ringing writes one byte into every pipe of
this host; a pipe with no reader belongs to a dead process and is removed.
Pipes do not cross hosts, so other hosts sharing the directory rely on
their poll interval, and a ring only touches this host's pipes.
"""

import errno
import itertools
import logging
import os
import select
import socket
import stat

from zope.interface import implementer

from mailspool.interfaces import IQueueListener

log = logging.getLogger(__name__)

_numbers = itertools.count()


def _host_prefix():
    host = "".join(c if c.isalnum() or c in "-" else "_" for c in socket.gethostname())
    return host + "."


def ring(directory):
    """Write a wake-up byte to every listener of this host in ``directory``. Never raises."""
    prefix = _host_prefix()
    try:
        names = [name for name in os.listdir(directory) if name.startswith(prefix)]
    except OSError:
        return  # nobody has ever listened here
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no reader: its process is gone
                _remove_quietly(path)
            continue
        try:
            os.write(fd, b"!")
        except OSError:
            pass  # EAGAIN: the pipe is full, so its reader will wake anyway
        finally:
            os.close(fd)


@implementer(IQueueListener)
class Listener:
    """One processor's FIFO. See ``IQueueListener``.

    Raises ``OSError`` if the FIFO cannot be created (for example a
    read-only queue); callers then fall back to polling.
    """

    def __init__(self, directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, f"{_host_prefix()}{os.getpid()}.{next(_numbers)}")
        _remove_quietly(self.path)
        os.mkfifo(self.path, 0o600)
        # Opened for reading *and* writing: the FIFO then always has a writer,
        # so select() does not report end-of-file between rings, and wake()
        # can write to it.
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        if not stat.S_ISFIFO(os.fstat(self._fd).st_mode):
            os.close(self._fd)
            raise OSError(errno.EINVAL, "not a FIFO", self.path)

    def wait(self, timeout):
        """See ``IQueueListener.wait``."""
        if self._fd is None:
            return False
        readable, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not readable:
            return False
        try:
            while os.read(self._fd, 4096):
                pass
        except BlockingIOError:
            pass
        return True

    def wake(self):
        """See ``IQueueListener.wake``."""
        fd = self._fd
        if fd is None:
            return
        try:
            os.write(fd, b"!")
        except OSError:
            pass

    def close(self):
        """See ``IQueueListener.close``."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            _remove_quietly(self.path)


def _remove_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
