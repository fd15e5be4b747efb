"""`newsletter doctor` against a DNS server of the test's own (dnslib on 127.0.0.1) and the
test SMTP sink: each kind of problem is reported, a good setup passes. Never the real network."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from dkim_keys import dkimpy_verify, write_key
from dns_zone import DnsZone, SilentDns

from newsletter.cli import main
from newsletter.config import load_settings
from newsletter.doctor import (
    FAIL,
    OK,
    WARN,
    Dns,
    check_bounce_address,
    check_dkim,
    check_dmarc,
    check_site_url,
    check_smtp,
    check_spf,
    check_unsubscribe,
    run_checks,
)
from newsletter.signing import load_key

NO_DOTENV = Path("/nonexistent/.env")
SELECTOR = "news2026"
DKIM_NAME = f"{SELECTOR}._domainkey.example.com"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two RSA 2048 keys and an Ed25519 key, made once for this module."""
    folder = tmp_path_factory.mktemp("doctor-keys")
    return {
        "rsa": write_key(folder / "rsa.pem"),
        "other": write_key(folder / "other.pem"),
        "ed25519": write_key(folder / "ed25519.pem", "ed25519"),
    }


def good_zone(key: Path) -> dict[str, list[str]]:
    """What a well set-up example.com publishes: SPF through a relay, the DKIM key, DMARC."""
    return {
        "example.com": ["v=spf1 include:_spf.relay.example.net ~all", "site-verification=1"],
        "_spf.relay.example.net": ["v=spf1 ip4:192.0.2.0/24 include:b.relay.example.net -all"],
        "b.relay.example.net": ["v=spf1 a mx -all"],
        DKIM_NAME: [load_key(key).dns_record()],
        "_dmarc.example.com": ["v=DMARC1; p=reject; rua=mailto:dmarc@example.com"],
    }


def _settings(dns: DnsZone | None = None, key: Path | None = None, **env: str):
    base = {
        "NEWSLETTER_FROM": "Weekly Links <links@example.com>",
        "NEWSLETTER_SITE_URL": "https://news.example.com",
        "NEWSLETTER_SECRET_KEY": "doctor-test-secret",
    }
    if dns is not None:
        base["NEWSLETTER_DNS_SERVER"] = dns.address
    if key is not None:
        base |= {"NEWSLETTER_DKIM_PRIVATE_KEY": str(key), "NEWSLETTER_DKIM_SELECTOR": SELECTOR}
    return load_settings(base | env, NO_DOTENV)


def _by_name(checks) -> dict[str, tuple[str, str]]:
    return {check.name: (check.status, check.message) for check in checks}


# DNS: SPF ---------------------------------------------------------------------------------


def test_good_spf_counts_lookups_through_includes(keys) -> None:
    """A record with nested includes passes, with the lookups a receiver makes counted."""
    with DnsZone(good_zone(keys["rsa"])) as dns:
        check = check_spf(Dns(_settings(dns).dns_server), "example.com")
    assert check.status == OK
    assert "(4 of 10 DNS lookups)" in check.message


@pytest.mark.parametrize(
    ("record", "extra", "words"),
    [
        ("v=spf1 +all", {}, "lets anyone send as example.com"),
        ("v=spf1 mx all", {}, "lets anyone send as example.com"),
        ("v=spf1 redirect=open.example.net", {"open.example.net": ["v=spf1 +all"]}, "+all"),
        ("v=spf1 include:gone.example.net -all", {}, "include:gone.example.net has no SPF"),
        (
            "v=spf1 " + " ".join(f"include:s{n}.example.net" for n in range(6)) + " -all",
            {f"s{n}.example.net": ["v=spf1 a mx -all"] for n in range(6)},
            "needs 18 DNS lookups; receivers stop at 10",
        ),
    ],
)
def test_spf_problems_are_reported(record: str, extra: dict, words: str) -> None:
    """+all (written, implied or redirected to), an include without a record, and more
    than 10 lookups fail, each saying why."""
    with DnsZone({"example.com": [record], **extra}) as dns:
        check = check_spf(Dns(_settings(dns).dns_server), "example.com")
    assert check.status == FAIL, check
    assert words in check.message


