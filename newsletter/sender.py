"""The one delivery engine: issues and one-off mail, claimed, built, sent and recorded.

``newsletter send`` and the worker's scheduled sends call :func:`send_issue`; the worker
drains one-off mail (confirmations) with the same :class:`Sender`. Each of a sender's
threads owns one reused transport (an SMTP connection, or the outbox), claims a small
batch of queued deliveries, builds each message (the issue's pre-encoded template filled
in, or the one-off message as queued), sends it and records the answer.

Accepted messages go to the sender's journal at once and to the ledger in batches; other
answers are rare and recorded at once. Before each message a thread makes sure it still
owns its batch (renewing the claim when it is due), so a sender paused long enough for
another to take its rows over sends none of them when it wakes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Connection, func, select

from newsletter.config import Settings
from newsletter.digest import MUST_FIX, Digest, load_digest
from newsletter.errors import InputError
from newsletter.journal import Journal
from newsletter.ledger import (
    Claimed,
    Scope,
    Takeover,
    alive_as,
    bound_transactions,
    claim,
    create_issue,
    delivery_message_id,
    find_issue,
    finish_if_done,
    load_rendered,
    mark,
    mark_bounced,
    new_owner,
    open_count,
    reclaim_abandoned,
    record_sent,
    release,
    renew,
    waiting_on,
)
from newsletter.message import (
    MessageTemplate,
    Recipient,
    envelope_address,
    new_message_id,
    wire_address,
)
from newsletter.outbound import one_off_message
from newsletter.pacing import Pacer, backoff
from newsletter.render import RenderedIssue, render_issue
from newsletter.signing import message_signer
from newsletter.store import Issue, Store, Subscriber, utcnow
from newsletter.tokens import Tokens, unsubscribe_url
from newsletter.transports import Message, Outcome, Transport, make_transport
from newsletter.verp import Verp

log = logging.getLogger(__name__)

TransportFactory = Callable[[], Transport]
THROTTLED_ATTEMPTS = 4  # times max_attempts, for answers that ask us to slow down
FLUSH_EVERY = 50  # accepted messages recorded in the ledger per statement
FLUSH_SECONDS = 0.5  # and at least this often
RENEW_AT_MOST = 60.0  # seconds between renewals of a claim (a quarter of the timeout if less)
WAITING_NOTE = 60.0  # seconds between "still waiting" notes while retries are pending


@dataclass(frozen=True)
class SendOptions:
    """Knobs of the delivery loop; the defaults suit real providers, tests shrink them."""

    batch_size: int = 100
    max_attempts: int = 8
    retry_base: float = 5.0
    retry_max: float = 300.0
    max_connection_failures: int = 5
    idle_poll: float = 0.5


ONE_OFF_OPTIONS = SendOptions(retry_base=60.0, retry_max=3600.0)  # a confirmation can wait


@dataclass
class SendReport:
    """What a send did; ``open`` deliveries are left for ``send --resume``."""

    issue_id: Scope
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
    resume: Issue | None  # the unfinished issue of this digest, which the send joins
    previous: Issue | None = None  # the finished one, when forced to send it again


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
    message_template(settings, rendered)  # a message that cannot be built fails first
    with store.session() as session:
        existing = find_issue(session, digest.path.name, digest.content_hash)
        if existing is not None and existing.status == "sending":
            return Plan(digest, rendered, open_count(session, existing.id), existing)
        if existing is not None and not force:
            raise InputError(
                f"{digest.path}: already sent as issue {existing.id} "
                f"({existing.finished_at:%Y-%m-%d %H:%M} UTC); --force sends it again"
            )
        active = session.scalar(
            select(func.count()).select_from(Subscriber).where(Subscriber.status == "active")
        )
    return Plan(digest, rendered, active or 0, None, existing)


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


def send_issue(
    store: Store,
    settings: Settings,
    plan: Plan,
    *,
    force: bool = False,
    on_started: Callable[[int], None] | None = None,
    **sender_options,
) -> SendReport:
    """The one send of a digest, for the CLI and the scheduler alike: check the server,
    create the issue and its ledger (or join the unfinished one), deliver it.

    ``on_started`` learns the issue id once the ledger exists.
    """
    sender = Sender(store, settings, **sender_options)
    check_transport(sender.factory)  # before the ledger: a refused login leaves no issue
    if plan.resume is not None:
        issue_id = plan.resume.id
    else:
        issue, _ = create_issue(
            store,
            digest_path=str(plan.digest.path.resolve()),
            digest_name=plan.digest.path.name,
            content_hash=plan.digest.content_hash,
            rendered=plan.rendered,
            force=force,
        )
        issue_id = issue.id
    if on_started is not None:
        on_started(issue_id)
    return sender.run(issue_id, check=False)


def send_test_copies(
    store: Store, settings: Settings, rendered: RenderedIssue, addresses: list[str]
) -> list[tuple[str, Outcome]]:
    """Send ``--to`` copies: real messages, but no issue and no delivery is recorded."""
    template = message_template(settings, rendered)
    sign = message_signer(settings)
    tokens = Tokens(store.secret_key(settings.secret_key))
    transport = make_transport(settings)
    try:
        transport.check()
        results = []
        for address in addresses:
            url = unsubscribe_url(settings.site_url, tokens.unsubscribe_token(address))
            recipient = Recipient(address, None, url, new_message_id(template.domain))
            data = sign(template.build(recipient))
            outcome = transport.send(template.envelope_from, wire_address(address), data)
            results.append((address, outcome))
        return results
    finally:
        transport.close()


def send_queued_mail(
    store: Store, settings: Settings, stop: threading.Event | None = None
) -> SendReport:
    """Send the one-off mail (confirmations) that is due now, over one connection; what
    cannot go now stays queued for the worker."""
    return Sender(store, settings, options=ONE_OFF_OPTIONS, stop=stop, connections=1).run(None)


def message_template(settings: Settings, rendered: RenderedIssue) -> MessageTemplate:
    """The issue's message as the settings head it, encoded once."""
    return MessageTemplate(
        rendered,
        from_address=settings.from_address,
        list_name=settings.list_name,
        site_url=settings.site_url,
        reply_to=settings.reply_to,
    )


