"""Face boxes per source frame: detection (every frame, or every k-th frame with the boxes in between
interpolated), the published padding and temporal smoothing, and a detection cache per video.

Raw detections are ``(x1, y1, x2, y2)`` pixel boxes or ``None``; the boxes the engine crops with are
``(y1, y2, x1, x2)``, the published order, after ``pads`` and smoothing.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np


import face_detection
from lipsync.core.fileio import atomic_write
from face_detection import DEFAULT_S3FD_PATH, Face, box_iou
from lipsync.render.settings import DEFAULTS
from lipsync.render.tracking import LARGEST, CutDetector, FaceTracker

Coords = Tuple[int, int, int, int]  # (y1, y2, x1, x2), the published order
Det = Optional[Tuple[int, int, int, int]]  # (x1, y1, x2, y2) or None
SMOOTH_T = 5  # the published smoothing window, frames
_UNKNOWN = object()
AUTO_DET_SIDE = 480  # --det_scale auto: detect on a copy whose shorter side is at most this (pixels)


@dataclass(frozen=True)
class DetectionSettings:
    """How faces are found. ``scale``: detect on frames resized by this factor (0 = auto: shorter
    side at most 480 px); ``every``: detect on every k-th frame (and the last), interpolate between,
    and detect every frame of a gap whose end boxes overlap less than ``jump_iou`` (a cut, a fast
    move, or a keyframe where a jittery detector is off) or where a face appears or vanishes (how
    close sparse boxes come: docs/inference.md). ``target``: which face (``--target_face``,
    :mod:`lipsync.render.tracking`). ``every=1, scale=1`` (the defaults here) is the published
    detection; the other defaults are the flags' (:mod:`lipsync.render.settings`)."""

    detector: str = DEFAULTS["face_detector"]
    s3fd_path: Optional[str] = DEFAULTS["s3fd_path"]
    batch_size: int = DEFAULTS["face_det_batch_size"]
    scale: float = 1.0
    every: int = 1
    jump_iou: float = DEFAULTS["det_jump_iou"]
    half: bool = False  # S3FD in fp16 (CUDA)
    target: str = DEFAULTS["target_face"]
    track_largest: bool = False  # target largest followed through the video (outside parity mode)

    def resolved_scale(self, frame_hw: Tuple[int, int]) -> float:
        if self.scale > 0:
            return self.scale
        return min(1.0, AUTO_DET_SIDE / max(1, min(frame_hw)))

    def identity(self) -> list:
        """What the boxes depend on (the detector's weights file and the chosen face included), for cache
        keys and avatars."""
        parts = [self.detector, self.scale, self.every, self.jump_iou] + self.weights()
        if self.target != LARGEST:  # largest per frame keeps the keys (and cached boxes) of before the rule existed
            parts.append(("target", self.target))
        elif self.track_largest:
            parts.append(("target", "largest, tracked"))
        return parts

    def weights(self) -> list:
        """The detector's weights file as [name, size in bytes] (S3FD with its file present), else []."""
        wpath = self.s3fd_path or DEFAULT_S3FD_PATH
        if self.detector == "sfd" and os.path.isfile(wpath):
            return [os.path.basename(wpath), os.stat(wpath).st_size]
        return []


# ------------------------------------------------------------------------------------------------
# Padding and smoothing (published)
# ------------------------------------------------------------------------------------------------
def smooth_boxes(boxes: np.ndarray, T: int = SMOOTH_T) -> np.ndarray:
    """The published temporal smoothing of (N, 4) boxes: each becomes the mean of a forward window
    of T boxes (the last T for the tail), truncated to int, in frame order."""
    boxes = boxes.copy()
    n = len(boxes)
    for i in range(n):
        window = boxes[max(0, n - T):] if i + T > n else boxes[i:i + T]
        boxes[i] = np.mean(window, axis=0)
    return boxes


