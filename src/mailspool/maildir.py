"""MaildirQueue: the on-disk queue, safe for many processes and hosts sharing a directory.

Layout (format 1, documented in docs/queue.rst)::

    queue/
      tmp/       staged by tpc_vote; invisible to processors
      new/       ready to deliver (the Maildir name, so Maildir tools can read it)
      active/    claimed: active/<host>/ID, by exactly one processor on <host>,
                 which holds a flock on the file and renews its mtime
      deferred/  waiting for a retry or a scheduled time; mtime = time it is due
      hold/      held by an operator (``mailspool hold``); never tried until released
      failed/    given up; kept with its attempt log until an operator acts
      log/       one attempt log per message id, JSON lines, append-only
      wakeup/    one FIFO per waiting processor on each host (see doorbell.py)

The claim protocol. Every step is one atomic rename, so a message is always
in exactly one of the state directories::

    send ─ tpc_vote ──> tmp/ID  (write, fsync)
           tpc_finish ─> rename tmp/ID -> new/ID (scheduled: -> deferred/ID), fsync dir
    claim:  open new/ID (or deferred/ID once due), flock(LOCK_EX|LOCK_NB),
            rename -> active/HOST/ID, utime(now)
                                     (losers get EWOULDBLOCK or ENOENT: None)
    renew:  utime(active/HOST/ID, now)   every stale_claim_timeout / 4 while sending
    settle: complete  unlink active/HOST/ID, fsync, unlink log/ID
            defer     append log/ID, fsync; utime(due); rename -> deferred/ID
            fail      append log/ID, fsync; rename -> failed/ID
            release   rename -> new/ID
    recover: active/H/ID whose flock can be taken -> new/ID, when H is this
             host (its holder died) or its mtime is older than the stale timeout
             (a host that died, where locks do not cross hosts)

The lock is taken before the rename into active/, so a claimed file is
never without its lock, and the kernel drops the lock when a processor
dies: recovery on the same host is immediate and needs no timeout.
"""

import errno
import fcntl
import itertools
import logging
import os
import queue as queue_module
import re
import secrets
import socket
import stat
import threading
import time

import filelock
from zope.interface import implementer

from mailspool import doorbell, legacy
from mailspool.envelope import PREFIX_CHUNK, Attempt, Envelope, QueueEntry
from mailspool.exceptions import QueueError, QueueFileError
from mailspool.interfaces import IClaimedMessage, IMailQueue, IStagedMessage

log = logging.getLogger(__name__)

READY, ACTIVE, DEFERRED, HELD, FAILED = "ready", "active", "deferred", "held", "failed"
STATE_DIRS = {READY: "new", ACTIVE: "active", DEFERRED: "deferred", HELD: "hold", FAILED: "failed"}
STAGING_DIR = "tmp"
LOG_DIR = "log"
WAKEUP_DIR = "wakeup"

# A writer that staged a file and died before tpc_finish leaves it in tmp/.
# A day is far longer than any transaction, so older files are abandoned,
# unless their writer (named in the file name) still runs on this host: then
# the "day" may be a clock that jumped ahead in the middle of its commit, and
# the file is kept up to LIVE_WRITER_STAGING_SECONDS.
STALE_STAGING_SECONDS = 24 * 3600
LIVE_WRITER_STAGING_SECONDS = 7 * 24 * 3600
# A claim on another host whose processor has not renewed it for this long
# is presumed dead (only consulted where its flock is not held).
STALE_CLAIM_SECONDS = 300
# repoze.sendmail's MAX_SEND_TIME: a younger .sending- marker means one of
# its processors may still be sending that message.
LEGACY_MAX_SEND_SECONDS = 3 * 3600

_sequence = itertools.count()
_hostname = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())


def unique_name(now=None):
    """Return a queue id unique across time, processes and hosts (the Maildir rules).

    ``<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>``; the host
    is reduced to letters, digits, ``-`` and ``.`` so ids are safe in file
    names and shells.
    """
    now = time.time() if now is None else now
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micro:06d}P{os.getpid()}Q{next(_sequence)}R{secrets.token_hex(4)}.{_hostname}"


