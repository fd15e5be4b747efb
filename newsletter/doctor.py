"""``newsletter doctor``: what decides whether mail lands in the inbox, checked before a send.

Since 2024 Gmail and Yahoo reject or spam-folder bulk mail without SPF, DKIM, a DMARC
record aligned with the From domain, and one-click unsubscribe (RFC 8058). Each check
here gives one :class:`Check`: what was found and, when something is wrong, what to do.
DNS goes through dnspython, to ``NEWSLETTER_DNS_SERVER`` when set; a server that does not
answer costs one short timeout, after which every DNS check reports it at once. The SMTP
checks log in as a send would (:meth:`transports.SmtpTransport.check`) and send nothing.

DMARC's organisational domain is found by the DNS tree walk of DMARCbis (the domain with
the fewest labels that publishes a DMARC record), not by the Public Suffix List.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import parseaddr

import dns.exception
import dns.resolver

from newsletter.config import Settings
from newsletter.errors import ConfigError, DeliveryError
from newsletter.signing import DkimKey, load_key, message_signer, signing_domain
from newsletter.transports import make_transport

OK, WARN, FAIL = "ok", "warn", "fail"
DNS_TIMEOUT = 3.0  # seconds per query; a server that misses it is not asked again
SPF_LOOKUP_LIMIT = 10  # RFC 7208 4.6.4: more is a permanent error at every receiver
SPF_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists")
MAX_WALK = 8  # DMARCbis: at most this many names are queried walking up the tree
ONE_CLICK = "List-Unsubscribe=One-Click"


@dataclass(frozen=True)
class Check:
    """One line of the report: ``status`` is OK, WARN (works, could be better) or FAIL
    (mail will suffer until it is fixed)."""

    name: str
    status: str
    message: str


class DnsFailure(Exception):
    """DNS could not say: a server that does not answer, or answers SERVFAIL."""


class Dns:
    """TXT lookups, cached; ``server`` (host, port) or the system's resolver."""

    def __init__(self, server: tuple[str, int] | None, timeout: float = DNS_TIMEOUT) -> None:
        self.server, self.timeout = server, timeout
        self._cache: dict[str, list[str]] = {}
        self._dead: str | None = None
        self._resolver: dns.resolver.Resolver | None = None

    @property
    def where(self) -> str:
        if self.server is None:
            return "the system's DNS server"
        host, port = self.server
        return f"DNS server {host}:{port}"

    def _make_resolver(self) -> dns.resolver.Resolver:
        if self.server is None:
            try:
                resolver = dns.resolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                raise DnsFailure(
                    "no DNS server is configured on this machine; set NEWSLETTER_DNS_SERVER"
                ) from None
        else:
            host, port = self.server
            try:
                address = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0][4][0]
            except OSError as exc:
                raise DnsFailure(f"NEWSLETTER_DNS_SERVER: cannot resolve {host}: {exc}") from None
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers = [address]
            resolver.port = port
        resolver.timeout = resolver.lifetime = self.timeout
        return resolver

    def txt(self, name: str) -> list[str]:
        """The TXT records at ``name``, each one's strings joined; [] when there are none."""
        name = name.lower().rstrip(".")
        if name in self._cache:
            return self._cache[name]
        if self._dead is not None:
            raise DnsFailure(self._dead)
        if self._resolver is None:
            self._resolver = self._make_resolver()
        try:
            answer = self._resolver.resolve(name, "TXT", raise_on_no_answer=False)
            records = [
                b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset or []
            ]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            records = []
        except dns.exception.Timeout:
            self._dead = f"{self.where} did not answer within {self.timeout:g} s"
            raise DnsFailure(self._dead) from None
        except dns.resolver.NoNameservers:
            raise DnsFailure(f"{self.where} could not answer for {name} (SERVFAIL)") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(f"looking up {name} at {self.where} failed: {exc}") from None
        self._cache[name] = records
        return records


def domain_of(address: str) -> str:
    """The lower-case domain of an address or a ``Name <address>`` header value."""
    return parseaddr(address)[1].rpartition("@")[2].lower().rstrip(".")