class Sender:
    """Delivers the deliveries of one scope (an issue, or one-off mail) with
    ``settings.smtp_connections`` threads sharing one pace."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        factory: TransportFactory | None = None,
        options: SendOptions | None = None,
        on_result: Callable[[str], None] | None = None,
        on_waiting: Callable[[int, datetime | None], None] | None = None,
        stop: threading.Event | None = None,
        connections: int | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.factory = factory or transport_factory(settings)
        self.options = options or SendOptions()
        self.on_result = on_result or (lambda status: None)
        self.on_waiting = on_waiting or (lambda waiting, due: None)
        self.stop = stop or threading.Event()
        self.connections = connections or settings.smtp_connections
        self.takeover = Takeover.of(settings)
        self.renew_every = min(RENEW_AT_MOST, settings.claim_timeout / 4)
        self.envelope_from = envelope_address(settings.from_address)
        self.pacer = Pacer(settings.send_rate)
        self.sign = message_signer(settings)  # a DKIM key that cannot sign fails here, first
        self.tokens = Tokens(store.secret_key(settings.secret_key))
        self.verp = Verp.of(settings, store.secret_key(settings.secret_key))
        self._lock = threading.Lock()
        self._last_note = 0.0

    def run(self, issue_id: Scope, check: bool = True) -> SendReport:
        """Deliver every open delivery of the scope that is due, then report. An issue's
        send waits for retries that fall due later; one-off mail returns when nothing is
        due now (the worker comes back). The server's TLS and login are checked first
        (DeliveryError, before any message) unless the caller just did."""
        started = time.monotonic()
        owner = new_owner()
        template = None
        report = SendReport(issue_id)
        if issue_id is not None:
            with self.store.session() as session:
                issue = session.get(Issue, issue_id)
                if issue is None:
                    raise InputError(f"issue {issue_id}: no such issue")
                report.total = issue.recipient_count
                if issue.status != "sending":
                    report.stopped_reason = f"issue {issue_id} is already {issue.status}"
                    return report
                template = message_template(self.settings, load_rendered(issue.rendered))
        if check:
            check_transport(self.factory)
        with alive_as(self.store, owner, self.takeover.journals) as journal:
            run = _Run(self, issue_id, owner, journal, template, report)
            with self.store.engine.connect() as db:
                reclaim_abandoned(db, issue_id, owner, self.takeover)
            threads = [
                threading.Thread(target=run.work, name=f"newsletter-send-{n}", daemon=True)
                for n in range(self.connections)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        with self.store.session() as session:
            if issue_id is not None:
                finish_if_done(session, issue_id)
            report.open = open_count(session, issue_id)
        report.seconds = time.monotonic() - started
        return report

    def note_waiting(self, waiting: int, due: datetime | None) -> None:
        """Tell ``on_waiting`` about pending retries, at most once a minute."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_note < WAITING_NOTE:
                return
            self._last_note = now
        self.on_waiting(waiting, due)