def test_spf_redirect_counts_and_neutral_ending_warns() -> None:
    """A redirect counts as a lookup and is followed; ?all protects nothing (a warning)."""
    zone = {
        "example.com": ["v=spf1 redirect=_spf.example.com"],
        "_spf.example.com": ["v=spf1 a mx ptr -all"],
        "example.org": ["v=spf1 ip4:192.0.2.1 ?all"],
    }
    with DnsZone(zone) as dns:
        resolver = Dns(_settings(dns).dns_server)
        redirected = check_spf(resolver, "example.com")
        neutral = check_spf(resolver, "example.org")
    assert redirected.status == OK and "(4 of 10 DNS lookups)" in redirected.message
    assert neutral.status == WARN and "without ~all or -all" in neutral.message


def test_two_spf_records_fail() -> None:
    """Two SPF records at one name are a permanent error at receivers."""
    with DnsZone({"example.com": ["v=spf1 -all", "v=spf1 mx -all"]}) as dns:
        check = check_spf(Dns(_settings(dns).dns_server), "example.com")
    assert check.status == FAIL and "2 SPF records" in check.message


# DNS: DKIM ---------------------------------------------------------------------------------


def test_dkim_key_of_another_key_is_reported(keys) -> None:
    """A published key that is not the configured key's public half fails, and the line
    gives the record to publish instead."""
    zone = good_zone(keys["rsa"]) | {DKIM_NAME: [load_key(keys["other"]).dns_record()]}
    with DnsZone(zone) as dns:
        check = check_dkim(Dns(_settings(dns).dns_server), _settings(dns, keys["rsa"]))
    assert check.status == FAIL
    assert "not the public half of NEWSLETTER_DKIM_PRIVATE_KEY" in check.message
    assert load_key(keys["rsa"]).dns_record() in check.message


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ("v=DKIM1; k=rsa; p=", "revoked"),
        ("v=DKIM1; k=ed25519; p=AAAA", "k=ed25519 key"),
        ("v=DKIM1; k=rsa; h=sha1; p=AAAA", "does not allow sha256"),
        ("v=DKIM1; p=not base64!", "not the public half"),
        ("v=DKIM1; p", "malformed"),
    ],
)
def test_unusable_dkim_records_fail(keys, record: str, words: str) -> None:
    """A revoked key, the wrong key type, a hash the signature does not use, a p= that is
    not a key, or a malformed record each fail with the reason."""
    with DnsZone({DKIM_NAME: [record]}) as dns:
        check = check_dkim(Dns(_settings(dns).dns_server), _settings(dns, keys["rsa"]))
    assert check.status == FAIL, check
    assert words in check.message


def test_dkim_ed25519_key_and_split_rsa_record(keys) -> None:
    """An Ed25519 key published raw (RFC 8463) matches; a 2048-bit RSA record served as
    several strings is joined before it is compared."""
    with DnsZone({DKIM_NAME: [load_key(keys["ed25519"]).dns_record()]}) as dns:
        ed = check_dkim(Dns(_settings(dns).dns_server), _settings(dns, keys["ed25519"]))
    assert ed.status == OK and "(ed25519, 256 bits)" in ed.message
    with DnsZone(good_zone(keys["rsa"])) as dns:
        rsa = check_dkim(Dns(_settings(dns).dns_server), _settings(dns, keys["rsa"]))
    assert rsa.status == OK and "(rsa, 2048 bits)" in rsa.message
    assert len(load_key(keys["rsa"]).dns_record()) > 255


def test_dkim_testing_mode_and_unsigned_setups_warn(keys) -> None:
    """t=y is a warning; no key at all, or a selector for the relay's key, are warnings
    that say newsletter does not sign."""
    record = load_key(keys["rsa"]).dns_record() + "; t=y"
    with DnsZone({DKIM_NAME: [record]}) as dns:
        resolver = Dns(_settings(dns).dns_server)
        testing = check_dkim(resolver, _settings(dns, keys["rsa"]))
        relay = check_dkim(resolver, _settings(dns, NEWSLETTER_DKIM_SELECTOR=SELECTOR))
        unsigned = check_dkim(resolver, _settings(dns))
    assert testing.status == WARN and "t=y" in testing.message
    assert relay.status == WARN and "your SMTP relay must sign" in relay.message
    assert unsigned.status == WARN and "NEWSLETTER_DKIM_PRIVATE_KEY is not set" in unsigned.message


