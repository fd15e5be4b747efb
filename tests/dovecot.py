"""A real Dovecot (Debian's dovecot-imapd and dovecot-pop3d) for the bounce mailbox tests.

    with Dovecot(cert) as server:             # IMAPS, IMAP+STARTTLS and POP3S on free ports
        user, password = server.add_user()
        server.append(user, "INBOX", dsn_bytes)
        ...
        server.uids(user, "Processed")

Everything lives in a throwaway folder: configuration, sockets, logs, maildirs. Run as
root (CI), Dovecot refuses to log in or keep mail as root, so logins run as ``dovenull``
and mail belongs to ``nobody``; the folder is made world-traversable for them.
"""

from __future__ import annotations

import contextlib
import imaplib
import itertools
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
MAIL_UID = 65534  # nobody: Dovecot will not keep mail as root
USERS = 64  # mail users made at start, one per test that asks


def installed() -> bool:
    return Path(DOVECOT).exists() and Path("/usr/lib/dovecot/imap").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Dovecot:
    """One Dovecot instance of a test session; each test adds a user of its own."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.folder = Path(tempfile.mkdtemp(prefix="newsletter-dovecot-"))
        self.folder.chmod(0o755)
        self.imaps, self.imap, self.pop3s = _free_port(), _free_port(), _free_port()
        self._users = itertools.count(1)
        self._passwords: dict[str, str] = {}
        self.process: subprocess.Popen | None = None
        self.root = os.geteuid() == 0
        self.uid = MAIL_UID if self.root else os.getuid()
        self.gid = MAIL_UID if self.root else os.getgid()

    def __enter__(self) -> Dovecot:
        self._make_users(USERS)
        config = self.folder / "dovecot.conf"
        as_root = (
            "default_login_user = dovenull\ndefault_internal_user = dovecot\n"
            if self.root
            else f"default_login_user = {os.environ.get('USER', 'nobody')}\n"
            f"default_internal_user = {os.environ.get('USER', 'nobody')}\n"
        )
        config.write_text(
            f"""
base_dir = {self.folder}/run
state_dir = {self.folder}/state
log_path = {self.folder}/dovecot.log
listen = 127.0.0.1
protocols = imap pop3
{as_root}first_valid_uid = 1
mail_location = maildir:~/Maildir
ssl = required
ssl_cert = <{self.cert}
ssl_key = <{self.key}
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.folder}/users
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {self.folder}/users
}}
service imap-login {{
  inet_listener imap {{
    port = {self.imap}
  }}
  inet_listener imaps {{
    port = {self.imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = {self.pop3s}
    ssl = yes
  }}
}}
"""
        )
        self.process = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dovecot did not start: {self.process.stderr.read()!r}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.imaps), timeout=1),
            ):
                return self
            time.sleep(0.05)
        raise RuntimeError("dovecot did not listen within 20 s")

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            if self.process.stderr is not None:
                self.process.stderr.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _make_users(self, count: int) -> None:
        """Users made before Dovecot starts: it may not notice a passwd-file that changed
        within the second it last read it."""
        lines = []
        for number in range(1, count + 1):
            user = f"bounces{number}"
            password = f"pw-{user}-{os.getpid()}"
            home = self.folder / "home" / user
            home.mkdir(parents=True)
            os.chown(home, self.uid, self.gid)
            lines.append(f"{user}:{{PLAIN}}{password}:{self.uid}:{self.gid}::{home}\n")
            self._passwords[user] = password
        (self.folder / "home").chmod(0o755)
        (self.folder / "users").write_text("".join(lines))
        (self.folder / "users").chmod(0o644)

    def add_user(self) -> tuple[str, str]:
        """A user of its own for a test, with an empty mailbox; (user, password)."""
        user = f"bounces{next(self._users)}"
        if user not in self._passwords:
            raise RuntimeError(f"more than {USERS} tests asked for a Dovecot user")
        return user, self._passwords[user]

    def url(self, scheme: str, user: str, password: str | None = None, tail: str = "") -> str:
        """NEWSLETTER_BOUNCE_MAILBOX for ``user`` over ``scheme`` (imaps, imap or pop3s)."""
        port = {"imaps": self.imaps, "imap": self.imap, "pop3s": self.pop3s}[scheme]
        password = self._passwords[user] if password is None else password
        return f"{scheme}://{user}:{password}@127.0.0.1:{port}{tail}"

    @contextlib.contextmanager
    def client(self, user: str):
        """An IMAP session of ``user`` trusting the test certificate."""
        context = ssl.create_default_context(cafile=str(self.cert))
        connection = imaplib.IMAP4_SSL("127.0.0.1", self.imaps, ssl_context=context, timeout=10)
        try:
            connection.login(user, self._passwords[user])
            yield connection
        finally:
            with contextlib.suppress(Exception):
                connection.logout()

    def append(self, user: str, folder: str, data: bytes) -> None:
        """Deliver ``data`` into ``folder`` (created if need be), as an MTA would."""
        wire = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        with self.client(user) as connection:
            connection.create(folder)
            status, answer = connection.append(folder, None, None, wire)
            assert status == "OK", answer

    def uids(self, user: str, folder: str) -> list[bytes]:
        """The messages in ``folder`` (empty when it does not exist)."""
        with self.client(user) as connection:
            status, _ = connection.select(folder, readonly=True)
            if status != "OK":
                return []
            status, answer = connection.uid("SEARCH", None, "ALL")
            return [uid for line in answer if line for uid in line.split()]
