"""Face detection behind one contract.

A detector takes a batch of BGR uint8 frames (H, W, 3) and returns, per frame, the best face box
``(x1, y1, x2, y2)`` in pixel coordinates or ``None``. Backends, chosen by name:

- ``sfd``: S3FD, the network of the face-alignment package, with weights read from a local file
  (default ``face_detection/detection/sfd/s3fd.pth``).
- ``lbp``: scikit-image's LBP frontal-face cascade; ships with scikit-image, needs no download.
"""
from __future__ import annotations

import os

from .base import Box, DetectorError, FaceDetector, box_iou

DEFAULT_S3FD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detection", "sfd", "s3fd.pth")
S3FD_URL = "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"
BACKENDS = ("sfd", "lbp")


def get_detector(name: str = "sfd", device="cpu", weights_path: str | None = None, **kwargs) -> FaceDetector:
    """Make a detector by backend name; ``device`` is a torch device or its name."""
    if name == "sfd":
        from .sfd import S3FDDetector

        return S3FDDetector(device=device, weights_path=weights_path or DEFAULT_S3FD_PATH, **kwargs)
    if name == "lbp":
        from .lbp import LBPDetector

        return LBPDetector(**kwargs)
    raise DetectorError(f"unknown face detector {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Box", "box_iou", "DEFAULT_S3FD_PATH", "DetectorError", "FaceDetector", "S3FD_URL", "get_detector"]
