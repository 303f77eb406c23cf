from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from lipsync.core.errors import Wav2LipError

Box = Tuple[int, int, int, int]


class DetectorError(Wav2LipError, RuntimeError):
    """A detector that cannot be built or run (missing weights or package, unknown backend, bad frames)."""


@dataclass(frozen=True)
class Face:
    """One face found in a frame.

    ``box``: (x1, y1, x2, y2) in integer pixels of the frame, x to the right, y down, clipped to the
    frame, forehead to chin and cheek to cheek (the extent S3FD reports; the other backends grow their
    own boxes to it). ``score``: the backend's confidence (S3FD: softmax probability in (0, 1]; dlib:
    the detector's margin or confidence, unbounded; lbp: 1.0, the cascade gives none). ``landmarks``:
    None, or a (68, 2) float32 array of (x, y) pixels in the iBUG 300-W point order (0-16 jaw,
    48-67 mouth) when the backend was asked for them.
    """

    box: Box
    score: float
    landmarks: Optional[np.ndarray] = None


class FaceDetector:
    """Base class: subclasses implement :meth:`_detect_all_batch` on validated frames.

    :meth:`detect_all` returns every face of every frame; :meth:`detect` (also ``__call__``) returns one
    box per frame, the backend's best face (:meth:`best`), or None: the published single-face contract.
    """

    name = "base"

    def detect_all(self, frames: Sequence[np.ndarray]) -> list[list[Face]]:
        """Every face of each frame. ``frames``: BGR uint8 images of shape (H, W, 3) (sizes may differ).
        Returns one list per frame, best face first (the order :meth:`best` picks from). Raises
        :class:`DetectorError` for a frame that is not (H, W, 3)."""
        frames = list(frames)
        if not frames:
            return []
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray) or f.ndim != 3 or f.shape[2] != 3:
                shape = getattr(f, "shape", None)
                raise DetectorError(f"frame {i}: expected a BGR image of shape (H, W, 3), got {shape}")
        return self._detect_all_batch(frames)

    def detect(self, frames: Sequence[np.ndarray]) -> list[Optional[Box]]:
        """One (x1, y1, x2, y2) pixel box per frame (the best face, see :meth:`detect_all`) or None."""
        return [faces[0].box if faces else None for faces in self.detect_all(frames)]

    def _detect_all_batch(self, frames: list[np.ndarray]) -> list[list[Face]]:
        raise NotImplementedError

    __call__ = detect


def clip_box(x1, y1, x2, y2, width: int, height: int) -> Optional[Box]:
    """Integer box clipped to the image; None when nothing of it is left."""
    x1, y1 = max(0, int(x1)), max(0, int(y1))
    x2, y2 = min(width, int(x2)), min(height, int(y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def grow_box(x1, y1, x2, y2, grow: Tuple[float, float, float], width: int, height: int) -> Optional[Box]:
    """A backend's own box grown to the contract's forehead-to-chin extent and clipped to the image.
    ``grow``: (top, bottom, sides) as fractions of the box's width (sides) and height (top, bottom)."""
    top, bottom, sides = grow
    bw, bh = x2 - x1, y2 - y1
    return clip_box(x1 - sides * bw, y1 - top * bh, x2 + sides * bw, y2 + bottom * bh, width, height)


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
