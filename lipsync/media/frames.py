"""The frame source: a face video or photo, after ``--resize_factor``, ``--rotate`` and ``--crop``,
and the order in which output frames show source frames when the audio outlasts the video.

Frames are BGR uint8 arrays of shape (H, W, 3), decoded as they are needed (constant memory).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from lipsync.core.errors import Wav2LipError
from lipsync.media.video import is_image_path, iter_frames, probe_video, read_image

BACKWARD_SEGMENT = 32  # frames decoded at a time when playing the video backwards (pingpong)
LOOP_MODES = ("repeat", "pingpong")


class FrameSourceError(Wav2LipError, ValueError):
    """A face input that cannot be read or prepared; the message says what to change."""


@dataclass(frozen=True)
class FrameTransform:
    """What is done to every source frame before anything else, in the published order:
    downscale by ``resize_factor`` (integer division of width and height), rotate 90 degrees
    clockwise, crop to ``crop`` = (top, bottom, left, right) in pixels (-1: to the edge)."""

    resize_factor: int = 1
    rotate: bool = False
    crop: Tuple[int, int, int, int] = (0, -1, 0, -1)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """(H, W, 3) -> (H', W', 3); raises FrameSourceError when the crop leaves nothing."""
        if self.resize_factor > 1:
            w, h = frame.shape[1] // self.resize_factor, frame.shape[0] // self.resize_factor
            if not w or not h:
                raise FrameSourceError(f"--resize_factor {self.resize_factor} leaves nothing of a "
                                       f"{frame.shape[1]}x{frame.shape[0]} frame")
            frame = cv2.resize(frame, (w, h))
        if self.rotate:
            frame = cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)
        y1, y2, x1, x2 = self.crop
        x2 = frame.shape[1] if x2 == -1 else x2
        y2 = frame.shape[0] if y2 == -1 else y2
        frame = frame[y1:y2, x1:x2]
        if frame.size == 0:
            raise FrameSourceError(f"--crop {list(self.crop)} leaves nothing of the frame")
        return frame


class FaceSource:
    """A face video or photo as a stream of prepared frames.

    ``fps`` is the video's own rate (for a photo: the ``fps`` argument, frames/s). With ``static``
    (or a photo) the source is its first frame only. ``kind`` ("image" or "video") skips deciding
    what the file is. Raises FrameSourceError for a missing file and
    VideoError (from :mod:`lipsync.media.video`) for one ffmpeg cannot read.
    """

    def __init__(self, path: str, fps: float = 25.0, static: bool = False,
                 transform: FrameTransform = FrameTransform(), kind: Optional[str] = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FrameSourceError(f"--face file not found: {path!r}")
        self.path = path
        self.transform = transform
        self.is_image = is_image_path(path) if kind is None else kind == "image"
        if self.is_image:
            self.image = transform.apply(read_image(path))
            self.info = None
            self.fps = float(fps)
        else:
            self.info = probe_video(path)
            self.fps = self.info.fps
        self.static = self.is_image or static
        self.count: Optional[int] = 1 if self.static else None  # known after a full pass
        self._first: Optional[np.ndarray] = None

    @property
    def rate(self):
        """The exact frame rate (a Fraction where the container gives one), for writing output."""
        rate = getattr(self.info, "rate", None) if self.info is not None else None
        return rate if rate is not None else self.fps

    def first_frame(self) -> np.ndarray:
        """A copy of the first prepared frame, (H, W, 3) uint8."""
        if self._first is None:
            self._first = next(self.frames(), None)
            if self._first is None:
                raise FrameSourceError(f"no frames could be read from {self.path!r}")
        return self._first.copy()

    def frames(self, start: int = 0, end: Optional[int] = None) -> Iterator[np.ndarray]:
        """Prepared source frames [start, end) (just the first one for a photo or ``static``)."""
        if self.is_image:
            yield self.image.copy()
            return
        if self.static:
            end = 1
        for frame in iter_frames(self.info, self.fps, start, end):
            yield self.transform.apply(frame)


def source_index(i: int, n: int, loop: str) -> int:
    """Which of ``n`` source frames output frame ``i`` shows: ``repeat`` cycles 0..n-1, ``pingpong``
    plays forwards then backwards (0..n-1..1) without repeating the turning frames."""
    if n <= 1:
        return 0
    if loop == "pingpong":
        period = 2 * n - 2
        k = i % period
        return k if k < n else period - k
    return i % n


def output_order(src: FaceSource, n_out: Optional[int], loop: str) -> Iterator[Tuple[int, np.ndarray]]:
    """(source index, frame) for each of ``n_out`` output frames (endless with None), decoding as it
    goes (constant memory); the first pass also counts the source (``src.count``)."""
    if n_out is None:
        n_out = -1  # never reached
    if src.static:
        first = src.first_frame()
        i = 0
        while i != n_out:
            yield 0, first.copy()
            i += 1
        return
    produced = 0
    n = 0
    for frame in src.frames():
        yield n, frame
        n += 1
        produced += 1
        if produced == n_out:
            return
    src.count = n
    while produced < n_out:
        idx = source_index(produced, n, loop)
        backwards = loop == "pingpong" and n > 1 and (produced % (2 * n - 2)) >= n
        for k, frame in _segment(src, idx, n, loop, backwards):
            yield k, frame
            produced += 1
            if produced == n_out:
                return


def _segment(src: FaceSource, idx: int, n: int, loop: str, backwards: bool) -> Iterator[Tuple[int, np.ndarray]]:
    """One run of consecutive output frames starting at source frame ``idx``: backwards, a decoded
    segment ending at ``idx`` played reversed; forwards, up to the end (pingpong turns there)."""
    if backwards:
        start = max(1, idx - BACKWARD_SEGMENT + 1)
        segment = list(src.frames(start, idx + 1))
        yield from zip(range(idx, start - 1, -1), reversed(segment))
        return
    for k, frame in enumerate(src.frames(idx)):
        yield idx + k, frame
        if loop == "pingpong" and idx + k == n - 1:
            return


def frames_by_index(frames: Sequence[np.ndarray], n_out: Optional[int], loop: str
                    ) -> Iterator[Tuple[int, np.ndarray]]:
    """:func:`output_order` for frames already in memory (a prepared avatar's)."""
    n = len(frames)
    i = 0
    while i != (-1 if n_out is None else n_out):
        j = source_index(i, n, loop)
        yield j, frames[j].copy()
        i += 1