# SPF ------------------------------------------------------------------------------------


@dataclass
class _Spf:
    """What following an SPF record found: the lookups a receiver makes, what is broken,
    and the qualifier of the ``all`` that ends it (a redirect's, when it has none)."""

    lookups: int = 0
    problems: list[str] = field(default_factory=list)
    final: str | None = None


def _spf_records(dns: Dns, domain: str) -> list[str]:
    return [r for r in dns.txt(domain) if re.match(r"v=spf1(\s|$)", r, re.IGNORECASE)]


def _spf_terms(record: str) -> Iterator[tuple[str, str, str]]:
    """(qualifier, name, argument) of each term; modifiers as ("", "redirect", value)."""
    for term in record.split()[1:]:
        if "=" in term and ":" not in term.split("=", 1)[0]:
            name, _, value = term.partition("=")
            yield "", name.lower(), value
            continue
        qualified = term[0] in "+-~?"
        name, argument = [*re.split(r"[:/]", term[1:] if qualified else term, maxsplit=1), ""][:2]
        yield term[0] if qualified else "+", name.lower(), argument


def _follow_spf(dns: Dns, record: str, state: _Spf, seen: set[str], top: bool) -> None:
    """Add the DNS lookups ``record`` costs a receiver, includes and redirects followed;
    ``top``: the record (or a redirect of it) whose ``all`` decides."""
    terms = list(_spf_terms(record))
    final = next((qualifier for qualifier, name, _ in terms if name == "all"), None)
    if top and final is not None:
        state.final = final
    for _, name, argument in terms:
        if name in SPF_LOOKUP_TERMS:
            state.lookups += 1
        if name not in ("include", "redirect") or (name == "redirect" and final is not None):
            continue
        if name == "redirect":
            state.lookups += 1
        target = argument.lower().rstrip(".")
        if not target or "%" in target:
            continue  # a macro: expanded per message, not countable here
        if target in seen or state.lookups > 3 * SPF_LOOKUP_LIMIT:
            continue  # a loop, or far enough past the limit to say by how much
        seen.add(target)
        found = _spf_records(dns, target)
        if len(found) != 1:
            what = "no SPF record" if not found else f"{len(found)} SPF records"
            state.problems.append(f"{name}:{target} has {what} (a permanent error at receivers)")
            continue
        _follow_spf(dns, found[0], state, seen, top and name == "redirect")


def check_spf(dns: Dns, domain: str, role: str = "From") -> Check:
    """The domain's SPF record: one, not ``+all``, at most 10 DNS lookups."""
    name = f"SPF ({role} domain {domain})"
    try:
        records = _spf_records(dns, domain)
        if not records:
            return Check(
                name,
                FAIL,
                f"no SPF record: publish a TXT record at {domain} such as "
                '"v=spf1 include:<your SMTP provider\'s SPF domain> ~all"',
            )
        if len(records) > 1:
            return Check(
                name,
                FAIL,
                f"{len(records)} SPF records, which receivers treat as an error: merge them "
                "into one TXT record",
            )
        record = records[0]
        state = _Spf()
        _follow_spf(dns, record, state, {domain}, top=True)
    except DnsFailure as exc:
        return Check(name, FAIL, f"cannot look it up: {exc}")
    if state.final == "+":
        return Check(
            name,
            FAIL,
            f'"{record}" ends in +all (or a redirect does), which lets anyone send as '
            f"{domain}: end it with ~all or -all",
        )
    if state.problems:
        return Check(name, FAIL, f'"{record}": {"; ".join(state.problems)}')
    if state.lookups > SPF_LOOKUP_LIMIT:
        return Check(
            name,
            FAIL,
            f'"{record}" needs {state.lookups} DNS lookups; receivers stop at '
            f"{SPF_LOOKUP_LIMIT} and fail it: remove includes you do not send through, or "
            "replace some with ip4:/ip6: ranges",
        )
    summary = f'"{record}" ({state.lookups} of {SPF_LOOKUP_LIMIT} DNS lookups)'
    if state.final in ("?", None):
        return Check(
            name,
            WARN,
            f"{summary} ends without ~all or -all, so it protects nothing from forgers: "
            "end it with ~all",
        )
    return Check(name, OK, summary)


