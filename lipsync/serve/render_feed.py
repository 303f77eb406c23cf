"""One session's render thread: mel windows in, lip-synced frames out, through the one render path.

A :class:`RenderFeed` runs :func:`lipsync.render.engine.render_windows` on its own thread over the
windows queued with :meth:`RenderFeed.put`, with the session's ``generate`` (its share of the
generator's :class:`lipsync.render.forward.ForwardQueue`), and hands each frame to the session's
``emit``. The WebSocket stream (:mod:`lipsync.serve.sessions`) and the WebRTC session
(:mod:`lipsync.serve.webrtc`) are its two users; they differ only in what they do with a frame.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from typing import Callable, Deque, Hashable, Optional

import numpy as np
import torch

from lipsync.core.errors import Wav2LipError
from lipsync.core.pipeline import END, StageStopped
from lipsync.render.avatar import Avatar
from lipsync.render.engine import GenerateFn, composer_for, render_windows

log = logging.getLogger(__name__)

MAX_GROUP = 16                   # windows handed to the render path at once (the most frames posted in one burst)

# emit(i, frame, tag): talk frame i (counted from 0 over the feed's life), (H, W, 3) uint8 BGR, and the
# tag its windows were queued with; called on the render thread
Emit = Callable[[int, np.ndarray, Hashable], None]


class RenderFeed:
    """The render thread of one session.

    ``put(windows, tag)`` queues (G, 80, 16) float32 mel windows (one output frame each); ``end()``
    says no more will come; ``drain()`` drops the windows not yet taken by the renderer; ``stop()``
    ends the thread at its next frame. ``emit(i, frame, tag)`` gets every frame in order on the
    render thread; ``finished(n)`` is called after the last one when the feed ended (not when it
    was stopped), ``failed(message)`` when rendering failed. ``options``: the session's
    :class:`lipsync.serve.stream_output.StreamOptions` (``blend``, ``loop``, ``on_device``).
    """

    def __init__(self, name: str, avatar: Avatar, generate: GenerateFn, options, device, emit: Emit,
                 finished: Callable[[int], None], failed: Callable[[str], None]):
        self.name = name
        self.avatar = avatar
        self.generate = generate
        self.options = options
        self.device = torch.device(device or "cpu")
        self.emit = emit
        self.finished = finished
        self.failed = failed
        self.produced = 0                  # frames emitted
        self.consumed = 0                  # windows taken by the renderer
        self.cancel = threading.Event()
        self._groups: "queue.Queue" = queue.Queue()
        self._tags: Deque[Hashable] = deque()   # the tag of each window taken and not yet emitted
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the render thread."""
        self._thread = threading.Thread(target=self._render, name=f"session-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the render thread to end (after :meth:`stop` or :meth:`end`)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def put(self, windows: np.ndarray, tag: Hashable = None) -> None:
        """Queue (G, 80, 16) windows for rendering, in groups of at most MAX_GROUP."""
        for k in range(0, len(windows), MAX_GROUP):
            self._groups.put((windows[k:k + MAX_GROUP], tag))

    def end(self) -> None:
        """No more windows: the thread ends after rendering those queued."""
        self._groups.put(END)

    def stop(self) -> None:
        """Stop rendering (idempotent): the render thread ends at its next frame."""
        self.cancel.set()
        self._groups.put(END)

    def drain(self) -> int:
        """Drop the windows queued and not yet taken by the renderer; returns how many."""
        dropped, keep = 0, []
        while True:
            try:
                item = self._groups.get_nowait()
            except queue.Empty:
                break
            if item is END:
                keep.append(item)
            else:
                dropped += len(item[0])
        for item in keep:
            self._groups.put(item)
        return dropped

    def _window_groups(self):
        """The windows queued for rendering, in groups: whatever has arrived since the last group, up
        to MAX_GROUP windows. A session that keeps up gets each message's frames at once; one that
        falls behind its audio (the generator slower per frame in small batches than in large ones,
        as on a CPU) catches up in larger, cheaper batches instead of falling further behind."""
        waiting = None
        while True:
            item = self._groups.get() if waiting is None else waiting
            waiting = None
            if item is END or self.cancel.is_set():
                return
            parts, n = [item], len(item[0])
            while n < MAX_GROUP:
                try:
                    more = self._groups.get_nowait()
                except queue.Empty:
                    break
                if more is END or n + len(more[0]) > MAX_GROUP:
                    waiting = more
                    break
                parts.append(more)
                n += len(more[0])
            with self._lock:
                for windows, tag in parts:
                    self._tags.extend([tag] * len(windows))
                self.consumed += n
            yield parts[0][0] if len(parts) == 1 else np.concatenate([w for w, _ in parts])  # (G, 80, 16)

    def _render(self) -> None:
        opts = self.options
        try:
            composer = composer_for(self.avatar.img_size, opts.blend, self.device, opts.on_device)
            frames = render_windows(self.generate, self.avatar, self._window_groups(), n_out=None, loop=opts.loop,
                                    blend=opts.blend, cache_faces=True, composer=composer)
            try:
                for i, frame in enumerate(frames):
                    if self.cancel.is_set():
                        return
                    with self._lock:
                        tag = self._tags.popleft()
                    self.emit(i, frame, tag)
                    self.produced = i + 1
            finally:
                frames.close()
            if not self.cancel.is_set():
                self.finished(self.produced)
        except (Wav2LipError, StageStopped) as exc:
            self.failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug, but it must end this session, not the server
            log.exception("session %s: render failed", self.name)
            self.failed(f"internal error: {type(exc).__name__}: {exc}")
