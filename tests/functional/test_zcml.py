"""ZCML: zope.sendmail's mail:* directives, implemented by mailspool, against a real SMTP server."""

import logging

import pytest
import transaction
import zope.component
import zope.component.testing
import zope.sendmail.interfaces
import zope.sendmail.vocabulary
from zope.configuration import xmlconfig
from zope.configuration.exceptions import ConfigurationError
from zope.interface import implementer

from mailspool import MaildirQueue, QueueProcessor
from mailspool import zcml as mailspool_zcml
from mailspool.interfaces import IDirectMailDelivery, IMailDelivery, IMailer, IMailSentEvent, IQueuedMailDelivery
from harness import wait_for

MESSAGE = b"From: shop@example.org\r\nTo: alice@example.org\r\nSubject: Hi\r\n\r\nHello.\r\n"

ZCML = """
<configure xmlns="http://namespaces.zope.org/zope" xmlns:mail="http://namespaces.zope.org/mail"
           i18n_domain="mailspool.tests">
  <include package="mailspool" file="meta.zcml" />
  {body}
</configure>
"""


def configure(body):
    xmlconfig.string(ZCML.format(body=body))


def smtp_mailer(sink, name="smtp"):
    # aiosmtpd on 127.0.0.1 offers no STARTTLS: zope.sendmail's no_tls flag.
    return f'<mail:smtpMailer name="{name}" hostname="{sink.host}" port="{sink.port}" no_tls="true" timeout="10" />'


@pytest.fixture(autouse=True)
def component_registry():
    """A clean global registry per test; processor threads and the thread's transaction end with it."""
    zope.component.testing.setUp()
    yield
    mailspool_zcml.stop_processor_threads(timeout=30)
    transaction.abort()
    zope.component.testing.tearDown()


def test_queued_delivery_queues_at_commit_and_a_processor_delivers_with_the_registered_mailer(smtp_sink, queue_path):
    configure(smtp_mailer(smtp_sink) + f"""
        <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" processorThread="false" />""")

    delivery = zope.component.getUtility(IMailDelivery, "Mail")
    assert IQueuedMailDelivery.providedBy(delivery)
    assert delivery.queuePath == str(queue_path)
    assert mailspool_zcml.processor_threads() == []
    queue = MaildirQueue(queue_path)
    with transaction.manager:
        message_id = delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
        assert queue.counts()["ready"] == 0
    assert queue.counts()["ready"] == 1
    assert [entry.envelope.message_id for entry in queue.entries()] == [message_id]

    summary = QueueProcessor(queue_path, zope.component.getUtility(IMailer, "smtp")).run_once()

    assert summary.sent == 1
    (received,) = smtp_sink.received
    assert (received.sender, received.recipients) == ("shop@example.org", ("alice@example.org",))
    assert f"Message-Id: {message_id}".encode() in received.data
    assert queue.counts()["ready"] == 0


def test_nothing_is_queued_when_the_transaction_aborts(smtp_sink, queue_path):
    configure(smtp_mailer(smtp_sink) + f"""
        <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" processorThread="false" />""")
    delivery = zope.component.getUtility(IMailDelivery, "Mail")

    transaction.begin()
    delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
    transaction.abort()

    assert sum(MaildirQueue(queue_path).counts().values()) == 0


def test_direct_delivery_sends_at_commit_and_notifies_zope_subscribers(smtp_sink):
    configure(smtp_mailer(smtp_sink) + '<mail:directDelivery name="direct" mailer="smtp" />')
    sent = []
    zope.component.provideHandler(sent.append, [IMailSentEvent])

    delivery = zope.component.getUtility(IMailDelivery, "direct")
    assert IDirectMailDelivery.providedBy(delivery)
    assert delivery.mailer is zope.component.getUtility(IMailer, "smtp")
    with transaction.manager:
        message_id = delivery.send("shop@example.org", ["alice@example.org"], MESSAGE)
        assert smtp_sink.received == []

    assert [message.recipients for message in smtp_sink.received] == [("alice@example.org",)]
    assert [(event.message_id, event.recipients) for event in sent] == [(message_id, ("alice@example.org",))]