# DKIM -----------------------------------------------------------------------------------


def _tags(record: str) -> dict[str, str]:
    """A tag=value list (DKIM, DMARC) as a dict of lower-case tags; ValueError if malformed."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        if not part.strip():
            continue
        tag, equals, value = part.partition("=")
        tag = tag.strip().lower()
        if not equals or not re.fullmatch(r"[a-z][a-z0-9_]*", tag) or tag in tags:
            raise ValueError(part.strip())
        tags[tag] = re.sub(r"\s+", "", value) if tag == "p" else value.strip()
    return tags


def _same_public_key(key: DkimKey, published: str) -> bool:
    """Whether the p= value is the public half of ``key`` (SubjectPublicKeyInfo or PKCS#1
    RSAPublicKey for RSA, the raw key for Ed25519)."""
    try:
        data = base64.b64decode(published, validate=True)
    except (binascii.Error, ValueError):
        return False
    if key.kind == "ed25519":
        return data == base64.b64decode(key.public_key)
    from cryptography.hazmat.primitives import serialization

    try:
        public = serialization.load_der_public_key(data)
    except (ValueError, TypeError):
        return False
    numbers = getattr(public, "public_numbers", None)
    return numbers is not None and numbers() == key.private.public_key().public_numbers()


def check_dkim(dns: Dns, settings: Settings) -> Check:
    """The key at SELECTOR._domainkey.DOMAIN: published, and the configured key's."""
    domain = signing_domain(settings)
    selector = settings.dkim_selector
    if settings.dkim_private_key is None and selector is None:
        return Check(
            "DKIM",
            WARN,
            "newsletter does not sign (NEWSLETTER_DKIM_PRIVATE_KEY is not set): unless your "
            f"SMTP relay signs with d={domain}, Gmail and Yahoo refuse bulk mail; make a key "
            "(openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out dkim.pem) "
            "and set NEWSLETTER_DKIM_PRIVATE_KEY and NEWSLETTER_DKIM_SELECTOR",
        )
    assert selector is not None  # config requires one with a key
    name = f"{selector}._domainkey.{domain}"
    key = None
    if settings.dkim_private_key is not None:
        try:
            key = load_key(settings.dkim_private_key)
        except ConfigError as exc:
            return Check("DKIM", FAIL, str(exc))
    publish = f'publish a TXT record at {name}: "{key.dns_record()}"' if key else ""
    try:
        records = [r for r in dns.txt(name) if r.strip()]
    except DnsFailure as exc:
        return Check("DKIM", FAIL, f"cannot look up {name}: {exc}")
    if not records:
        what = publish or "publish your relay's DKIM key there, or unset NEWSLETTER_DKIM_SELECTOR"
        return Check("DKIM", FAIL, f"no key at {name}: {what}")
    if len(records) > 1:
        return Check("DKIM", FAIL, f"{len(records)} TXT records at {name}: keep one")
    try:
        tags = _tags(records[0])
    except ValueError as exc:
        fix = f": {publish}" if publish else ""
        return Check("DKIM", FAIL, f"the record at {name} is malformed near {exc!s}{fix}")
    kind = tags.get("k", "rsa").lower()
    problem = None
    if tags.get("v", "DKIM1") != "DKIM1":
        problem = f"v={tags['v']} is not DKIM1"
    elif not tags.get("p"):
        problem = "the key is revoked (empty p=)"
    elif "sha256" not in tags.get("h", "sha256").lower():
        problem = f"h={tags['h']} does not allow sha256"
    elif tags.get("s", "*").lower() not in ("*", "email"):
        problem = f"s={tags['s']} does not allow email"
    elif key is not None and kind != key.kind:
        problem = f"it is a k={kind} key, and NEWSLETTER_DKIM_PRIVATE_KEY is {key.kind}"
    elif key is not None and not _same_public_key(key, tags["p"]):
        problem = "it is not the public half of NEWSLETTER_DKIM_PRIVATE_KEY"
    if problem:
        fix = f": {publish}" if publish else ""
        return Check("DKIM", FAIL, f"the key at {name} cannot verify our mail: {problem}{fix}")
    if key is None:
        return Check(
            "DKIM",
            WARN,
            f"a k={kind} key is published at {name}, but newsletter does not sign "
            "(NEWSLETTER_DKIM_PRIVATE_KEY is not set): your SMTP relay must sign with it",
        )
    testing = "y" in tags.get("t", "").lower().split(":")
    summary = (
        f"{name} publishes the key of NEWSLETTER_DKIM_PRIVATE_KEY ({key.kind}, {key.bits} bits)"
    )
    if testing:
        return Check(
            "DKIM",
            WARN,
            f"{summary}, in testing mode (t=y): receivers may ignore its signatures; remove t=y",
        )
    return Check("DKIM", OK, summary)


