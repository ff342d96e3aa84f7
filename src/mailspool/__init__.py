"""mailspool: send email from web applications without losing a message or making a request wait.

This module only re-exports the public names; each lives in its own module.
"""

from mailspool.delivery import DirectMailDelivery, QueuedMailDelivery
from mailspool.maildir import MaildirQueue
from mailspool.message import Attachment, Message
from mailspool.mailer import DebugMailer, SendmailMailer, SMTPMailer
from mailspool.processor import QueueProcessor, QueueProcessorThread, RetryPolicy, RunSummary
from mailspool.pyramid import get_mailer, includeme

__all__ = [
    "Attachment",
    "DebugMailer",
    "DirectMailDelivery",
    "MaildirQueue",
    "Message",
    "QueueProcessor",
    "QueueProcessorThread",
    "QueuedMailDelivery",
    "RetryPolicy",
    "RunSummary",
    "SMTPMailer",
    "SendmailMailer",
    "get_mailer",
    "includeme",
]
