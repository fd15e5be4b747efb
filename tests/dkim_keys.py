"""DKIM keys made in the test, and verifiers that check signatures the way receivers do.

``dkimpy_verify`` asks dkimpy with the key record handed over directly (no DNS);
``perl_verify`` runs Perl's Mail::DKIM (what SpamAssassin's DKIM rules use), an independent
implementation, against a DNS server the test runs on 127.0.0.1 (tests/dns_zone.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

PERL_VERIFIER = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
my ($port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ["127.0.0.1"], port => $port, recurse => 0,
    udp_timeout => 5, tcp_timeout => 5, retry => 1));
binmode STDIN;
my $verifier = Mail::DKIM::Verifier->new();
while (my $line = <STDIN>) { $verifier->PRINT($line); }
$verifier->CLOSE;
print $verifier->result, "\t", ($verifier->result_detail // ""), "\n";
for my $signature ($verifier->signatures) {
    print "signature\t", $signature->domain, "\t", $signature->result, "\n";
}
"""


def write_key(path: Path, kind: str = "rsa", bits: int = 2048) -> Path:
    """A new private key as unencrypted PKCS#8 PEM: rsa (``bits``), ed25519 or ec."""
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def dkimpy_verify(message: bytes, record: str) -> bool:
    """dkimpy's verdict on the first signature, with ``record`` as the DNS answer."""
    import dkim

    return dkim.verify(message, dnsfunc=lambda name, timeout=5: record.encode("ascii"))


def perl_verify(message: bytes, dns_port: int) -> tuple[str, str]:
    """Mail::DKIM's overall result and detail ("pass", or "fail" with a reason) for
    ``message`` (CRLF line ends), looking keys up at 127.0.0.1:``dns_port``."""
    done = subprocess.run(
        ["perl", "-e", PERL_VERIFIER, str(dns_port)],
        input=message,
        capture_output=True,
        timeout=60,
        check=True,
    )
    result, _, detail = done.stdout.decode().splitlines()[0].partition("\t")
    return result, detail
