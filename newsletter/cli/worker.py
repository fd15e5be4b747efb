"""`newsletter worker` (and its old name `newsletter scheduler`): everything that sends."""

from __future__ import annotations

import logging

import click

from newsletter.cli.common import fast_thread_switching, settings, stop_on_signals


def _run() -> None:
    from newsletter.worker import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = settings()
    fast_thread_switching()
    with stop_on_signals() as stop:
        run_worker(config, stop)


@click.command()
def worker() -> None:
    """Send queued mail and run scheduled sends until stopped (SIGINT/SIGTERM: exit 0).

    Confirmations go out as soon as they are queued; any number of workers may share
    one PostgreSQL database, and each message and each scheduled send is done once.

    Example: newsletter worker
    """
    _run()


@click.command()
def scheduler() -> None:
    """The same as `newsletter worker` (its old name).

    Example: newsletter scheduler
    """
    _run()
