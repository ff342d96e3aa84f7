"""A real Pyramid application with pyramid_tm, driven through WebTest."""

import os

import pytest
import pyramid_tm
import webtest
from pyramid.config import Configurator
from pyramid.response import Response

from harness import wait_for

import mailspool
from mailspool import Message, QueueProcessor, SMTPMailer
from mailspool.exceptions import ConfigError
from mailspool.interfaces import IPyramidMailer
from mailspool.pyramid import settings_from_pyramid
from mailspool.testing import DummyMailer


def welcome(to="alice@example.org"):
    return Message(subject="Welcome", recipients=[to], bcc=["audit@example.org"], body="Hello!",
                   html="<p>Hello!</p>")


def queue_then_fail(request):
    request.mailer.send_to_queue(welcome())
    raise RuntimeError("the view failed after sending")


def queue_ok(request):
    return Response(mailspool.get_mailer(request).send_to_queue(welcome()))


def send_direct(request):
    return Response(request.mailer.send(welcome()))


def make_app(settings, include="mailspool"):
    settings = {"tm.manager_hook": pyramid_tm.explicit_manager, **settings}
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include(include)
        for name, view in (("fail", queue_then_fail), ("ok", queue_ok), ("direct", send_direct)):
            config.add_route(name, f"/{name}")
            config.add_view(view, route_name=name)
        return config.make_wsgi_app()


@pytest.fixture
def settings(queue_path, smtp_sink):
    return {"mail.queue_path": str(queue_path), "mail.host": smtp_sink.host, "mail.port": str(smtp_sink.port),
            "mail.default_sender": "Shop <shop@example.org>"}


def test_a_view_that_raises_after_sending_queues_nothing(settings, queue_path):
    app = webtest.TestApp(make_app(settings))
    with pytest.raises(RuntimeError, match="the view failed"):
        app.get("/fail")
    assert os.listdir(queue_path / "new") == [] and os.listdir(queue_path / "tmp") == []


def test_a_view_that_succeeds_is_delivered_by_the_processor(settings, queue_path, smtp_sink):
    app = webtest.TestApp(make_app(settings))
    message_id = app.get("/ok").text
    assert len(os.listdir(queue_path / "new")) == 1

    QueueProcessor(str(queue_path), SMTPMailer(smtp_sink.host, smtp_sink.port, tls="none")).run_once()

    (received,) = smtp_sink.received
    assert received.sender == "shop@example.org"
    assert received.recipients == ("alice@example.org", "audit@example.org")
    assert f"Message-Id: {message_id}".encode() in received.data
    assert b"Bcc" not in received.data


def test_send_delivers_at_commit(settings, smtp_sink):
    webtest.TestApp(make_app(settings)).get("/direct")
    assert len(smtp_sink.received) == 1


def test_the_processor_thread_delivers_without_a_separate_process(settings, smtp_sink):
    settings = {**settings, "mail.processor_thread": "true", "mail.poll_interval": "600"}
    wsgi = make_app(settings)
    try:
        webtest.TestApp(wsgi).get("/ok")
        assert wait_for(lambda: smtp_sink.received)
        assert len(smtp_sink.received) == 1
    finally:
        wsgi.registry.mailspool_processor_thread.stop(timeout=60)


def test_the_testing_include_records_only_committed_messages(settings):
    app = webtest.TestApp(make_app(settings, include="mailspool.testing"))
    with pytest.raises(RuntimeError):
        app.get("/fail")
    app.get("/ok")
    app.get("/direct")
    mailer = app.app.registry.getUtility(IPyramidMailer)
    assert isinstance(mailer, DummyMailer)
    assert [m.subject for m in mailer.queue] == ["Welcome"]
    assert [m.subject for m in mailer.outbox] == ["Welcome"]


def test_pyramid_mailer_settings_map_onto_mailspool_settings(tmp_path):
    settings = settings_from_pyramid({
        "mail.host": "smtp.example.org", "mail.port": "465", "mail.ssl": "true", "mail.username": "app",
        "mail.password": "secret", "mail.queue_path": str(tmp_path), "mail.sendmail_app": "/usr/lib/sendmail",
        "mail.sendmail_template": "{sendmail_app} -t -i -f {sender}", "mail.max_age": "2d", "mail.workers": "3",
        "other.setting": "ignored",
    })
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_tls) == ("smtp.example.org", 465, "ssl")
    assert (settings.smtp_username, settings.sendmail_path, settings.max_age, settings.workers) == (
        "app", "/usr/lib/sendmail", 172800, 3)
    assert settings.make_sendmail_mailer().template == ("{sendmail_app}", "-i", "-f", "{sender}")
    assert settings_from_pyramid({"mail.tls": "true"}).smtp_tls == "starttls"
    assert settings_from_pyramid({}).smtp_tls == "none"  # pyramid_mailer's default: plain SMTP
    assert settings_from_pyramid({"mail.tls": "true", "mail.smtp_tls": "opportunistic"}).smtp_tls == "opportunistic"
    assert settings_from_pyramid({"pyramid_mailer.prefix": "email.", "email.host": "x"}).smtp_host == "x"


def test_a_bad_pyramid_setting_names_the_key():
    with pytest.raises(ConfigError, match="settings mail.port: bad value for smtp_port"):
        settings_from_pyramid({"mail.port": "smtp"})
    with pytest.raises(ConfigError, match="settings mail.hots: unknown setting 'hots'"):
        settings_from_pyramid({"mail.hots": "x"})
