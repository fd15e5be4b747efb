"""`newsletter send`: deliver a digest to every active subscriber, or test copies."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from newsletter.cli import settings
from newsletter.cli.render import DIGEST
from newsletter.config import Settings
from newsletter.digest import MUST_FIX
from newsletter.errors import InputError
from newsletter.sender import (
    Sender,
    SendReport,
    check_transport,
    plan_send,
    secret_key,
    send_test_copies,
    start_send,
    transport_factory,
)
from newsletter.store import Store, open_store
from newsletter.subscribers import normalise_email


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, so workers finish their message and release the rest."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is threading.main_thread():
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class RateColumn(ProgressColumn):
    """Messages per second, as measured by the progress bar."""

    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:,.0f} msg/s")


def _where(config: Settings) -> str:
    if config.smtp_host:
        return f"via {config.smtp_host}:{config.smtp_port}"
    return f"written to {config.outbox_dir.resolve()}/"


def summary_line(report: SendReport, config: Settings) -> str:
    """The closing line every send prints."""
    return (
        f"issue {report.issue_id}: sent {report.sent}, failed {report.failed}, "
        f"bounced {report.bounced}, skipped {report.skipped}, still queued {report.open}; "
        f"{report.seconds:.1f} s, {report.rate:.1f} msg/s; messages {_where(config)}"
    )


def run_issue(store: Store, config: Settings, issue_id: int, total: int | None) -> SendReport:
    """Deliver an issue with a progress bar on a terminal; exit 1 if it could not finish."""
    with stop_on_signals() as stop:
        sender = Sender(store, config, stop=stop)
        check_transport(sender.factory)
        if sys.stderr.isatty():
            columns = (
                TextColumn("sending"),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
                task = bar.add_task("send", total=total)
                sender.on_result = lambda status: bar.advance(task) if status != "retried" else None
                report = sender.run(issue_id)
        else:
            report = sender.run(issue_id)
    if report.finished and report.stopped_reason:
        click.echo(f"{report.stopped_reason}; nothing left to send")
    for email, answer in report.failures:
        click.echo(f"failed: {email}: {answer}", err=True)
    click.echo(summary_line(report, config))
    if not report.finished:
        reason = report.stopped_reason or "stopped"
        click.echo(
            f"error: {reason}; {report.open} deliveries left queued: "
            f"newsletter send --resume {issue_id}",
            err=True,
        )
        sys.exit(1)
    return report


@click.command()
@click.argument("digest", required=False, type=DIGEST)
@click.option(
    "--to",
    "to",
    multiple=True,
    metavar="ADDR",
    help="Send a test copy to ADDR only (repeatable); records nothing.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force", is_flag=True, help="Send even if already sent, or with problems `check` reports."
)
@click.option("--resume", type=int, metavar="ISSUE_ID", help="Finish an interrupted send.")
def send(
    digest: Path | None,
    to: tuple[str, ...],
    dry_run: bool,
    yes: bool,
    force: bool,
    resume: int | None,
) -> None:
    """Send a digest to every active subscriber (or test copies with --to).

    Running it again on an unfinished issue resumes that issue; a digest that
    was already sent is refused unless --force.

    Example: newsletter send digests/2026-11-20-weekly-links.md --to me@example.com
    """
    if (digest is None) == (resume is None):
        raise click.UsageError("give either DIGEST or --resume ISSUE_ID")
    config = settings()
    with open_store(config) as store:
        if resume is not None:
            if to or dry_run:
                raise click.UsageError("--to and --dry-run need a DIGEST, not --resume")
            run_issue(store, config, resume, total=None)
            return
        plan = plan_send(store, config, digest, force=force or bool(to))
        if to:
            for finding in plan.rendered.findings:
                if finding.severity == MUST_FIX:
                    click.echo(f"warning: {digest}:{finding.line}: {finding.message}", err=True)
            if dry_run:
                click.echo(f"dry run: would send test copies to {', '.join(to)}; nothing sent")
                return
            _test_copies(store, config, plan, to)
            return
        verb = f"resume issue {plan.resume.id}:" if plan.resume else "send"
        line = f"{verb} {plan.rendered.subject!r} to {plan.recipients} subscriber(s)"
        if dry_run:
            click.echo(f"dry run: would {line}; nothing sent")
            return
        if plan.resume is None and not yes:
            _confirm(line)
        check_transport(transport_factory(config))
        issue_id = start_send(store, plan, force=force)
        run_issue(store, config, issue_id, total=plan.recipients)


def _confirm(line: str) -> None:
    if not sys.stdin.isatty():
        raise InputError(f"about to {line}: pass --yes to confirm when not on a terminal")
    if not click.confirm(f"{line[0].upper()}{line[1:]}?", default=False):
        raise InputError("cancelled; nothing sent")


def _test_copies(store: Store, config: Settings, plan, to: tuple[str, ...]) -> None:
    addresses = [normalise_email(address, "--to") for address in to]
    results = send_test_copies(
        config, plan.rendered, addresses, transport_factory(config), secret_key(config, store)
    )
    for address, outcome in results:
        click.echo(f"test copy to {address}: {outcome.status} ({outcome.answer})")
    if any(outcome.status != "sent" for _, outcome in results):
        sys.exit(1)


def register(group: click.Group) -> None:
    """Add ``send`` to the ``newsletter`` group."""
    group.add_command(send)
