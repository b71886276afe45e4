"""SIGINT and SIGTERM in the tools that build and tear things down (the ext4 reference,
compare, the bench): hold them across a step that must not be cut in half, and let SIGTERM
interrupt like Ctrl-C, so that the same `finally` clean-up runs for both.

Python runs signal handlers in the main thread only, so only there do these act; elsewhere
they do nothing (no signal reaches the code of another thread anyway).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_deferred(reraise: bool = True) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (starting a tool or a mount, registering
    its undo, tearing down). A signal that arrived meanwhile is delivered right after the
    block, to the handler that was in place before it; reraise=False drops it instead (a
    clean-up that runs because the user already asked to stop).

    The handlers are swapped rather than the signals blocked: a blocked mask would be
    inherited by the tools and daemons started inside the block, which then could not be
    stopped."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, remember) for signum in _DEFERRED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received and reraise:
        signal.raise_signal(received[0])


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does (`kill` and a
    timeout's TERM clean up like Ctrl-C); the previous handler comes back after it."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
