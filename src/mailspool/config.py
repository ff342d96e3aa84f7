"""Settings: one parser for the INI file, command-line overrides, the Python API and Pyramid.

Every setting has a name, a type and a default here and nowhere else. The
INI file has one section, ``[mailspool]``; Pyramid settings use the same
names behind a prefix. An unknown key or a bad value is a ``ConfigError``
naming the key, where it came from (file and line, "command line" or
"settings") and what is wrong.
"""

import configparser
import dataclasses
import logging
import os
import re

from mailspool.exceptions import ConfigError
from mailspool.mailer import TLS_MODES

SECTION = "mailspool"
DEFAULT_CONFIG_PATH = "/etc/mailspool.ini"
CONFIG_ENVIRONMENT_VARIABLE = "MAILSPOOL_CONFIG"

_DURATION = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*(s|sec|seconds?|m|min|minutes?|h|hours?|d|days?)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _text(value):
    return value.strip()


def _optional_text(value):
    return value.strip() or None


def _integer(value):
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{value.strip()!r} is not a whole number") from None


def _port(value):
    port = _integer(value)
    if not 0 < port < 65536:
        raise ValueError(f"{port} is not a TCP port (1-65535)")
    return port


def _positive_integer(value):
    number = _integer(value)
    if number < 1:
        raise ValueError(f"must be at least 1, not {number}")
    return number


def _optional_positive_integer(value):
    return _positive_integer(value) if value.strip() else None


def duration(value):
    """Seconds from ``'90'``, ``'90s'``, ``'15m'``, ``'1h'``, ``'5d'``; ValueError otherwise."""
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"{value.strip()!r} is not a duration (such as 90, 90s, 15m, 1h, 5d)")
    number, unit = match.groups()
    return float(number) * _UNIT_SECONDS[(unit or "s")[0].lower()]


