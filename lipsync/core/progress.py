"""Progress for long work that suits where the output goes.

On a terminal: a tqdm bar. Anywhere else (a log file, a CI job, a pipe): a plain line at most every
``interval`` seconds and one when the work ends, because tqdm's carriage-return redraws turn into
thousands of lines in a log. Both take the same calls (iteration, ``update``, ``set_postfix``,
``write``, ``close``, ``with``), so a call site does not care which it gets.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Optional

LINE_INTERVAL_S = 30.0   # seconds between two plain progress lines when the output is not a terminal


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, desc: Optional[str] = None, total: Optional[float] = None,
             unit: str = "it", initial: float = 0, disable: bool = False, leave: bool = True, file=None,
             interval: float = LINE_INTERVAL_S, **tqdm_kwargs):
    """A progress bar over ``iterable`` (or updated by hand with ``update(n)``).

    ``total``: the expected count (taken from ``len(iterable)`` when it has one); ``unit``: what
    is counted; ``initial``: the count already done (a resumed run); ``disable``: show nothing;
    ``file``: the stream (default stderr); ``interval``: seconds between plain lines when that
    stream is not a terminal. Other keyword arguments go to tqdm on a terminal.
    """
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    if disable or is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, disable=disable, leave=leave,
                    file=file, **tqdm_kwargs)
    return LineProgress(iterable, desc=desc, total=total, unit=unit, initial=initial, file=stream, interval=interval)


class LineProgress:
    """Plain-line progress: ``<desc>: <n>/<total> <unit> (<pct>%) <elapsed> s, <rate> <unit>/s``
    at most every ``interval`` seconds while counting, and a last line on ``close``."""

    def __init__(self, iterable=None, desc=None, total=None, unit="it", initial=0, file=None,
                 interval=LINE_INTERVAL_S, clock=time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.desc, self.total, self.unit = iterable, desc or "progress", total, unit
        self.n = self.initial = initial
        self.file = sys.stderr if file is None else file
        self.interval = interval
        self.postfix = ""
        self._clock = clock
        self._start = self._last = clock()
        self._closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self):
        return int(self.total) if self.total is not None else len(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def update(self, n: float = 1) -> None:
        """Count ``n`` more; print a line if ``interval`` seconds passed since the last one."""
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        """Values shown after the count on the next line (tqdm's signature)."""
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def write(self, line: str) -> None:
        """Print a message line (tqdm's ``bar.write``)."""
        print(line, file=self.file, flush=True)

    def refresh(self) -> None:
        pass   # nothing is redrawn: lines are printed by update and close

    def close(self) -> None:
        """Print the last line, once."""
        if self._closed:
            return
        self._closed = True
        # "done" only when the count reached its total: a loop left early says where it stopped
        self._print(final=self.total is None or self.n >= self.total)

    def line(self, final: bool = False) -> str:
        """The progress line as it would be printed now."""
        elapsed = max(self._clock() - self._start, 1e-9)
        count = f"{self.n:g}/{self.total:g}" if self.total else f"{self.n:g}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.initial) / elapsed
        text = f"{self.desc}: {'done ' if final else ''}{count} {self.unit}{pct} {elapsed:.0f} s, {rate:.3g} {self.unit}/s"
        return text + (f", {self.postfix}" if self.postfix else "")

    def _print(self, final: bool = False) -> None:
        print(self.line(final), file=self.file, flush=True)
