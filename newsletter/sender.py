"""An issue's send: plan it, create its ledger, and deliver it with a pool of workers.

The CLI's ``send`` and the scheduler's job call the same functions here. Each worker
owns one reused transport (an SMTP connection, or the outbox), claims a small batch
of queued deliveries, fills the issue's pre-encoded message for each recipient,
sends it and records the answer before touching the next one.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection

from newsletter.config import Settings
from newsletter.digest import MUST_FIX, Digest, load_digest
from newsletter.errors import DeliveryError, InputError
from newsletter.journal import Journal, journal_dir
from newsletter.ledger import (
    Claimed,
    claim,
    create_issue,
    find_issue,
    finish_if_done,
    load_rendered,
    mark,
    mark_bounced,
    new_owner,
    next_due,
    reclaim_abandoned,
    record_sent,
    register_owner,
    release,
    touch,
    waiting_on,
)
from newsletter.message import MessageTemplate, Recipient, new_message_id
from newsletter.pacing import Pacer, backoff
from newsletter.render import RenderedIssue, render_issue
from newsletter.store import Issue, Store, Subscriber, get_or_create_secret_key, utcnow
from newsletter.tokens import Tokens, unsubscribe_url
from newsletter.transports import Outcome, Transport, make_transport

TransportFactory = Callable[[], Transport]
GIL_SWITCH = 0.001  # seconds; Python's default 5 ms leaves answered connections idle
THROTTLED_ATTEMPTS = 4  # times max_attempts, for answers that ask us to slow down
FLUSH_EVERY = 50  # accepted messages recorded in the ledger per statement
FLUSH_SECONDS = 0.5  # and at least this often
CLAIM_RENEWAL = 60.0  # seconds; well inside ledger.STALE_CLAIM, so a slow batch stays ours


@dataclass(frozen=True)
class SendOptions:
    """Knobs of the delivery loop; the defaults suit real providers, tests shrink them."""

    batch_size: int = 100
    max_attempts: int = 8
    retry_base: float = 5.0
    retry_max: float = 300.0
    max_connection_failures: int = 5
    idle_poll: float = 0.5


@dataclass
class SendReport:
    """What a send did; ``open`` deliveries are left for ``send --resume``."""

    issue_id: int
    total: int = 0
    sent: int = 0
    failed: int = 0
    bounced: int = 0
    skipped: int = 0
    retried: int = 0
    open: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stopped_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.open == 0

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Plan:
    """What ``send DIGEST`` is about to do, for the confirmation prompt and ``--dry-run``."""

    digest: Digest
    rendered: RenderedIssue
    recipients: int
    resume: Issue | None


def content_hash(digest: Digest) -> str:
    """Identity of a digest's content, for 'this was already sent' across renames."""
    return hashlib.sha256(digest.source.encode("utf-8")).hexdigest()


def secret_key(settings: Settings, store: Store) -> str:
    """The configured key, or the one generated once and kept in the database."""
    return settings.secret_key or get_or_create_secret_key(store.engine)


def plan_send(store: Store, settings: Settings, path: Path | str, force: bool = False) -> Plan:
    """Render the digest and decide: a new send, a resume, or a refusal (InputError)."""
    digest = load_digest(path)
    rendered = render_issue(digest, settings)
    must_fix = [f for f in rendered.findings if f.severity == MUST_FIX]
    if must_fix and not force:
        first = must_fix[0]
        raise InputError(
            f"{digest.path}:{first.line}: {first.message} "
            f"({len(must_fix)} problem(s); `newsletter check` lists them, --force sends anyway)"
        )
    _template(settings, rendered)  # a message that cannot be built fails before any issue exists
    with store.session() as session:
        existing = find_issue(session, digest.path.name, content_hash(digest))
        if existing is not None and existing.status == "sending":
            open_count, _ = next_due(session, existing.id)
            return Plan(digest, rendered, open_count, existing)
        if existing is not None and not force:
            raise InputError(
                f"{digest.path}: already sent as issue {existing.id} "
                f"({existing.finished_at:%Y-%m-%d %H:%M} UTC); --force sends it again"
            )
        active = session.query(Subscriber).filter(Subscriber.status == "active").count()
    return Plan(digest, rendered, active, None)


def start_send(store: Store, plan: Plan, force: bool = False) -> int:
    """Create the issue and its ledger (or join the unfinished one); returns its id."""
    if plan.resume is not None:
        return plan.resume.id
    issue, _ = create_issue(
        store,
        digest_path=str(plan.digest.path.resolve()),
        digest_name=plan.digest.path.name,
        content_hash=content_hash(plan.digest),
        rendered=plan.rendered,
        force=force,
    )
    return issue.id


def check_transport(factory: TransportFactory) -> None:
    """Connect, start TLS and log in once before any message (DeliveryError if refused)."""
    transport = factory()
    try:
        transport.check()
    finally:
        transport.close()


def transport_factory(settings: Settings) -> TransportFactory:
    """One new transport per worker, as configured (SMTP, or the outbox folder)."""
    return lambda: make_transport(settings)


