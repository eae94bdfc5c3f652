"""Child processes that do not outlive what started them.

- :func:`die_with_parent`: on Linux, ask the kernel to send this process ``sig`` when its
  parent dies (``PR_SET_PDEATHSIG``), as a ``preexec_fn`` of a child or at the start of one;
  a no-op elsewhere.
- :func:`stop_on_signals`: while it is active, SIGTERM and SIGHUP interrupt the main thread as
  Ctrl-C does (``KeyboardInterrupt``), so the ``finally`` blocks that stop children run when a
  supervisor, a shell closing or ``kill`` ends the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: this process gets ``sig`` when its parent dies (and exits at once if the parent
    died before this call)."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent or parent == 1:  # the parent died before the line above
        os._exit(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}")


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt`` in the main thread while inside."""
    old = {s: signal.signal(s, _interrupt) for s in signals}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
