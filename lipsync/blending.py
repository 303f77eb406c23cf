"""Pasting the generated face back into the frame.

``blend="none"`` is the published hard paste: the generated face, resized to the box, replaces the
box. ``blend="feather"`` mixes it in with a soft mask over the mouth and jaw (weights 0..1 at the
model's size, resized to the box), so the edge of the box never shows.
"""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

Coords = Tuple[int, int, int, int]  # (y1, y2, x1, x2), the published order


# ------------------------------------------------------------------------------------------------
def feather_mask(size: int) -> np.ndarray:
    """(size, size) weights: 1 over the mouth and jaw, fading to 0 towards the box edges and the
    upper face, so no seam shows where the generated face meets the frame."""
    mask = np.zeros((size, size), np.float32)
    top = int(size * 0.42)
    margin = int(size * 0.08)
    mask[top:size - margin // 2, margin:size - margin] = 1.0
    k = max(3, (size // 8) | 1)
    mask = cv2.GaussianBlur(mask, (k, k), size / 16)
    return mask


def paste(frame: np.ndarray, face: np.ndarray, coords: Coords, blend: str, mask: Optional[np.ndarray]):
    y1, y2, x1, x2 = coords
    face = cv2.resize(face, (x2 - x1, y2 - y1))
    if blend == "none":
        frame[y1:y2, x1:x2] = face
        return frame
    m = cv2.resize(mask, (x2 - x1, y2 - y1))[..., None]
    region = frame[y1:y2, x1:x2].astype(np.float32)
    frame[y1:y2, x1:x2] = np.clip(region + m * (face.astype(np.float32) - region) + 0.5, 0, 255).astype(np.uint8)
    return frame
