"""Pyramid with pyramid_tm and a request ``dbsession``: ``mail.queue_url`` + ``mail.queue_session``.

A real Pyramid application driven through WebTest, a real PostgreSQL server.
"""

import pyramid_tm
import pytest
import sqlalchemy as sa
import webtest
from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy.orm import sessionmaker
from zope.sqlalchemy import mark_changed, register

from mailspool import Message
from mailspool.postgresql import PostgresQueue


def order_and_mail(request):
    request.dbsession.execute(sa.text("INSERT INTO orders (number) VALUES (1)"))
    mark_changed(request.dbsession, request.tm)
    message_id = request.mailer.send_to_queue(
        Message(subject="Your order", sender="shop@example.org", recipients=["alice@example.org"], body="Thanks"))
    if "fail" in request.params:
        raise RuntimeError("the view failed after sending")
    return Response(message_id)


def make_app(engine, postgres_url):
    settings = {"tm.manager_hook": pyramid_tm.explicit_manager, "mail.queue_url": postgres_url,
                "mail.queue_session": "dbsession", "mail.default_sender": "shop@example.org"}
    session_factory = sessionmaker(bind=engine)

    def dbsession(request):
        session = session_factory()
        register(session, transaction_manager=request.tm)
        request.add_finished_callback(lambda request: session.close())
        return session

    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("mailspool")
        config.add_request_method(dbsession, "dbsession", reify=True)
        config.add_route("order", "/order")
        config.add_view(order_and_mail, route_name="order")
        app = config.make_wsgi_app()
    return app


@pytest.fixture
def app_and_queue(pg_engine, postgres_url):
    with pg_engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE orders (id serial PRIMARY KEY, number int NOT NULL)"))
    queue = PostgresQueue(pg_engine)
    queue.create_schema()
    app = make_app(pg_engine, postgres_url)
    yield webtest.TestApp(app), queue
    from mailspool.interfaces import IPyramidMailer

    app.registry.getUtility(IPyramidMailer).queue.close()


def orders(engine):
    with engine.begin() as connection:
        return connection.execute(sa.text("SELECT count(*) FROM orders")).scalar()


def test_the_request_mail_commits_with_the_request_rows(app_and_queue, pg_engine):
    app, queue = app_and_queue

    message_id = app.get("/order").text

    assert orders(pg_engine) == 1
    (entry,) = queue.entries()
    assert entry.envelope.message_id == message_id and entry.state == "ready"


def test_a_failing_view_leaves_neither_row_nor_mail(app_and_queue, pg_engine):
    app, queue = app_and_queue

    with pytest.raises(RuntimeError, match="the view failed"):
        app.get("/order?fail=1")

    assert orders(pg_engine) == 0
    assert list(queue.entries()) == []
