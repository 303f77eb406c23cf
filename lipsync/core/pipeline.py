"""Threads of a streaming pipeline: a worker that keeps its error, the one put-with-stop helper,
a prefetching iterator, and per-phase timings.

Stages hand items on through bounded queues, so memory holds a few items whatever the length of the
stream. A stage that fails keeps its exception; whoever waits on it re-raises that exception instead
of blocking forever.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")

END = object()  # sentinel closing a queue


class StageStopped(RuntimeError):
    """A pipeline stage ended before the stream did (its own error, when it had one, is raised instead)."""


class Worker(threading.Thread):
    """Runs ``fn()`` in a daemon thread; an exception is kept and re-raised by :meth:`check`."""

    def __init__(self, fn: Callable[[], None], name: str):
        super().__init__(daemon=True, name=name)
        self.fn = fn
        self.error: Optional[BaseException] = None

    def run(self):
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that checks
            self.error = exc

    def check(self):
        """Re-raise the worker's exception, if it had one."""
        if self.error is not None:
            raise self.error


def put(q: queue.Queue, item, stop: Optional[threading.Event] = None, peer: Optional[Worker] = None,
        poll: float = 0.1) -> bool:
    """Put ``item`` into the bounded queue ``q``, waiting for room.

    Returns False (item not put) once ``stop`` is set. If ``peer`` (the consumer) has died, its error
    is raised, or :class:`StageStopped` when it ended without one, so a producer never blocks on a
    queue nobody reads.
    """
    while True:
        if stop is not None and stop.is_set():
            return False
        if peer is not None:
            peer.check()
            if not peer.is_alive():
                raise StageStopped(f"pipeline stage {peer.name!r} stopped early")
        try:
            q.put(item, timeout=poll)
            return True
        except queue.Full:
            continue


def get(q: queue.Queue, peer: Optional[Worker] = None, poll: float = 0.1):
    """Take the next item of ``q``; if ``peer`` (the producer) died meanwhile, raise its error."""
    while True:
        try:
            return q.get(timeout=poll)
        except queue.Empty:
            if peer is not None:
                peer.check()
                if not peer.is_alive() and q.empty():
                    raise StageStopped(f"pipeline stage {peer.name!r} stopped early")


@contextmanager
def prefetch(items: Iterable[T], depth: int, name: str, timer: Optional[Callable[[float], None]] = None
             ) -> Iterator[Iterator[T]]:
    """``with prefetch(it, depth, "decode") as it2:`` runs ``it`` in a thread, ``depth`` items ahead.

    ``timer(seconds)``, when given, receives the time spent producing each item. Leaving the block
    stops the thread (the source iterator is closed where it is, e.g. an ffmpeg pipe killed).
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce():
        it = iter(items)
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                item = next(it, END)
                if timer is not None:
                    timer(time.perf_counter() - t0)
                if not put(q, item, stop) or item is END:
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    worker = Worker(produce, name)
    worker.start()

    def consume() -> Iterator[T]:
        while True:
            item = get(q, worker)
            if item is END:
                worker.check()
                return
            yield item

    try:
        yield consume()
    finally:
        stop.set()
        worker.join(timeout=10)
        worker.check()


@dataclass
class Timings:
    """Seconds spent per phase of a run (summed over threads, so phases overlap in wall time)."""

    decode: float = 0.0
    detect: float = 0.0
    crop: float = 0.0
    generate: float = 0.0
    blend: float = 0.0
    enhance: float = 0.0
    encode: float = 0.0
    total: float = 0.0

    def add(self, phase: str, seconds: float) -> None:
        setattr(self, phase, getattr(self, phase) + seconds)

    @contextmanager
    def measure(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("decode", "detect", "crop", "generate", "blend", "enhance", "encode", "total")}
