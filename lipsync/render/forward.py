"""The one owner of a generator's forward pass: a thread that runs every generate call, batching the
calls of concurrent callers into one forward pass.

Every caller (the CLI's render, each streaming session, each ``/v1/lipsync`` job) hands its mel
windows and crops to :meth:`ForwardQueue.generate` from its own thread and blocks until its rows are
ready. The queue's thread takes the first waiting request, waits a bounded time for the requests of
the other owners that have frames in flight (``busy()``), runs the forward pass once on the
concatenation and hands each caller its rows back. One pass over N sessions' frames costs less than
N passes (fewer kernel launches and thread barriers, better use of the GPU), and the generator runs
one forward at a time with one OpenMP thread team (teams of several calling threads would spin
against each other for the same cores). A lone caller never waits: with no other owner busy, its
request runs at once.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, List, Optional, Set

import numpy as np

log = logging.getLogger(__name__)

# forward(mels (B, 80, 16) float32, faces (B, S, S, 3) uint8 numpy or device tensor, keys, as_tensor)
#   -> (B, S, S, 3) uint8 faces (a device tensor with as_tensor)
ForwardFn = Callable[[np.ndarray, object, Optional[list], bool], object]


class ForwardQueueClosed(RuntimeError):
    """The queue stopped (the generator was closed, a server shutting down) before a request ran."""


@dataclass
class _Request:
    owner: Hashable
    mels: np.ndarray                 # (B, 80, 16) float32
    faces: object                    # (B, S, S, 3) uint8: numpy, or a tensor on the generator's device
    keys: Optional[list]
    as_tensor: bool                  # the caller wants a device tensor back
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[object] = None
    error: Optional[BaseException] = None


@dataclass
class BatchStats:
    """Forward calls made, frames generated, requests served, and the most owners in one call."""

    calls: int = 0
    frames: int = 0
    requests: int = 0
    most_sessions: int = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "frames": self.frames, "requests": self.requests,
                "mean_frames_per_call": round(self.frames / self.calls, 2) if self.calls else 0.0,
                "most_sessions_per_call": self.most_sessions}


class ForwardQueue:
    """Runs ``forward`` on one thread for every caller, batching concurrent requests.

    ``max_batch``: frames per forward call (a request larger than this runs alone, whole).
    ``max_wait``: seconds to wait, after the first request, for the others (bounded latency).
    ``busy()``: the owners that have frames in flight (their requests are worth waiting for); the
    wait ends early once every one of them has a request in. :meth:`configure` changes these while
    running (a server sets them from its flags).
    """

    def __init__(self, forward: ForwardFn, max_batch: int = 64, max_wait: float = 0.0,
                 busy: Optional[Callable[[], Set[Hashable]]] = None, name: str = "generator"):
        self.forward = forward
        self.max_batch = 64
        self.max_wait = 0.0
        self.busy: Callable[[], Set[Hashable]] = lambda: set()
        self.configure(max_batch, max_wait, busy)
        self.stats = BatchStats()
        self._queue: "queue.Queue[Optional[_Request]]" = queue.Queue()
        self._closed = threading.Event()
        self._carry: Optional[_Request] = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def configure(self, max_batch: Optional[int] = None, max_wait: Optional[float] = None,
                  busy: Optional[Callable[[], Set[Hashable]]] = None) -> None:
        """Set the batching limits (None keeps a value); raises ValueError for ``max_batch`` < 1."""
        if max_batch is not None:
            if max_batch < 1:
                raise ValueError("max_batch must be >= 1")
            self.max_batch = max_batch
        if max_wait is not None:
            self.max_wait = max(0.0, max_wait)
        if busy is not None:
            self.busy = busy

    def generate_for(self, owner: Hashable) -> Callable:
        """The ``generate(mels, faces, keys)`` function of one owner (a session): blocks until its
        rows of a shared forward pass are ready; faces come back as a device tensor when the crops
        were a tensor."""
        return lambda mels, faces, keys: self.generate(mels, faces, keys, not isinstance(faces, np.ndarray), owner)

    def generate(self, mels: np.ndarray, faces, keys: Optional[list] = None, as_tensor: bool = False,
                 owner: Hashable = None):
        """(B, 80, 16) mel windows + (B, S, S, 3) uint8 crops -> (B, S, S, 3) uint8 faces (numpy; a
        tensor on the generator's device with ``as_tensor``). Raises ForwardQueueClosed after
        :meth:`close`, or the forward pass's own error."""
        if threading.current_thread() is self._thread:   # a forward that generates (not batched again)
            return self.forward(mels, faces, keys, as_tensor)
        if self._closed.is_set():
            raise ForwardQueueClosed("the generator was closed")
        req = _Request(owner, mels, faces, keys, as_tensor)
        self._queue.put(req)
        while not req.done.wait(0.5):
            if self._closed.is_set() and not self._thread.is_alive():
                raise ForwardQueueClosed("the generator was closed")
        if req.error is not None:
            raise req.error
        return req.result

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still waiting get ForwardQueueClosed."""
        self._closed.set()
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- the forward thread ----------------------------------------------------------------------
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
            self._finish(batch, lambda: self._forward(batch))
        # fail whatever is still queued
        if self._carry is not None:
            self._queue.put(self._carry)
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                req.error = ForwardQueueClosed("the generator was closed")
                req.done.set()

    @staticmethod
    def _finish(batch: List[_Request], work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - handed to every caller of this batch
            log.exception("generator call failed")
            for r in batch:
                r.error = exc
        for r in batch:
            r.done.set()

    def _forward(self, batch: List[_Request]) -> None:
        mels = np.concatenate([r.mels for r in batch])          # (sum B, 80, 16)
        # crops come as numpy arrays, or as device tensors from callers that compose on the device
        # (lipsync.render.gpu.TorchComposer)
        on_device = [r.faces for r in batch if not isinstance(r.faces, np.ndarray)]
        if on_device:
            import torch

            faces = torch.cat([torch.as_tensor(r.faces).to(on_device[0].device) for r in batch])  # (sum B, S, S, 3)
        else:
            faces = np.concatenate([r.faces for r in batch])                  # (sum B, S, S, 3)
        keys = [k for r in batch for k in r.keys] if all(r.keys is not None for r in batch) else None
        want_tensor = any(r.as_tensor for r in batch)
        out = self.forward(mels, faces, keys, want_tensor)
        s = self.stats
        s.calls += 1
        s.frames += len(mels)
        s.requests += len(batch)
        s.most_sessions = max(s.most_sessions, len({r.owner for r in batch}))
        k = 0
        for r in batch:
            rows = out[k:k + len(r.mels)]
            r.result = rows.cpu().numpy() if want_tensor and not r.as_tensor else rows
            k += len(r.mels)
