"""Processes kubetrain starts never outlive it: one stop on the first signal, none on the next.

Three rules, each closing a way a run left work behind:

- **A second signal changes nothing.** GNU ``timeout`` (and a container runtime) signals the
  process *and* its group, so two SIGTERMs arrive milliseconds apart; a handler that runs again
  while the first is still stopping things interrupts that stop half-way (``stop_once``).
- **What we started dies with us.** A torchrun agent and its workers ask the kernel for a signal
  when their parent goes (``die_with_parent``: ``PR_SET_PDEATHSIG``), so a launcher killed
  outright (SIGKILL, the OOM killer) does not leave them training and writing checkpoints.
- **The CLI waits for its descendants.** On a signal it notes every process below it
  (``descendants``) and, before it exits, waits for them to end and kills what is left
  (``reap``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; elsewhere a
    no-op). Call it first thing in a child; if the parent is already gone by then, the signal
    is sent at once."""
    prctl = _prctl()
    if prctl is None:
        return
    parent = os.getppid()
    prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl: no signal would ever come
        os.kill(os.getpid(), sig)


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen`` that makes the child get ``sig`` when the
    thread that started it exits (None where there is no such thing). The C function is looked
    up here, in the parent: the child only calls it."""
    prctl = _prctl()
    if prctl is None:
        return None

    def ask() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return ask


def descendants() -> list[Any]:
    """Every process below this one (``psutil.Process`` objects; empty if psutil fails)."""
    import psutil

    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def reap(processes: list[Any], grace: float = 30.0) -> list[int]:
    """Wait up to ``grace`` seconds for ``processes`` to end, then kill the ones left.

    Args:
        processes: ``psutil.Process`` objects (e.g. ``descendants()`` taken when a signal came).
        grace: seconds they have to stop on their own.

    Returns:
        The pids that had to be killed.
    """
    import psutil

    def running(p: Any) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + grace
    while (left := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return [p.pid for p in left]


def _unhandled(sig: int) -> bool:
    """Whether ``sig`` has Python's default handling (nothing of ours or a caller's)."""
    return signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)


@contextlib.contextmanager
def stop_once(
    signals: tuple[int, ...], on_first: Callable[[int], None], only_unhandled: bool = False
) -> Iterator[Callable[[], bool]]:
    """Within it, the first of ``signals`` calls ``on_first(signum)`` (which typically raises to
    unwind); every later one is ignored while the stop proceeds, and after the block too (the
    process is on its way out). Outside the main thread it does nothing (signals are the main
    thread's); with ``only_unhandled``, it leaves alone a signal someone already handles (the
    CLI, which stops its own way).

    Yields:
        A function telling whether a signal has come.
    """
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if fired:
            return  # already stopping: a second signal must not interrupt that
        fired = True
        on_first(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in signals:
            if not only_unhandled or _unhandled(sig):
                previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        previous.clear()
    try:
        yield lambda: fired
    finally:
        for sig, old in previous.items():
            # Once stopping, a late signal must not kill this process before it has said so
            # (the default action of SIGTERM): it stays ignored until the process exits.
            signal.signal(sig, signal.SIG_IGN if fired else old)