def send_test_copies(
    settings: Settings,
    rendered: RenderedIssue,
    addresses: list[str],
    factory: TransportFactory,
    secret: str,
) -> list[tuple[str, Outcome]]:
    """Send ``--to`` copies: real messages, but no issue and no delivery is recorded."""
    template = _template(settings, rendered)
    tokens = Tokens(secret)
    transport = factory()
    try:
        transport.check()
        results = []
        for address in addresses:
            recipient = Recipient(
                address,
                None,
                unsubscribe_url(settings.site_url, tokens.unsubscribe_token(address)),
                new_message_id(template.domain),
            )
            results.append(
                (
                    address,
                    transport.send(template.envelope_from, address, template.build(recipient)),
                )
            )
        return results
    finally:
        transport.close()


def _template(settings: Settings, rendered: RenderedIssue) -> MessageTemplate:
    return MessageTemplate(
        rendered,
        from_address=settings.from_address,
        list_name=settings.list_name,
        site_url=settings.site_url,
        reply_to=settings.reply_to,
    )


class Sender:
    """Delivers one issue with ``settings.smtp_connections`` workers sharing one pace."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        factory: TransportFactory | None = None,
        options: SendOptions | None = None,
        on_result: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.factory = factory or transport_factory(settings)
        self.options = options or SendOptions()
        self.on_result = on_result or (lambda status: None)
        self.stop = stop or threading.Event()
        self.owner = new_owner()
        self.pacer = Pacer(settings.send_rate)
        self._lock = threading.Lock()
        self._tokens = Tokens(secret_key(settings, store))
        self.journal = Journal(self.owner, journal_dir(settings.database_url))
        self._clean_exit = True

    def run(self, issue_id: int) -> SendReport:
        """Deliver every open delivery of the issue that is due, then report."""
        started = time.monotonic()
        with self.store.session() as session:
            issue = session.get(Issue, issue_id)
            if issue is None:
                raise InputError(f"issue {issue_id}: no such issue")
            report = SendReport(issue_id, total=issue.recipient_count)
            if issue.status != "sending":
                report.stopped_reason = f"issue {issue_id} is already {issue.status}"
                return report
            reclaim_abandoned(session, issue_id, self.owner, self.journal.path.parent)
            template = _template(self.settings, load_rendered(issue.rendered))
        workers = [
            threading.Thread(target=self._work, args=(issue_id, template, report), daemon=True)
            for _ in range(self.settings.smtp_connections)
        ]
        try:
            self.journal.open()
        except OSError as exc:
            raise DeliveryError(
                f"cannot write the send journal {self.journal.path}: {exc.strerror or exc}"
            ) from None
        switch = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH)  # a worker whose server answered gets the GIL sooner
        register_owner(self.owner, live=True)
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        finally:
            sys.setswitchinterval(switch)
            register_owner(self.owner, live=False)
            # Kept when a worker failed: what it had not recorded is replayed on resume.
            self.journal.close(keep=not self._clean_exit)
        with self.store.session() as session:
            finish_if_done(session, issue_id)
            report.open, _ = next_due(session, issue_id)
        report.seconds = time.monotonic() - started
        return report

    def _work(self, issue_id: int, template: MessageTemplate, report: SendReport) -> None:
        """A worker thread: its own transport and connection until nothing is left to claim."""
        transport = self.factory()
        try:
            with self.store.engine.connect() as db:
                _Worker(self, db, transport, template, report).run(issue_id)
        except Exception as exc:  # a database error must stop the send, not hang it
            self._clean_exit = False
            reason = (str(exc).strip().splitlines() or [""])[0]
            self._stop_all(report, f"a worker failed: {type(exc).__name__}: {reason}")
        finally:
            transport.close()

    def _wait_for_due(self, db: Connection, issue_id: int) -> bool:
        """Nothing to claim now: wait for retries that are due later, or stop when all is done."""
        open_count, due = waiting_on(db, issue_id, self.owner)
        if open_count == 0:
            return False  # what is left is in this process's other workers' hands
        reclaim_abandoned(db, issue_id, self.owner, self.journal.path.parent)
        delay = self.options.idle_poll
        if due is not None:
            delay = min(max((due - utcnow()).total_seconds(), 0.01), self.options.idle_poll)
        self.stop.wait(delay)
        return True

    def _count(self, report: SendReport, status: str, email: str = "", answer: str = "") -> None:
        with self._lock:
            setattr(report, status, getattr(report, status) + 1)
            if status in {"failed", "bounced"} and len(report.failures) < 100:
                report.failures.append((email, answer))
        self.on_result(status)

    def _stop_all(self, report: SendReport, reason: str) -> None:
        with self._lock:
            report.stopped_reason = report.stopped_reason or reason
        self.stop.set()


class _Worker:
    """One connection's loop: claim a batch, send each message, record the answers.

    Accepted messages go to the journal at once and to the ledger in batches
    (every ``FLUSH_EVERY`` messages or ``FLUSH_SECONDS``); other answers are rare and
    recorded at once.
    """

    def __init__(
        self,
        sender: Sender,
        db: Connection,
        transport: Transport,
        template: MessageTemplate,
        report: SendReport,
    ) -> None:
        self.sender, self.db, self.transport = sender, db, transport
        self.template, self.report = template, report
        self.owner = sender.owner
        self.options = sender.options
        self.accepted: list[tuple[int, str, str, datetime]] = []
        self.first_accepted = 0.0
        self.failures = 0

    def run(self, issue_id: int) -> None:
        try:
            while not self.sender.stop.is_set():
                batch = claim(self.db, issue_id, self.owner, self.options.batch_size)
                if not batch:
                    self._flush()  # others wait on rows that are accepted but unrecorded
                    if not self.sender._wait_for_due(self.db, issue_id):
                        return
                    continue
                if not self._send_batch(batch):
                    return
        finally:
            self._flush()

    def _send_batch(self, batch: list[Claimed]) -> bool:
        renewed = time.monotonic()
        for index, delivery in enumerate(batch):
            if time.monotonic() - renewed > CLAIM_RENEWAL:
                self._flush()
                touch(self.db, [d.id for d in batch[index:]], self.owner)
                renewed = time.monotonic()
            unreachable = self.failures >= self.options.max_connection_failures
            if self.sender.stop.is_set() or unreachable:
                self._flush()
                release(self.db, [d.id for d in batch[index:]], self.owner)
                if unreachable:
                    self.sender._stop_all(self.report, "the SMTP server cannot be reached")
                return False
            self._deliver(delivery)
        return True

    def _deliver(self, delivery: Claimed) -> None:
        sender = self.sender
        if not delivery.active:
            mark(self.db, delivery.id, self.owner, "skipped", last_answer="no longer subscribed")
            self.db.commit()
            sender._count(self.report, "skipped")
            return
        message_id = new_message_id(self.template.domain)
        url = unsubscribe_url(
            sender.settings.site_url, sender._tokens.unsubscribe_token(delivery.email)
        )
        data = self.template.build(Recipient(delivery.email, delivery.name, url, message_id))
        sender.pacer.wait()
        outcome = self.transport.send(self.template.envelope_from, delivery.email, data)
        dropped = outcome.status == "retry" and outcome.code is None
        self.failures = self.failures + 1 if dropped else 0
        if outcome.throttle:
            sender.pacer.throttled()
        if outcome.sender_refused:
            release(self.db, [delivery.id], self.owner)
            sender._stop_all(self.report, f"the server refuses to send for us: {outcome.answer}")
            return
        if outcome.status == "sent":
            now = time.time()
            sender.journal.accepted(delivery.id, message_id, now)
            if not self.accepted:
                self.first_accepted = time.monotonic()
            self.accepted.append(
                (delivery.id, outcome.answer[:500], message_id, datetime.fromtimestamp(now, UTC))
            )
            sender._count(self.report, "sent")
            if (
                len(self.accepted) >= FLUSH_EVERY
                or time.monotonic() - self.first_accepted > FLUSH_SECONDS
            ):
                self._flush()
            return
        self._record_failure(delivery, outcome)

    def _record_failure(self, delivery: Claimed, outcome: Outcome) -> None:
        answer = outcome.answer[:500]
        if outcome.status == "bounced":
            mark_bounced(self.db, delivery, self.owner, answer)
            status = "bounced"
        elif outcome.status == "retry" and delivery.attempts < self._attempts_allowed(outcome):
            delay = backoff(delivery.attempts, self.options.retry_base, self.options.retry_max)
            mark(
                self.db,
                delivery.id,
                self.owner,
                "queued",
                last_answer=answer,
                next_attempt_at=utcnow() + timedelta(seconds=delay),
            )
            status = "retried"
        else:
            mark(self.db, delivery.id, self.owner, "failed", last_answer=answer)
            status = "failed"
        self.db.commit()
        self.sender._count(self.report, status, delivery.email, answer)

    def _attempts_allowed(self, outcome: Outcome) -> int:
        """Throttling is about our pace, not the address: it may go on for hours (at the
        longest backoff, four times the attempts take about two hours by default)."""
        return self.options.max_attempts * (THROTTLED_ATTEMPTS if outcome.throttle else 1)

    def _flush(self) -> None:
        if self.accepted:
            record_sent(self.db, self.owner, self.accepted)
            self.accepted = []


def deliver_issue(store: Store, settings: Settings, issue_id: int, **kwargs) -> SendReport:
    """Run (or resume) an issue's send to the end; DeliveryError if the server refuses us."""
    sender = Sender(store, settings, **kwargs)
    check_transport(sender.factory)
    return sender.run(issue_id)


__all__ = [
    "DeliveryError",
    "Plan",
    "SendOptions",
    "SendReport",
    "Sender",
    "check_transport",
    "deliver_issue",
    "plan_send",
    "send_test_copies",
    "start_send",
]
