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