# DMARC ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dmarc:
    domain: str  # where the record was found
    record: str
    tags: dict[str, str]


def _walk(domain: str) -> list[str]:
    """The domain and its parents down to two labels, at most MAX_WALK names."""
    labels = domain.split(".")
    names = [".".join(labels[at:]) for at in range(len(labels) - 1)] or [domain]
    return names[: MAX_WALK - 1] + names[-1:] if len(names) > MAX_WALK else names


def _dmarc_at(dns: Dns, domain: str) -> _Dmarc | None:
    """The one valid DMARC record at ``_dmarc.domain``; None when there is none; ValueError
    when there are several or it is malformed."""
    records = [r for r in dns.txt(f"_dmarc.{domain}") if re.match(r"v\s*=\s*DMARC1\s*(;|$)", r)]
    if not records:
        return None
    if len(records) > 1:
        raise ValueError(f"{len(records)} DMARC records at _dmarc.{domain}, so none counts")
    try:
        tags = _tags(records[0])
    except ValueError as exc:
        raise ValueError(f"the record at _dmarc.{domain} is malformed near {exc}") from None
    return _Dmarc(domain, records[0], tags)


def _policy_and_org(dns: Dns, domain: str) -> tuple[_Dmarc | None, str]:
    """The DMARC record that applies to ``domain`` (its own, else the nearest parent's), and
    its organisational domain (the one with the fewest labels that has a record)."""
    policy, organisation = None, domain
    for name in _walk(domain):
        found = _dmarc_at(dns, name)
        if found is not None:
            policy = policy or found
            organisation = name
    return policy, organisation


def _aligned(dns: Dns, domain: str, from_domain: str, mode: str, org: str) -> bool:
    if mode == "s":
        return domain == from_domain
    return domain == from_domain or _policy_and_org(dns, domain)[1] == org


def check_dmarc(
    dns: Dns, from_domain: str, dkim_domain: str | None, envelope_domain: str
) -> list[Check]:
    """DMARC present and its policy; From aligned with the DKIM domain and with the
    envelope sender's (bounce address) domain, as DMARC needs one of them to be."""
    name = f"DMARC ({from_domain})"
    try:
        policy, org = _policy_and_org(dns, from_domain)
    except ValueError as exc:
        return [Check(name, FAIL, f"{exc}: keep one well-formed record")]
    except DnsFailure as exc:
        return [Check(name, FAIL, f"cannot look it up: {exc}")]
    if policy is None:
        return [
            Check(
                name,
                FAIL,
                f"no DMARC record: publish a TXT record at _dmarc.{from_domain} such as "
                f'"v=DMARC1; p=none; rua=mailto:dmarc@{from_domain}" (Gmail and Yahoo require '
                "one from bulk senders), and move to p=quarantine once its reports are clean",
            )
        ]
    tags = policy.tags
    own = policy.domain == from_domain
    chosen = tags.get("p") if own else tags.get("sp", tags.get("p"))
    where = "" if own else f" (inherited from _dmarc.{policy.domain})"
    checks = []
    if chosen not in ("none", "quarantine", "reject"):
        checks.append(
            Check(name, FAIL, f'"{policy.record}"{where} has no valid p= policy: add p=none')
        )
    elif chosen == "none":
        checks.append(
            Check(
                name,
                WARN,
                f'"{policy.record}"{where}: policy none only monitors; forged mail from '
                f"{from_domain} is still delivered: move to p=quarantine once reports are clean",
            )
        )
    else:
        checks.append(Check(name, OK, f'"{policy.record}"{where}: policy {chosen}'))
    checks.append(_alignment(dns, from_domain, org, tags, dkim_domain, envelope_domain))
    return checks