def test_the_processor_thread_delivers_without_an_explicit_run(smtp_sink, queue_path):
    # processorThread is not given: true by default, as in zope.sendmail.
    configure(smtp_mailer(smtp_sink) + f'<mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" />')
    (thread,) = mailspool_zcml.processor_threads()
    try:
        assert thread.is_alive()
        assert thread.processor.mailer is zope.component.getUtility(IMailer, "smtp")
        with transaction.manager:
            zope.component.getUtility(IMailDelivery, "Mail").send("shop@example.org", ["bob@example.org"], MESSAGE)

        assert wait_for(lambda: len(smtp_sink.received) == 1)
        assert smtp_sink.received[0].recipients == ("bob@example.org",)
    finally:
        assert mailspool_zcml.stop_processor_threads(timeout=30) == []
    assert not thread.is_alive()
    assert mailspool_zcml.processor_threads() == []
    assert mailspool_zcml.stop_processor_threads() == []  # again: nothing left, no error


def test_threads_stopped_right_after_they_started_do_stop(queue_path):
    configure(f"""
        <mail:smtpMailer name="smtp" hostname="127.0.0.1" port="9" no_tls="true" />
        <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" />
        <mail:queuedDelivery name="other" queuePath="{queue_path}-other" mailer="smtp" />""")
    threads = mailspool_zcml.processor_threads()
    assert len(threads) == 2

    assert mailspool_zcml.stop_processor_threads(timeout=30) == []
    assert not any(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("attributes, expected", [
    ("", "opportunistic"),
    ('implicit_tls="false" force_tls="false" no_tls="false"', "opportunistic"),
    ('implicit_tls="true"', "ssl"),
    ('implicit_tls="true" force_tls="true"', "ssl"),
    ('force_tls="true"', "starttls"),
    ('no_tls="true"', "none"),
    ('tls="starttls"', "starttls"),
    ('tls="none"', "none"),
])
def test_zope_sendmail_tls_flags_map_to_a_tls_mode(attributes, expected):
    configure(f'<mail:smtpMailer name="smtp" hostname="mail.example.org" port="587" {attributes} />')

    mailer = zope.component.getUtility(IMailer, "smtp")
    assert mailer.tls == expected
    assert (mailer.hostname, mailer.port, mailer.verify) == ("mail.example.org", 587, True)


def test_smtp_mailer_defaults_and_mailspool_additions(tmp_path):
    ca_file = tmp_path / "ca.pem"
    configure(f"""
        <mail:smtpMailer name="plain" />
        <mail:smtpMailer name="full" hostname="smtp.example.org" port="465" username="shop" password="secret"
                         implicit_tls="true" timeout="5" ca_file="{ca_file}" verify="false" />""")

    plain = zope.component.getUtility(IMailer, "plain")
    assert (plain.hostname, plain.port, plain.username, plain.tls, plain.verify) == (
        "localhost", 25, None, "opportunistic", True)
    full = zope.component.getUtility(IMailer, "full")
    assert (full.hostname, full.port, full.username, full.tls, full.timeout, full.ca_file, full.verify) == (
        "smtp.example.org", 465, "shop", "ssl", 5.0, str(ca_file), False)
    assert "secret" not in repr(full)


@pytest.mark.parametrize("attributes, error", [
    ('no_tls="true" force_tls="true"', "contradict"),
    ('no_tls="true" implicit_tls="true"', "contradict"),
    ('tls="ssl" implicit_tls="true"', "not both"),
    ('tls="tls13"', "Invalid value for 'tls'"),
    ('no_tls="perhaps"', "Invalid value for 'no_tls'"),
    ('port="0"', "Invalid value for 'port'"),
    ('username="shop"', "username without password"),
    ('password="secret"', "password without username"),
])
def test_bad_smtp_mailer_settings_are_configuration_errors(attributes, error):
    with pytest.raises(ConfigurationError, match=error):
        configure(f'<mail:smtpMailer name="smtp" {attributes} />')


@pytest.mark.parametrize("directive", ["queuedDelivery", "directDelivery"])
def test_a_missing_mailer_is_a_clear_configuration_error(directive, queue_path):
    queue = f'queuePath="{queue_path}"' if directive == "queuedDelivery" else ""

    with pytest.raises(ConfigurationError, match="mailer 'nowhere' is not defined"):
        configure(f'<mail:{directive} mailer="nowhere" {queue} />')

    assert zope.component.queryUtility(IMailDelivery, "Mail") is None
    assert mailspool_zcml.processor_threads() == []


def test_the_mailer_may_be_declared_after_the_delivery(smtp_sink):
    configure('<mail:directDelivery mailer="smtp" />' + smtp_mailer(smtp_sink))

    assert zope.component.getUtility(IMailDelivery, "Mail").mailer is zope.component.getUtility(IMailer, "smtp")


def test_two_deliveries_with_one_name_conflict(smtp_sink, queue_path):
    with pytest.raises(ConfigurationError, match="Conflicting configuration actions"):
        configure(smtp_mailer(smtp_sink) + f"""
            <mail:directDelivery mailer="smtp" />
            <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" processorThread="false" />""")


def test_code_written_against_zope_sendmail_finds_and_uses_the_delivery(smtp_sink, queue_path):
    configure(smtp_mailer(smtp_sink) + f"""
        <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" processorThread="false" />
        <mail:directDelivery name="direct" mailer="smtp" />""")

    # Unchanged zope.sendmail-era application code:
    def notify_customer(address):
        mail_delivery = zope.component.getUtility(zope.sendmail.interfaces.IMailDelivery, "Mail")
        return mail_delivery.send("shop@example.org", [address], MESSAGE)

    with transaction.manager:
        message_id = notify_customer("carol@example.org")
    assert [entry.envelope.message_id for entry in MaildirQueue(queue_path).entries()] == [message_id]

    queued = zope.component.getUtility(zope.sendmail.interfaces.IMailDelivery, "Mail")
    assert queued is zope.component.getUtility(IMailDelivery, "Mail")
    assert zope.sendmail.interfaces.IQueuedMailDelivery.providedBy(queued)
    direct = zope.component.getUtility(zope.sendmail.interfaces.IMailDelivery, "direct")
    assert zope.sendmail.interfaces.IDirectMailDelivery.providedBy(direct)
    # zope.sendmail's vocabulary of delivery names (used by Zope forms) lists them.
    assert sorted(term.value for term in zope.sendmail.vocabulary.MailDeliveryNames(None)) == ["Mail", "direct"]


@implementer(zope.sendmail.interfaces.IMailer)
class ZopeSendmailStyleMailer:
    """A mailer written for zope.sendmail: send returns None."""

    def __init__(self):
        self.sent = []

    def vote(self, fromaddr, toaddrs, message):
        pass

    def send(self, fromaddr, toaddrs, message):
        self.sent.append((fromaddr, tuple(toaddrs)))

    def abort(self):
        pass


def test_a_mailer_registered_for_zope_sendmails_imailer_is_found(queue_path):
    legacy = ZopeSendmailStyleMailer()
    zope.component.provideUtility(legacy, zope.sendmail.interfaces.IMailer, "legacy")
    configure(f"""
        <mail:directDelivery mailer="legacy" />
        <mail:queuedDelivery name="queued" queuePath="{queue_path}" mailer="legacy" processorThread="false" />""")

    with transaction.manager:
        zope.component.getUtility(IMailDelivery, "Mail").send("shop@example.org", ["dave@example.org"], MESSAGE)
    assert legacy.sent == [("shop@example.org", ("dave@example.org",))]


def test_mailspools_meta_zcml_included_after_zope_sendmails_defines_the_directives():
    xmlconfig.string("""
        <configure xmlns="http://namespaces.zope.org/zope" xmlns:mail="http://namespaces.zope.org/mail">
          <include package="zope.sendmail" file="meta.zcml" />
          <include package="mailspool" file="meta.zcml" />
          <mail:smtpMailer name="smtp" />
        </configure>""")

    assert zope.component.queryUtility(IMailer, "smtp") is not None
    assert zope.component.queryUtility(zope.sendmail.interfaces.IMailer, "smtp") is None


def test_without_zope_security_permission_is_accepted_and_ignored(smtp_sink, caplog, monkeypatch):
    # zope.security is a test dependency; without it the module's optional import leaves proxify None.
    monkeypatch.setattr(mailspool_zcml, "proxify", None)
    with caplog.at_level(logging.WARNING, logger="mailspool.zcml"):
        configure('<include package="zope.security" file="meta.zcml" />'
                  '<permission id="zope.SendMail" title="Send mail" />'
                  + smtp_mailer(smtp_sink) + '<mail:directDelivery mailer="smtp" permission="zope.SendMail" />')

    delivery = zope.component.getUtility(IMailDelivery, "Mail")
    assert type(delivery).__name__ == "DirectMailDelivery"  # not proxied
    assert "permission 'zope.SendMail' ignored because zope.security is not installed" in caplog.text


@pytest.mark.skipif(mailspool_zcml.proxify is None, reason="zope.security is not installed")
def test_with_zope_security_permission_protects_send(smtp_sink):
    from zope.security.checker import ProxyFactory
    from zope.security.interfaces import ForbiddenAttribute, Unauthorized
    from zope.security.management import endInteraction, newInteraction

    xmlconfig.string(ZCML.format(body=f"""
        <include package="zope.security" file="meta.zcml" />
        <permission id="mailspool.test.SendMail" title="Send mail (test)" />
        {smtp_mailer(smtp_sink)}
        <mail:directDelivery mailer="smtp" permission="mailspool.test.SendMail" />"""))

    delivery = zope.component.getUtility(IMailDelivery, "Mail")
    assert zope.component.getUtility(zope.sendmail.interfaces.IMailDelivery, "Mail") is delivery
    assert IDirectMailDelivery.providedBy(delivery)
    secured = ProxyFactory(delivery)  # what untrusted code (a page template) gets

    class Participation:
        interaction = None
        principal = type("Principal", (), {"id": "someone"})()

    newInteraction(Participation())
    try:
        with pytest.raises(Unauthorized):
            secured.send
        with pytest.raises(ForbiddenAttribute):
            secured.mailer  # only IMailDelivery (send) is exposed, as in zope.sendmail
    finally:
        endInteraction()


def test_a_queue_left_by_zope_sendmail_is_delivered(smtp_sink, queue_path):
    from zope.sendmail.delivery import QueuedMailDelivery

    with transaction.manager:  # X-Zope-From and X-Zope-To lines, which the queue imports
        QueuedMailDelivery(str(queue_path)).send("shop@example.org", ["erin@example.org"], MESSAGE)
    configure(smtp_mailer(smtp_sink) + f"""
        <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" processorThread="false" />""")

    summary = QueueProcessor(queue_path, zope.component.getUtility(IMailer, "smtp")).run_once()

    assert summary.sent == 1
    (received,) = smtp_sink.received
    assert (received.sender, received.recipients) == ("shop@example.org", ("erin@example.org",))
    assert b"X-Zope" not in received.data


def test_a_queue_left_by_repoze_sendmail_is_accepted_and_delivered(smtp_sink, queue_path):
    import email

    from repoze.sendmail.delivery import QueuedMailDelivery

    with transaction.manager:  # X-Actually-* headers, which the queue imports
        QueuedMailDelivery(str(queue_path)).send("shop@example.org", ["erin@example.org"],
                                                 email.message_from_bytes(MESSAGE))
    configure(smtp_mailer(smtp_sink) + f"""
        <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" processorThread="false" />""")

    summary = QueueProcessor(queue_path, zope.component.getUtility(IMailer, "smtp")).run_once()

    assert summary.sent == 1
    assert [message.recipients for message in smtp_sink.received] == [("erin@example.org",)]


def test_a_queue_with_mailspool_messages_is_accepted(smtp_sink, queue_path):
    body = smtp_mailer(smtp_sink) + f"""
        <mail:queuedDelivery queuePath="{queue_path}" mailer="smtp" processorThread="false" />"""
    configure(body)
    with transaction.manager:  # a message whose own headers look like an old envelope
        zope.component.getUtility(IMailDelivery, "Mail").send(
            "shop@example.org", ["erin@example.org"], b"X-Zope-To: someone@example.org\r\n" + MESSAGE)
    zope.component.testing.tearDown()
    zope.component.testing.setUp()

    configure(body)  # a restart

    assert MaildirQueue(queue_path).counts()["ready"] == 1


def test_including_the_package_configuration_registers_nothing():
    registry = zope.component.getGlobalSiteManager()
    before = list(registry.registeredUtilities())

    xmlconfig.string('<configure xmlns="http://namespaces.zope.org/zope"><include package="mailspool" /></configure>')

    assert list(registry.registeredUtilities()) == before
