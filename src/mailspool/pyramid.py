"""Pyramid integration: ``config.include('mailspool')``, ``request.mailer`` and ``get_mailer(request)``.

Settings are read with the ``mail.`` prefix (``pyramid_mailer.prefix`` or
``mailspool.prefix`` change it). pyramid_mailer's keys keep their meaning
(``mail.host``, ``mail.port``, ``mail.tls`` ...); every key of
:doc:`configuration` is accepted under the same prefix
(``mail.max_age = 2d``, ``mail.workers = 4``, ``mail.processor_thread =
true``). Both go through ``mailspool.config``, the parser the command
uses, so a bad value is the same clear ``ConfigError``.
"""

import email.utils
import logging

import transaction
from zope.interface import implementer

from mailspool import config
from mailspool.delivery import DirectMailDelivery, QueuedMailDelivery
from mailspool.exceptions import ConfigError, DeliveryError, InvalidMessage
from mailspool.interfaces import IPyramidMailer
from mailspool.prepare import prepare

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "mail."

# pyramid_mailer's setting -> mailspool's. tls/ssl are handled apart.
PYRAMID_MAILER_KEYS = {
    "host": "smtp_host",
    "port": "smtp_port",
    "username": "smtp_username",
    "password": "smtp_password",
    "keyfile": "smtp_keyfile",
    "certfile": "smtp_certfile",
    "debug": "smtp_debug",
    "sendmail_app": "sendmail_path",
}


def settings_from_pyramid(pyramid_settings, prefix=None):
    """mailspool Settings from Pyramid's settings; ConfigError naming the key for anything wrong.

    ``mail.tls = true`` means STARTTLS (required), ``mail.ssl = true``
    implicit TLS, neither plain SMTP, as with pyramid_mailer;
    ``mail.smtp_tls`` says it in mailspool's words and wins.
    """
    prefix = prefix or pyramid_settings.get("mailspool.prefix") or pyramid_settings.get(
        "pyramid_mailer.prefix", DEFAULT_PREFIX)
    raw, sources = {}, {}
    flags = {}
    for key, value in pyramid_settings.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in ("tls", "ssl"):
            try:
                flags[name] = config.boolean(value) if isinstance(value, str) else bool(value)
            except ValueError as exc:
                raise ConfigError(f"settings {key}: {exc}", key=key) from None
            continue
        if name == "sendmail_template":
            name, value = "sendmail_template", " ".join(value) if isinstance(value, (list, tuple)) else value
        name = PYRAMID_MAILER_KEYS.get(name, name)
        raw[name] = value
        sources[name] = f"settings {key}"
    if "smtp_tls" not in raw:
        raw["smtp_tls"] = "ssl" if flags.get("ssl") else "starttls" if flags.get("tls") else "none"
        sources["smtp_tls"] = f"settings {prefix}tls/{prefix}ssl"
    return config.parse(raw, sources)


def _envelope(message, default_sender):
    """(sender, recipients, message object) for a pyramid_mailer-style Message; InvalidMessage if unusable."""
    if not getattr(message, "sender", None):
        if not default_sender:
            raise InvalidMessage("the message has no sender and no mail.default_sender is set")
        message.sender = default_sender
    built = message.to_message()
    sender = email.utils.parseaddr(message.sender)[1]
    recipients = [address for _, address in email.utils.getaddresses(list(message.send_to)) if address]
    return sender, recipients, built