def _alignment(
    dns: Dns,
    from_domain: str,
    org: str,
    tags: dict[str, str],
    dkim_domain: str | None,
    envelope_domain: str,
) -> Check:
    name = "DMARC alignment"
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    modes = {"r": "relaxed", "s": "strict"}
    try:
        spf_ok = _aligned(dns, envelope_domain, from_domain, aspf, org)
        dkim_ok = dkim_domain is not None and _aligned(dns, dkim_domain, from_domain, adkim, org)
    except (ValueError, DnsFailure) as exc:
        return Check(name, FAIL, f"cannot tell: {exc}")
    spf_text = (
        f"the envelope sender's domain {envelope_domain} is "
        f"{'' if spf_ok else 'not '}aligned with From ({modes.get(aspf, aspf)})"
    )
    if dkim_domain is None:
        dkim_text = f"DKIM is left to your relay, whose d= must be {from_domain} or under it"
    else:
        dkim_text = (
            f"DKIM d={dkim_domain} is {'' if dkim_ok else 'not '}aligned with From "
            f"{from_domain} ({modes.get(adkim, adkim)})"
        )
    if dkim_ok and spf_ok:
        return Check(name, OK, f"{dkim_text}; {spf_text}")
    if dkim_ok:
        return Check(
            name,
            OK,
            f"{dkim_text}, which is enough for DMARC; {spf_text} (only DKIM will pass)",
        )
    fix = (
        f"set NEWSLETTER_DKIM_DOMAIN to {from_domain} (and publish its key there)"
        if dkim_domain is not None
        else f"make sure the relay signs with d={from_domain}"
    )
    if spf_ok:
        return Check(
            name,
            WARN,
            f"{dkim_text}; {spf_text}, so DMARC rests on SPF alone, which forwarding breaks: {fix}",
        )
    if dkim_domain is None:
        return Check(name, WARN, f"{dkim_text}; {spf_text}, so DMARC rests on that: {fix}")
    return Check(name, FAIL, f"{dkim_text}, and {spf_text}: DMARC fails for every message: {fix}")


# SMTP, headers, settings ------------------------------------------------------------------


def _local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_smtp(settings: Settings) -> Check:
    """Connect, TLS as configured, log in, and say QUIT: no message is sent."""
    if settings.smtp_host is None:
        return Check(
            "SMTP",
            FAIL,
            f"NEWSLETTER_SMTP_HOST is not set: messages are written to "
            f"{settings.outbox_dir}/ and reach no one; set your SMTP server",
        )
    transport = make_transport(settings)
    try:
        transport.check()
    except DeliveryError as exc:
        return Check(
            "SMTP",
            FAIL,
            f"{exc}: check NEWSLETTER_SMTP_HOST, _PORT, _SECURITY, _USERNAME and _PASSWORD",
        )
    finally:
        transport.close()
    where = f"{settings.smtp_host}:{settings.smtp_port}"
    tls = {"starttls": "STARTTLS", "ssl": "TLS", "none": "no TLS"}[settings.smtp_security]
    login = f"logged in as {settings.smtp_username}" if settings.smtp_username else "no login set"
    summary = f"{where} answered, {tls}, {login}; nothing sent"
    if settings.smtp_security == "none" and not _local(settings.smtp_host):
        return Check(
            "SMTP",
            WARN,
            f"{summary}: without TLS, mail and password cross the network in clear; set "
            "NEWSLETTER_SMTP_SECURITY to starttls or ssl",
        )
    return Check("SMTP", OK, summary)


