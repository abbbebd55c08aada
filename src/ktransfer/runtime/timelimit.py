"""A time limit on a stretch of Python code in the main thread (``signal.setitimer``): ``within(seconds, message)``.

Used where code from a file the user was handed runs inside ktransfer (a tokenizer's Jinja chat template, run by
``transformers`` in its sandbox): a template with a huge nested loop raises ``TimeoutError`` instead of hanging
training. The alarm interrupts Python code (what a compiled template is); off the main thread, where signals cannot
be delivered, the block runs without a limit. A SIGALRM handler already installed is restored afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def within(seconds: float, message: str):
    """Run the block; ``TimeoutError(message)`` when it takes more than ``seconds`` (main thread only)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