@implementer(IPyramidMailer)
class Mailer:
    """pyramid_mailer's Mailer on mailspool's deliveries. See ``IPyramidMailer``.

    ``Mailer(settings)`` takes mailspool Settings (``settings_from_pyramid``
    or ``mailspool.config.parse``). ``bind(transaction_manager=...)``
    returns a mailer sharing everything but the transaction manager.
    """

    def __init__(self, settings, transaction_manager=None, _parts=None):
        self.settings = settings
        self.transaction_manager = transaction_manager if transaction_manager is not None else transaction.manager
        if _parts is None:
            queue = settings.make_queue(create=True) if settings.queue_location else None
            _parts = (settings.make_smtp_mailer(), settings.make_sendmail_mailer(), queue)
        self.smtp_mailer, self.sendmail_mailer, self.queue = _parts
        self.default_sender = settings.default_sender

    @classmethod
    def from_settings(cls, pyramid_settings, prefix=DEFAULT_PREFIX):
        """As pyramid_mailer's ``Mailer.from_settings``."""
        return cls(settings_from_pyramid(pyramid_settings, prefix))

    def bind(self, transaction_manager=None, dbsession=None, **unsupported):
        """A mailer joined to ``transaction_manager`` (pyramid_tm's ``request.tm``).

        With a PostgreSQL queue and ``dbsession`` (the request's SQLAlchemy
        session, registered with zope.sqlalchemy), ``send_to_queue`` writes
        through that session: the mail commits with the request's rows.
        """
        if unsupported:
            raise TypeError(f"bind() does not take {', '.join(sorted(unsupported))}")
        queue = self.queue
        if dbsession is not None:
            if not hasattr(queue, "bind"):
                raise ConfigError("a dbsession needs a PostgreSQL queue: set mail.queue_url", key="queue_session")
            queue = queue.bind(dbsession, transaction_manager)
        return Mailer(self.settings, transaction_manager, (self.smtp_mailer, self.sendmail_mailer, queue))

    def send(self, message):
        """Send over SMTP when the transaction commits (checked in its vote)."""
        return self._deliver(DirectMailDelivery(self.smtp_mailer, self.transaction_manager), message)

    def send_to_queue(self, message):
        """Queue at commit, for a processor to deliver (``mail.queue_path`` or ``mail.queue_url`` must be set)."""
        if self.queue is None:
            raise ConfigError("send_to_queue() needs a queue: set mail.queue_path or mail.queue_url", key="queue_path")
        return self._deliver(QueuedMailDelivery(self.queue, self.transaction_manager), message)

    def send_sendmail(self, message):
        """Pipe to sendmail when the transaction commits."""
        return self._deliver(DirectMailDelivery(self.sendmail_mailer, self.transaction_manager), message)

    def send_immediately(self, message, fail_silently=False):
        """Send over SMTP now, outside any transaction; with ``fail_silently`` errors are logged only."""
        return self._send_now(self.smtp_mailer, message, fail_silently)

    def send_immediately_sendmail(self, message, fail_silently=False):
        """Pipe to sendmail now, outside any transaction."""
        return self._send_now(self.sendmail_mailer, message, fail_silently)

    def _deliver(self, delivery, message):
        sender, recipients, built = _envelope(message, self.default_sender)
        return delivery.send(sender, recipients, built)

    def _send_now(self, mailer, message, fail_silently):
        sender, recipients, built = _envelope(message, self.default_sender)
        prepared = prepare(sender, recipients, built)
        try:
            refused = mailer.send(prepared.sender, prepared.recipients, prepared.data) or {}
        except DeliveryError:
            if not fail_silently:
                raise
            log.exception("sending %s failed", prepared.message_id)
            return None
        for recipient, reply in refused.items():
            log.error("sending %s to %s refused: %s", prepared.message_id, recipient, reply)
        return prepared.message_id


def get_mailer(request):
    """The application's mailer, bound to ``request.tm`` when pyramid_tm provides one (as pyramid_mailer's).

    With ``mail.queue_session = dbsession`` (the name of the request
    attribute holding the SQLAlchemy session) and a PostgreSQL queue, it is
    also bound to that session (see ``Mailer.bind``).
    """
    mailer = request.registry.getUtility(IPyramidMailer)
    manager = getattr(request, "tm", None)
    attribute = getattr(mailer, "settings", None) and mailer.settings.queue_session
    dbsession = getattr(request, attribute) if attribute else None
    if dbsession is not None:
        return mailer.bind(transaction_manager=manager, dbsession=dbsession)
    return mailer.bind(transaction_manager=manager) if manager is not None else mailer


def _set_mailer(config_, mailer):
    config_.registry.registerUtility(mailer, IPyramidMailer)
    config_.add_request_method(get_mailer, "mailer", reify=True)


def includeme(config_):
    """Read the ``mail.`` settings, register the mailer and ``request.mailer``; maybe start a processor thread.

    With ``mail.processor_thread = true`` a ``QueueProcessorThread`` starts
    when the application is created (``ApplicationCreated``), in the
    process that serves requests: for small deployments. Larger ones run
    ``mailspool run --daemon`` or cron instead.
    """
    from pyramid.events import ApplicationCreated

    settings = settings_from_pyramid(config_.registry.settings)
    mailer = Mailer(settings)
    _set_mailer(config_, mailer)
    if settings.processor_thread:
        if mailer.queue is None:
            raise ConfigError("mail.processor_thread needs mail.queue_path or mail.queue_url", key="processor_thread")

        def start_processor(event):
            from mailspool.processor import QueueProcessorThread

            thread = QueueProcessorThread(mailer.queue, settings.make_mailer(), poll_interval=settings.poll_interval,
                                          **settings.processor_options())
            thread.start()
            event.app.registry.mailspool_processor_thread = thread

        config_.add_subscriber(start_processor, ApplicationCreated)
