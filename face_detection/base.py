from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from lipsync.core.errors import Wav2LipError

Box = Tuple[int, int, int, int]


class DetectorError(Wav2LipError, RuntimeError):
    """A detector that cannot be built or run (missing weights, unknown backend, bad frames)."""


class FaceDetector:
    """Base class: subclasses implement :meth:`_detect_batch` on validated frames."""

    name = "base"

    def detect(self, frames: Sequence[np.ndarray]) -> list[Optional[Box]]:
        frames = list(frames)
        if not frames:
            return []
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray) or f.ndim != 3 or f.shape[2] != 3:
                shape = getattr(f, "shape", None)
                raise DetectorError(f"frame {i}: expected a BGR image of shape (H, W, 3), got {shape}")
        return self._detect_batch(frames)

    def _detect_batch(self, frames: list[np.ndarray]) -> list[Optional[Box]]:
        raise NotImplementedError

    __call__ = detect


def clip_box(x1, y1, x2, y2, width: int, height: int) -> Optional[Box]:
    """Integer box clipped to the image; None when nothing of it is left."""
    x1, y1 = max(0, int(x1)), max(0, int(y1))
    x2, y2 = min(width, int(x2)), min(height, int(y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def box_iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
