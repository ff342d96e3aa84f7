"""The contracts of record: what every delivery, mailer, queue and processor promises.

The names follow ``zope.sendmail.interfaces`` so that code and adapters
written against zope.sendmail or repoze.sendmail fit unchanged.
Implementations say "See ``IMailQueue.claim``" and document only what they
add; when code and this module disagree, this module is right and the code
is a bug.
"""

from zope.interface import Attribute, Interface


class IMailDelivery(Interface):
    """Hands a message to the mail system as part of a transaction."""

    def send(fromaddr, toaddrs, message):
        """Send ``message`` from ``fromaddr`` to ``toaddrs`` when the transaction commits.

        ``fromaddr`` is the envelope sender (``str``; ``""`` for a null
        sender), ``toaddrs`` a non-empty sequence of envelope recipients
        (``str``). Non-ASCII addresses are accepted; SMTPUTF8 is negotiated
        at delivery. ``message`` is an ``email.message.Message`` or the
        ``bytes`` of one (bare LF line endings are accepted and normalised to
        CRLF). A Message-Id and a Date header are added when absent; Bcc
        and Resent-Bcc headers are removed (their addresses stay envelope
        recipients only if they are in ``toaddrs``).

        Returns the Message-Id (with its angle brackets).

        Joins the current transaction of the delivery's transaction manager;
        nothing leaves the process unless that transaction commits.

        Raises, before joining the transaction:

        - ``mailspool.exceptions.InvalidMessage`` (a ``ValueError``) or one of
          its subclasses for bad input, naming the problem;
        - ``mailspool.exceptions.TransactionNotBegun`` when the manager is
          explicit and no transaction was begun.
        """


class IDirectMailDelivery(IMailDelivery):
    """Delivers through a mailer during the commit, without a queue.

    The mailer's ``vote`` runs in ``tpc_vote`` (so an unreachable server or
    refused recipients abort the transaction where the mailer can tell);
    ``send`` runs in ``tpc_finish``, where a failure is logged and reported as
    a ``MailFailedEvent``, never raised: the transaction has committed.
    """

    mailer = Attribute("The IMailer used for delivery.")


class IQueuedMailDelivery(IMailDelivery):
    """Writes the message into a queue at commit; a processor delivers it later.

    An error writing the queue (full disk, read-only directory) is raised
    from ``tpc_vote`` and aborts the whole transaction.
    """

    queuePath = Attribute("Path of the queue directory (zope.sendmail's name).")
    queue = Attribute("The IMailQueue messages are written to.")

    def send(fromaddr, toaddrs, message, send_at=None, delay=None):
        """See ``IMailDelivery.send``; the message may also be scheduled.

        ``send_at`` (a ``datetime``; a naive one is local time) or ``delay``
        (a ``timedelta`` or seconds) commit the message as not due before
        that time; processors leave it alone until then. Giving both is a
        ``ValueError``. Processors are woken when the transaction commits.
        """


class IMailer(Interface):
    """Delivers one message now, synchronously (zope.sendmail's contract, made precise)."""

    def send(fromaddr, toaddrs, message):
        """Deliver ``message`` (``bytes`` with CRLF line endings, sent as is).

        Returns a mapping ``{recipient: SMTPReply}`` of the recipients the
        server refused while accepting the message for the others; it is
        empty when every recipient was accepted. When ``send`` returns, the
        message was handed over for every recipient not in that mapping.

        Raises ``TransientDeliveryError`` when nobody got the message and a
        later attempt may succeed, ``PermanentDeliveryError`` when nobody
        got it and a later attempt cannot succeed. Never raises anything else
        for a failure of the server or the network.
        """

    def vote(fromaddr, toaddrs, message):
        """Raise a ``DeliveryError`` if it is already known that ``send`` would fail.

        Called from a data manager's ``tpc_vote``. A mailer that cannot tell
        does nothing. A mailer may keep resources (a connection) between
        ``vote`` and the following ``send`` or ``abort``.
        """

    def abort():
        """Release whatever ``vote`` kept. Must never raise."""

    # Optional: a mailer may also offer ``session()``, a context manager
    # during which it keeps its connection open between sends of the same
    # thread (SMTPMailer does; the queue processor uses it when present).


class ISMTPMailer(IMailer):
    """A mailer that relays through one SMTP server."""

    hostname = Attribute("Name or address of the SMTP server.")
    port = Attribute("TCP port of the SMTP server.")
    username = Attribute("User name for SMTP AUTH, or None for no AUTH.")
    tls = Attribute(
        "'starttls' (required), 'ssl' (implicit TLS, port 465), "
        "'opportunistic' (STARTTLS when offered) or 'none'."
    )
    timeout = Attribute("Seconds allowed for each blocking network operation.")


