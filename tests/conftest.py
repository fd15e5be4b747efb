"""Shared fixtures: real files, real databases, real servers; never mocks."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

FIXTURES = Path(__file__).parent / "fixtures"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def fixtures_dir() -> Path:
    """The project's own digests, CSVs and images."""
    return FIXTURES


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A working directory with no NEWSLETTER_* variables and no .env, as on a new machine."""
    import os

    for name in list(os.environ):
        if name.startswith("NEWSLETTER_") and name != "NEWSLETTER_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def runner(clean_env: Path) -> CliRunner:
    """A click runner in a clean working directory."""
    return CliRunner()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright; required in CI, skipped on a laptop without it."""
    import os

    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI needs /usr/bin/chromium (apt-get install chromium)")
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def artifacts_dir() -> Path:
    """Where screenshots go, for a person to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


POSTGRES_URL_VARIABLE = "NEWSLETTER_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):
    """A new, empty database: a SQLite file in tmp_path, and a PostgreSQL database of its own
    (created for the test, dropped after) when NEWSLETTER_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'subscribers' / 'newsletter.db'}"
        return
    import os

    base = os.environ.get(POSTGRES_URL_VARIABLE)
    if not base:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set")
    from databases import fresh_postgres_database

    with fresh_postgres_database(base) as url:
        yield url


@pytest.fixture
def store(database_url: str):
    """The store on a fresh database, migrated to the newest schema, closed after the test."""
    from newsletter.store import open_store

    with open_store(database_url) as opened:
        yield opened


@pytest.fixture
def db_runner(runner: CliRunner, database_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A click runner whose NEWSLETTER_DATABASE_URL is the test's fresh database."""
    monkeypatch.setenv("NEWSLETTER_DATABASE_URL", database_url)
    return runner


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory):
    """A self-signed certificate for localhost and 127.0.0.1, made once with the openssl CLI."""
    from smtp_sink import make_self_signed_cert

    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def trust_tls_cert(tls_cert, monkeypatch: pytest.MonkeyPatch):
    """Make ssl.create_default_context() trust the sink's certificate, as a real CA would be."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_cert.cert))
    return tls_cert


@pytest.fixture
def smtp_sink():
    """A plain SMTP server (PIPELINING, no AUTH) on a free 127.0.0.1 port: tests/smtp_sink.py."""
    from smtp_sink import SmtpSink

    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def make_smtp_sink():
    """Start sinks with options (tls=, cert=, credentials=, pipelining=); stopped after the test."""
    from smtp_sink import SmtpSink

    sinks = []

    def make(**options):
        sink = SmtpSink(**options).start()
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.stop()


@pytest.fixture
def smtp_env(smtp_sink) -> dict[str, str]:
    """NEWSLETTER_SMTP_* variables pointing at ``smtp_sink`` (security none, 5 s timeout)."""
    return smtp_sink.env()


WEB_SECRET = "test-secret-key-that-signs-links-0123456789"


@pytest.fixture
def web_settings(clean_env: Path, database_url: str):
    """Settings of the signup web app on the test's fresh database (a fixed secret key)."""
    from newsletter.config import load_settings

    return load_settings(
        {
            "NEWSLETTER_DATABASE_URL": database_url,
            "NEWSLETTER_SITE_URL": "https://news.example.com",
            "NEWSLETTER_NAME": "Weekly Links",
            "NEWSLETTER_FROM": "Weekly Links <links@example.com>",
            "NEWSLETTER_SECRET_KEY": WEB_SECRET,
            "NEWSLETTER_OUTBOX_DIR": str(clean_env / "outbox"),
        },
        dotenv_path=clean_env / ".env",
    )


@pytest.fixture
def app(web_settings, store):
    """The Flask app of `newsletter serve` on ``store`` (no outbound worker: mail stays queued)."""
    from newsletter.web import create_app

    return create_app(web_settings, store)


@pytest.fixture
def client(app):
    """Flask's test client for ``app``."""
    return app.test_client()


@pytest.fixture
def server(tmp_path: Path, smtp_sink):
    """`newsletter serve` as a subprocess on a free port, an SQLite file and the SMTP sink;
    killed with its whole process tree after the test: tests/serving.py."""
    import signal

    from serving import start_server

    running = start_server(tmp_path, smtp_sink.env())
    try:
        yield running
    finally:
        running.stop(signal.SIGKILL)
