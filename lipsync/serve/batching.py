"""One generator shared by many concurrent renders: their generate calls go through it together.

Each render (a streaming session) gets a ``generate`` function from :meth:`Batcher.generate_for`
and calls it from its own thread, as :func:`lipsync.render.engine.render_windows` does. A single batching
thread takes the first waiting request, waits a bounded time for the requests of the other sessions
that have frames in flight, runs :meth:`Generator.generate` once on the concatenation, and hands
each caller its rows back. One forward pass over N sessions' frames costs less than N passes (fewer
kernel launches and thread barriers, better use of the GPU), and the generator still runs one
forward at a time.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, List, Optional, Set

import numpy as np

from lipsync.render.engine import GenerateFn
from lipsync.render.generator import Generator

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher stopped (server shutting down) before a request was run."""


@dataclass
class _Request:
    owner: Hashable
    mels: np.ndarray                 # (B, 80, 16) float32
    faces: object                    # (B, S, S, 3) uint8: numpy, or a tensor on the generator's device
    keys: Optional[list]
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[np.ndarray] = None
    error: Optional[BaseException] = None


@dataclass
class BatchStats:
    """Forward calls made, frames generated, and the largest number of sessions in one call."""

    calls: int = 0
    frames: int = 0
    requests: int = 0
    most_sessions: int = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "frames": self.frames, "requests": self.requests,
                "mean_frames_per_call": round(self.frames / self.calls, 2) if self.calls else 0.0,
                "most_sessions_per_call": self.most_sessions}


class Batcher:
    """Batches generate calls of concurrent sessions into one :meth:`Generator.generate` call.

    ``max_batch``: frames per forward call (a request larger than this runs alone, whole).
    ``max_wait``: seconds to wait, after the first request, for the others (bounded latency).
    ``busy()``: the owners that have frames in flight (their requests are worth waiting for);
    the wait ends early once every one of them has a request in, so a lone session never waits.
    """

    def __init__(self, generator: Generator, max_batch: int = 64, max_wait: float = 0.01,
                 busy: Optional[Callable[[], Set[Hashable]]] = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.generator = generator
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait)
        self.busy = busy or (lambda: set())
        self.stats = BatchStats()
        self._queue: "queue.Queue[Optional[_Request]]" = queue.Queue()
        self._closed = threading.Event()
        self._carry: Optional[_Request] = None
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def generate_for(self, owner: Hashable) -> GenerateFn:
        """The ``generate(mels, faces, keys)`` function of one session (``owner``): blocks until its
        rows of a shared forward pass are ready; raises BatcherClosed after :meth:`close`."""
        return lambda mels, faces, keys: self.generate(owner, mels, faces, keys)

    def generate(self, owner: Hashable, mels: np.ndarray, faces, keys: Optional[list] = None):
        """(B, 80, 16) mel windows + (B, S, S, 3) uint8 crops of ``owner`` -> (B, S, S, 3) uint8 faces
        (numpy; a tensor on the generator's device when the crops are a tensor)."""
        if self._closed.is_set():
            raise BatcherClosed("the server is shutting down")
        req = _Request(owner, mels, faces, keys)
        self._queue.put(req)
        while not req.done.wait(0.5):
            if self._closed.is_set() and not self._thread.is_alive():
                raise BatcherClosed("the server is shutting down")
        if req.error is not None:
            raise req.error
        return req.result

    def close(self, timeout: float = 10.0) -> None:
        """Stop the batching thread; requests still waiting get BatcherClosed."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- the batching thread ---------------------------------------------------------------------
    def _collect(self, first: _Request) -> List[_Request]:
        batch = [first]
        frames = len(first.mels)
        deadline = time.monotonic() + self.max_wait
        while frames < self.max_batch:
            waiting_for = self.busy() - {r.owner for r in batch}
            if not waiting_for and self._queue.empty():
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                req = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if req is None:            # close(): run what we have, then stop
                self._queue.put(None)
                break
            if frames + len(req.mels) > self.max_batch:
                self._carry = req       # first into the next call, keeping arrival order
                break
            batch.append(req)
            frames += len(req.mels)
        return batch

    def _run(self) -> None:
        while True:
            first, self._carry = (self._carry, None) if self._carry is not None else (self._queue.get(), None)
            if first is None:
                break
            batch = self._collect(first)
            self._forward(batch)
        # fail whatever is still queued
        if self._carry is not None:
            self._queue.put(self._carry)
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                req.error = BatcherClosed("the server is shutting down")
                req.done.set()

    def _forward(self, batch: List[_Request]) -> None:
        try:
            mels = np.concatenate([r.mels for r in batch])          # (sum B, 80, 16)
            # crops come as numpy arrays, or as device tensors from sessions that compose on the
            # device (lipsync.render.gpu.TorchComposer); those want device tensors back
            tensors = [not isinstance(r.faces, np.ndarray) for r in batch]
            if any(tensors):
                import torch

                device = self.generator.device
                faces = torch.cat([torch.as_tensor(r.faces).to(device) for r in batch])  # (sum B, S, S, 3)
            else:
                faces = np.concatenate([r.faces for r in batch])    # (sum B, S, S, 3)
            keys = None
            if all(r.keys is not None for r in batch):
                keys = [k for r in batch for k in r.keys]
            out = self.generator.generate(mels, faces, keys, as_tensor=any(tensors))
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of this batch
            log.exception("generator call failed")
            for r in batch:
                r.error = exc
                r.done.set()
            return
        s = self.stats
        s.calls += 1
        s.frames += len(mels)
        s.requests += len(batch)
        s.most_sessions = max(s.most_sessions, len({r.owner for r in batch}))
        k = 0
        for r, tensor in zip(batch, tensors):
            rows = out[k:k + len(r.mels)]
            r.result = rows if tensor or isinstance(rows, np.ndarray) else rows.cpu().numpy()
            k += len(r.mels)
            r.done.set()
