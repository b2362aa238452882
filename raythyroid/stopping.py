"""Stopping a job by signal: Ctrl-C (SIGINT) at a terminal, SIGTERM from Kubernetes or
`ray job stop`.

The first signal raises KeyboardInterrupt in the driver's main thread, wherever it waits; Ray's
blocking calls turn that into an orderly return, the job's `finally` blocks run (progress marked
interrupted, Ray shut down) and the command exits 130 or 143 with one line. Work already
committed stays committed, so the same command resumes. A second signal exits at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report
RESUMABLE = ("infer", "train", "cv", "distill")


@dataclass
class Interruption:
    signal: int | None = None
    # what the innermost job had done when it stopped: (job, done, total, unit)
    progress: tuple[str, int, int, str] | None = None


state = Interruption()


def _handler(signum, frame) -> None:
    if state.signal is not None:
        os._exit(EXIT_CODES[signum])  # the second signal: the person means now
    state.signal = signum
    raise KeyboardInterrupt


def install() -> None:
    """Take SIGINT and SIGTERM for the job. Called again after `ray.init`, which sets its own
    SIGTERM handler (a bare exit), and never from other threads (Python forbids it)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in EXIT_CODES:
        signal.signal(signum, _handler)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """A command's lifetime: a fresh record, our handlers, and the caller's back afterwards
    (a command run in-process, or again by a retrying job, starts clean)."""
    global state
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in EXIT_CODES}
    outer, state = state, Interruption()
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if outer.signal is not None:  # a stop of the enclosing command outlives this one
            state = outer


def note_progress(job: str, done: int, total: int, unit: str) -> None:
    state.progress = (job, int(done), int(total), unit)


def exit_code() -> int:
    return EXIT_CODES.get(state.signal, EXIT_CODES[signal.SIGINT])


def message() -> str:
    """The one line a stopped command prints."""
    name = signal.Signals(state.signal or signal.SIGINT).name
    if state.progress is None:
        return f"interrupted ({name}) before any work started"
    job, done, total, unit = state.progress
    # preprocess rewrites its OUTPUT from scratch; the others skip what they committed
    then = "to resume" if job in RESUMABLE else "to run it again"
    return (f"{job} interrupted ({name}) after {done} of {total} {unit}; rerun the same command "
            f"{then}")


# whether this process's native stderr (Ray's C++ core) already goes to command_log()
_native_stderr_diverted = False


def command_log(pid: int | None = None) -> str:
    """This command's own log file: Ray's native output and the tracebacks of failures."""
    return os.path.join(tempfile.gettempdir(), f"raythyroid-{pid or os.getpid()}.log")


def forget_command_log() -> None:
    """After a command that succeeded, the log it diverted native stderr to holds only Ray's
    warnings (Ray's own log files keep them too): one per run would pile up in TMPDIR. A log
    this process did not divert to (a --verbose run) may be an earlier failure's: kept."""
    if _native_stderr_diverted:
        with contextlib.suppress(OSError):
            os.remove(command_log())


def divert_native_stderr() -> None:
    """Point file descriptor 2 at a log file and keep Python's sys.stderr on the terminal,
    once per process (a second command in it, a job's retry, already writes there).

    Ray's C++ core writes its errors straight to descriptor 2 (for example a warning, logged
    as an error, about Ray Data's actor-pool arguments), and a crash handler dumps stacks
    there (command_log()). Nothing changes when the descriptors cannot be moved."""
    global _native_stderr_diverted
    if _native_stderr_diverted:
        return
    path = command_log()
    try:
        sys.stderr.flush()
        terminal = os.dup(2)
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 2)
        os.close(log)
    except OSError:
        return
    sys.stderr = os.fdopen(terminal, "w", buffering=1, encoding=sys.stderr.encoding,
                           errors="backslashreplace")
    _native_stderr_diverted = True


def leave(code: int) -> None:
    """End a command's process with `code`: disconnect from Ray, flush, and exit without
    Python's finalization. Native libraries can crash in it when their objects outlive their own
    shutdown (pyarrow's S3 clients after the AWS SDK is finalized: a train stopped by SIGTERM
    printed its line and then died of SIGSEGV instead of exiting 143), and a finished command
    has nothing left for it to do. For processes that are only the command (the console script,
    job entrypoints); a caller that goes on uses main()'s return value instead."""
    try:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:  # after Ray's shutdown, the last thing that could write there
            forget_command_log()
        os._exit(code)
