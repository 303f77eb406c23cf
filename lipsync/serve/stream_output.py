"""What a streaming session sends, and the options it runs with: :class:`StreamOptions` (the
``serve.py`` flags), the bounded :class:`Outbox` between the render thread and the socket, the
:class:`IdleFrames` shown while no audio arrives, and JPEG encoding. The session itself is
:class:`lipsync.serve.sessions.StreamSession`.
"""
from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Deque, Optional, Tuple

import cv2
import numpy as np

import audio
from lipsync.core.errors import Wav2LipError
from lipsync.media.frames import source_index
from lipsync.render.avatar import Avatar
from lipsync.render.settings import DEFAULTS

SAMPLE_BYTES = 2                 # signed 16-bit PCM
IDLE_SWING_S = 1.0               # idle frames wander at most this far (seconds of video) from the next talk frame


@dataclass(frozen=True)
class StreamOptions:
    """How sessions run (``serve.py`` flags of the same names).

    ``idle_grace``: seconds past the expected arrival of the next audio message (the last one's
    arrival plus its duration) before idle frames start; negative: never send idle frames.
    ``idle_timeout``: seconds without audio after which the session ends with an error.
    ``send_buffer``: frames queued per session for a slow reader before the oldest are dropped (at
    least :data:`lipsync.serve.sessions.MAX_GROUP`: the render thread posts up to that many frames
    at once, which a reader that keeps up must not lose).
    ``max_pending``: frames of audio received but not yet rendered before the socket is no longer read.
    ``max_message_bytes``: the largest PCM message accepted (default 1 s of audio). ``on_device``:
    crop and paste on the generator's device (:class:`lipsync.render.gpu.TorchComposer`; None: on CUDA),
    as :func:`lipsync.render.engine.render` does.
    """

    blend: str = DEFAULTS["blend"]
    loop: str = DEFAULTS["loop"]
    on_device: Optional[bool] = None
    jpeg_quality: int = 80
    idle_grace: float = 0.25
    idle_timeout: float = 300.0
    send_buffer: int = 50
    max_pending: int = 100
    max_message_bytes: int = audio.SAMPLE_RATE * SAMPLE_BYTES


FrameSink = Callable[[str, int, np.ndarray], None]


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 BGR -> JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise Wav2LipError("internal error: JPEG encoding failed")
    return buf.tobytes()


class Outbox:
    """What one session has to send, bounded: at most ``capacity`` frames wait (talk and idle).

    Used from the event loop only (the render thread posts with ``loop.call_soon_threadsafe``).
    When full, the oldest idle frame is dropped first, else the oldest talk frame; ``dropped``
    counts the talk frames lost. Control messages (end, error) are never dropped.
    """

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.items: Deque[tuple] = deque()
        self.frames = 0
        self.dropped = 0
        self.dropped_idle = 0
        self.event = asyncio.Event()

    def put(self, item: tuple) -> None:
        kind = item[0]
        if kind in ("frame", "idle"):
            if self.frames >= self.capacity and not self._drop_one(incoming=kind):
                return
            self.frames += 1
        self.items.append(item)
        self.event.set()

    def _drop_one(self, incoming: str) -> bool:
        """Make room for one frame; False when the incoming (idle) frame should be dropped instead."""
        for kinds in (("idle",), ("frame",)):
            for k, item in enumerate(self.items):
                if item[0] in kinds:
                    del self.items[k]
                    self.frames -= 1
                    if item[0] == "idle":
                        self.dropped_idle += 1
                    else:
                        self.dropped += 1
                    return True
            if incoming == "idle":  # never push out a talk frame for an idle one
                self.dropped_idle += 1
                return False
        return True

    async def get(self) -> tuple:
        while not self.items:
            self.event.clear()
            await self.event.wait()
        item = self.items.popleft()
        if item[0] in ("frame", "idle"):
            self.frames -= 1
        return item


class IdleFrames:
    """What an idle session shows: the avatar's own source frames (no generation), JPEG-encoded once
    and shared by all sessions (at most ``max_items`` kept).

    The ``m``-th idle frame of a pause that began before talk frame ``k`` shows the source frame of
    talk position ``k + offset(m)``, where the offset goes 1, 2, ... up to about a second of video
    and back to 0, and again: the face keeps moving as in its video, continuing from the last talk
    frame, and when speech resumes at frame ``k`` the picture is at most that second away from
    where the talk frames go on. A photo avatar idles on its photo.
    """

    def __init__(self, quality: int, max_items: int = 512):
        self.quality = quality
        self.max_items = max_items
        self._cache: "OrderedDict[Tuple[str, int], bytes]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def offset(m: int, swing: int) -> int:
        """Offset of the ``m``-th idle frame of a pause: 1, 2, ..., swing, swing - 1, ..., 0, 1, ..."""
        if swing < 1:
            return 0
        p = (m + 1) % (2 * swing)
        return p if p <= swing else 2 * swing - p

    def source_of(self, avatar: Avatar, next_talk: int, m: int, loop: str) -> int:
        """The source frame of the ``m``-th idle frame before talk frame ``next_talk``."""
        n = avatar.n_frames or 1
        swing = max(1, round(avatar.fps * IDLE_SWING_S))
        return source_index(next_talk + self.offset(m, swing), n, loop)

    def jpeg(self, avatar: Avatar, j: int) -> bytes:
        """JPEG of source frame ``j`` (the first frame when the avatar's frames are not held in memory)."""
        frames = avatar.frames
        if frames is None:
            j = -1
        key = (avatar.key, j)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        frame = avatar.source.first_frame() if j < 0 else frames[j]
        data = encode_jpeg(frame, self.quality)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.max_items:
                self._cache.popitem(last=False)
        return data
