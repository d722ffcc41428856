"""What one Ctrl-C does: the command stops within seconds and says in one line where, and how to go on.

A terminal's Ctrl-C reaches every process of its foreground group: this one, the benchmark's worker processes and
Ray's processes. Left to Python and Ray, each of them prints a KeyboardInterrupt traceback, and Flower's simulation
waits for its client threads, which wait for a stop signal that the interrupted main thread never sends: the
command hangs until a second Ctrl-C. Here this process alone decides. It kills every process it started (they hold
nothing that is not on disk: checkpoints, artifacts and client states are written to a temporary file and renamed,
results files line by line, and a line cut off is dropped and redone on resume), names the step that stopped and
how to go on, and exits with status 130 (128 + SIGINT, the shells' convention).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

EXIT_STATUS = 130
_steps: list[tuple[str, str]] = []  # innermost last: (what is running, how the user goes on from there)


@contextmanager
def resumable(step: str, how_to_resume: str) -> Iterator[None]:
    """Mark the code inside as ``step`` (e.g. "the psg stage"): an interrupt there names it and says
    ``how_to_resume`` (e.g. "the same command resumes the run there")."""
    _steps.append((step, how_to_resume))
    try:
        yield
    finally:
        _steps.pop()


def ignore_interrupts() -> None:
    """For a worker process: the process that started it decides what an interrupt does (and stops it). Only a
    process's main thread can change its signal handling; elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def children_start_deaf() -> Iterator[None]:
    """Processes started inside start with SIGINT blocked: a Ctrl-C that reaches them while they are still starting
    (a benchmark worker imports torch for seconds before it can ``ignore_interrupts``) would otherwise raise a
    KeyboardInterrupt there and print its traceback. A blocked signal mask survives the start of a new program
    (the standard library starts its resource tracker the same way). Here the block lasts only while the children
    start, and a SIGINT that arrives meanwhile is not lost: it waits, and this process handles it when the block
    ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_descendants(timeout_s: float = 5.0) -> None:
    """Stop every process started from this one: Ray through ``ray.shutdown`` (killed in another order, its
    servers end this process with status 1 before it can exit with 130, or its agents outlive it), then a kill
    for whatever is left (the benchmark's workers, and Ray's processes if its shutdown hangs), and wait for them."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        stopping = threading.Thread(target=ray.shutdown, daemon=True)
        stopping.start()
        stopping.join(timeout_s)
    left = psutil.Process().children(recursive=True)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=timeout_s)


def silence_output() -> None:
    """Point this process's stdout and stderr at /dev/null: what its threads and dying child processes would
    print now (Flower's errors about vanished actors, Ray's forwarded worker lines) is noise."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (1, 2):
        os.dup2(devnull, stream)


def stopped_message() -> str:
    """The one line an interrupt prints."""
    if not _steps:
        return "fedp2eft: stopped (interrupted)"
    step, how_to_resume = _steps[-1]
    return f"fedp2eft: stopped (interrupted) during {step}; {how_to_resume}"


def _stop(signum: int, frame: object) -> None:
    """The SIGINT handler. It runs between two bytecodes of the main thread, which may be inside a write to
    stdout: it writes to the file descriptors, never through Python's stream objects (a reentrant write fails)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while stopping changes nothing
    try:
        sys.stdout.flush()  # results printed so far
    except (OSError, RuntimeError, ValueError):
        pass
    if os.isatty(1):
        os.write(1, b"\x1b[?25h\n")  # show the cursor that a progress bar hides while it draws, end its line
    os.write(2, f"{stopped_message()}\n".encode())
    silence_output()
    stop_descendants()
    os._exit(EXIT_STATUS)  # not an exception: Flower's threads would keep the process alive waiting for it


@contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """Inside, a SIGINT stops the command as the module docstring says. Only the main thread can install a
    signal handler; called from another thread (a caller embedding ``fedp2eft.cli.main``) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
