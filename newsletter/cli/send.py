"""`newsletter send`: deliver a digest to every active subscriber, or test copies."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from newsletter.cli.common import DIGEST, fast_thread_switching, settings, stop_on_signals

if TYPE_CHECKING:
    from newsletter.config import Settings
    from newsletter.sender import SendReport


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


def _progress(total: int | None):
    """A progress bar with rate and ETA on a terminal, for ``on_result``; None elsewhere."""
    if not sys.stderr.isatty():
        return None
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

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:,.0f} msg/s")

    columns = (
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, transient=True, console=Console(stderr=True)), total


def _waiting(waiting: int, due) -> None:
    when = f"; next try at {due:%H:%M:%S} UTC" if due else ""
    click.echo(f"waiting: {waiting} deliveries to be retried{when}", err=True)


def _finish(report: SendReport, config: Settings) -> None:
    if report.finished and report.stopped_reason:
        click.echo(f"{report.stopped_reason}; nothing left to send")
    for email, answer in report.failures:
        click.echo(f"failed: {email}: {answer}", err=True)
    click.echo(summary_line(report, config))
    if not report.finished:
        reason = report.stopped_reason or "stopped"
        click.echo(
            f"error: {reason}; {report.open} deliveries left queued: "
            f"newsletter send --resume {report.issue_id}",
            err=True,
        )
        sys.exit(1)


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
    from newsletter import sender
    from newsletter.store import open_store

    if (digest is None) == (resume is None):
        raise click.UsageError("give either DIGEST or --resume ISSUE_ID")
    if resume is not None and (to or dry_run):
        raise click.UsageError("--to and --dry-run need a DIGEST, not --resume")
    config = settings()
    fast_thread_switching()
    with open_store(config) as store:
        if resume is not None:
            _deliver(lambda **options: sender.Sender(store, config, **options).run(resume), None)
            return
        plan = sender.plan_send(store, config, digest, force=force or bool(to) or dry_run)
        if to or dry_run:
            _warn(plan)
        if to:
            _test_copies(store, config, to, plan, dry_run)
            return
        verb = f"resume issue {plan.resume.id}:" if plan.resume else "send"
        line = f"{verb} {plan.rendered.subject!r} to {plan.recipients} subscriber(s)"
        if dry_run:
            again = ""
            if plan.previous is not None and not force:
                again = f" (already sent as issue {plan.previous.id}: it needs --force)"
            click.echo(f"dry run: would {line}{again}; nothing sent")
            return
        if plan.resume is None and not yes:
            _confirm(line)
        _deliver(
            lambda **options: sender.send_issue(store, config, plan, force=force, **options),
            plan.recipients,
        )


def _deliver(start, total: int | None) -> None:
    """Run a send with a progress bar on a terminal and a line per minute of waiting; print
    the summary; exit 1 if it could not finish."""
    config = settings()
    with stop_on_signals() as stop:
        progress = _progress(total)
        if progress is None:
            report = start(stop=stop, on_waiting=_waiting)
        else:
            bar, total = progress
            with bar:
                task = bar.add_task("send", total=total)
                report = start(
                    stop=stop,
                    on_waiting=_waiting,
                    on_result=lambda status: bar.advance(task) if status != "retried" else None,
                )
    _finish(report, config)


def _confirm(line: str) -> None:
    from newsletter.errors import InputError

    if not sys.stdin.isatty():
        raise InputError(f"about to {line}: pass --yes to confirm when not on a terminal")
    if not click.confirm(f"{line[0].upper()}{line[1:]}?", default=False):
        raise InputError("cancelled; nothing sent")


def _warn(plan) -> None:
    """What `check` would refuse, as warnings: test copies and dry runs go ahead anyway."""
    from newsletter.digest import MUST_FIX

    for finding in plan.rendered.findings:
        if finding.severity == MUST_FIX:
            click.echo(f"warning: {plan.digest.path}:{finding.line}: {finding.message}", err=True)


def _test_copies(store, config: Settings, to: tuple[str, ...], plan, dry_run: bool) -> None:
    from newsletter.sender import send_test_copies
    from newsletter.subscribers import normalise_email

    addresses = [normalise_email(address, "--to") for address in to]
    if dry_run:
        click.echo(f"dry run: would send test copies to {', '.join(addresses)}; nothing sent")
        return
    results = send_test_copies(store, config, plan.rendered, addresses)
    for address, outcome in results:
        click.echo(f"test copy to {address}: {outcome.status} ({outcome.answer})")
    if any(outcome.status != "sent" for _, outcome in results):
        sys.exit(1)
