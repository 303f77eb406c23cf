"""The project's one family of errors, and how entry points report them.

Every error a user can cause (a missing or unreadable file, a video that is not a video, a checkpoint
of the wrong kind, a flag value that cannot work) is a :class:`Wav2LipError`. Entry points run their
work through :func:`run_main`: such an error, or an ``OSError`` about a file, becomes one ``error: ...``
line on stderr and exit status 2. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys


class Wav2LipError(Exception):
    """Base class of every error caused by input (files, flags, checkpoints, media)."""


def error_line(exc: BaseException) -> str:
    """The one line shown for a user error: ``error: <message>``."""
    if isinstance(exc, OSError) and not isinstance(exc, Wav2LipError):
        name = exc.filename if exc.filename is not None else ""
        reason = exc.strerror or str(exc)
        return f"error: {reason}: {name}" if name else f"error: {reason}"
    msg = str(exc).strip().splitlines()
    return "error: " + (" ".join(m.strip() for m in msg) if msg else type(exc).__name__)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (``timeout``, ``docker stop``, a job scheduler): unwinds like Ctrl-C, so
    unfinished outputs are removed on the way out."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_main(fn, *args, **kwargs) -> int:
    """Call ``fn(*args, **kwargs)`` and return its exit status; a :class:`Wav2LipError` or an
    ``OSError`` becomes one ``error:`` line on stderr and status 2; Ctrl-C is status 130, SIGTERM
    143 (both after the work in progress has cleaned up: no partial output file is left)."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return fn(*args, **kwargs)
    except (Wav2LipError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