class _Run:
    """One :meth:`Sender.run`: what its threads share."""

    def __init__(
        self,
        sender: Sender,
        issue_id: Scope,
        owner: str,
        journal: Journal,
        template: MessageTemplate | None,
        report: SendReport,
    ) -> None:
        self.sender, self.issue_id, self.owner = sender, issue_id, owner
        self.journal, self.template, self.report = journal, template, report
        self.aborted = threading.Event()
        self._lock = threading.Lock()

    def stopped(self) -> bool:
        """Stop taking new messages: asked to (a signal), or the run cannot go on."""
        return self.aborted.is_set() or self.sender.stop.is_set()

    def work(self) -> None:
        """A thread: its own transport and connection until nothing is left to claim."""
        transport = self.sender.factory()
        try:
            with self.sender.store.engine.connect() as db:
                bound_transactions(db, self.sender.settings.claim_timeout)
                _Worker(self, db, transport).run()
        except Exception as exc:  # a database error must stop the send, not hang it
            self.journal.keep = True  # what this thread had not recorded is replayed on resume
            reason = (str(exc).strip().splitlines() or [""])[0]
            self.stop_all(f"a worker failed: {type(exc).__name__}: {reason}")
        finally:
            transport.close()

    def count(self, status: str, email: str = "", answer: str = "") -> None:
        with self._lock:
            setattr(self.report, status, getattr(self.report, status) + 1)
            if status in {"failed", "bounced"} and len(self.report.failures) < 100:
                self.report.failures.append((email, answer))
        self.sender.on_result(status)

    def stop_all(self, reason: str) -> None:
        with self._lock:
            self.report.stopped_reason = self.report.stopped_reason or reason
        self.aborted.set()


class TakenOver(Exception):
    """The message waiting for its body was taken over while this sender was paused."""


