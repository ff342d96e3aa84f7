"""The error tree: every exception mailspool raises on purpose.

::

    MailspoolError
    ├── InvalidMessage (ValueError)         bad input to ``send()``; nothing queued
    │   ├── NotAMessage (TypeError)          neither bytes nor email.message.Message
    │   ├── NoRecipients                     empty recipient list
    │   ├── InvalidAddress                   CR, LF or NUL in an address, or empty
    │   └── HeaderInjection                  CR/LF/NUL where a header must be one line
    ├── ConfigError (ValueError)             a setting is unknown or has a bad value
    ├── TransactionNotBegun (RuntimeError)   explicit manager, no ``begin()`` yet
    ├── QueueError (OSError)                 the queue directory cannot be used
    │   └── QueueFileError                   one queue file cannot be read or parsed
    └── DeliveryError                        a mailer could not deliver a message
        ├── TransientDeliveryError           try again later (4xx, network trouble)
        └── PermanentDeliveryError           never retry (5xx, refused by policy)

Each error refines the builtin it most resembles, so ``except ValueError``
around ``send()`` and ``except OSError`` around file work keep working.
"""

import transaction.interfaces


class MailspoolError(Exception):
    """Base of every error mailspool raises on purpose."""


class InvalidMessage(MailspoolError, ValueError):
    """The message or its envelope was refused by ``send()``; nothing was queued."""


class NotAMessage(InvalidMessage, TypeError):
    """``send()`` was given something that is neither bytes nor a Message."""


class NoRecipients(InvalidMessage):
    """``send()`` was given an empty list of recipients."""


class InvalidAddress(InvalidMessage):
    """An envelope address is empty or contains CR, LF or NUL."""


class HeaderInjection(InvalidMessage):
    """A header value contains CR, LF or NUL where it must stay one line."""


class ConfigError(MailspoolError, ValueError):
    """A setting is unknown, has a bad value, or the configuration cannot be read.

    The message names the key and where it came from (file and line,
    "command line", or the settings key). ``key`` and ``path`` are set when
    known. The ``mailspool`` command exits with 78 (EX_CONFIG) for it.
    """

    def __init__(self, message, key=None, path=None):
        super().__init__(message)
        self.key = key
        self.path = path


class TransactionNotBegun(MailspoolError, transaction.interfaces.NoTransaction, RuntimeError):
    """A delivery with an explicit transaction manager was used outside a transaction.

    Raised from ``send()``; call ``manager.begin()`` (or use ``with manager:``)
    first. Also an instance of ``transaction.interfaces.NoTransaction``.
    """


class QueueError(MailspoolError, OSError):
    """The queue directory is missing, unwritable or not a directory.

    The message names the path. ``filename`` is set to it as well.
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.filename = path

    def __str__(self):
        return self.args[0]


class QueueFileError(QueueError):
    """One queue file is unreadable, truncated or not in a known format."""


class DeliveryError(MailspoolError):
    """A mailer could not deliver a message.

    ``reply`` is the server's :class:`~mailspool.reply.SMTPReply` when one was
    received, else ``None`` (connection trouble). ``server`` names the server
    (``host:port``) when known. ``refused`` maps recipients to their
    individual replies when the server refused every recipient in RCPT TO.
    """

    def __init__(self, message, reply=None, server=None, refused=None):
        super().__init__(message)
        self.reply = reply
        self.server = server
        self.refused = dict(refused or {})

    def __str__(self):
        return self.args[0]


class TransientDeliveryError(DeliveryError):
    """Delivery failed for now; the same message may succeed later."""


class PermanentDeliveryError(DeliveryError):
    """Delivery failed for good; retrying the same message cannot succeed."""
