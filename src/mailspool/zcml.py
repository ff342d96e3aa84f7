"""ZCML directives in zope.sendmail's ``mail`` namespace: ``smtpMailer``, ``queuedDelivery``, ``directDelivery``.

Declared in ``mailspool/meta.zcml``. A site moves from zope.sendmail by
including that file instead of zope.sendmail's ``meta.zcml``; the
directives accept every attribute zope.sendmail's accept and register the
same utilities (see docs/zope.rst), plus a few mailspool additions.

Needs zope.configuration and zope.component (the ``zope`` extra).
zope.security is optional: when it is installed, ``permission`` protects
the delivery as zope.sendmail does; without it ``permission`` is accepted
and ignored (with a warning in the log). When zope.sendmail is installed,
each delivery also provides and is registered under zope.sendmail's
``IMailDelivery``, so code written against zope.sendmail finds it.

A ``queuedDelivery`` with ``processorThread`` (the default, as in
zope.sendmail) starts a ``QueueProcessorThread`` when the configuration is
executed. ``stop_processor_threads()`` stops every thread started that way
(tests, shutdown code); it also runs, bounded, when the interpreter exits.
"""

import atexit
import logging
import os
import threading
import time

from zope.component import queryUtility
from zope.component.zcml import handler
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.fields import Bool, Path
from zope.interface import Interface, alsoProvides
from zope.schema import Choice, Float, Int, TextLine

from mailspool.delivery import DirectMailDelivery, QueuedMailDelivery
from mailspool.exceptions import QueueError
from mailspool.interfaces import IMailDelivery, IMailer
from mailspool.mailer import TLS_MODES, SMTPMailer
from mailspool.processor import QueueProcessorThread

try:  # zope.security is optional: Zope and Plone have it, plain applications need not
    from zope.component.security import proxify
    from zope.security.zcml import Permission
except ImportError:
    proxify = None
    Permission = TextLine

try:  # zope.sendmail is optional: when present, our deliveries also answer to its interfaces
    from zope.sendmail import interfaces as zope_sendmail_interfaces
except ImportError:
    zope_sendmail_interfaces = None

log = logging.getLogger(__name__)

# Delivery actions run after every order-0 action (mailers, other
# utilities), so a mailer may be declared after the delivery using it, and
# processor threads start only once the rest of the configuration ran.
DELIVERY_ORDER = 1

# How long the exit handler waits for processor threads to settle the
# messages in hand; a thread still sending after that dies with the
# process and its claim returns to the queue (a possible duplicate).
EXIT_STOP_TIMEOUT = 10.0


# -- smtpMailer ----------------------------------------------------------------


class IMailerDirective(Interface):
    """Register a mailer (an ``IMailer`` utility) under a name."""

    name = TextLine(
        title="Name",
        description="The name deliveries use to refer to this mailer (their 'mailer' attribute).",
        required=True,
    )


class ISMTPMailerDirective(IMailerDirective):
    """Register a ``mailspool.SMTPMailer``: zope.sendmail's attributes plus mailspool's.

    The TLS mode comes from zope.sendmail's flags (``implicit_tls`` ->
    ``'ssl'``, ``force_tls`` -> ``'starttls'``, ``no_tls`` -> ``'none'``,
    none of them -> ``'opportunistic'``) or from mailspool's ``tls``; not
    from both.
    """

    hostname = TextLine(title="Hostname", description="The SMTP server.", default="localhost", required=False)

    port = Int(title="Port", description="The SMTP server's port.", default=25, min=1, max=65535, required=False)

    username = TextLine(
        title="Username",
        description="User name for SMTP AUTH; AUTH is used when username and password are both given.",
        required=False,
    )

    password = TextLine(title="Password", description="Password for SMTP AUTH.", required=False)

    implicit_tls = Bool(
        title="Implicit TLS",
        description="TLS from the first byte (SMTPS, usually port 465): tls='ssl'.",
        default=False,
        required=False,
    )

    force_tls = Bool(
        title="Force TLS",
        description="Require STARTTLS; a server that does not offer it is an error: tls='starttls'.",
        default=False,
        required=False,
    )

    no_tls = Bool(
        title="No TLS",
        description="Never use TLS, even when the server offers STARTTLS: tls='none'.",
        default=False,
        required=False,
    )

    timeout = Float(
        title="Timeout",
        description="Seconds allowed for each network operation (default: SMTPMailer's, 30).",
        min=0.001,
        required=False,
    )

    # mailspool additions

    tls = Choice(
        title="TLS mode (mailspool)",
        description="'starttls', 'ssl', 'opportunistic' or 'none'; instead of zope.sendmail's flags.",
        values=TLS_MODES,
        required=False,
    )

    ca_file = Path(
        title="CA file (mailspool)",
        description="CA certificates (PEM) to verify the server with, instead of the system's.",
        required=False,
    )

    verify = Bool(
        title="Verify certificates (mailspool)",
        description="Verify the server's certificate and host name (default true).",
        default=True,
        required=False,
    )