def boolean(value):
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (as Pyramid's asbool); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"{value.strip()!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


def _host_list(value):
    return tuple(part for part in re.split(r"[\s,]+", value.strip()) if part)


def _choice(*allowed):
    def parse(value):
        text = value.strip().lower()
        if text not in allowed:
            raise ValueError(f"{value.strip()!r} is not one of {', '.join(allowed)}")
        return text
    return parse


def _log_level(value):
    text = value.strip().upper()
    if text not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"{value.strip()!r} is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return text


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    parse: object
    default: object
    help: str


SETTINGS = {setting.name: setting for setting in [
    Setting("queue_path", _optional_text, None, "queue directory"),
    Setting("queue_url", _optional_text, None, "PostgreSQL queue, postgresql://user@host/db (instead of queue_path)"),
    Setting("keep_sent", duration, 0.0, "PostgreSQL queue: keep delivered rows this long for audit"),
    Setting("queue_session", _optional_text, None, "Pyramid: request attribute with the SQLAlchemy session "
            "the PostgreSQL queue writes through (e.g. dbsession)"),
    Setting("mailer", _choice("smtp", "sendmail"), "smtp", "how to deliver: smtp or sendmail"),
    Setting("smtp_host", _text, "localhost", "SMTP server"),
    Setting("smtp_port", _port, 25, "SMTP port"),
    Setting("smtp_hosts", _host_list, (), "fallback servers, host[:port], tried in order"),
    Setting("smtp_username", _optional_text, None, "SMTP AUTH user name"),
    Setting("smtp_password", _optional_text, None, "SMTP AUTH password (prefer smtp_password_file)"),
    Setting("smtp_password_file", _optional_text, None, "file holding the SMTP AUTH password"),
    Setting("smtp_tls", _choice(*TLS_MODES), "starttls", "starttls, ssl, opportunistic or none"),
    Setting("smtp_ca_file", _optional_text, None, "CA certificates to verify the server with"),
    Setting("smtp_verify", boolean, True, "verify the server's certificate"),
    Setting("smtp_timeout", duration, 30.0, "seconds allowed per network operation"),
    Setting("smtp_local_hostname", _optional_text, None, "name to give in EHLO"),
    Setting("smtp_certfile", _optional_text, None, "client certificate to present (PEM)"),
    Setting("smtp_keyfile", _optional_text, None, "key of the client certificate, if not in smtp_certfile"),
    Setting("smtp_debug", boolean, False, "log the SMTP dialog (mailspool.transcript at DEBUG)"),
    Setting("sendmail_path", _text, "/usr/sbin/sendmail", "program used when mailer = sendmail"),
    Setting("sendmail_template", _optional_text, None, "sendmail arguments with {sendmail_app} and {sender}"),
    Setting("workers", _positive_integer, 1, "parallel connections"),
    Setting("max_age", duration, 5 * 86400.0, "give up on a message this old"),
    Setting("max_attempts", _optional_positive_integer, None, "give up after this many attempts"),
    Setting("backoff_min", duration, 60.0, "first retry delay"),
    Setting("backoff_max", duration, 3600.0, "longest retry delay"),
    Setting("stale_claim_timeout", duration, 300.0, "claims from other hosts not renewed this long return"),
    Setting("poll_interval", duration, 30.0, "daemon: look at the queue at least this often"),
    Setting("processor_thread", boolean, False, "Pyramid: run a queue processor thread in the application"),
    Setting("delivery_log", _optional_text, None, "file for the delivery log (logfmt, one line per attempt)"),
    Setting("log_level", _log_level, "INFO", "DEBUG, INFO, WARNING, ERROR"),
    Setting("default_sender", _optional_text, None, "envelope sender for `mailspool sendmail` without -f"),
]}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Parsed settings: one attribute per entry of ``SETTINGS``, and ``sources`` for error messages."""

    values: dict
    sources: dict = dataclasses.field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def smtp_password_value(self):
        """The SMTP password, read from ``smtp_password_file`` when that is set; ConfigError if unreadable."""
        path = self.values["smtp_password_file"]
        if path is None:
            return self.values["smtp_password"]
        try:
            with open(path, encoding="utf-8") as secret:
                return secret.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"smtp_password_file ({self.sources.get('smtp_password_file', 'settings')}): "
                              f"cannot read {path}: {exc.strerror}", key="smtp_password_file") from exc

    def make_mailer(self):
        """The mailer these settings describe (``mailer = smtp`` or ``sendmail``)."""
        return self.make_sendmail_mailer() if self.mailer == "sendmail" else self.make_smtp_mailer()

    def make_smtp_mailer(self):
        """An SMTPMailer from the ``smtp_*`` settings; ``smtp_debug`` turns the transcript on."""
        from mailspool.mailer import SMTPMailer

        if self.smtp_debug:
            logging.getLogger("mailspool.transcript").setLevel(logging.DEBUG)
        return SMTPMailer(
            self.smtp_host, self.smtp_port, username=self.smtp_username, password=self.smtp_password_value(),
            tls=self.smtp_tls, timeout=self.smtp_timeout, ca_file=self.smtp_ca_file, verify=self.smtp_verify,
            local_hostname=self.smtp_local_hostname, fallback_hosts=self.smtp_hosts,
            certfile=self.smtp_certfile, keyfile=self.smtp_keyfile,
        )

    def make_sendmail_mailer(self):
        """A SendmailMailer from ``sendmail_path`` and ``sendmail_template``."""
        from mailspool.mailer import SendmailMailer

        return SendmailMailer(self.sendmail_path, timeout=self.smtp_timeout, template=self.sendmail_template)

    @property
    def queue_location(self):
        """``queue_url`` if set, else ``queue_path`` (which may be a URL too), or None."""
        return self.queue_url or self.queue_path

    def make_queue(self, create=False):
        """The queue these settings name; ConfigError when none is set or its backend is not installed.

        A ``postgresql://`` location is a ``PostgresQueue`` (its lease is
        ``stale_claim_timeout``), anything else a ``MaildirQueue`` directory.
        """
        from mailspool.delivery import is_database_url
        from mailspool.maildir import MaildirQueue

        location = self.queue_location
        if not location:
            raise ConfigError("no queue: give QUEUE on the command line or queue_path (a directory) or queue_url "
                              "(postgresql://...) in the [mailspool] section of the configuration file",
                              key="queue_path")
        if not is_database_url(location):
            return MaildirQueue(location, create=create, stale_claim_timeout=self.stale_claim_timeout)
        try:
            from mailspool.postgresql import PostgresQueue
        except ImportError as exc:
            raise ConfigError(f"queue {location.split('@')[-1]} is in PostgreSQL, which needs the postgresql "
                              f"extra: pip install 'mailspool[postgresql]' ({exc})", key="queue_url") from exc
        return PostgresQueue(location, lease_seconds=self.stale_claim_timeout, keep_sent=self.keep_sent)

    def processor_options(self):
        """Keyword arguments for ``QueueProcessor``."""
        return {
            "workers": self.workers, "max_age": self.max_age, "max_attempts": self.max_attempts,
            "backoff_min": self.backoff_min, "backoff_max": self.backoff_max,
        }


def parse(raw, sources=None, base=None):
    """Parse ``{name: text}`` over ``base`` (Settings or None for the defaults); return Settings.

    ``sources`` maps names to where each value came from ("file:line",
    "command line"). Raises ConfigError for an unknown key or a bad value.
    """
    sources = dict(sources or {})
    values = dict(base.values) if base else {name: setting.default for name, setting in SETTINGS.items()}
    merged_sources = dict(base.sources) if base else {}
    for name, text in raw.items():
        where = sources.get(name, "settings")
        setting = SETTINGS.get(name)
        if setting is None:
            raise ConfigError(f"{where}: unknown setting {name!r} (known: {', '.join(sorted(SETTINGS))})", key=name)
        try:
            values[name] = setting.parse(text) if isinstance(text, str) else _parse_object(setting, text)
        except ValueError as exc:
            raise ConfigError(f"{where}: bad value for {name}: {exc}", key=name) from None
        merged_sources[name] = where
    if values["smtp_password"] and values["smtp_password_file"]:
        raise ConfigError(f"{merged_sources.get('smtp_password_file')}: give smtp_password or smtp_password_file, "
                          "not both", key="smtp_password_file")
    if values["backoff_min"] > values["backoff_max"]:
        raise ConfigError(f"{merged_sources.get('backoff_min', 'settings')}: backoff_min "
                          f"({values['backoff_min']:g}s) is longer than backoff_max ({values['backoff_max']:g}s)",
                          key="backoff_min")
    return Settings(values, merged_sources)


def _parse_object(setting, value):
    """Python values given through the API: checked by the same parser, via their text form."""
    if isinstance(value, (list, tuple)) and setting.parse is _host_list:
        return tuple(value)
    if isinstance(value, bool) or value is None:
        return setting.parse(str(value).lower() if isinstance(value, bool) else "")
    return setting.parse(str(value))


def read_file(path):
    """Read the ``[mailspool]`` section of INI file ``path``; return ``({name: text}, {name: 'path:line'})``.

    Raises ConfigError when the file cannot be read or parsed, or has no
    ``[mailspool]`` section.
    """
    try:
        with open(path, encoding="utf-8") as stream:
            lines = stream.readlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}", path=path) from exc
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    try:
        parser.read_string("".join(lines), source=path)
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {exc}", path=path) from exc
    if not parser.has_section(SECTION):
        raise ConfigError(f"{path}: no [{SECTION}] section", path=path)
    line_numbers = _key_lines(lines)
    raw = dict(parser.items(SECTION))
    return raw, {name: f"{path}:{line_numbers.get(name, '?')}" for name in raw}


def _key_lines(lines):
    """Line number of each key in the [mailspool] section (configparser does not keep them)."""
    numbers, in_section = {}, False
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = stripped == f"[{SECTION}]"
        elif in_section and stripped and not stripped.startswith(("#", ";")) and not line[0].isspace():
            key = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
            numbers.setdefault(key, number)
    return numbers


def find_config_file(explicit=None, environ=os.environ):
    """``--config``, then ``$MAILSPOOL_CONFIG``, then /etc/mailspool.ini if it exists; or None.

    A file named explicitly (flag or variable) must exist: ConfigError if not.
    """
    for candidate, origin in ((explicit, "--config"), (environ.get(CONFIG_ENVIRONMENT_VARIABLE),
                                                         f"${CONFIG_ENVIRONMENT_VARIABLE}")):
        if candidate:
            if not os.path.isfile(candidate):
                raise ConfigError(f"{origin}: configuration file {candidate} does not exist", path=candidate)
            return candidate
    return DEFAULT_CONFIG_PATH if os.path.isfile(DEFAULT_CONFIG_PATH) else None


def load(explicit_path=None, overrides=None, environ=os.environ):
    """Settings from the configuration file (if any) with ``overrides`` ({name: text}) from the command line."""
    path = find_config_file(explicit_path, environ)
    base = None
    if path is not None:
        raw, sources = read_file(path)
        base = parse(raw, sources)
    overrides = overrides or {}
    return parse(overrides, {name: "command line" for name in overrides}, base)


def from_mapping(mapping, prefix="", source="settings"):
    """Settings from a flat mapping such as Pyramid's ``registry.settings``; keys outside ``prefix`` ignored."""
    raw = {key[len(prefix):]: value for key, value in mapping.items() if key.startswith(prefix)}
    return parse(raw, {name: f"{source} {prefix}{name}" for name in raw})


def configure_delivery_log(settings):
    """Attach a file handler for the delivery log when ``delivery_log`` is set; return it or None.

    Calling it again (a reload) replaces the handler it attached before.
    """
    logger = logging.getLogger("mailspool.deliveries")
    for old_handler in [h for h in logger.handlers if getattr(h, "_mailspool_delivery_log", False)]:
        logger.removeHandler(old_handler)  # a reload replaces it
        old_handler.close()
    if not settings.delivery_log:
        return None
    try:
        handler = logging.FileHandler(settings.delivery_log, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{settings.sources.get('delivery_log', 'settings')}: cannot open delivery_log "
                          f"{settings.delivery_log}: {exc.strerror}", key="delivery_log") from exc
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._mailspool_delivery_log = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