# What unique_name() makes: a file in new/ named like this was written by
# mailspool, so the legacy import never has to open it to find out.
_OUR_QUEUE_ID = re.compile(r"\d+\.M\d{6}P(?P<pid>\d+)Q\d+R[0-9a-f]{8}\.(?P<host>.*)")


class _BackgroundCloser:
    """Closes file descriptors in a daemon thread (see ``MaildirQueue.complete``). ``close`` never raises."""

    def __init__(self):
        self._pending = queue_module.SimpleQueue()
        self._thread = None
        self._lock = threading.Lock()

    def close(self, fd):
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mailspool-closer", daemon=True)
                self._thread.start()
        self._pending.put(fd)

    def _run(self):
        while True:
            fd = self._pending.get()
            try:
                os.close(fd)
            except OSError:
                pass


_background_closer = _BackgroundCloser()


def fsync_directory(path):
    """Make the entries of directory ``path`` (renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IStagedMessage)
class StagedFile:
    """A queue file written to tmp/. See ``IStagedMessage``."""

    def __init__(self, queue, queue_id, not_before=None):
        self.queue = queue
        self.queue_id = queue_id
        self.not_before = not_before
        self._staged_path = queue._path(STAGING_DIR, queue_id)

    def publish(self):
        """See ``IStagedMessage.publish``. A scheduled message goes to deferred/, due at its time."""
        state = READY
        if self.not_before is not None and self.not_before > time.time():
            os.utime(self._staged_path, (self.not_before, self.not_before))
            state = DEFERRED
        os.rename(self._staged_path, self.queue._path(STATE_DIRS[state], self.queue_id))
        fsync_directory(self.queue._dir(state))

    def discard(self):
        """See ``IStagedMessage.discard``."""
        try:
            os.unlink(self._staged_path)
        except FileNotFoundError:
            pass
        except OSError:
            log.exception("could not remove staged queue file %s", self._staged_path)


@implementer(IClaimedMessage)
class ClaimedFile:
    """A message in active/, locked by this process. See ``IClaimedMessage``."""

    def __init__(self, queue, queue_id, path, fd, envelope, data_offset, attempts, has_log=True):
        self.queue = queue
        self.queue_id = queue_id
        self.path = path
        self.envelope = envelope
        self.attempts = attempts
        self._fd = fd
        self._data_offset = data_offset
        self._has_log = has_log  # False only when no attempt log existed at claim time

    def read(self):
        """See ``IClaimedMessage.read``."""
        try:
            size = os.fstat(self._fd).st_size
            data = os.pread(self._fd, max(size - self._data_offset, 0), self._data_offset)
        except OSError as exc:
            raise QueueFileError(f"{self.path}: cannot read message: {exc.strerror}", self.path) from exc
        if size <= self._data_offset:
            raise QueueFileError(f"{self.path}: the message is gone (file truncated to {size} bytes)", self.path)
        if len(data) != size - self._data_offset:
            raise QueueFileError(f"{self.path}: the file changed while it was read", self.path)
        return data

    def _close(self):
        """Drop the lock. Called only after the file has left active/ (or been removed)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@implementer(IMailQueue)
