"""The demo: the whole job end to end on loopback, with nothing to set up by hand."""

import email
import email.policy
import tempfile
import textwrap

import transaction

from mailspool.delivery import QueuedMailDelivery
from mailspool.mailer import SMTPMailer
from mailspool.processor import QueueProcessor
from mailspool.sink import SMTPSink

SENDER = "shop@example.org"


def _plain_message():
    message = email.message.EmailMessage()
    message["From"] = f"Example Shop <{SENDER}>"
    message["To"] = "alice@example.org"
    message["Subject"] = "Your order #1001 has shipped"
    message.set_content("Hello Alice,\n\nyour parcel is on its way.\n")
    return message


def _non_ascii_message():
    message = email.message.EmailMessage()
    message["From"] = f"Café Müller <{SENDER}>"
    message["To"] = "Zoë Ærøskøbing <zoe@example.org>"
    message["Subject"] = "Grüße aus Köln — ваш заказ готов"
    message.set_content("Liebe Zoë,\n\nIhre Bestellung (№ 1002) ist fertig. 🎉\n")
    return message


def _message_with_attachment():
    message = email.message.EmailMessage()
    message["From"] = f"Example Shop <{SENDER}>"
    message["To"] = "bob@example.org"
    message["Bcc"] = "audit@example.org"
    message["Subject"] = "Invoice 1003"
    message.set_content("Bob, your invoice is attached.\n")
    message.add_attachment(b"%PDF-1.4\n% not a real invoice\n", maintype="application",
                           subtype="pdf", filename="invoice-1003.pdf")
    return message


def _aborted_message():
    message = _plain_message()
    message.replace_header("Subject", "THIS MUST NEVER ARRIVE (aborted)")
    return message


def run_demo(queue_path=None, out=print):
    """Run the demo; return 0 when everything happened as promised, else 1."""
    with tempfile.TemporaryDirectory(prefix="mailspool-demo-") as scratch, SMTPSink() as sink:
        queue_path = queue_path or f"{scratch}/queue"
        out(f"SMTP sink listening on {sink.host}:{sink.port}; queue at {queue_path}\n")
        manager = transaction.TransactionManager(explicit=True)
        delivery = QueuedMailDelivery(queue_path, transaction_manager=manager)

        with manager:
            delivery.send(SENDER, ["alice@example.org"], _plain_message())
            delivery.send(SENDER, ["zoe@example.org"], _non_ascii_message())
        out("committed a transaction with 2 messages (one in German and Russian, with emoji)")
        with manager:
            delivery.send(SENDER, ["bob@example.org", "audit@example.org"], _message_with_attachment())
        out("committed a transaction with 1 message carrying a PDF attachment and a Bcc")
        manager.begin()
        delivery.send(SENDER, ["alice@example.org"], _aborted_message())
        manager.abort()
        out("aborted a transaction that had sent 1 message")
        out(f"queue before the run: {delivery.queue.counts()}\n")

        processor = QueueProcessor(queue_path, SMTPMailer(sink.host, sink.port, tls="none"))
        summary = processor.run_once()
        out(f"queue processor run: {summary}\n")

        out(f"the server received {len(sink.received)} message(s):")
        for received in sink.received:
            parsed = email.message_from_bytes(received.data, policy=email.policy.default)
            parts = [part.get_filename() for part in parsed.iter_attachments()] if parsed.is_multipart() else []
            out(textwrap.dedent(f"""\
                - from {received.sender} to {', '.join(received.recipients)}
                  Subject: {parsed['Subject']}
                  {len(received.data)} bytes{'; attachments: ' + ', '.join(parts) if parts else ''}"""))
        subjects = [email.message_from_bytes(r.data, policy=email.policy.default)["Subject"] for r in sink.received]
        aborted_arrived = any("aborted" in subject for subject in subjects)
        bcc_leaked = any(b"\nBcc:" in r.data for r in sink.received)
        out("")
        out("the aborted message never appeared" if not aborted_arrived else "ERROR: the aborted message arrived")
        out("no Bcc header was sent" if not bcc_leaked else "ERROR: a Bcc header was sent")
        everything_right = (
            not aborted_arrived and not bcc_leaked and len(sink.received) == 3
            and summary.sent == 3 and delivery.queue.counts()["ready"] == 0
        )
        out("demo finished: " + ("everything as promised" if everything_right else "SOMETHING WENT WRONG"))
        return 0 if everything_right else 1
