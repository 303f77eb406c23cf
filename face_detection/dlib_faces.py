"""dlib backends: the HOG frontal-face detector built into dlib, the MMOD CNN detector, and the
68-point shape predictor. Nothing is downloaded: the code comes with the ``dlib-bin`` wheel and the two
model files (``mmod_human_face_detector.dat``, ``shape_predictor_68_face_landmarks.dat``) with the
``face-recognition-models`` package (``pip install -r requirements-faces.txt``).

The files are found through the package's import spec, without importing it: its ``__init__`` imports
``pkg_resources``, which new setuptools no longer has.

Terms (README, "Licence"): dlib is under the Boost Software License; the MMOD detector is Davis
King's, released into the public domain (CC0 in the package); the 68-point model is trained on iBUG
300-W, whose licence forbids commercial use.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence, Tuple

import cv2
import numpy as np

from .base import Box, DetectorError, Face, FaceDetector, grow_box

PIP_FACES = "pip install -r requirements-faces.txt (or: pip install dlib-bin face-recognition-models)"
MMOD_FILE = "mmod_human_face_detector.dat"
LANDMARKS_FILE = "shape_predictor_68_face_landmarks.dat"
# growth of each detector's own box to the forehead-to-chin extent S3FD reports, as (top, bottom,
# sides) fractions of its height and width: the mean over the two bundled photographs (astronaut,
# grace_hopper) of the gap to their boxes by eye (lipsync.train.synthetic_faces.PHOTOS)
GROW = {"hog": (0.08, 0.04, 0.03), "cnn": (0.03, 0.19, 0.09)}
N_LANDMARKS = 68  # iBUG 300-W's points, in its order


def import_dlib():
    """The ``dlib`` module; :class:`DetectorError` naming the pip command when it is not installed."""
    try:
        import dlib
    except ImportError:
        raise DetectorError(f"dlib is not installed (the dlib_hog and dlib_cnn detectors and the landmark mask need it): "
                            f"{PIP_FACES}") from None
    return dlib


def model_path(filename: str) -> str:
    """Path of ``filename`` (``MMOD_FILE`` or ``LANDMARKS_FILE``) inside the installed
    face-recognition-models package (never imported, see the module's note). Raises
    :class:`DetectorError` naming the pip command when the package or the file is missing."""
    spec = importlib.util.find_spec("face_recognition_models")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "models", filename)
        if os.path.isfile(path):
            return path
    raise DetectorError(f"{filename} not found: it comes with the face-recognition-models package: {PIP_FACES}")


def landmarks_available() -> bool:
    """Whether dlib and its 68-point model are installed (``--mask auto`` then means ``landmarks``)."""
    try:
        import_dlib(), model_path(LANDMARKS_FILE)
    except DetectorError:
        return False
    return True


def _rgb(frame: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))


def _ungrow(box: Box, grow: Tuple[float, float, float]) -> Tuple[float, float, float, float]:
    """Inverse of :func:`face_detection.base.grow_box` (before clipping): the detector's own box."""
    x1, y1, x2, y2 = box
    top, bottom, sides = grow
    bw, bh = (x2 - x1) / (1 + 2 * sides), (y2 - y1) / (1 + top + bottom)
    return x1 + sides * bw, y1 + top * bh, x2 - sides * bw, y2 - bottom * bh


class Landmarker:
    """dlib's 68-point shape predictor (Kazemi & Sullivan 2014, trained by dlib on iBUG 300-W).

    :meth:`landmarks` takes a BGR uint8 (H, W, 3) frame and a face box in this package's convention
    ((x1, y1, x2, y2) pixels, forehead to chin, as any backend's :meth:`FaceDetector.detect` returns) and
    gives a (68, 2) float32 array of (x, y) pixels in iBUG 300-W order (0-16 jaw, 17-26 brows, 27-35
    nose, 36-47 eyes, 48-67 mouth). The box is shrunk back to the HOG detector's own box first, the
    boxes the predictor was trained with. Raises :class:`DetectorError` when dlib or the model file is
    missing (the message names the pip command).
    """

    def __init__(self, path: str | None = None):
        dlib = import_dlib()
        self._dlib = dlib
        self.predictor = dlib.shape_predictor(path or model_path(LANDMARKS_FILE))

    def landmarks(self, frame: np.ndarray, box: Sequence[int], rgb: np.ndarray | None = None) -> np.ndarray:
        """(68, 2) float32 (x, y) pixels of the face in ``box`` (see the class); ``rgb``: the frame already
        converted to RGB, to skip the conversion."""
        x1, y1, x2, y2 = (int(round(v)) for v in _ungrow(tuple(box), GROW["hog"]))
        shape = self.predictor(_rgb(frame) if rgb is None else rgb, self._dlib.rectangle(x1, y1, x2, y2))
        return np.array([(p.x, p.y) for p in shape.parts()], np.float32).reshape(N_LANDMARKS, 2)  # (68, 2) x, y

    __call__ = landmarks


class DlibDetector(FaceDetector):
    """dlib's face detectors. ``kind="hog"``: the HOG + linear SVM frontal-face detector built into dlib
    (score: the SVM margin, > 0); ``kind="cnn"``: the MMOD CNN detector (King 2015,
    ``mmod_human_face_detector.dat``; score: its confidence, > 0). Both find faces from about 80 pixels
    high; ``upsample`` doubles the frame that many times first to find smaller ones (about 4x the time
    each). Boxes are grown to the forehead-to-chin extent (``GROW``); ``landmarks=True`` adds the
    68 points of :class:`Landmarker` to every face. Faces come highest score first. Raises
    :class:`DetectorError` naming the pip command when dlib or the model file is missing.
    """

    def __init__(self, kind: str = "hog", upsample: int = 0, landmarks: bool = False,
                 mmod_path: str | None = None, landmarks_path: str | None = None):
        if kind not in GROW:
            raise DetectorError(f"unknown dlib detector {kind!r}; choose one of {sorted(GROW)}")
        dlib = import_dlib()
        self.kind, self.name, self.upsample = kind, f"dlib_{kind}", int(upsample)
        if kind == "hog":
            self.net = dlib.get_frontal_face_detector()
        else:
            self.net = dlib.cnn_face_detection_model_v1(mmod_path or model_path(MMOD_FILE))
        self.landmarker = Landmarker(landmarks_path) if landmarks else None

    def _raw(self, rgb: np.ndarray):
        """(left, top, right, bottom, score) of each face, in pixels, as dlib reports them."""
        if self.kind == "hog":
            rects, scores, _ = self.net.run(rgb, self.upsample, 0.0)
            return [(r.left(), r.top(), r.right(), r.bottom(), s) for r, s in zip(rects, scores)]
        return [(d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom(), d.confidence)
                for d in self.net(rgb, self.upsample)]

    def _detect_one(self, frame: np.ndarray) -> list[Face]:
        h, w = frame.shape[:2]
        rgb = _rgb(frame)
        faces = []
        for left, top, right, bottom, score in sorted(self._raw(rgb), key=lambda r: -r[4]):
            box = grow_box(left, top, right, bottom, GROW[self.kind], w, h)
            if box is None:
                continue
            points = None if self.landmarker is None else self.landmarker.landmarks(frame, box, rgb=rgb)
            faces.append(Face(box, float(score), points))
        return faces

    def _detect_all_batch(self, frames):
        return [self._detect_one(f) for f in frames]
