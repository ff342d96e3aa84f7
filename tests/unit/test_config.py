"""The one settings parser: INI files, overrides, errors that name key, file and line."""

import pytest

from mailspool import config
from mailspool.exceptions import ConfigError
from mailspool.mailer import SendmailMailer, SMTPMailer


def write_ini(tmp_path, text):
    path = tmp_path / "mailspool.ini"
    path.write_text(text)
    return path


def test_defaults():
    settings = config.parse({})
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_tls, settings.workers) == ("localhost", 25,
                                                                                           "starttls", 1)
    assert settings.max_age == 5 * 86400 and settings.backoff_min == 60 and settings.backoff_max == 3600


def test_the_file_is_read_with_typed_values(tmp_path):
    path = write_ini(tmp_path, "[mailspool]\nqueue_path = /var/spool/app\nsmtp_port = 587\nsmtp_tls = ssl\n"
                               "max_age = 2d\nbackoff_min = 30s\nsmtp_hosts = a.example.org, b.example.org:2525\n"
                               "smtp_verify = no\nworkers = 4\n")
    settings = config.load(str(path), environ={})
    assert settings.queue_path == "/var/spool/app"
    assert (settings.smtp_port, settings.smtp_tls, settings.workers) == (587, "ssl", 4)
    assert (settings.max_age, settings.backoff_min) == (172800, 30)
    assert settings.smtp_hosts == ("a.example.org", "b.example.org:2525")
    assert settings.smtp_verify is False


@pytest.mark.parametrize("line, message", [
    ("smtp_prot = 25", "unknown setting 'smtp_prot'"),
    ("smtp_port = 99999", "bad value for smtp_port: 99999 is not a TCP port"),
    ("smtp_port = twenty-five", "bad value for smtp_port"),
    ("smtp_tls = maybe", "'maybe' is not one of starttls, ssl, opportunistic, none"),
    ("max_age = forever", "'forever' is not a duration"),
    ("workers = 0", "must be at least 1"),
    ("smtp_verify = perhaps", "not a boolean"),
])
def test_a_bad_file_names_the_key_the_file_and_the_line(tmp_path, line, message):
    path = write_ini(tmp_path, f"[mailspool]\nqueue_path = /tmp/q\n\n# a comment\n{line}\n")
    with pytest.raises(ConfigError, match=message) as raised:
        config.load(str(path), environ={})
    assert str(raised.value).startswith(f"{path}:5: ")
    assert isinstance(raised.value, ValueError)


def test_overrides_win_over_the_file_and_are_named_command_line(tmp_path):
    path = write_ini(tmp_path, "[mailspool]\nsmtp_port = 25\n")
    assert config.load(str(path), {"smtp_port": "2525"}, environ={}).smtp_port == 2525
    with pytest.raises(ConfigError, match="^command line: bad value for smtp_port"):
        config.load(str(path), {"smtp_port": "x"}, environ={})


def test_the_file_is_found_through_the_environment(tmp_path):
    path = write_ini(tmp_path, "[mailspool]\nsmtp_host = mail.example.org\n")
    assert config.load(environ={"MAILSPOOL_CONFIG": str(path)}).smtp_host == "mail.example.org"


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="MAILSPOOL_CONFIG: configuration file .* does not exist"):
        config.load(environ={"MAILSPOOL_CONFIG": str(tmp_path / "absent.ini")})
    with pytest.raises(ConfigError, match="--config: configuration file .* does not exist"):
        config.load(str(tmp_path / "absent.ini"), environ={})


def test_a_file_without_the_section_is_an_error(tmp_path):
    path = write_ini(tmp_path, "[other]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"no \[mailspool\] section"):
        config.load(str(path), environ={})


def test_password_and_password_file_together_are_refused():
    with pytest.raises(ConfigError, match="smtp_password or smtp_password_file, not both"):
        config.parse({"smtp_password": "x", "smtp_password_file": "/run/secret"})


def test_the_password_is_read_from_its_file(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    settings = config.parse({"smtp_username": "app", "smtp_password_file": str(secret)})
    mailer = settings.make_mailer()
    assert isinstance(mailer, SMTPMailer) and mailer._password == "s3cret"
    assert "s3cret" not in repr(mailer)


def test_an_unreadable_password_file_names_it(tmp_path):
    settings = config.parse({"smtp_username": "app", "smtp_password_file": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match="smtp_password_file.*cannot read"):
        settings.make_mailer()


def test_backoff_min_above_backoff_max_is_refused():
    with pytest.raises(ConfigError, match="backoff_min .* is longer than backoff_max"):
        config.parse({"backoff_min": "2h", "backoff_max": "1h"})


def test_the_sendmail_mailer_is_chosen_by_setting():
    mailer = config.parse({"mailer": "sendmail", "sendmail_path": "/usr/lib/sendmail"}).make_mailer()
    assert isinstance(mailer, SendmailMailer) and mailer.sendmail_path == "/usr/lib/sendmail"


def test_python_values_go_through_the_same_checks():
    settings = config.parse({"smtp_port": 587, "smtp_verify": False, "smtp_hosts": ["a", "b:26"], "workers": 3})
    assert (settings.smtp_port, settings.smtp_verify, settings.smtp_hosts, settings.workers) == (
        587, False, ("a", "b:26"), 3)
    with pytest.raises(ConfigError, match="smtp_port"):
        config.parse({"smtp_port": 0})


def test_a_prefixed_mapping_like_pyramid_settings():
    settings = config.from_mapping({"mailspool.smtp_port": "2525", "sqlalchemy.url": "x"}, prefix="mailspool.")
    assert settings.smtp_port == 2525
    with pytest.raises(ConfigError, match="settings mailspool.smtp_prot: unknown setting"):
        config.from_mapping({"mailspool.smtp_prot": "1"}, prefix="mailspool.")


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("15m", 900), ("1.5h", 5400), ("5d", 432000),
                                           ("2 hours", 7200)])
def test_durations(text, seconds):
    assert config.duration(text) == seconds


def test_every_setting_is_documented():
    import pathlib

    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "configuration.rst").read_text()
    assert [name for name in config.SETTINGS if f"``{name}``" not in page] == []


def test_a_word_where_a_number_belongs_is_named_plainly():
    with pytest.raises(ConfigError, match="bad value for smtp_port: 'http' is not a whole number"):
        config.parse({"smtp_port": "http"})


def test_the_delivery_log_handler_is_replaced_not_doubled_on_reload(tmp_path):
    import logging

    settings = config.parse({"delivery_log": str(tmp_path / "deliveries.log")})
    logger = logging.getLogger("mailspool.deliveries")
    try:
        config.configure_delivery_log(settings)
        config.configure_delivery_log(settings)
        assert sum(getattr(h, "_mailspool_delivery_log", False) for h in logger.handlers) == 1
    finally:
        config.configure_delivery_log(config.parse({}))
    assert not any(getattr(h, "_mailspool_delivery_log", False) for h in logger.handlers)