class _Worker:
    """One connection's loop: claim a batch, send each message, record the answers."""

    def __init__(self, run: _Run, db: Connection, transport: Transport) -> None:
        self.run_, self.db, self.transport = run, db, transport
        self.sender = run.sender
        self.owner = run.owner
        self.options = self.sender.options
        self.accepted: list[int] = []  # accepted by the server, not yet recorded
        self.first_accepted = 0.0
        self.last_accepted = 0.0
        self.failures = 0
        self.renewed = (0.0, 0.0)  # monotonic and wall-clock time of the last claim or renewal
        self.going_on = True  # False once a batch found the send must stop
        self.waiting: Claimed | None = None  # drawn by the transport, not answered yet

    def run(self) -> None:
        try:
            while not self.run_.stopped():
                batch = claim(self.db, self.run_.issue_id, self.owner, self.options.batch_size)
                self.renewed = (time.monotonic(), time.time())
                if not batch:
                    self._flush()  # others wait on rows that are accepted but unrecorded
                    if not self._wait_for_due():
                        return
                    continue
                if not self._send_batch(batch):
                    return
        finally:
            self._flush()

    def _wait_for_due(self) -> bool:
        """Nothing to claim now: wait for retries that are due later (an issue), or stop."""
        issue_id = self.run_.issue_id
        if issue_id is None:
            return False
        waiting, due = waiting_on(self.db, issue_id, self.owner)
        if waiting == 0:
            return False  # what is left is in this sender's other threads' hands
        sender = self.sender
        reclaim_abandoned(self.db, issue_id, self.owner, sender.takeover)
        delay = self.options.idle_poll
        if due is not None:
            delay = min(max((due - utcnow()).total_seconds(), 0.01), self.options.idle_poll)
            sender.note_waiting(waiting, due)
        self.run_.aborted.wait(delay)
        return not self.run_.stopped()

    def _still_ours(self, batch: list[Claimed]) -> list[Claimed]:
        """The rest of the batch, less what was taken over, once the claim needs renewing
        (by either clock: a suspended machine's monotonic clock stands still). If the
        message whose body the server is waiting for was taken over, TakenOver: its body
        must not go (the rest of the batch is given back)."""
        monotonic, wall = self.renewed
        elapsed = max(time.monotonic() - monotonic, time.time() - wall)
        if elapsed < self.sender.renew_every:
            return batch
        self._flush()
        waiting = [self.waiting] if self.waiting is not None else []
        held = renew(self.db, [d.id for d in [*waiting, *batch]], self.owner)
        self.renewed = (time.monotonic(), time.time())
        lost = len(waiting) + len(batch) - len(held)
        if lost:
            log.warning("%d claimed deliveries were taken over while this sender was paused", lost)
        kept = [d for d in batch if d.id in held]
        if waiting and waiting[0].id not in held:
            self.waiting = None
            release(self.db, [d.id for d in kept], self.owner)
            raise TakenOver
        return kept

    def _send_batch(self, batch: list[Claimed]) -> bool:
        """Send a claimed batch as one run over the connection; False when the send must
        stop (the rest of the batch goes back to the queue)."""
        self.going_on = True
        try:
            for delivery, outcome in self.transport.send_all(self._ready(batch)):
                self._recorded(delivery, outcome)
        except TakenOver:  # the transport dropped the connection: that body never left
            pass
        return self.going_on

    def _ready(self, batch: list[Claimed]) -> Iterator[tuple[Claimed, Message]]:
        """The batch's messages as the transport draws them: each one still ours, still
        wanted and paced; what must not go is recorded or given back here."""
        sender = self.sender
        while batch:
            batch = self._still_ours(batch)
            if not batch:
                return
            unreachable = self.failures >= self.options.max_connection_failures
            if self.run_.stopped() or unreachable:
                self._flush()
                release(self.db, [d.id for d in batch], self.owner)
                if unreachable:
                    self.run_.stop_all("the SMTP server cannot be reached")
                self.going_on = False
                return
            delivery, batch = batch[0], batch[1:]
            if not delivery.mailable:
                mark(
                    self.db, delivery.id, self.owner, "skipped", last_answer="no longer subscribed"
                )
                self.db.commit()
                self.run_.count("skipped")
                continue
            try:
                data = sender.sign(self._message(delivery))
            except Exception as exc:  # one address the message cannot carry must not stop a send
                answer = (
                    f"cannot build a message for {delivery.email!r}: {type(exc).__name__}: {exc}"
                )
                self._record_failure(delivery, Outcome("failed", None, answer))
                continue
            sender.pacer.wait()
            self.waiting = delivery  # until its answer: the next draw comes before its body
            envelope_from = sender.verp.envelope_from(delivery.id)
            yield delivery, Message(envelope_from, wire_address(delivery.email), data)

    def _message(self, delivery: Claimed) -> bytes:
        """The wire bytes of a delivery's message."""
        sender = self.sender
        message_id = delivery_message_id(delivery.id, self.owner, sender.takeover.domain)
        token = sender.verp.token(delivery.id)
        if delivery.kind is not None:
            return one_off_message(sender.settings, sender.tokens, delivery, message_id, token)
        template = self.run_.template
        assert template is not None
        url = unsubscribe_url(
            sender.settings.site_url, sender.tokens.unsubscribe_token(delivery.email)
        )
        return template.build(Recipient(delivery.email, delivery.name, url, message_id, token))

    def _recorded(self, delivery: Claimed, outcome: Outcome) -> None:
        """Take in the server's answer to one message."""
        sender, run = self.sender, self.run_
        if self.waiting is delivery:
            self.waiting = None
        dropped = outcome.status == "retry" and outcome.code is None
        self.failures = self.failures + 1 if dropped else 0
        if outcome.throttle:
            sender.pacer.throttled()
        if outcome.sender_refused:
            release(self.db, [delivery.id], self.owner)
            run.stop_all(f"the server refuses to send for us: {outcome.answer}")
            return
        if outcome.status == "sent":
            now = time.time()
            run.journal.accepted(delivery.id, now)
            if not self.accepted:
                self.first_accepted = time.monotonic()
            self.accepted.append(delivery.id)
            self.last_accepted = now
            run.count("sent")
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
        self.run_.count(status, delivery.email, answer)

    def _attempts_allowed(self, outcome: Outcome) -> int:
        """Throttling is about our pace, not the address: it may go on for hours (at the
        longest backoff, four times the attempts take about two hours by default)."""
        return self.options.max_attempts * (THROTTLED_ATTEMPTS if outcome.throttle else 1)

    def _flush(self) -> None:
        if self.accepted:
            when = datetime.fromtimestamp(self.last_accepted, UTC)
            record_sent(self.db, self.owner, self.sender.takeover.domain, self.accepted, when)
            self.accepted = []
