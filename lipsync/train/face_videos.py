"""Short test videos made from real photographs, with the true box of every face in every frame.

The photographs are the ones installed packages ship (scikit-image's astronaut, matplotlib's
grace_hopper: :func:`lipsync.train.synthetic_faces.load_photo`); their faces' boxes by eye
(``PHOTOS[...]["face"]``, forehead to chin, cheek to cheek) are carried through the same warp that
places each head in the frame, so every frame knows where its faces are. Scenes (``SCENES``):

- ``moving``: one face moving across the frame and growing;
- ``two_faces``: two faces side by side, swaying;
- ``crossing``: one face passing in front of another (which is hidden for some frames);
- ``cut``: one face, then a cut to the other;
- ``rotations``: one face rolled from -25 to 25 degrees, then the other turned (a perspective
  foreshortening, "yaw") from -30 to 30 degrees.

A head is the photograph warped by a homography (scale, roll, yaw, translation) and pasted through a
soft ellipse about 1.6 times its face box (hair, ears, some neck and background of the photograph) onto
a smooth background. The true box of a face is the axis-aligned box of its face box's inscribed
ellipse after the warp, clipped to the frame; ``visible`` is the share of that ellipse inside the
frame and not covered by a head drawn later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from lipsync.train.synthetic_faces import PHOTOS, load_photo

Box = Tuple[int, int, int, int]  # (x1, y1, x2, y2) pixels
FRAME_SIZE = (320, 240)  # (width, height) pixels
SCENES = ("moving", "two_faces", "crossing", "cut", "rotations")
HEAD_AXES = (0.8, 0.85)  # the pasted head's half-axes, as fractions of the face box's width and height
YAW_FOCAL = 2.5  # distance of the simulated camera, in face heights (how strong the yaw's perspective is)
ELLIPSE_POINTS = 64


@dataclass(frozen=True)
class Placement:
    """Where one photograph's face goes in a frame: ``center`` (x, y) pixels of the face box's centre,
    ``height``: face box height in pixels, ``roll``: in-plane rotation in degrees (counter-clockwise),
    ``yaw``: simulated turn in degrees (a perspective foreshortening of one side)."""

    photo: str
    center: Tuple[float, float]
    height: float
    roll: float = 0.0
    yaw: float = 0.0


@dataclass(frozen=True)
class TrueFace:
    """A face in a frame: ``box`` (x1, y1, x2, y2) integer pixels, ``visible`` in [0, 1] (see the module)."""

    photo: str
    box: Box
    visible: float


@dataclass
class FaceVideo:
    """``frames``: (H, W, 3) uint8 BGR images; ``faces``: per frame, its :class:`TrueFace` s in drawing order."""

    name: str
    frames: List[np.ndarray]
    faces: List[List[TrueFace]]


def _homography(p: Placement) -> np.ndarray:
    """3x3 map from photograph pixels to frame pixels for placement ``p``."""
    x1, y1, x2, y2 = PHOTOS[p.photo]["face"]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    s = p.height / (y2 - y1)
    a, r = np.radians(p.yaw), np.radians(p.roll)
    to_origin = np.array([[s, 0, -s * cx], [0, s, -s * cy], [0, 0, 1]])
    roll = np.array([[np.cos(r), np.sin(r), 0], [-np.sin(r), np.cos(r), 0], [0, 0, 1]])
    yaw = np.array([[np.cos(a), 0, 0], [0, 1, 0], [np.sin(a) / (YAW_FOCAL * p.height), 0, 1]])
    to_frame = np.array([[1, 0, p.center[0]], [0, 1, p.center[1]], [0, 0, 1]])
    return to_frame @ yaw @ roll @ to_origin


def _ellipse(photo: str, axes: Tuple[float, float]) -> np.ndarray:
    """(ELLIPSE_POINTS, 2) points (x, y) in photograph pixels of an ellipse about the face box's
    centre with half-axes ``axes`` times its width and height."""
    x1, y1, x2, y2 = PHOTOS[photo]["face"]
    t = np.linspace(0, 2 * np.pi, ELLIPSE_POINTS, endpoint=False)
    return np.stack([(x1 + x2) / 2 + axes[0] * (x2 - x1) * np.cos(t),
                     (y1 + y2) / 2 + axes[1] * (y2 - y1) * np.sin(t)], axis=1)


def _warp_points(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(pts.reshape(-1, 1, 2).astype(np.float64), h).reshape(-1, 2)


def _background(size: Tuple[int, int], seed: int) -> np.ndarray:
    """A smooth vertical gradient with a little sensor noise, (H, W, 3) float32."""
    w, h = size
    rng = np.random.default_rng(seed)
    top, bottom = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = top * (1 - ramp) + bottom * ramp + rng.normal(0, 2.0, (h, w, 3))
    return np.broadcast_to(img, (h, w, 3)).astype(np.float32)


def render_frame(placements: Sequence[Placement], size: Tuple[int, int] = FRAME_SIZE, seed: int = 0,
                 photos: Optional[Dict[str, np.ndarray]] = None) -> Tuple[np.ndarray, List[TrueFace]]:
    """One frame of ``size`` (width, height) with the heads of ``placements`` drawn in order (later on
    top): the (H, W, 3) uint8 BGR frame and its :class:`TrueFace` s, in the same order. ``photos``:
    name -> BGR photograph, to skip loading them."""
    photos = photos if photos is not None else {}
    w, h = size
    frame = _background(size, seed).copy()
    warped = []
    for p in placements:
        img = photos.get(p.photo)
        if img is None:
            img = photos[p.photo] = load_photo(p.photo)
        hom = _homography(p)
        head = np.zeros(img.shape[:2], np.float32)
        cv2.fillPoly(head, [np.round(_ellipse(p.photo, HEAD_AXES)).astype(np.int32)], 1.0)
        fw = PHOTOS[p.photo]["face"][2] - PHOTOS[p.photo]["face"][0]
        head = cv2.GaussianBlur(head, (0, 0), 0.08 * fw)
        alpha = cv2.warpPerspective(head, hom, size, flags=cv2.INTER_LINEAR)[..., None]  # (H, W, 1)
        pixels = cv2.warpPerspective(img, hom, size, flags=cv2.INTER_LINEAR).astype(np.float32)
        frame = frame * (1 - alpha) + pixels * alpha
        outline = _warp_points(hom, _ellipse(p.photo, (0.5, 0.5)))
        face_mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(face_mask, [np.round(outline).astype(np.int32)], 1)
        warped.append((p.photo, outline, face_mask, alpha[..., 0]))
    faces = []
    for i, (photo, outline, face_mask, _) in enumerate(warped):
        covered = np.zeros((h, w), bool)
        for _, _, _, later_alpha in warped[i + 1:]:
            covered |= later_alpha > 0.5
        area = max(1.0, cv2.contourArea(outline.astype(np.float32)))
        visible = float((face_mask.astype(bool) & ~covered).sum() / area)
        x1, y1 = np.floor(outline.min(axis=0)).astype(int)
        x2, y2 = np.ceil(outline.max(axis=0)).astype(int)
        box = (max(0, int(x1)), max(0, int(y1)), min(w, int(x2)), min(h, int(y2)))
        faces.append(TrueFace(photo, box, min(1.0, visible)))
    return np.clip(frame + 0.5, 0, 255).astype(np.uint8), faces


def scene_placements(name: str, n_frames: int, size: Tuple[int, int] = FRAME_SIZE) -> List[List[Placement]]:
    """The placements of each of ``n_frames`` frames of scene ``name`` (one of ``SCENES``), in drawing
    order. Face heights are half the frame's height, about the smallest dlib's detectors find without
    upsampling. Raises ValueError for an unknown scene."""
    w, h = size
    fh = 0.5 * h
    out = []
    for k in range(n_frames):
        t = k / max(1, n_frames - 1)  # 0..1 through the clip
        sway = np.sin(2 * np.pi * t)
        if name == "moving":
            frame = [Placement("astronaut", (w * (0.28 + 0.44 * t), h * (0.5 + 0.06 * sway)), fh * (0.95 + 0.2 * t),
                               roll=4 * sway)]
        elif name == "two_faces":
            frame = [Placement("astronaut", (w * 0.27 + 4 * sway, h * 0.5), fh * 0.95),
                     Placement("grace_hopper", (w * 0.73 - 4 * sway, h * 0.52), fh * 0.95)]
        elif name == "crossing":
            frame = [Placement("grace_hopper", (w * 0.55, h * 0.5), fh * 0.95),
                     Placement("astronaut", (w * (0.18 + 0.7 * t), h * 0.52), fh)]
        elif name == "cut":
            frame = [Placement("astronaut", (w * 0.45, h * 0.5), fh) if t < 0.5 else
                     Placement("grace_hopper", (w * 0.55, h * 0.52), fh)]
        elif name == "rotations":  # the first half rolls, the second half turns
            half = max(1, n_frames // 2)
            if k < half:
                frame = [Placement("astronaut", (w * 0.5, h * 0.5), fh, roll=-25 + 50 * k / max(1, half - 1))]
            else:
                u = (k - half) / max(1, n_frames - half - 1)
                frame = [Placement("grace_hopper", (w * 0.5, h * 0.5), fh, yaw=-30 + 60 * u)]
        else:
            raise ValueError(f"unknown scene {name!r}; choose one of {SCENES}")
        out.append(frame)
    return out


def make_video(name: str, n_frames: int = 12, size: Tuple[int, int] = FRAME_SIZE, seed: int = 0) -> FaceVideo:
    """Scene ``name`` as ``n_frames`` frames of ``size`` (width, height) pixels, with its true faces."""
    photos: Dict[str, np.ndarray] = {}
    frames, faces = [], []
    for placements in scene_placements(name, n_frames, size):
        frame, truth = render_frame(placements, size, seed, photos)
        frames.append(frame)
        faces.append(truth)
    return FaceVideo(name, frames, faces)


def make_videos(n_frames: int = 12, size: Tuple[int, int] = FRAME_SIZE, scenes: Sequence[str] = SCENES) -> List[FaceVideo]:
    """:func:`make_video` for each of ``scenes``."""
    return [make_video(s, n_frames, size, seed=i) for i, s in enumerate(scenes)]


def score_detections(video: FaceVideo, detections: Sequence[Sequence[Sequence[int]]], min_visible: float = 0.6,
                     hit_iou: float = 0.3) -> Dict[str, float]:
    """How well ``detections`` (per frame of ``video``, every (x1, y1, x2, y2) box found) find its faces.

    Detections and true faces are matched greedily by IoU (highest first, one to one, IoU >= ``hit_iou``).
    A true face counts when at least ``min_visible`` of it shows. Returns ``faces`` (true faces counted),
    ``hits`` (those matched), ``recall`` (hits / faces), ``mean_iou`` (over the hits; 0 without any) and
    ``false_positives`` (detections matching no true face, hidden ones included). Raises ValueError when
    there are not as many detection lists as frames.
    """
    if len(detections) != len(video.faces):
        raise ValueError(f"{len(detections)} detection lists for {len(video.faces)} frames")
    from face_detection import box_iou

    faces = hits = false_positives = 0
    ious: List[float] = []
    for truth, found in zip(video.faces, detections):
        pairs = sorted(((box_iou(t.box, d), i, j) for i, t in enumerate(truth) for j, d in enumerate(found)),
                       reverse=True)
        matched_t, matched_d = set(), set()
        for iou, i, j in pairs:
            if iou >= hit_iou and i not in matched_t and j not in matched_d:
                matched_t.add(i)
                matched_d.add(j)
                if truth[i].visible >= min_visible:
                    ious.append(iou)
        counted = [i for i, t in enumerate(truth) if t.visible >= min_visible]
        faces += len(counted)
        hits += sum(1 for i in counted if i in matched_t)
        false_positives += len(found) - len(matched_d)
    return {"faces": faces, "hits": hits, "recall": hits / faces if faces else 0.0,
            "mean_iou": float(np.mean(ious)) if ious else 0.0, "false_positives": false_positives}