def _headers(message: bytes) -> list[tuple[str, str]]:
    """The header fields of wire bytes, unfolded."""
    head = message.split(b"\r\n\r\n", 1)[0].decode("ascii", "replace")
    fields: list[tuple[str, str]] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + line.strip())
        elif ":" in line:
            field_name, _, value = line.partition(":")
            fields.append((field_name.strip().lower(), value.strip()))
    return fields


def check_unsubscribe(message: bytes, settings: Settings) -> Check:
    """List-Unsubscribe (a link of ours) and List-Unsubscribe-Post on a sample message (wire
    bytes, unsigned), and both covered by its DKIM signature once it is signed."""
    name = "List-Unsubscribe"
    try:
        message = message_signer(settings)(message)
        unsigned = ""
    except ConfigError:  # the DKIM check says why
        unsigned = " (not signed: see the DKIM line)"
    values = dict(reversed(_headers(message)))  # the first of each field
    link = re.search(r"<(https?://[^>]+)>", values.get("list-unsubscribe", ""))
    if link is None:
        return Check(name, FAIL, "the sample message has no List-Unsubscribe link")
    if values.get("list-unsubscribe-post") != ONE_CLICK:
        return Check(name, FAIL, f'the sample message lacks "List-Unsubscribe-Post: {ONE_CLICK}"')
    if not link.group(1).startswith(settings.site_url + "/"):
        return Check(name, FAIL, f"the link {link.group(1)} is not under NEWSLETTER_SITE_URL")
    signature = values.get("dkim-signature")
    if signature is not None:
        covered = {field.strip().lower() for field in _tags(signature).get("h", "").split(":")}
        if not {"list-unsubscribe", "list-unsubscribe-post"} <= covered:
            return Check(name, FAIL, "the sample's DKIM signature does not cover both headers")
        unsigned = ", both signed by DKIM"
    return Check(name, OK, f"one-click unsubscribe (RFC 8058) on every message{unsigned}")


def check_site_url(settings: Settings) -> Check:
    """Confirm and unsubscribe links must reach readers, over https."""
    name = "NEWSLETTER_SITE_URL"
    url = settings.site_url
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    if _local(host):
        return Check(
            name,
            WARN,
            f"{url} is this machine: readers cannot open confirm and unsubscribe links; "
            "set the public https URL of `newsletter serve`",
        )
    if not url.startswith("https://"):
        return Check(
            name,
            WARN,
            f"{url} is not https: one-click unsubscribe (RFC 8058) needs an https link, and "
            "Gmail and Yahoo ignore others; serve it over https",
        )
    return Check(name, OK, f"{url} (https)")


def check_bounce_address(settings: Settings) -> Check:
    """A bounce address of our own makes bounces come back to newsletter."""
    address = settings.bounce_address
    if not address:
        return Check(
            "bounce address",
            WARN,
            "NEWSLETTER_BOUNCE_ADDRESS is not set: bounces go to the From address, where "
            "newsletter cannot act on them; set an address whose domain aligns with From",
        )
    return Check("bounce address", OK, f"{address} (the envelope sender of every message)")


def run_checks(settings: Settings, sample: bytes | None, dns: Dns | None = None) -> Iterator[Check]:
    """Every check as it is done, in the order a reader fixes them: the server, DNS, the
    message, the settings."""
    dns = dns or Dns(settings.dns_server)
    from_domain = domain_of(settings.from_address)
    bounce = settings.bounce_address
    envelope_domain = domain_of(bounce) if bounce else from_domain
    dkim_domain = signing_domain(settings) if settings.dkim_private_key is not None else None
    yield check_smtp(settings)
    yield check_spf(dns, from_domain)
    if envelope_domain != from_domain:
        yield check_spf(dns, envelope_domain, "bounce")
    yield check_dkim(dns, settings)
    yield from check_dmarc(dns, from_domain, dkim_domain, envelope_domain)
    if sample is not None:
        yield check_unsubscribe(sample, settings)
    yield check_site_url(settings)
    yield check_bounce_address(settings)
