"""LBP backend: scikit-image's frontal-face cascade (ships with scikit-image, no download).

The cascade finds the inner face (brows to mouth); the box is grown to the forehead-to-chin extent
that S3FD reports, so crops from both backends frame the face alike.
"""
from __future__ import annotations

import cv2
import numpy as np

from .base import Face, FaceDetector, box_iou, grow_box

# growth of the cascade's square box, as fractions of its side (measured on the bundled photographs)
GROW_TOP, GROW_BOTTOM, GROW_SIDES = 0.05, 0.20, 0.02
# a smaller box overlapping a kept larger one by more than this IoU is the same face at another scale
DUPLICATE_IOU = 0.3


class LBPDetector(FaceDetector):
    """scikit-image's LBP cascade on a grey, histogram-equalized copy whose longer side is at most
    ``max_side`` pixels; every face it finds, largest first (score 1.0: the cascade gives none)."""

    name = "lbp"

    def __init__(self, max_side: int = 320, scale_factor: float = 1.15, min_neighbors: int = 2):
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        self.cascade = Cascade(lbp_frontal_face_cascade_filename())
        self.max_side = max_side
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors

    def _detect_one(self, frame):
        h, w = frame.shape[:2]
        scale = min(1.0, self.max_side / max(h, w))
        small = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA) if scale < 1 else frame
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
        gray = cv2.equalizeHist(gray)
        sh, sw = gray.shape
        side = min(sh, sw)
        dets = self.cascade.detect_multi_scale(
            img=gray.astype(np.float32) / 255.0, scale_factor=self.scale_factor, step_ratio=1,
            min_size=(max(24, side // 8),) * 2, max_size=(side, side),
            min_neighbor_number=self.min_neighbors)
        faces = []
        for d in sorted(dets, key=lambda d: d["width"] * d["height"], reverse=True):
            x, y, bw, bh = (v / scale for v in (d["c"], d["r"], d["width"], d["height"]))
            box = grow_box(x, y, x + bw, y + bh, (GROW_TOP, GROW_BOTTOM, GROW_SIDES), w, h)
            if box is not None and all(box_iou(box, f.box) <= DUPLICATE_IOU for f in faces):
                faces.append(Face(box, 1.0))
        return faces

    def _detect_all_batch(self, frames):
        return [self._detect_one(f) for f in frames]