class IStagedMessage(Interface):
    """A message written durably to a queue but not yet visible to processors."""

    queue_id = Attribute("The id the message will have in the queue.")

    def publish():
        """Make the message visible to processors, durably.

        Called from ``tpc_finish``. May raise ``OSError`` only if the
        operating system fails an operation that cannot fail on a sane
        file system; the caller logs that loudly and never re-raises.
        """

    def discard():
        """Remove the staged message. Idempotent. Must never raise."""


class IClaimedMessage(Interface):
    """A message one processor holds exclusively until it settles it."""

    queue_id = Attribute("The message's id in its queue.")
    envelope = Attribute("The mailspool.envelope.Envelope: sender, recipients, ids, times.")
    attempts = Attribute("List of earlier mailspool.envelope.Attempt records, oldest first.")

    def read():
        """Return the message bytes exactly as committed.

        Raises ``QueueFileError`` if they cannot be read.
        """


class IMailQueue(Interface):
    """Storage for queued messages: the seam between processors and the storage.

    Its words are storage words, never SMTP words. Every operation is safe
    while other processes (on this or other hosts) use the same queue.
    A message is only ever removed by ``complete`` (delivered) or kept in
    the failed state by ``fail``; nothing else deletes a committed message.
    """

    def add(envelope, data):
        """Stage ``data`` (CRLF ``bytes``) with its envelope; return an IStagedMessage.

        The bytes are on stable storage when this returns, but invisible to
        processors until ``publish()``. Raises ``QueueError`` (an
        ``OSError``) naming the path when the queue cannot be written.
        """

    def due(now=None, max_wait=None):
        """Iterate the ids of messages that may be claimed at ``now`` (epoch seconds).

        Ready messages and deferred ones whose retry time has come. The
        result is a snapshot; a listed id may be claimed by someone else
        before the caller gets to it.

        ``max_wait`` (seconds; None: no limit) is the longest any retry can
        wait. A retry due further ahead than that was deferred by a clock
        that has since gone back, and is due now. Messages scheduled with
        ``send_at`` (never attempted) keep their time however far ahead.
        """

    # Optional: a queue may also offer ``claim_next(now=None, max_wait=None)``,
    # which claims the due message that comes first and nobody holds (None
    # when nothing is due). Processors use it instead of ``due``/``claim``
    # where it exists (PostgresQueue: one UPDATE ... SKIP LOCKED leases a few
    # rows, handed out one per call); such a queue may also offer
    # ``release_unused()``, which processors call after each run to give
    # back what was leased ahead and not delivered, and whatever it held
    # for the run (PostgresQueue: each worker thread's claim connection).

    def claim(queue_id, now=None, max_wait=None):
        """Take the message for exclusive processing; return an IClaimedMessage or None.

        A deferred message is only taken once it is due at ``now`` (epoch
        seconds, default the current time; ``max_wait`` as for ``due``);
        ``now=math.inf`` takes it whatever its due time (``mailspool move``).

        Atomic: of any number of concurrent callers, exactly one gets the
        message; the others get ``None``, as does a caller whose id is gone.
        Raises ``QueueFileError`` when the message was claimed but its file
        cannot be parsed; the claim is then already released to the failed
        state with that reason, so the caller just moves on.
        """

    claim_renewal_interval = Attribute(
        "Seconds between renew() calls that keep a claim from being taken for abandoned."
    )

    def renew(claim):
        """Tell other processors the claim is alive (called while a long send goes on). Cheap."""

    def complete(claim):
        """The message was delivered to every recipient: remove it."""

    def discard(claim):
        """Remove a claimed message that was not delivered here: it now lives in another queue.

        ``mailspool move`` calls it once the message is written to its
        target. Unlike ``complete`` it records no delivery (a PostgreSQL
        queue with ``keep_sent`` keeps no ``sent`` row for it).
        """

    def defer(claim, attempt, until):
        """Record ``attempt`` and make the message due again at ``until`` (epoch seconds).

        The message bytes are not rewritten.
        """

    def fail(claim, attempt):
        """Record ``attempt`` (whose ``error`` says why) and move the message to the failed state."""

    def release(claim):
        """Give the message back, unchanged and due now (for example on shutdown)."""

    def cleanup(now=None):
        """Housekeeping that must never lose a committed message.

        Removes staging files abandoned by crashed writers (older than a
        day) and returns claims whose processor died (at once on this host;
        on other hosts once not renewed for the stale-claim timeout).
        Returns a mapping of what it did, by kind, for logging.
        """

    def counts():
        """Return ``{state: number}`` for every state, cheaply (no message is parsed)."""

    def entries(states=None, limit=None):
        """Iterate a ``mailspool.envelope.QueueEntry`` per message in ``states`` (default: all).

        At most ``limit`` entries when given (the maildir lists each state
        in name order, which is enqueue order; PostgreSQL oldest first).

        States are ``ready``, ``active``, ``deferred``, ``held`` and
        ``failed``. Reads envelopes and attempt records, never message
        bodies. An entry that cannot be read is listed with ``problem`` set.
        """

    def entry(queue_id):
        """The QueueEntry of ``queue_id`` in whatever state it is, or None."""

    def read_message(queue_id):
        """The message bytes of ``queue_id``; ``KeyError`` if there is no such message."""

    def insert_entry(queue_id, state, envelope, data, attempts, due_at=None):
        """Add a message under an id it already has, in ``state``, with its attempt history (``mailspool move``).

        ``due_at`` (epoch seconds) is a deferred message's due time. Returns
        False, writing nothing, when ``queue_id`` is already in this queue,
        so that a move run again never writes a message twice. Raises
        ``QueueError`` when the queue cannot be written.
        """

    # Optional, for inspection: ``summary()`` returns what ``mailspool
    # status`` shows without reading every entry (PostgresQueue: indexed
    # queries); ``verify()`` raises ``QueueError`` saying what is wrong when
    # the storage cannot be used (a database unreachable or without its
    # tables). Commands use them where a queue offers them.

    def requeue(queue_id, now=None):
        """Make a failed, deferred or held message ready now; return the state it was in, or None.

        Its attempt history is kept; a failed one gets a requeue record, so
        recipients refused for good are tried again (those who got it are not).
        """

    def hold(queue_id):
        """Set a ready or deferred message aside until ``unhold``; return its former state, or None."""

    def unhold(queue_id):
        """Make a held message ready; return ``'held'``, or None if it was not held."""

    def delete(queue_id):
        """Remove a message that is not being delivered, for good; return its former state, or None.

        The only removal besides ``complete`` and ``discard``; for operators, who confirm it.
        """

    def announce():
        """Wake processors waiting on this queue: new mail is ready. Must never raise.

        Called after a commit made messages visible. Reaches processors in
        this process and, where the storage allows, in other processes.
        """

    def listener():
        """Return an IQueueListener for a processor that waits for ``announce``."""