def test_dkim_key_that_cannot_sign_is_a_failed_check(keys, tmp_path: Path) -> None:
    """doctor reports a key file that is not a key as a failed check, not a crash."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key", "utf-8")
    with DnsZone({}) as dns:
        check = check_dkim(Dns(_settings(dns).dns_server), _settings(dns, bad))
    assert check.status == FAIL and check.message.startswith("NEWSLETTER_DKIM_PRIVATE_KEY: ")


# DNS: DMARC --------------------------------------------------------------------------------


def _dmarc(zone: dict, dkim_domain: str | None, envelope: str = "example.com"):
    with DnsZone(zone) as dns:
        return check_dmarc(Dns(_settings(dns).dns_server), "example.com", dkim_domain, envelope)


def test_dmarc_policy_and_alignment() -> None:
    """p=reject passes; a subdomain's DKIM and bounce domains align in relaxed mode."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject"]}
    policy, alignment = _dmarc(zone, "mail.example.com", "bounces.example.com")
    assert policy.status == OK and "policy reject" in policy.message
    assert alignment.status == OK, alignment


def test_misaligned_dmarc_is_reported() -> None:
    """DKIM signing for another domain and bounces from another domain fail DMARC for
    every message, and the line says what to set."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=quarantine"]}
    _, alignment = _dmarc(zone, "other.example.org", "bounces.example.org")
    assert alignment.status == FAIL
    assert "DKIM d=other.example.org is not aligned" in alignment.message
    assert "set NEWSLETTER_DKIM_DOMAIN to example.com" in alignment.message


def test_strict_alignment_refuses_subdomains() -> None:
    """adkim=s and aspf=s need the exact From domain: DKIM of a subdomain is not aligned,
    and DMARC resting on SPF alone is a warning."""
    zone = {"_dmarc.example.com": ["v=DMARC1; p=reject; adkim=s; aspf=s"]}
    _, alignment = _dmarc(zone, "mail.example.com", "example.com")
    assert alignment.status == WARN
    assert "not aligned with From example.com (strict)" in alignment.message
    assert "DMARC rests on SPF alone" in alignment.message


def test_dmarc_missing_none_inherited_and_duplicated() -> None:
    """No record fails; p=none warns; a parent's record applies with its sp=; two records
    at one name count as none."""
    [missing] = _dmarc({}, "example.com")
    assert missing.status == FAIL and "no DMARC record" in missing.message
    none, _ = _dmarc({"_dmarc.example.com": ["v=DMARC1; p=none"]}, "example.com")
    assert none.status == WARN and "policy none only monitors" in none.message
    with DnsZone({"_dmarc.example.com": ["v=DMARC1; p=reject; sp=quarantine"]}) as dns:
        inherited, aligned = check_dmarc(
            Dns(_settings(dns).dns_server), "news.example.com", "example.com", "example.com"
        )
    assert inherited.status == OK and "policy quarantine" in inherited.message
    assert "inherited from _dmarc.example.com" in inherited.message
    assert aligned.status == OK
    [twice] = _dmarc({"_dmarc.example.com": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]}, None)
    assert twice.status == FAIL and "2 DMARC records" in twice.message


# A DNS server that does not answer ---------------------------------------------------------


def test_silent_dns_server_is_one_short_timeout_then_clear_failures(keys) -> None:
    """Every DNS check fails saying the server did not answer; the server is asked once,
    not once per check."""
    with SilentDns() as silent:
        settings = _settings(key=keys["rsa"], NEWSLETTER_DNS_SERVER=silent.address)
        checks = _by_name(run_checks(settings, None, Dns(settings.dns_server, timeout=0.3)))
        asked = silent.received()
    for name in ("SPF (From domain example.com)", "DKIM", "DMARC (example.com)"):
        status, message = checks[name]
        assert status == FAIL, name
        assert f"DNS server {silent.address} did not answer within 0.3 s" in message
    assert asked == 1


# SMTP and the sample message ---------------------------------------------------------------


def test_smtp_checks_against_the_test_server(make_smtp_sink, trust_tls_cert) -> None:
    """STARTTLS with the right login passes; a wrong password, a server without STARTTLS
    and a closed port fail; plain SMTP to this machine passes; nothing is ever sent."""
    secured = make_smtp_sink(tls="starttls", cert=trust_tls_cert, credentials=("ann", "s3cret"))
    good = check_smtp(_settings(**secured.env()))
    assert good.status == OK and "STARTTLS, logged in as ann; nothing sent" in good.message
    wrong = check_smtp(_settings(**(secured.env() | {"NEWSLETTER_SMTP_PASSWORD": "nope"})))
    assert wrong.status == FAIL and "SMTP login refused" in wrong.message
    plain = make_smtp_sink()
    no_tls = check_smtp(_settings(**(plain.env() | {"NEWSLETTER_SMTP_SECURITY": "starttls"})))
    assert no_tls.status == FAIL and "does not offer STARTTLS" in no_tls.message
    assert check_smtp(_settings(**plain.env())).status == OK
    closed = plain.env() | {"NEWSLETTER_SMTP_PORT": "1"}
    assert check_smtp(_settings(**closed)).status == FAIL
    assert secured.messages == [] and plain.messages == []


def test_no_smtp_host_fails() -> None:
    """Without NEWSLETTER_SMTP_HOST mail goes to the outbox folder: a failed check."""
    check = check_smtp(_settings())
    assert check.status == FAIL and "NEWSLETTER_SMTP_HOST is not set" in check.message


def _sample(settings) -> bytes:
    from newsletter.message import Recipient
    from newsletter.sample import sample_issue
    from newsletter.sender import message_template

    template = message_template(settings, sample_issue(settings))
    url = f"{settings.site_url}/unsubscribe/token"
    return template.build(Recipient("reader@example.org", None, url, "1.abc@example.com"))


def test_unsubscribe_headers_on_the_sample(keys) -> None:
    """The rendered sample carries both RFC 8058 headers, signed when a key is set; a
    message without List-Unsubscribe-Post fails."""
    settings = _settings(key=keys["rsa"])
    check = check_unsubscribe(_sample(settings), settings)
    assert check.status == OK and "both signed by DKIM" in check.message
    stripped = _sample(settings).replace(b"List-Unsubscribe-Post: ", b"X-Removed: ")
    missing = check_unsubscribe(stripped, settings)
    assert missing.status == FAIL and "List-Unsubscribe-Post" in missing.message


def test_unsubscribe_check_with_a_key_that_cannot_sign(tmp_path: Path) -> None:
    """The headers are still checked when the key is broken; the line points at DKIM."""
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key", "utf-8")
    settings = _settings(key=bad)
    check = check_unsubscribe(_sample(settings), settings)
    assert check.status == OK and "not signed: see the DKIM line" in check.message


def test_site_url_and_bounce_address() -> None:
    """A site URL on this machine or over http warns; https passes; no bounce address
    warns, one set passes."""
    assert check_site_url(_settings(NEWSLETTER_SITE_URL="http://127.0.0.1:8000")).status == WARN
    assert check_site_url(_settings(NEWSLETTER_SITE_URL="http://news.example.com")).status == WARN
    assert check_site_url(_settings()).status == OK
    assert check_bounce_address(_settings()).status == WARN
    bounce = check_bounce_address(_settings(NEWSLETTER_BOUNCE_ADDRESS="bounces@example.com"))
    assert bounce.status == OK and bounce.message.startswith("bounces@example.com")


# The command -----------------------------------------------------------------------------


@pytest.fixture
def doctor_env(db_runner: CliRunner, smtp_sink, keys, monkeypatch: pytest.MonkeyPatch):
    """The SMTP sink, a DKIM key, an https site URL and a bounce address in the environment."""
    for name, value in smtp_sink.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEWSLETTER_FROM", "Weekly Links <links@example.com>")
    monkeypatch.setenv("NEWSLETTER_SITE_URL", "https://news.example.com")
    monkeypatch.setenv("NEWSLETTER_DKIM_PRIVATE_KEY", str(keys["rsa"]))
    monkeypatch.setenv("NEWSLETTER_DKIM_SELECTOR", SELECTOR)
    monkeypatch.setenv("NEWSLETTER_BOUNCE_ADDRESS", "bounces@example.com")
    return db_runner


def test_doctor_on_a_domain_without_records_exits_1(doctor_env, monkeypatch) -> None:
    """SPF, DKIM and DMARC are each reported missing with what to publish; exit 1."""
    with DnsZone({}) as dns:
        monkeypatch.setenv("NEWSLETTER_DNS_SERVER", dns.address)
        result = doctor_env.invoke(main, ["doctor"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("✗ SPF (From domain example.com): no SPF record") for line in lines)
    assert any(line.startswith(f"✗ DKIM: no key at {DKIM_NAME}: publish") for line in lines)
    assert any(line.startswith("✗ DMARC (example.com): no DMARC record") for line in lines)
    assert any(line.startswith("✓ SMTP: ") for line in lines)


def test_doctor_on_a_good_setup_exits_0_and_sends_a_signed_test(
    doctor_env, smtp_sink, keys, monkeypatch
) -> None:
    """Every check passes (one line each, ✓) and --send-test delivers one message that
    verifies against the published key; exit 0."""
    zone = good_zone(keys["rsa"])
    with DnsZone(zone) as dns:
        monkeypatch.setenv("NEWSLETTER_DNS_SERVER", dns.address)
        result = doctor_env.invoke(main, ["doctor", "--send-test", "Me@Example.org"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(line.startswith("✓ ") for line in lines), result.stdout
    names = [line[2:].split(":")[0] for line in lines]
    assert names == [
        "SMTP",
        "SPF (From domain example.com)",
        "DKIM",
        "DMARC (example.com)",
        "DMARC alignment",
        "List-Unsubscribe",
        "NEWSLETTER_SITE_URL",
        "bounce address",
        "test message",
    ]
    [message] = smtp_sink.messages
    assert message.recipients == ("me@example.org",)
    assert dkimpy_verify(message.data, zone[DKIM_NAME][0])
    assert b"A test message from newsletter doctor" in message.data


def test_doctor_warnings_alone_exit_0(doctor_env, keys, monkeypatch) -> None:
    """An http site URL and no bounce address are warnings (!): exit 0 all the same."""
    monkeypatch.setenv("NEWSLETTER_SITE_URL", "http://news.example.com")
    monkeypatch.delenv("NEWSLETTER_BOUNCE_ADDRESS")
    with DnsZone(good_zone(keys["rsa"])) as dns:
        monkeypatch.setenv("NEWSLETTER_DNS_SERVER", dns.address)
        result = doctor_env.invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "! NEWSLETTER_SITE_URL: http://news.example.com is not https" in result.stdout
    assert "! bounce address: NEWSLETTER_BOUNCE_ADDRESS is not set" in result.stdout


def test_doctor_bad_usage_exits_2(doctor_env, monkeypatch) -> None:
    """An address that is not one, or an unknown option, is exit 2 and sends nothing."""
    bad = doctor_env.invoke(main, ["doctor", "--send-test", "not-an-address"])
    assert bad.exit_code == 2 and "--send-test" in bad.stderr
    assert doctor_env.invoke(main, ["doctor", "--nope"]).exit_code == 2
    monkeypatch.setenv("NEWSLETTER_DKIM_SELECTOR", "two words")
    selector = doctor_env.invoke(main, ["doctor"])
    assert selector.exit_code == 2
    assert selector.stderr.startswith("error: NEWSLETTER_DKIM_SELECTOR: 'two words'")


def test_a_bounce_address_on_another_domain_is_checked_too(keys) -> None:
    """A bounce address on another domain gets its own SPF line and its alignment judged."""
    zone = good_zone(keys["rsa"]) | {"elsewhere.example.net": ["v=spf1 -all"]}
    with DnsZone(zone) as dns:
        bounce = {"NEWSLETTER_BOUNCE_ADDRESS": "bounces@elsewhere.example.net"}
        checks = _by_name(run_checks(_settings(dns, keys["rsa"], **bounce), None))
    assert checks["SPF (bounce domain elsewhere.example.net)"][0] == OK
    status, message = checks["DMARC alignment"]
    assert status == OK and "elsewhere.example.net is not aligned" in message
