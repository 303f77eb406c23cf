"""Face detection behind one contract.

A detector takes a batch of BGR uint8 frames (H, W, 3). ``detect`` returns, per frame, the best face
box ``(x1, y1, x2, y2)`` in pixel coordinates or ``None`` (the published contract);
``detect_all`` returns every face of each frame as :class:`Face` (box, score, optional 68 landmarks).
Backends, chosen by name (``BACKENDS``, the one list every ``--face_detector`` flag offers):

- ``sfd``: S3FD, the network of the face-alignment package, with weights read from a local file
  (default ``face_detection/detection/sfd/s3fd.pth``).
- ``lbp``: scikit-image's LBP frontal-face cascade; ships with scikit-image, needs no download.
- ``dlib_hog``: dlib's HOG frontal-face detector, built into the ``dlib-bin`` wheel.
- ``dlib_cnn``: dlib's MMOD CNN detector, its weights in the ``face-recognition-models`` package.
  The dlib backends are optional: ``pip install -r requirements-faces.txt``.

:func:`get_landmarker` gives dlib's 68-point shape predictor for a frame and a box.
"""
from __future__ import annotations

import os

from .base import Box, DetectorError, Face, FaceDetector, box_iou

DEFAULT_S3FD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detection", "sfd", "s3fd.pth")
S3FD_URL = "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth"
BACKENDS = ("sfd", "lbp", "dlib_hog", "dlib_cnn")
BACKENDS_HELP = ("sfd: S3FD (needs s3fd.pth), as published; lbp: scikit-image's LBP cascade; dlib_hog, dlib_cnn: "
                 "dlib's HOG and MMOD CNN detectors (pip install -r requirements-faces.txt); only sfd needs a download")


def get_detector(name: str = "sfd", device="cpu", weights_path: str | None = None, **kwargs) -> FaceDetector:
    """Make a detector by backend name (one of ``BACKENDS``); ``device`` is a torch device or its name
    (S3FD only; the others run on the CPU). ``kwargs`` go to the backend's class. Raises
    :class:`DetectorError` for an unknown name, missing weights or a missing optional package."""
    if name == "sfd":
        from .sfd import S3FDDetector

        return S3FDDetector(device=device, weights_path=weights_path or DEFAULT_S3FD_PATH, **kwargs)
    if name == "lbp":
        from .lbp import LBPDetector

        return LBPDetector(**kwargs)
    if name in ("dlib_hog", "dlib_cnn"):
        from .dlib_faces import DlibDetector

        return DlibDetector(kind=name[len("dlib_"):], **kwargs)
    raise DetectorError(f"unknown face detector {name!r}; choose one of {BACKENDS}")


def get_landmarker(path: str | None = None):
    """dlib's 68-point shape predictor (:class:`face_detection.dlib_faces.Landmarker`): call it with a
    BGR (H, W, 3) frame and an (x1, y1, x2, y2) box for a (68, 2) float32 array of (x, y) pixels.
    ``path``: the model file (None: the one face-recognition-models installs). Raises
    :class:`DetectorError` naming the pip command when dlib or the model is missing."""
    from .dlib_faces import Landmarker

    return Landmarker(path)


__all__ = ["BACKENDS", "BACKENDS_HELP", "Box", "box_iou", "DEFAULT_S3FD_PATH", "DetectorError", "Face",
           "FaceDetector", "S3FD_URL", "get_detector", "get_landmarker"]