class ITransactionalMailQueue(IMailQueue):
    """A queue stored in the application's own database transaction (``PostgresQueue.bind(session)``).

    ``QueuedMailDelivery`` given one writes the message at ``send()`` through
    the application's database session instead of joining the transaction
    as a resource of its own: the message and the application's rows commit
    or roll back in one database commit.
    """

    def insert(envelope, data):
        """Write the message in the session's current transaction now; return its queue id.

        Raises ``QueueError`` when the database refuses the write; the
        application's transaction must then be aborted (it cannot commit).
        """


class IQueueListener(Interface):
    """How one waiting processor hears ``IMailQueue.announce``."""

    def wait(timeout):
        """Block until announced or woken, or ``timeout`` seconds passed; True if announced or woken."""

    def wake():
        """End the current or next ``wait`` early (from any thread). Must never raise."""

    def close():
        """Stop listening and release what listening holds. Idempotent."""


class IMailQueueProcessor(Interface):
    """Drains an IMailQueue through an IMailer."""

    queue = Attribute("The IMailQueue being drained.")
    mailer = Attribute("The IMailer used for delivery.")

    def run_once():
        """Try every message that is due once; return a RunSummary.

        Never raises because of one message: a message that cannot be read
        or that makes delivery fail unexpectedly is moved to the failed state
        with the reason, and the run goes on with the rest.
        """


class IMailEvent(Interface):
    """Something happened to a message (sent through zope.event when installed)."""

    message_id = Attribute("The Message-Id of the message, with angle brackets.")
    recipients = Attribute("The envelope recipients the event is about.")


class IMailSentEvent(IMailEvent):
    """The message was handed to the server for ``recipients``."""


class IMailFailedEvent(IMailEvent):
    """Delivery to ``recipients`` failed; ``reason`` says why, in one line."""

    reason = Attribute("Why delivery failed, for people.")


class IPyramidMailer(Interface):
    """pyramid_mailer's mailer API (``request.mailer``), implemented on mailspool's deliveries.

    ``message`` is a ``mailspool.Message`` (or a pyramid_mailer Message):
    anything with ``sender``, ``send_to`` and ``to_message()``. Bad
    messages raise ``InvalidMessage`` (a ``ValueError``) from the call.
    """

    def bind(transaction_manager=None):
        """Return a mailer like this one, joined to ``transaction_manager``."""

    def send(message):
        """Send over SMTP when the transaction commits; return the Message-Id."""

    def send_to_queue(message):
        """Queue the message when the transaction commits; return the Message-Id."""

    def send_sendmail(message):
        """Pipe the message to sendmail when the transaction commits; return the Message-Id."""

    def send_immediately(message, fail_silently=False):
        """Send over SMTP now, outside any transaction; return the Message-Id (None if it failed silently)."""

    def send_immediately_sendmail(message, fail_silently=False):
        """Pipe to sendmail now, outside any transaction; return the Message-Id (None if it failed silently)."""
