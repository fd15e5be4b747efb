"""Configuration from the environment and .env, validated with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsletter.config import load_settings
from newsletter.errors import ConfigError

NO_DOTENV = Path("/nonexistent/.env")


def test_defaults() -> None:
    """With nothing set, the embedded defaults: SQLite under subscribers/, the outbox folder."""
    settings = load_settings({}, NO_DOTENV)
    assert settings.database_url == "sqlite:///subscribers/newsletter.db"
    assert settings.smtp_host is None and settings.outbox_dir == Path("outbox")
    assert (settings.smtp_port, settings.smtp_security, settings.smtp_connections) == (
        587,
        "starttls",
        4,
    )


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    """Values come from .env unless the real environment sets them."""
    dotenv = tmp_path / ".env"
    dotenv.write_text("NEWSLETTER_NAME=From dotenv\nNEWSLETTER_SMTP_PORT=2525\n", "utf-8")
    settings = load_settings({"NEWSLETTER_SMTP_PORT": "465"}, dotenv)
    assert settings.list_name == "From dotenv"
    assert settings.smtp_port == 465


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NEWSLETTER_SMTP_PORT", "abc"),
        ("NEWSLETTER_SMTP_SECURITY", "tls-please"),
        ("NEWSLETTER_DATABASE_URL", "not a url"),
        ("NEWSLETTER_SMTP_CONNECTIONS", "0"),
        ("NEWSLETTER_SEND_RATE", "fast"),
        ("NEWSLETTER_SITE_URL", "localhost:8000"),
        ("NEWSLETTER_TIMEZONE", "Mars/Olympus"),
        ("NEWSLETTER_FROM", "no-address-here"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    """Each malformed value is a ConfigError whose single line starts with the variable."""
    with pytest.raises(ConfigError) as info:
        load_settings({name: value}, NO_DOTENV)
    assert str(info.value).startswith(f"{name}: ")
    assert "\n" not in str(info.value)


def test_password_never_in_repr() -> None:
    """SMTP credentials and the secret key are not printed with the settings."""
    settings = load_settings(
        {"NEWSLETTER_SMTP_PASSWORD": "hunter2", "NEWSLETTER_SECRET_KEY": "s3cret"}, NO_DOTENV
    )
    assert "hunter2" not in repr(settings) and "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "variable", "words"),
    [
        ({"NEWSLETTER_DKIM_SELECTOR": "my selector"}, "NEWSLETTER_DKIM_SELECTOR", "not a selector"),
        ({"NEWSLETTER_DKIM_SELECTOR": "-sel"}, "NEWSLETTER_DKIM_SELECTOR", "not a selector"),
        ({"NEWSLETTER_DKIM_DOMAIN": "exa mple.com"}, "NEWSLETTER_DKIM_DOMAIN", "not a domain"),
        ({"NEWSLETTER_DKIM_DOMAIN": "localhost"}, "NEWSLETTER_DKIM_DOMAIN", "not a domain"),
        (
            {"NEWSLETTER_DKIM_PRIVATE_KEY": "/nonexistent/dkim.pem"},
            "NEWSLETTER_DKIM_PRIVATE_KEY",
            "cannot read /nonexistent/dkim.pem",
        ),
        (
            {"NEWSLETTER_DKIM_PRIVATE_KEY": "/"},
            "NEWSLETTER_DKIM_PRIVATE_KEY",
            "cannot read /: Is a directory",
        ),
        ({"NEWSLETTER_DNS_SERVER": "127.0.0.1:abc"}, "NEWSLETTER_DNS_SERVER", "HOST:PORT"),
        ({"NEWSLETTER_DNS_SERVER": "[::1"}, "NEWSLETTER_DNS_SERVER", "HOST:PORT"),
        ({"NEWSLETTER_DNS_SERVER": "ns.example.com:0"}, "NEWSLETTER_DNS_SERVER", "port 0"),
        ({"NEWSLETTER_DNS_SERVER": "ns example:53"}, "NEWSLETTER_DNS_SERVER", "HOST:PORT"),
    ],
)
def test_bad_deliverability_settings_name_the_variable(
    env: dict[str, str], variable: str, words: str
) -> None:
    """A malformed DKIM selector or domain, an unreadable key file or a bad DNS server is
    a one-line ConfigError that starts with the variable and says what is wrong."""
    with pytest.raises(ConfigError) as info:
        load_settings(env, NO_DOTENV)
    assert str(info.value).startswith(f"{variable}: ")
    assert words in str(info.value) and "\n" not in str(info.value)


def test_key_without_selector_is_refused(tmp_path: Path) -> None:
    """A key with no selector names the selector variable: the key cannot be found in DNS."""
    key = tmp_path / "dkim.pem"
    key.write_text("not checked here", "utf-8")
    with pytest.raises(ConfigError, match=r"^NEWSLETTER_DKIM_SELECTOR: required"):
        load_settings({"NEWSLETTER_DKIM_PRIVATE_KEY": str(key)}, NO_DOTENV)


def test_deliverability_settings_are_read(tmp_path: Path) -> None:
    """The key path, selector, domain (lower-cased, IDN in ASCII) and DNS server forms."""
    key = tmp_path / "dkim.pem"
    key.write_text("parsed by newsletter.signing", "utf-8")
    settings = load_settings(
        {
            "NEWSLETTER_DKIM_PRIVATE_KEY": str(key),
            "NEWSLETTER_DKIM_SELECTOR": "news2026.a",
            "NEWSLETTER_DKIM_DOMAIN": "Mail.Bücher.example",
            "NEWSLETTER_DNS_SERVER": "127.0.0.1:5353",
        },
        NO_DOTENV,
    )
    assert settings.dkim_private_key == key and settings.dkim_selector == "news2026.a"
    assert settings.dkim_domain == "mail.xn--bcher-kva.example"
    assert settings.dns_server == ("127.0.0.1", 5353)
    for raw, expected in [
        ("10.0.0.53", ("10.0.0.53", 53)),
        ("[::1]:5300", ("::1", 5300)),
        ("::1", ("::1", 53)),
        ("ns1.example.net", ("ns1.example.net", 53)),
    ]:
        assert load_settings({"NEWSLETTER_DNS_SERVER": raw}, NO_DOTENV).dns_server == expected
    defaults = load_settings({}, NO_DOTENV)
    assert (defaults.dkim_private_key, defaults.dkim_selector, defaults.dns_server) == (
        None,
        None,
        None,
    )