def tls_mode(implicit_tls=False, force_tls=False, no_tls=False, tls=None):
    """The ``SMTPMailer`` ``tls`` value for zope.sendmail's flags or mailspool's ``tls``.

    Raises ``ConfigurationError`` for contradictory settings.
    """
    flags = [flag for flag, value in (("implicit_tls", implicit_tls), ("force_tls", force_tls),
                                      ("no_tls", no_tls)) if value]
    if tls is not None:
        if flags:
            raise ConfigurationError(
                f"give either tls={tls!r} or zope.sendmail's {'/'.join(flags)}, not both"
            )
        return tls
    if no_tls and (implicit_tls or force_tls):
        raise ConfigurationError(f"{' and '.join(flags)} contradict each other")
    if implicit_tls:
        return "ssl"  # force_tls as well says nothing more: implicit TLS is TLS
    if force_tls:
        return "starttls"
    if no_tls:
        return "none"
    return "opportunistic"  # zope.sendmail's default: STARTTLS when the server offers it


def smtpMailer(_context, name, hostname="localhost", port=25, username=None, password=None,
               implicit_tls=False, force_tls=False, no_tls=False, timeout=None,
               tls=None, ca_file=None, verify=True):
    """Handler of ``<mail:smtpMailer>``: build the mailer now, register it when the actions run."""
    mode = tls_mode(implicit_tls, force_tls, no_tls, tls)
    if (username is None) != (password is None):
        given, missing = ("username", "password") if password is None else ("password", "username")
        raise ConfigurationError(
            f"smtpMailer {name!r}: {given} without {missing} (SMTP AUTH needs both; "
            "zope.sendmail silently skipped AUTH then)"
        )
    options = {"tls": mode, "verify": verify}
    if timeout is not None:
        options["timeout"] = timeout
    if ca_file is not None:
        options["ca_file"] = ca_file
    try:
        mailer = SMTPMailer(hostname, port, username=username, password=password, **options)
    except ValueError as exc:
        raise ConfigurationError(f"smtpMailer {name!r}: {exc}") from exc
    _context.action(
        discriminator=("utility", IMailer, name),
        callable=handler,
        args=("registerUtility", mailer, IMailer, name),
    )


# -- deliveries ----------------------------------------------------------------


class IDeliveryDirective(Interface):
    """Register a mail delivery (an ``IMailDelivery`` utility)."""

    name = TextLine(
        title="Name",
        description="The name of the IMailDelivery utility (default 'Mail').",
        default="Mail",
        required=False,
    )

    mailer = TextLine(
        title="Mailer",
        description="Name of the IMailer utility that delivers (see smtpMailer).",
        required=True,
    )

    permission = Permission(
        title="Permission",
        description="Permission needed to call send(); enforced only when zope.security is installed.",
        required=False,
    )


class IQueuedDeliveryDirective(IDeliveryDirective):
    """Register a ``QueuedMailDelivery``, and start a processor thread unless told not to."""

    queuePath = Path(
        title="Queue path",
        description="The queue directory (created when missing).",
        required=True,
    )

    processorThread = Bool(
        title="Run a queue processor thread",
        description="Deliver the queue from a thread of this process (default true, as zope.sendmail).",
        default=True,
        required=False,
    )


class IDirectDeliveryDirective(IDeliveryDirective):
    """Register a ``DirectMailDelivery``: the mailer sends while the transaction commits."""


def queuedDelivery(_context, queuePath, mailer, permission=None, name="Mail", processorThread=True):
    """Handler of ``<mail:queuedDelivery>``."""

    def create():
        mailer_object = lookup_mailer(mailer)
        try:
            delivery = QueuedMailDelivery(queuePath)
        except QueueError as exc:
            raise ConfigurationError(f"queuedDelivery {name!r}: {exc}") from exc
        if zope_sendmail_interfaces is not None:
            alsoProvides(delivery, zope_sendmail_interfaces.IQueuedMailDelivery)
        if processorThread:  # once registered: a failure before leaves no thread behind
            return delivery, lambda: start_processor_thread(delivery.queue, mailer_object)
        return delivery, None

    _delivery_actions(_context, name, permission, create)


