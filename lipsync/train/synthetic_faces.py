"""The faces of the synthetic corpus: identities made from real photographs, rendered with a drawn
mouth of a given opening and width, and that opening measured back from any frame.

The photographs are ones installed packages ship (scikit-image's astronaut, matplotlib's
grace_hopper), varied per identity: colour, scale, position, flip, small rotation, background, sensor
noise and a small head sway. The photograph's own mouth is painted over with skin and a drawn mouth
takes its place; how open and how wide it is per frame comes from the audio
(:func:`lipsync.train.synthetic.mouth_track`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

FRAME_SIZE = 256


# per photograph (in its own pixel coordinates): face box by eye, mouth centre and size, a cheek pixel.
# Grace Hopper's mouth opens half as far relative to her face as the astronaut's; scaled to the same
# share (29 pixels) the tiny generator no longer drew it (docs/demo.md).
PHOTOS = {
    "astronaut": dict(face=(172, 70, 272, 182), mouth=(224, 146), mouth_w=44, mouth_h=16, cheek=(193, 127)),
    "grace_hopper": dict(face=(160, 135, 372, 340), mouth=(267, 277), mouth_w=72, mouth_h=16, cheek=(215, 255)),
}


def load_photo(name: str) -> np.ndarray:
    if name == "astronaut":
        from skimage import data

        return cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    if name == "grace_hopper":
        import matplotlib.cbook as cbook

        return cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    raise ValueError(f"unknown photo {name!r}")


@dataclass
class Identity:
    photo: str
    face_height: float        # face height in output pixels
    center: Tuple[float, float]  # face centre in the output frame
    flip: bool
    angle: float              # degrees
    gains: Tuple[float, float, float]  # per-channel colour gains (B, G, R)
    background: Tuple[int, int, int]
    noise: float              # sensor noise sigma (grey levels)
    sway: float               # head motion amplitude (pixels)
    sway_period: float        # frames
    seed: int
    frame_size: int = FRAME_SIZE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Identity":
        d = dict(d)
        d["center"] = tuple(d["center"])
        d["gains"] = tuple(d["gains"])
        d["background"] = tuple(d["background"])
        return cls(**d)


def random_identity(rng: np.random.Generator, photo: Optional[str] = None, frame_size: int = FRAME_SIZE) -> Identity:
    photo = photo or str(rng.choice(sorted(PHOTOS)))
    s = frame_size
    return Identity(
        photo=photo,
        face_height=float(rng.uniform(0.42, 0.55) * s),
        center=(float(s / 2 + rng.uniform(-0.08, 0.08) * s), float(s / 2 + rng.uniform(-0.06, 0.06) * s)),
        flip=bool(rng.random() < 0.5),
        angle=float(rng.uniform(-6, 6)),
        gains=tuple(float(g) for g in rng.uniform(0.85, 1.15, 3)),
        background=tuple(int(v) for v in rng.integers(30, 220, 3)),
        noise=float(rng.uniform(0.0, 4.0)),
        sway=float(rng.uniform(0.5, 3.0)),
        sway_period=float(rng.uniform(30, 80)),
        seed=int(rng.integers(0, 2**31 - 1)),
        frame_size=frame_size,
    )


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
class Renderer:
    """Renders frames of one identity; the photograph is prepared once."""

    def __init__(self, ident: Identity):
        self.ident = ident
        info = PHOTOS[ident.photo]
        photo = load_photo(ident.photo).astype(np.float32)
        photo = np.clip(photo * np.array(ident.gains, np.float32), 0, 255)
        mx, my = info["mouth"]
        cx, cy = info["cheek"]
        skin = photo[cy - 3:cy + 4, cx - 3:cx + 4].reshape(-1, 3).mean(axis=0)
        # paint the photograph's own mouth over with skin (soft edged)
        cover = np.zeros(photo.shape[:2], np.float32)
        cv2.ellipse(cover, (mx, my), (int(info["mouth_w"] * 0.75), int(info["mouth_h"] * 1.1)), 0, 0, 360, 1.0, -1)
        cover = cv2.GaussianBlur(cover, (0, 0), 3)[..., None]
        self.photo = photo * (1 - cover) + skin * cover
        self.skin = skin
        self.info = info
        x1, y1, x2, y2 = info["face"]
        self.face_center = ((x1 + x2) / 2, (y1 + y2) / 2)
        self.scale = ident.face_height / (y2 - y1)
        self.rng = np.random.default_rng(ident.seed)

    def transform(self, k: int) -> np.ndarray:
        """2x3 affine map from photograph to frame coordinates at frame k."""
        ident = self.ident
        dx = ident.sway * np.sin(2 * np.pi * k / ident.sway_period)
        dy = 0.5 * ident.sway * np.sin(2 * np.pi * k / (1.7 * ident.sway_period))
        ang = ident.angle + 0.8 * np.sin(2 * np.pi * k / (2.3 * ident.sway_period))
        M = cv2.getRotationMatrix2D(self.face_center, ang, self.scale)
        M[0, 2] += ident.center[0] + dx - self.face_center[0]
        M[1, 2] += ident.center[1] + dy - self.face_center[1]
        if ident.flip:
            s = ident.frame_size
            M = np.array([[-1, 0, s - 1], [0, 1, 0]], np.float64) @ np.vstack([M, [0, 0, 1]])
        return M

    def _frame_box(self, corners, k: int) -> Tuple[int, int, int, int]:
        """Axis-aligned box in frame k around photograph-coordinate points, clipped to the frame."""
        pts = np.hstack([np.asarray(corners, np.float64), np.ones((len(corners), 1))])
        out = pts @ self.transform(k).T
        s = self.ident.frame_size
        return (int(max(0, out[:, 0].min())), int(max(0, out[:, 1].min())),
                int(min(s, out[:, 0].max())), int(min(s, out[:, 1].max())))

    def face_box(self, k: int) -> Tuple[int, int, int, int]:
        x1, y1, x2, y2 = self.info["face"]
        return self._frame_box([[x1, y1], [x2, y1], [x1, y2], [x2, y2]], k)

    def mouth_roi(self, k: int) -> Tuple[int, int, int, int]:
        """(x1, y1, x2, y2) in the frame around the drawn mouth at its widest and most open."""
        mx, my = self.info["mouth"]
        w, h = self.info["mouth_w"], self.info["mouth_h"]
        return self._frame_box([[mx - 0.6 * w, my - 1.2 * h], [mx + 0.6 * w, my - 1.2 * h],
                                [mx - 0.6 * w, my + 1.6 * h], [mx + 0.6 * w, my + 1.6 * h]], k)

    def render(self, k: int, opening: float, width: float) -> np.ndarray:
        info = self.info
        mx, my = info["mouth"]
        w = info["mouth_w"] * (0.75 + 0.45 * width)
        h_open = info["mouth_h"] * 1.6 * opening
        img = self.photo.copy()
        lip = np.array([70, 70, 165], np.float32) * np.array(self.ident.gains, np.float32)
        # lips: an outer ellipse; cavity: a dark inner ellipse whose height is the opening
        cv2.ellipse(img, (mx, my), (int(w / 2), int(2 + h_open / 2 + 3)), 0, 0, 360, lip.tolist(), -1, cv2.LINE_AA)
        if h_open >= 1.0:
            cv2.ellipse(img, (mx, my), (int(w / 2 - 3), max(1, int(h_open / 2))), 0, 0, 360, (25, 18, 30), -1, cv2.LINE_AA)
        else:
            cv2.line(img, (int(mx - w / 2 + 3), my), (int(mx + w / 2 - 3), my), (40, 30, 60), 1, cv2.LINE_AA)
        s = self.ident.frame_size
        frame = cv2.warpAffine(img, self.transform(k), (s, s), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=self.ident.background)
        if self.ident.noise > 0:
            frame = frame + self.rng.normal(0, self.ident.noise, frame.shape)
        return np.clip(frame + 0.5, 0, 255).astype(np.uint8)


def measure_opening(frame: np.ndarray, ident: Identity, k: int, renderer: Optional[Renderer] = None) -> float:
    """How open the mouth in ``frame`` looks: the share of dark pixels in the mouth region."""
    renderer = renderer or Renderer(ident)
    x1, y1, x2, y2 = renderer.mouth_roi(k)
    roi = cv2.cvtColor(frame[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY).astype(np.float32)
    if roi.size == 0:
        return 0.0
    return float((roi < 60).mean())
