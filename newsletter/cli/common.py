"""What the commands share: the settings of this invocation, option types, signals."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from newsletter.config import Settings

DIGEST = click.Path(path_type=Path, dir_okay=False)


def settings(ctx: click.Context | None = None) -> Settings:
    """The validated settings for this invocation, read once and cached on the root context."""
    from newsletter.config import Settings, load_settings

    ctx = (ctx or click.get_current_context()).find_root()
    if not isinstance(ctx.obj, Settings):
        ctx.obj = load_settings()
    return ctx.obj


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, so a command finishes its message and stops cleanly."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def fast_thread_switching() -> None:
    """Hand the GIL over every millisecond instead of five: a sending thread whose server
    answered gets it back sooner (an interpreter setting, so only commands set it)."""
    sys.setswitchinterval(0.001)