def directDelivery(_context, mailer, permission=None, name="Mail"):
    """Handler of ``<mail:directDelivery>``."""

    def create():
        delivery = DirectMailDelivery(lookup_mailer(mailer))
        if zope_sendmail_interfaces is not None:
            alsoProvides(delivery, zope_sendmail_interfaces.IDirectMailDelivery)
        return delivery, None

    _delivery_actions(_context, name, permission, create)


def lookup_mailer(name):
    """The mailer registered as ``name``: a mailspool ``IMailer``, else a zope.sendmail one.

    zope.sendmail-style mailers (``send`` returning ``None``) work with
    mailspool's deliveries and processor. Raises ``ConfigurationError``
    when there is neither.
    """
    mailer = queryUtility(IMailer, name)
    if mailer is None and zope_sendmail_interfaces is not None:
        mailer = queryUtility(zope_sendmail_interfaces.IMailer, name)
    if mailer is None:
        raise ConfigurationError(
            f"mailer {name!r} is not defined: declare it with <mail:smtpMailer name={name!r} .../> "
            f"or register an IMailer utility named {name!r}"
        )
    return mailer


def _delivery_actions(_context, name, permission, create):
    """Register the delivery ``create()`` makes under our IMailDelivery and, if installed, zope.sendmail's.

    ``create()`` returns the delivery and a callable to run once it is
    registered, or None.

    Two actions with the discriminators each interface's registration has
    everywhere else (``<utility>``, zope.sendmail's own directives), so a
    conflict with either is reported and either can be overridden alone
    (overrides.zcml).
    """
    made = []

    def register():
        delivery, then = create()
        if permission is not None:
            delivery = _protect(delivery, permission, name)
        handler("registerUtility", delivery, IMailDelivery, name)
        made.append(delivery)
        if then is not None:
            then()

    _context.action(discriminator=("utility", IMailDelivery, name), callable=register, order=DELIVERY_ORDER)

    if zope_sendmail_interfaces is not None:
        def register_for_zope_sendmail():
            if made:  # nothing when our action was overridden away
                handler("registerUtility", made[-1], zope_sendmail_interfaces.IMailDelivery, name)

        _context.action(
            discriminator=("utility", zope_sendmail_interfaces.IMailDelivery, name),
            callable=register_for_zope_sendmail,
            order=DELIVERY_ORDER,
        )


def _protect(delivery, permission, name):
    """A security proxy allowing ``send`` to holders of ``permission``, as zope.sendmail does."""
    if proxify is None:
        log.warning("mail delivery %r: permission %r ignored because zope.security is not installed",
                    name, permission)
        return delivery
    return proxify(delivery, provides=IMailDelivery, permission=permission)


# -- processor threads -----------------------------------------------------------

_threads = []
_threads_lock = threading.Lock()
_exit_handler_registered = False


def start_processor_thread(queue, mailer):
    """Start a ``QueueProcessorThread`` on ``queue`` and remember it for ``stop_processor_threads``."""
    global _exit_handler_registered
    thread = QueueProcessorThread(queue, mailer)
    with _threads_lock:
        if not _exit_handler_registered:
            atexit.register(stop_processor_threads, EXIT_STOP_TIMEOUT)
            _exit_handler_registered = True
        _threads.append(thread)
    thread.start()
    return thread


def processor_threads():
    """The processor threads started by ``queuedDelivery`` and not yet stopped."""
    with _threads_lock:
        return list(_threads)


def stop_processor_threads(timeout=30.0):
    """Stop every processor thread ``queuedDelivery`` started; wait at most ``timeout`` seconds in all.

    Each thread settles the messages in hand and returns. Returns the
    threads still running when the time was up (empty when all stopped);
    those are forgotten all the same, and die with the process. Never
    raises; safe to call again, and when no thread was started.
    """
    with _threads_lock:
        threads, _threads[:] = list(_threads), []
    deadline = time.monotonic() + timeout
    running = [thread for thread in threads if thread.is_alive()]
    while running:
        for thread in running:
            # All at once, so they settle their messages in parallel; asked
            # again each round because a thread that has only just started
            # clears the request when its loop begins.
            thread.processor.stop()
        for thread in running:
            thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
        running = [thread for thread in running if thread.is_alive()]
        if time.monotonic() >= deadline:
            break
    for thread in running:
        log.warning("%s did not stop within %gs", thread.name, timeout)
    return running