def coords_from_detections(dets: Sequence[Det], frame_hw: Tuple[int, int], pads: Sequence[int],
                           smooth: bool) -> List[Optional[Coords]]:
    """Padded (top, bottom, left, right pixels), clipped and, per run of consecutive detections,
    smoothed boxes as (y1, y2, x1, x2); None where no face was found."""
    h, w = frame_hw
    pady1, pady2, padx1, padx2 = pads
    padded: List[Optional[list]] = []
    for d in dets:
        if d is None:
            padded.append(None)
            continue
        x1, y1, x2, y2 = d
        padded.append([max(0, x1 - padx1), max(0, y1 - pady1), min(w, x2 + padx2), min(h, y2 + pady2)])
    out: List[Optional[Coords]] = [None] * len(dets)
    i = 0
    while i < len(padded):
        if padded[i] is None:
            i += 1
            continue
        j = i
        while j < len(padded) and padded[j] is not None:
            j += 1
        run = np.array(padded[i:j], dtype=np.int64)
        if smooth:
            run = smooth_boxes(run)
        for k, (x1, y1, x2, y2) in enumerate(run.tolist()):
            out[i + k] = (y1, y2, x1, x2) if (x2 > x1 and y2 > y1) else None
        i = j
    return out


# ------------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------------
def interpolate(a: Det, b: Det, t: float) -> Det:
    """Box at fraction ``t`` (0..1) of the way from ``a`` to ``b`` (rounded to pixels); None when
    both are None (no face on either side)."""
    if a is None or b is None:
        return None
    return tuple(int(round(p + (q - p) * t)) for p, q in zip(a, b))  # type: ignore[return-value]


def needs_dense(a: Det, b: Det, jump_iou: float) -> bool:
    """Whether the frames between keyframe boxes ``a`` and ``b`` must be detected one by one."""
    if a is None or b is None:
        return (a is None) != (b is None)  # a face appears or vanishes in between
    return box_iou(a, b) < jump_iou


class FaceFinder:
    """Runs a detector over a stream of frames, on a downscaled copy and (with ``every`` > 1) only on
    keyframes, and follows the face ``settings.target`` chooses (:class:`FaceTracker`; scene cuts
    from :class:`CutDetector` on every frame). Holds at most ``every * batch_size`` downscaled
    frames."""

    def __init__(self, settings: DetectionSettings, device, timer: Optional[Callable[[float], None]] = None):
        self.s = settings
        self.detector = face_detection.get_detector(settings.detector, device=device, weights_path=settings.s3fd_path,
                                     **({"half": True} if settings.half and settings.detector == "sfd" else {}))
        self.timer = timer
        self.dense_frames = 0  # frames detected one by one between keyframes (cuts, jumps)
        self.tracker = FaceTracker(settings.target, track_largest=settings.track_largest)
        self.cuts = CutDetector()

    def _detect(self, small: List[np.ndarray], scale: float) -> List[List[Face]]:
        """Every face of each downscaled frame, its box (and landmarks) in full-frame pixels."""
        t0 = time.perf_counter()
        found = []
        for k in range(0, len(small), self.s.batch_size):
            for faces in self.detector.detect_all(small[k:k + self.s.batch_size]):
                found.append([f if scale == 1.0 else
                              Face(tuple(int(round(v / scale)) for v in f.box), f.score,
                                   None if f.landmarks is None else f.landmarks / scale) for f in faces])
        if self.timer is not None:
            self.timer(time.perf_counter() - t0)
        return found

    def run(self, frames: Iterable[np.ndarray], on_frame: Optional[Callable[[], None]] = None) -> List[Det]:
        """Boxes of the chosen face (raw: before pads and smoothing) for every frame of ``frames``
        (BGR (H, W, 3) uint8), in order; None where it is not found."""
        every = max(1, self.s.every)
        dets: List[Det] = []
        pending: List[np.ndarray] = []  # downscaled frames not yet resolved, from the last keyframe on
        cuts: List[bool] = []  # whether a scene cut comes before each pending frame
        carried = _UNKNOWN  # detection of pending[0] when it was the previous round's last keyframe
        scale = None
        for frame in frames:
            if scale is None:
                scale = self.s.resolved_scale(frame.shape[:2])
            pending.append(frame if scale == 1.0 else
                           cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
            cuts.append(self.cuts.is_cut(pending[-1]))
            if on_frame is not None:
                on_frame()
            if len(pending) >= every * self.s.batch_size + 1:
                resolved = self._resolve(pending, cuts, scale, every, carried)
                dets.extend(resolved[:-1])
                pending, cuts, carried = pending[-1:], cuts[-1:], resolved[-1]
        if pending:
            dets.extend(self._resolve(pending, cuts, scale, every, carried))
        return dets

    def _resolve(self, frames: List[np.ndarray], cuts: List[bool], scale: float, every: int,
                 first=_UNKNOWN) -> List[Det]:
        """Detections of ``frames``: ``frames[0]`` (already known when ``first`` is given: the tracker
        has seen it), every ``every``-th frame after it and the last frame are keyframes; the rest are
        interpolated, or detected one by one (and tracked in order) where the keyframes' boxes jump."""
        keys = list(range(0, len(frames), every))
        if keys[-1] != len(frames) - 1:
            keys.append(len(frames) - 1)
        todo = keys if first is _UNKNOWN else keys[1:]
        key_faces = dict(zip(todo, self._detect([frames[k] for k in todo], scale)))
        out: List[Det] = [None] * len(frames)
        out[0] = self.tracker.step(key_faces[0], cuts[0]) if first is _UNKNOWN else first
        for a, b in zip(keys, keys[1:]):
            ahead = self.tracker.copy()
            out[b] = ahead.step(key_faces[b], any(cuts[a + 1:b + 1]))
            inner = list(range(a + 1, b))
            if inner and needs_dense(out[a], out[b], self.s.jump_iou):
                self.dense_frames += len(inner)
                for k, faces in zip(inner, self._detect([frames[k] for k in inner], scale)):
                    out[k] = self.tracker.step(faces, cuts[k])
                out[b] = self.tracker.step(key_faces[b], cuts[b])
            else:
                for k in inner:
                    out[k] = interpolate(out[a], out[b], (k - a) / (b - a))
                self.tracker = ahead
        return out


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wav2lip", "detections")


class DetectionCache:
    """Raw detections per (video file, frame preparation, detection settings), as (N, 4) int32 .npy
    files (-1 rows: no face). ``directory=''`` disables it; None is :func:`default_cache_dir`."""

    def __init__(self, directory: Optional[str]):
        self.directory = default_cache_dir() if directory is None else directory

    def key(self, path: str, parts: list) -> str:
        st = os.stat(path)
        ident = [os.path.realpath(path), st.st_size, st.st_mtime_ns] + list(parts)
        return hashlib.sha1(repr(ident).encode("utf-8")).hexdigest()

    def load(self, key: str) -> Optional[List[Det]]:
        if not self.directory:
            return None
        path = os.path.join(self.directory, key + ".npy")
        try:
            arr = np.load(path)
        except (OSError, ValueError):
            return None  # absent or unreadable: detect again and overwrite it
        if arr.ndim != 2 or arr.shape[1] != 4:
            return None
        return array_to_boxes(arr)

    def save(self, key: str, dets: Sequence[Det]) -> None:
        if not self.directory:
            return
        os.makedirs(self.directory, exist_ok=True)
        arr = dets_to_array(dets)
        path = os.path.join(self.directory, key + ".npy")
        with atomic_write(path, ".npy") as tmp:
            np.save(tmp, arr)


def dets_to_array(dets: Sequence[Optional[Sequence[int]]]) -> np.ndarray:
    """(N, 4) int32, a row of -1 where there is no box."""
    return np.array([d if d is not None else (-1, -1, -1, -1) for d in dets], dtype=np.int32).reshape(-1, 4)


def array_to_boxes(arr: np.ndarray) -> list:
    """Inverse of :func:`dets_to_array`: tuples of ints, None for -1 rows."""
    return [None if r[0] < 0 else tuple(int(v) for v in r) for r in arr]
