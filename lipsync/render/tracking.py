"""Which face to lip-sync when a frame has several (``--target_face``), and following it through a video.

The rule (:func:`parse_target_face`) picks a face on the first frame with faces, and again after
every scene cut (:class:`CutDetector`):

- ``largest`` (the default): the detector's best face (lbp: the largest box; S3FD and dlib: the highest
  score, on real footage nearly always the largest face) on the first frame with faces, then followed
  like the others; a frame where it is not found gets that frame's best face (the published pick). In
  parity mode (:attr:`lipsync.render.boxes.DetectionSettings.track_largest` False) it is each frame's
  best face, untracked, exactly as the published script picks, so the published frames stay bit for
  bit (with two faces that can jump between them, and the 5-frame smoothing then averages boxes of both);
- ``N``: the N-th face from the left (by box centre), 0-based;
- ``X,Y``: the face whose box contains pixel (X, Y) of the frame (as inference sees it: after
  ``--crop``, ``--resize_factor`` and ``--rotate``), else the one whose box is nearest to it.

Between cuts :class:`FaceTracker` follows the picked face by continuity: each frame's faces are
matched one to one with the faces of the frame before (greedily, the smallest move first: centre
distance over the previous box's width, the centre of the 68 landmarks where the detector gives
them, and a limit on the change of size). A face that vanishes (hidden, out of the frame) is kept
as a lost track, and a face that reappears near where it was last seen is the same face again,
unless an other face's track claims that detection first. While the chosen face is lost its frames
have no box (they pass through unchanged); other faces are never chosen in its place.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from face_detection import Face
from lipsync.core.settings import SettingError

Det = Optional[Tuple[int, int, int, int]]  # (x1, y1, x2, y2) pixels or None
LARGEST = "largest"
TARGET_FACE_HELP = ("which face to lip-sync when there are several: largest (the detector's best face on the first "
                    "frame with faces; in parity mode each frame's best, as published); N (the N-th face from the left, "
                    "0-based, "
                    "on the first frame with faces); or X,Y (the face whose box contains, else is nearest to, that "
                    "pixel of the first frame). Followed through the video; picked again after a scene cut")
MAX_MOVE = 0.6       # a face moves at most this many of its box widths between two detected frames
MAX_SCALE = 1.6      # ... and its box width changes by at most this factor
CUT_DISTANCE = 0.3   # Bhattacharyya distance of colour histograms over which two frames are a scene cut
CUT_BINS = 8         # histogram bins per colour channel
CUT_SIZE = (64, 48)  # (width, height) the frame is reduced to before its histogram


def target_rule(text: str) -> Tuple[str, object]:
    """``--target_face`` as ``("largest", None)``, ``("index", N)`` or ``("point", (X, Y))``.
    Raises :class:`SettingError` (a ValueError) naming the accepted forms for anything else."""
    value = str(text).strip().lower()
    if value == LARGEST:
        return LARGEST, None
    parts = value.replace(" ", "").split(",")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(parts) == 1 and numbers and numbers[0] >= 0:
        return "index", numbers[0]
    if len(parts) == 2 and len(numbers) == 2 and min(numbers) >= 0:
        return "point", (numbers[0], numbers[1])
    raise SettingError(f"--target_face must be largest, a face number N >= 0 or a pixel X,Y; got {text!r}")


def parse_target_face(text: str) -> str:
    """``--target_face``'s text, checked (:func:`target_rule`) and normalised (``"largest"``, ``"1"``,
    ``"120,80"``); argparse.ArgumentTypeError for a malformed one."""
    try:
        kind, value = target_rule(text)
    except SettingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return LARGEST if kind == LARGEST else str(value) if kind == "index" else "%d,%d" % value


def is_target_face(text) -> bool:
    """Whether ``text`` is a valid ``--target_face`` (for form fields)."""
    try:
        target_rule(text)
    except SettingError:
        return False
    return True


def pick(faces: Sequence[Face], target: str) -> Optional[int]:
    """Index into ``faces`` of the face ``target`` (``--target_face``) picks, or None (no faces, or
    fewer than N + 1)."""
    if not faces:
        return None
    kind, value = target_rule(target)
    boxes = [f.box for f in faces]
    if kind == LARGEST:  # the backend's best (see the module)
        return 0
    if kind == "index":
        order = sorted(range(len(boxes)), key=lambda i: (boxes[i][0] + boxes[i][2], i))
        return order[value] if value < len(order) else None
    x, y = value

    def gap(i):  # distance from the pixel to the box (0 inside), then to its centre
        x1, y1, x2, y2 = boxes[i]
        outside = np.hypot(max(x1 - x, 0, x - x2), max(y1 - y, 0, y - y2))
        return outside, np.hypot((x1 + x2) / 2 - x, (y1 + y2) / 2 - y)

    return min(range(len(boxes)), key=gap)


def _centre(face: Face) -> np.ndarray:
    if face.landmarks is not None:
        return np.asarray(face.landmarks, np.float64).mean(axis=0)
    x1, y1, x2, y2 = face.box
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2])


def move_cost(before: Face, after: Face) -> float:
    """How far ``after`` is from ``before``, in ``before``'s box widths (centres: landmarks' where both
    have them); infinite when the width changes by more than MAX_SCALE."""
    wa, wb = before.box[2] - before.box[0], after.box[2] - after.box[0]
    if wa <= 0 or wb <= 0 or max(wa / wb, wb / wa) > MAX_SCALE:
        return float("inf")
    a, b = (_centre(before), _centre(after)) if (before.landmarks is None) == (after.landmarks is None) else \
        (_centre(Face(before.box, 0.0)), _centre(Face(after.box, 0.0)))
    return float(np.hypot(*(b - a)) / wa)


@dataclass
class FaceTracker:
    """Follows the face ``target`` picks (see the module) through frames given in order to
    :meth:`step`. ``tracks``: the last :class:`Face` of each face seen since the last cut, with
    whether the last frame had it; ``chosen``: the index of the chosen face's track (None: not yet
    picked). ``track_largest``: ``largest`` follows
    the face it picked, and on a frame without it gives that frame's best face (so no frame has fewer
    faces than with the published rule); False: each frame's best face, untracked (the published rule,
    parity mode)."""

    target: str = LARGEST
    tracks: List[Tuple[Face, bool]] = field(default_factory=list)
    chosen: Optional[int] = None
    track_largest: bool = False

    def __post_init__(self):
        largest = target_rule(self.target)[0] == LARGEST  # raises SettingError early
        self._per_frame = largest and not self.track_largest
        self._fallback = largest and self.track_largest

    def copy(self) -> "FaceTracker":
        """An independent copy (for looking ahead without moving this one)."""
        return FaceTracker(self.target, list(self.tracks), self.chosen, self.track_largest)

    def step(self, faces: Sequence[Face], cut: bool = False) -> Det:
        """The chosen face's (x1, y1, x2, y2) box in the next frame, whose faces are ``faces``, or None.
        ``cut``: a scene cut comes before this frame (forget every face, pick again)."""
        if self._per_frame:
            return tuple(faces[0].box) if faces else None
        if cut:
            self.tracks, self.chosen = [], None
        matched = self._match(faces)
        if self.chosen is None:
            i = pick(faces, self.target)
            self.chosen = None if i is None else next(t for t, f in matched.items() if f == i)
        if self.chosen is None or self.chosen not in matched:
            if self._fallback and faces:
                # tracked largest while its face is lost: this frame's best face, as the published rule
                # picks (never fewer frames with a face than it); the chosen face is still the one followed
                return tuple(int(v) for v in faces[0].box)
            return None
        return tuple(int(v) for v in faces[matched[self.chosen]].box)

    def _match(self, faces: Sequence[Face]) -> dict:
        """Match ``faces`` to the tracks (seen ones first, then the chosen face's if lost), update the
        tracks, start new ones; returns {track index: face index} of this frame's faces."""
        matched: dict = {}
        free = set(range(len(faces)))
        for seen in (True, False):
            pairs = sorted((move_cost(t, faces[j]), i, j) for i, (t, s) in enumerate(self.tracks)
                           if s == seen and (seen or i == self.chosen) for j in free)
            for cost, i, j in pairs:
                if cost <= MAX_MOVE and i not in matched and j in free:
                    matched[i] = j
                    free.discard(j)
        # unmatched tracks other than the chosen one are forgotten; new faces start tracks
        keep = [i for i in range(len(self.tracks)) if i in matched or i == self.chosen]
        old_chosen = self.chosen
        tracks = [(faces[matched[i]], True) if i in matched else (self.tracks[i][0], False) for i in keep]
        renumber = {i: k for k, i in enumerate(keep)}
        matched = {renumber[i]: j for i, j in matched.items()}
        for j in sorted(free):
            matched[len(tracks)] = j
            tracks.append((faces[j], True))
        self.tracks = tracks
        self.chosen = None if old_chosen is None else renumber[old_chosen]
        return matched


class CutDetector:
    """Scene cuts from colour histograms: :meth:`is_cut` says whether a BGR (H, W, 3) uint8 frame
    starts a new shot after the previous frame it was given (its CUT_BINS^3 histogram of a CUT_SIZE
    copy is more than CUT_DISTANCE away, Bhattacharyya; faces moving, turning or passing each other
    stay far below it on the test videos of lipsync.train.face_videos, a cut is above it)."""

    def __init__(self):
        self.previous: Optional[np.ndarray] = None

    def is_cut(self, frame: np.ndarray) -> bool:
        small = cv2.resize(frame, CUT_SIZE, interpolation=cv2.INTER_AREA)
        hist = cv2.calcHist([small], [0, 1, 2], None, [CUT_BINS] * 3, [0, 256] * 3)
        hist = cv2.normalize(hist, hist).flatten()
        previous, self.previous = self.previous, hist
        return previous is not None and cv2.compareHist(previous, hist, cv2.HISTCMP_BHATTACHARYYA) > CUT_DISTANCE