class MaildirQueue:
    """A mail queue in a directory. See ``IMailQueue``.

    ``MaildirQueue(path, create=True)`` creates the directory tree (mode
    0700) when it is missing. Raises ``QueueError`` naming the path when
    ``path`` is not a directory, or is missing and ``create`` is false.

    ``stale_claim_timeout`` (seconds) applies to claims made on *other*
    hosts sharing the directory: one not renewed for that long, and whose
    lock is free, returns to the queue. Claims on this host return as soon
    as their processor is dead. Host names must differ between the hosts
    that share a queue.
    """

    def __init__(self, path, create=True, stale_claim_timeout=STALE_CLAIM_SECONDS):
        self.path = os.path.abspath(os.fspath(path))
        self.stale_claim_timeout = float(stale_claim_timeout)
        self.claim_renewal_interval = self.stale_claim_timeout / 4
        self._claim_dir = os.path.join(self.path, STATE_DIRS[ACTIVE], _hostname)
        subdirs = [STAGING_DIR, LOG_DIR, *STATE_DIRS.values()]
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise QueueError(f"queue path {self.path} exists but is not a directory", self.path)
        if not create and not os.path.isdir(self.path):
            raise QueueError(f"queue directory {self.path} does not exist", self.path)
        if os.path.isdir(self.path) and not os.access(self.path, os.R_OK | os.X_OK):
            # Another user's queue (it is 0700): its subdirectories would look missing below.
            raise QueueError(f"queue directory {self.path} cannot be read: permission denied", self.path)
        # The queue itself and its subdirectories get 0700; parents we had to
        # create get the umask's default, like `mkdir -p`.
        # A Maildir written by repoze.sendmail or zope.sendmail (it has new/)
        # is adopted: our other subdirectories are added to it.
        adopting = os.path.isdir(os.path.join(self.path, STATE_DIRS[READY]))
        for subdir in [self.path, *(os.path.join(self.path, name) for name in subdirs)]:
            if os.path.isdir(subdir):
                continue
            if not create and not adopting:
                raise QueueError(f"queue directory {self.path} has no {os.path.basename(subdir)}/ "
                                 "(not a mailspool queue?)", self.path)
            try:
                os.makedirs(os.path.dirname(subdir), exist_ok=True)
                os.mkdir(subdir, mode=0o700)
            except FileExistsError:
                pass  # created by a concurrent process
            except OSError as exc:
                raise QueueError(f"cannot create queue directory {subdir}: {exc.strerror}", subdir) from exc

    def __repr__(self):
        return f"<MaildirQueue {self.path}>"

    def _dir(self, state):
        return os.path.join(self.path, STATE_DIRS[state])

    def _path(self, subdir, queue_id):
        return f"{self.path}/{subdir}/{queue_id}"

    # -- writing -----------------------------------------------------------

    def add(self, envelope, data):
        """See ``IMailQueue.add``."""
        queue_id = unique_name()
        staged_path = self._path(STAGING_DIR, queue_id)
        try:
            fd = os.open(staged_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise QueueError(f"cannot write to queue {self.path}: {exc.strerror} ({staged_path})", self.path) from exc
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(envelope.to_bytes())
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        except OSError as exc:
            _unlink_quietly(staged_path)
            raise QueueError(f"cannot write to queue {self.path}: {exc.strerror} ({staged_path})", self.path) from exc
        except BaseException:
            _unlink_quietly(staged_path)
            raise
        return StagedFile(self, queue_id, envelope.not_before)

    def insert_entry(self, queue_id, state, envelope, data, attempts, due_at=None):
        """Add a message under its existing ``queue_id`` in ``state`` (``mailspool move``); False if already here.

        Written to tmp/ and fsync'd, its attempt log too, then renamed into
        place (a deferred message's mtime is its due time).
        """
        if not _is_plain_name(queue_id) or any(os.path.lexists(path) for _, path in self._locations(queue_id)):
            return False
        staged = self.add(envelope, data)
        if attempts:
            with open(self._path(LOG_DIR, queue_id), "wb") as log_file:
                log_file.write(b"".join(attempt.to_line() for attempt in attempts))
                log_file.flush()
                os.fsync(log_file.fileno())
        if state == DEFERRED and due_at is not None:
            os.utime(staged._staged_path, (due_at, due_at))
        os.rename(staged._staged_path, self._path(STATE_DIRS[state], queue_id))
        fsync_directory(self._dir(state))
        return True

    # -- processing --------------------------------------------------------

    def due(self, now=None, max_wait=None):
        """See ``IMailQueue.due``. Ready messages first, oldest first.

        ``max_wait`` (seconds, None: no limit) is the longest a retry can
        wait. A deferred message due further ahead than that was deferred
        by a clock that has since gone back (or had jumped ahead): it is
        due now, so a clock set back by a day does not hold a one-minute
        retry for a day. Scheduled messages (no attempt log yet) keep
        their time, however far ahead.
        """
        now = time.time() if now is None else now
        yield from sorted(self._names(READY))
        for entry in _scan(self._dir(DEFERRED)):
            try:
                if self._deferred_is_due(entry.name, entry.stat(follow_symlinks=False).st_mtime, now, max_wait):
                    yield entry.name
            except FileNotFoundError:
                continue  # claimed by someone else meanwhile

    def _deferred_is_due(self, queue_id, due_at, now, max_wait):
        """Whether a deferred message due at ``due_at`` (its mtime) may be claimed at ``now``; see ``due``."""
        if due_at <= now:
            return True
        if max_wait is None or due_at - now <= max_wait:
            return False
        # Too far ahead for a retry. A scheduled message has no attempt log (defer() writes one first).
        return os.path.lexists(self._path(LOG_DIR, queue_id))

    def claim(self, queue_id, now=None, max_wait=None):
        """See ``IMailQueue.claim``. Looks in new/, then deferred/ (only if due; ``max_wait`` as in ``due``)."""
        now = time.time() if now is None else now
        for state in (READY, DEFERRED):
            source = self._path(STATE_DIRS[state], queue_id)
            try:
                fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self._set_aside(source, queue_id, "a symbolic link where a message should be (never followed)")
                    raise QueueFileError(f"{source}: symbolic link moved to failed/", source) from exc
                raise QueueError(f"cannot open {source}: {exc.strerror}", source) from exc
            claimed = self._lock_and_take(fd, source, queue_id, state, now, max_wait)
            if claimed is not None:
                return claimed
            return None
        return None

    def _lock_and_take(self, fd, source, queue_id, state, now, max_wait=None):
        """Lock ``fd`` and rename its file into active/HOST/; return a ClaimedFile or None."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # another processor holds it
        try:
            info = os.fstat(fd)
            if state == DEFERRED and not self._deferred_is_due(queue_id, info.st_mtime, now, max_wait):
                os.close(fd)
                return None  # deferred again by someone else since it was listed
            target = os.path.join(self._claim_dir, queue_id)
            try:
                self._rename_into_claims(source, target)
            except FileNotFoundError:
                os.close(fd)
                return None  # delivered or moved by someone else since we opened it
            if state == DEFERRED and info.st_mtime > now:
                log.warning("message %s was deferred until %d s from now, longer than any retry waits: "
                            "the clock went back; trying it now", queue_id, info.st_mtime - now)
            if stat.S_ISREG(info.st_mode):
                os.utime(fd)  # the claim's heartbeat starts now
        except BaseException:
            _close_quietly(fd)
            raise
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            self._set_aside(target, queue_id, "not a regular file")
            raise QueueFileError(f"{source}: not a regular file; moved to failed/", source)
        try:
            envelope, data_offset = Envelope.read_at(fd, source)
            attempts = self._read_attempts(queue_id)
            has_log = attempts is not None
        except (QueueFileError, OSError) as exc:
            if state == READY and _is_legacy_file(fd):
                # Written by repoze.sendmail/zope.sendmail: cleanup() imports it.
                self._move_claim(ClaimedFile(self, queue_id, target, fd, None, 0, []), READY)
                return None
            error = exc if isinstance(exc, QueueFileError) else QueueFileError(
                f"{source}: cannot read: {exc.strerror}", source)
            self.fail(ClaimedFile(self, queue_id, target, fd, None, 0, []),
                      Attempt(at=time.time(), error=f"unreadable queue file: {error}"))
            raise error from exc
        return ClaimedFile(self, queue_id, target, fd, envelope, data_offset, attempts or [], has_log)

    def _rename_into_claims(self, source, target):
        """Rename; FileNotFoundError means ``source`` is gone (this host's directory is made on demand)."""
        try:
            os.rename(source, target)
        except FileNotFoundError:
            try:
                os.mkdir(self._claim_dir, 0o700)  # maybe this host's first claim
            except FileExistsError:
                pass
            os.rename(source, target)

    def _set_aside(self, path, queue_id, reason):
        """Move something that is not a message (a link, a directory) to failed/ with ``reason``."""
        self._append_attempt(queue_id, Attempt(at=time.time(), error=reason))
        try:
            os.rename(path, self._path(STATE_DIRS[FAILED], queue_id))
        except FileNotFoundError:
            return  # someone else set it aside first
        log.error("queue entry %s set aside to failed/: %s", queue_id, reason)

    def complete(self, claim):
        """See ``IMailQueue.complete``.

        The directory is not fsync'd after the unlink: a power failure that
        undoes the unlink can only bring a delivered message back (the
        duplicate window every at-least-once queue has), never lose one, and
        the fsync would cost more than the rest of the queue work together.
        The file's descriptor is closed by a background thread: closing the
        last descriptor of an unlinked file frees its blocks (about 0.2 ms
        on ext4, half of the queue's work per message), and nothing can
        reach the file any more, so its lock no longer matters.
        """
        os.unlink(claim.path)
        fd, claim._fd = claim._fd, None
        if fd is not None:
            _background_closer.close(fd)
        if claim._has_log:
            _unlink_quietly(self._path(LOG_DIR, claim.queue_id))

    def discard(self, claim):
        """See ``IMailQueue.discard``: the same removal as ``complete`` (a maildir keeps nothing of sent mail)."""
        self.complete(claim)

    def defer(self, claim, attempt, until):
        """See ``IMailQueue.defer``. The due time is the file's mtime (as Postfix does)."""
        self._append_attempt(claim.queue_id, attempt)
        os.utime(claim.path, (until, until))
        self._move_claim(claim, DEFERRED)

    def fail(self, claim, attempt):
        """See ``IMailQueue.fail``."""
        self._append_attempt(claim.queue_id, attempt)
        self._move_claim(claim, FAILED)

    def renew(self, claim):
        """See ``IMailQueue.renew``."""
        os.utime(claim._fd)

    def release(self, claim):
        """See ``IMailQueue.release``."""
        self._move_claim(claim, READY)

    def _move_claim(self, claim, state):
        os.rename(claim.path, self._path(STATE_DIRS[state], claim.queue_id))
        claim._close()
        fsync_directory(self._dir(state))

    # -- attempt logs ------------------------------------------------------

    def _append_attempt(self, queue_id, attempt):
        path = self._path(LOG_DIR, queue_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, attempt.to_line())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _read_attempts(self, queue_id):
        """Return the attempt records of ``queue_id`` as a list, or None when it has no attempt log.

        A damaged line is skipped with a warning.
        """
        path = self._path(LOG_DIR, queue_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        attempts = []
        for number, line in enumerate(b"".join(chunks).splitlines(), 1):
            try:
                attempts.append(Attempt.from_line(line))
            except (ValueError, KeyError, TypeError):
                log.warning("%s line %d: damaged attempt record skipped", path, number)
        return attempts

    # -- maintenance and inspection -----------------------------------------

    def cleanup(self, now=None):
        """See ``IMailQueue.cleanup``.

        Also imports messages left by repoze.sendmail or zope.sendmail (see
        ``mailspool.legacy``). One process at a time does this (a
        ``filelock`` on ``.maintenance.lock``); the others skip it.
        """
        now = time.time() if now is None else now
        done = {"stale_staging_removed": 0, "dead_claims_released": 0, "legacy_imported": 0}
        lock = filelock.FileLock(os.path.join(self.path, ".maintenance.lock"), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            return done  # another processor is doing it right now
        except OSError as exc:
            # The queue cannot be written (read-only, another user's): say so as the
            # QueueError every caller expects, naming the queue, not filelock's bare OSError.
            raise QueueError(f"cannot use queue {self.path}: {exc.strerror} ({lock.lock_file})", self.path) from exc
        try:
            self._remove_stale_staging(now, done)
            self._release_abandoned_claims(now, done)
            done["legacy_imported"] = self._import_legacy(now)
        finally:
            lock.release()
        return done

    def _remove_stale_staging(self, now, done):
        for entry in _scan(os.path.join(self.path, STAGING_DIR)):
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
                if age <= STALE_STAGING_SECONDS:
                    continue
                if age <= LIVE_WRITER_STAGING_SECONDS and _writer_runs_here(entry.name):
                    log.warning("staging file %s looks %d s old but its writer still runs: kept (a clock that "
                                "jumped ahead?)", entry.path, age)
                    continue
                os.unlink(entry.path)
                done["stale_staging_removed"] += 1
                log.info("removed abandoned staging file %s", entry.path)
            except FileNotFoundError:
                continue

    def _release_abandoned_claims(self, now, done):
        for host_dir in self._claim_host_dirs():
            this_host = host_dir.name == _hostname
            for entry in _scan(host_dir.path):
                if self._release_if_abandoned(entry.path, entry.name, this_host, now):
                    done["dead_claims_released"] += 1

    # -- repoze.sendmail / zope.sendmail queues ------------------------------------

    def _import_legacy(self, now):
        """Turn their queue files into ours; return how many were imported. See ``mailspool.legacy``.

        Each file is first renamed to ``tmp/.legacy-NAME`` (so exactly one
        importer has it and it is never mistaken for an abandoned staging
        file), converted into a queue file, published, and only then removed.
        """
        imported = 0
        staging = os.path.join(self.path, STAGING_DIR)
        for pending in _dot_names(staging, ".legacy-"):
            imported += self._import_pending(os.path.join(staging, pending), pending[len(".legacy-"):], now)
        for directory in (self._dir(READY), os.path.join(self.path, "cur")):
            if not os.path.isdir(directory):
                continue
            for name in _dot_names(directory, legacy.REJECTED_PREFIX):
                imported += self._take_legacy(os.path.join(directory, name), name[len(legacy.REJECTED_PREFIX):],
                                              now, rejected=True)
            for entry in list(_scan(directory)):
                if directory == self._dir(READY) and _OUR_QUEUE_ID.match(entry.name):
                    continue  # ours: no need to open it
                sending = os.path.join(directory, legacy.SENDING_PREFIX + entry.name)
                if _younger_than(sending, LEGACY_MAX_SEND_SECONDS, now):
                    continue  # an old processor may be sending it right now
                if directory == self._dir(READY) and not _file_is_legacy(entry.path):
                    continue
                imported += self._take_legacy(entry.path, entry.name, now)
                _unlink_quietly(sending)
            for name in _dot_names(directory, legacy.SENDING_PREFIX):
                original = os.path.join(directory, name[len(legacy.SENDING_PREFIX):])
                if not os.path.lexists(original):
                    _unlink_quietly(os.path.join(directory, name))  # it was sent; only the marker was left
        return imported

    def _take_legacy(self, path, name, now, rejected=False):
        pending = os.path.join(self.path, STAGING_DIR, (".legacy-rejected-" if rejected else ".legacy-") + name)
        try:
            os.rename(path, pending)
        except FileNotFoundError:
            return 0
        return self._import_pending(pending, os.path.basename(pending)[len(".legacy-"):], now)

    def _import_pending(self, pending, name, now):
        rejected = name.startswith("rejected-")
        try:
            with open(pending, "rb") as stream:
                data = stream.read()
            queued_at = os.stat(pending).st_mtime
            sender, recipients, message = legacy.convert(data, name)
        except (OSError, QueueFileError) as exc:
            log.error("cannot import %s from an old queue: %s; moved to failed/", pending, exc)
            self._append_attempt(name, Attempt(at=now, error=f"cannot import from repoze/zope.sendmail: {exc}"))
            os.rename(pending, self._path(STATE_DIRS[FAILED], name))
            return 0
        envelope = Envelope(sender, recipients, legacy.message_id(message), queued_at)
        staged = self.add(envelope, message)
        if rejected:
            reason = "refused for good by repoze.sendmail/zope.sendmail before the switch (.rejected- file)"
            self._append_attempt(staged.queue_id, Attempt(at=now, error=reason))
            os.rename(staged._staged_path, self._path(STATE_DIRS[FAILED], staged.queue_id))
            fsync_directory(self._dir(FAILED))
        else:
            staged.publish()
        os.unlink(pending)
        log.info("imported %s from a repoze.sendmail/zope.sendmail queue as %s%s",
                 envelope.message_id or name, staged.queue_id, " (failed)" if rejected else "")
        return 1

    def _release_if_abandoned(self, path, queue_id, this_host, now):
        """Return a claim to new/ if its lock is free and it was made here or has gone stale."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False  # settled meanwhile, or not a file (claim() sets those aside)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its processor is alive
            silent_for = now - os.fstat(fd).st_mtime
            if not this_host and silent_for <= self.stale_claim_timeout:
                return False  # maybe alive on a host whose locks we cannot see
            os.rename(path, self._path(STATE_DIRS[READY], queue_id))
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)
        if this_host:
            log.warning("message %s returned to the queue: the processor that claimed it died", queue_id)
        else:
            log.warning("message %s returned to the queue: its claim was not renewed for %ds",
                        queue_id, silent_for)
        return True

    def _names(self, state):
        if state == ACTIVE:
            return [entry.name for host_dir in self._claim_host_dirs() for entry in _scan(host_dir.path)]
        return [entry.name for entry in _scan(self._dir(state))]

    # -- inspection and repair (the operator's side) ------------------------------

    def entries(self, states=None, limit=None):
        """See ``IMailQueue.entries``. Reads envelopes and attempt logs, never message bodies."""
        found = self._entries(states)
        return found if limit is None else itertools.islice(found, limit)

    def _entries(self, states):
        logged = {entry.name for entry in _scan(os.path.join(self.path, LOG_DIR))}
        for state in states or STATE_DIRS:
            directories = ([entry.path for entry in self._claim_host_dirs()] if state == ACTIVE
                           else [self._dir(state)])
            for directory in directories:
                for entry in sorted(_scan(directory), key=lambda entry: entry.name):
                    found = self._entry(entry.path, entry.name, state, entry.name in logged)
                    if found is not None:
                        yield found

    def entry(self, queue_id):
        """See ``IMailQueue.entry``."""
        for state, path in self._locations(queue_id):
            found = self._entry(path, queue_id, state, True)
            if found is not None:
                return found
        return None

    def _entry(self, path, queue_id, state, has_log):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None  # moved on while we looked
        except OSError as exc:
            return QueueEntry(queue_id, state, problem=f"cannot open: {exc.strerror}")
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return QueueEntry(queue_id, state, problem="not a regular file")
            envelope, offset = Envelope.read_at(fd, queue_id)
            size = info.st_size - offset
        except (QueueFileError, OSError) as exc:
            return QueueEntry(queue_id, state, problem=str(exc))
        finally:
            os.close(fd)
        attempts = tuple(self._read_attempts(queue_id) or ()) if has_log else ()
        due_at = info.st_mtime if state == DEFERRED else None
        return QueueEntry(queue_id, state, envelope, attempts, due_at, size)

    def _locations(self, queue_id):
        """(state, path) pairs where ``queue_id`` could be; checked by the caller."""
        if not _is_plain_name(queue_id):
            return []
        places = [(state, self._path(STATE_DIRS[state], queue_id)) for state in STATE_DIRS if state != ACTIVE]
        places += [(ACTIVE, os.path.join(host_dir.path, queue_id)) for host_dir in self._claim_host_dirs()]
        return places

    def read_message(self, queue_id):
        """See ``IMailQueue.read_message``."""
        for _, path in self._locations(queue_id):
            try:
                with open(path, "rb") as stream:
                    Envelope.read_from(stream, queue_id)
                    return stream.read()
            except FileNotFoundError:
                continue
        raise KeyError(queue_id)

    def requeue(self, queue_id, now=None):
        """See ``IMailQueue.requeue``: failed, deferred or held -> ready, history kept."""
        now = time.time() if now is None else now
        for state in (FAILED, DEFERRED, HELD):
            source = self._path(STATE_DIRS[state], queue_id)
            if not _is_plain_name(queue_id) or not os.path.lexists(source):
                continue
            if state == FAILED:
                self._append_attempt(queue_id, Attempt(at=now, error="requeued by an operator", requeued=True))
            if self._move(source, READY, queue_id):
                log.info("message %s requeued from %s", queue_id, state)
                return state
        return None

    def hold(self, queue_id):
        """See ``IMailQueue.hold``: ready or deferred -> held."""
        return self._move_from((READY, DEFERRED), queue_id, HELD)

    def unhold(self, queue_id):
        """See ``IMailQueue.unhold``: held -> ready."""
        return self._move_from((HELD,), queue_id, READY)

    def delete(self, queue_id):
        """See ``IMailQueue.delete``: removes a message that is not being delivered, and its log."""
        for state in (READY, DEFERRED, HELD, FAILED):
            path = self._path(STATE_DIRS[state], queue_id)
            if not _is_plain_name(queue_id):
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            fsync_directory(self._dir(state))
            _unlink_quietly(self._path(LOG_DIR, queue_id))
            log.warning("message %s deleted from %s by an operator", queue_id, state)
            return state
        return None

    def _move_from(self, states, queue_id, target_state):
        for state in states:
            source = self._path(STATE_DIRS[state], queue_id)
            if _is_plain_name(queue_id) and self._move(source, target_state, queue_id):
                return state
        return None

    def _move(self, source, target_state, queue_id):
        try:
            os.rename(source, self._path(STATE_DIRS[target_state], queue_id))
        except FileNotFoundError:
            return False
        fsync_directory(self._dir(target_state))
        return True

    # -- waking processors ----------------------------------------------------

    def announce(self):
        """See ``IMailQueue.announce``."""
        doorbell.ring(os.path.join(self.path, WAKEUP_DIR))

    def listener(self):
        """See ``IMailQueue.listener``. Raises ``OSError`` if no FIFO can be made."""
        return doorbell.Listener(os.path.join(self.path, WAKEUP_DIR))

    def _claim_host_dirs(self):
        return [entry for entry in _scan(self._dir(ACTIVE)) if entry.is_dir(follow_symlinks=False)]

    def counts(self):
        """See ``IMailQueue.counts``."""
        return {state: len(self._names(state)) for state in STATE_DIRS}


def _dot_names(directory, prefix):
    """Names in ``directory`` starting with ``prefix`` (dot files, which scans skip)."""
    try:
        return [name for name in os.listdir(directory) if name.startswith(prefix)]
    except FileNotFoundError:
        return []


def _younger_than(path, seconds, now):
    try:
        return now - os.lstat(path).st_mtime < seconds
    except FileNotFoundError:
        return False


def _file_is_legacy(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        return _is_legacy_file(fd)
    finally:
        os.close(fd)


def _writer_runs_here(queue_id):
    """Whether the process that named ``queue_id`` (``unique_name``) still runs on this host.

    False for names of other hosts or of other makers. A pid reused by an
    unrelated process answers True: the file is then kept longer, never
    removed early.
    """
    match = _OUR_QUEUE_ID.fullmatch(queue_id)
    if match is None or match["host"] != _hostname:
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    except (OverflowError, ValueError):
        return False
    return True


def _is_legacy_file(fd):
    """A repoze.sendmail/zope.sendmail message: no MAILSPOOL line, an X-Actually-To header."""
    try:
        head = os.pread(fd, PREFIX_CHUNK, 0)
    except OSError:
        return False
    return not head.startswith(b"MAILSPOOL ") and legacy.looks_legacy(head)


def _is_plain_name(queue_id):
    """A queue id names a file inside a state directory, never a path elsewhere."""
    return bool(queue_id) and "/" not in queue_id and queue_id not in (".", "..") and not queue_id.startswith(".")


def _scan(directory):
    """Yield the entries of ``directory`` that can be queue files (not dot files)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                yield entry


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass
