"""Pasting the generated face back into the frame.

``blend="none"`` is the published hard paste: the generated face, resized to the box, replaces the
box, bit for bit.

``blend="feather"`` (the default of ``inference.py``) hides the box in two ways:

* **shape**: the face is mixed in through a soft ellipse over the mouth and jaw
  (:func:`feather_mask`) that is exactly 0 on every edge of the box and over the upper face, so
  the frame is unchanged along the box's border and above the nose, whatever the generator
  outputs;
* **colour**: before mixing, the generated face is shifted towards the frame's colours. Per
  channel, a plane ``a + b*x + c*y`` (grey levels) is fitted by weighted least squares to
  ``frame - generated`` over the mask's feather ring (where the two meet, away from the mouth) and
  added to the generated face. A face that comes out darker, brighter, tinted or shaded across
  the cheeks therefore fades into the frame without a patch, while the mouth keeps the
  generator's contrast (the ring does not see the mouth, and a plane cannot cancel a local
  feature). This is a cheap stand-in for a Poisson blend, which matches the boundary exactly but
  costs a linear solve per frame.

Everything per frame is computed from the frame's own crop and the generated face; what depends
only on the face size (mask, least-squares projector) is built once per :class:`Blender`.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from lipsync.core.errors import Wav2LipError

Coords = Tuple[int, int, int, int]  # (y1, y2, x1, x2), the published order
BLEND_MODES = ("feather", "none")
MASKS = ("ellipse", "landmarks")  # --mask: feather_mask, or landmark_mask on each frame


def resolve_mask(mask: str, blend: str) -> str:
    """The mask a render uses: ``"auto"`` is ``"landmarks"`` when dlib and its 68-point model are
    installed (requirements-faces.txt) and ``"ellipse"`` otherwise; ``"none"`` with ``blend="none"``
    (a hard paste has no mask). Other values are returned as given."""
    if blend == "none":
        return "none"
    if mask == "auto":
        from face_detection.dlib_faces import landmarks_available

        return "landmarks" if landmarks_available() else "ellipse"
    return mask

# The feather ellipse, as fractions of the (square) face crop: centred on the mouth, reaching the
# crop's sides and bottom with a margin of zeros (so every box edge keeps the frame's pixels) and
# stopping below the eyes (the generator only redraws the lower half).
FEATHER_CENTER = (0.5, 0.71)   # (x, y)
FEATHER_RADII = (0.44, 0.26)   # (x, y): spans x 0.06..0.94, y 0.45..0.97
FEATHER_INNER = 0.55           # full weight inside this fraction of the radii
MIN_GAIN = 0.5                 # the colour gain stays within [MIN_GAIN, 1 / MIN_GAIN]
ROBUST_SCALE = 12.0            # grey levels: residuals further than this off the plane count less
COLOUR_FIT_SIZE = 24           # the colour plane is fitted on crops reduced to this many pixels a side
# the landmark mask: iBUG 300-W jaw points 2..14 (below the cheekbones, round the chin) closed by the
# bottom of the nose (35..31), falling from 1 inside to exactly 0 on that outline over this share of
# the box's width
JAW_POINTS = tuple(range(2, 15))
NOSE_BOTTOM = (35, 34, 33, 32, 31)
LANDMARK_FEATHER = 0.08
MIN_MASK_AREA = 0.05           # a landmark polygon under this share of the box: ellipse instead


class BlendError(Wav2LipError, ValueError):
    """An unknown blend mode or a mask that does not fit."""


# ------------------------------------------------------------------------------------------------
def feather_mask(size: int) -> np.ndarray:
    """The feather weights for a ``size`` x ``size`` face crop: (size, size) float32 in [0, 1],
    rows top to bottom. 1 over the mouth and jaw, falling smoothly (smoothstep of the elliptic
    radius) to exactly 0 before every edge of the crop and over the upper face."""
    if size < 8:
        raise BlendError(f"face size must be at least 8 pixels, got {size}")
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size           # pixel centres in (0, 1)
    u = (centres[None, :] - FEATHER_CENTER[0]) / FEATHER_RADII[0]         # (1, size)
    v = (centres[:, None] - FEATHER_CENTER[1]) / FEATHER_RADII[1]         # (size, 1)
    t = np.clip((1.0 - np.sqrt(u * u + v * v)) / (1.0 - FEATHER_INNER), 0.0, 1.0)  # (size, size)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def landmark_mask(landmarks: np.ndarray, coords: Coords) -> Optional[np.ndarray]:
    """The weights of one paste drawn by the face's 68 landmarks: (h, w) float32 in [0, 1] over the box
    ``coords`` ((y1, y2, x1, x2) pixels, h = y2 - y1, w = x2 - x1). The polygon of the jaw (points
    JAW_POINTS) closed by the bottom of the nose (NOSE_BOTTOM), filled: 1 deeper than
    LANDMARK_FEATHER * w inside, smoothstep to exactly 0 on its outline and on the box's edges, 0
    outside. ``landmarks``: (68, 2) float (x, y) frame pixels in iBUG 300-W order. None when the polygon
    covers less than MIN_MASK_AREA of the box (landmarks that failed)."""
    y1, y2, x1, x2 = coords
    h, w = y2 - y1, x2 - x1
    points = np.asarray(landmarks, np.float32)[list(JAW_POINTS + NOSE_BOTTOM)] - (x1, y1)   # (18, 2) box px
    inside = np.zeros((h + 2, w + 2), np.uint8)                          # a row of zeros round the box
    cv2.fillPoly(inside[1:-1, 1:-1], [np.round(points).astype(np.int32)], 1)
    if inside.sum() < MIN_MASK_AREA * h * w:
        return None
    depth = cv2.distanceTransform(inside, cv2.DIST_L2, 3)[1:-1, 1:-1]     # (h, w) px to the outline
    t = np.clip(depth / max(1.0, LANDMARK_FEATHER * w), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per column of ``values`` (N, C): the value where the cumulative ``weights`` (N,) reach
    half their total. Returns (C,)."""
    order = np.argsort(values, axis=0)                                      # (N, C)
    cum = np.cumsum(weights[order], axis=0)                                 # (N, C)
    idx = (cum < 0.5 * cum[-1]).sum(axis=0)                                 # (C,) first index past half
    return np.take_along_axis(values, order, axis=0)[idx, np.arange(values.shape[1])]


def _plane_design(n: int) -> np.ndarray:
    """(n*n, 3) rows [1, x, y] with x, y the pixel centres of an n x n grid in (-0.5, 0.5)."""
    c = (np.arange(n, dtype=np.float64) + 0.5) / n - 0.5
    ys, xs = np.meshgrid(c, c, indexing="ij")                             # (n, n) each
    return np.stack([np.ones(n * n), xs.ravel(), ys.ravel()], axis=1)


_DESIGN = _plane_design(COLOUR_FIT_SIZE).astype(np.float32)  # (n*n, 3) rows [1, x, y]


def apply_colour(gen, coef, xs, ys):
    """``gen`` (rows, w, C) float grey levels corrected by :meth:`Blender.colour_fit`'s (4, C)
    ``coef`` (gain, offset, x slope, y slope): ``gain * gen + offset + x * bx + y * by``, with ``xs``
    (w,) and ``ys`` (rows,) the pixel centres in -0.5..0.5 across the box. Plain arithmetic, so numpy
    arrays and torch tensors (the GPU paste) go through the same formula."""
    return gen * coef[0] + coef[1] + xs[None, :, None] * coef[2] + ys[:, None, None] * coef[3]


def fit_weights(mask: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """What the colour fit of :meth:`Blender.colour_fit` needs from a mask ((h, w) weights in [0, 1]):
    the feather ring's weights on the COLOUR_FIT_SIZE grid, (n*n,) float32, and the weighted
    least-squares projector of the plane, (3, n*n) float32, or None where the ring cannot fit a
    plane (a mask that is all 0 / 1: paste without colour correction)."""
    n = COLOUR_FIT_SIZE
    m = cv2.resize(mask, (n, n), interpolation=cv2.INTER_AREA).astype(np.float64).ravel()
    ring = (m * (1.0 - m)).astype(np.float32)                              # (n*n,) peaks where m = 1/2
    design = _DESIGN                                                        # (n*n, 3)
    if ring.sum() <= 0 or np.linalg.matrix_rank(design * ring[:, None]) < 3:
        return ring, None
    aw = design.T * ring                                                    # plane = (A'WA)^-1 A'W residual
    return ring, np.linalg.solve(aw @ design, aw).astype(np.float32)


class Blender:
    """Pastes generated faces of one size into frames.

    ``blend``: ``"feather"`` or ``"none"`` (see the module's docstring). ``size``: the generated
    face's side in pixels (96 or 288 for the published models). ``mask``: optional (size, size)
    weights in [0, 1] to use instead of :func:`feather_mask` (feather only).

    Raises :class:`BlendError` for an unknown mode or a mask of the wrong shape.
    """

    def __init__(self, blend: str, size: int, mask: Optional[np.ndarray] = None):
        if blend not in BLEND_MODES:
            raise BlendError(f"blend must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
        self.blend = blend
        self.size = int(size)
        if blend == "none":
            return
        self.mask = feather_mask(self.size) if mask is None else np.asarray(mask, np.float32)
        if self.mask.shape != (self.size, self.size):
            raise BlendError(f"mask shape {self.mask.shape} does not match face size {self.size}")
        rows = np.nonzero(self.mask.max(axis=1) > 0)[0]
        # rows of the crop the mask touches, as fractions, so a paste only computes those rows
        self._rows = (rows[0] / self.size, (rows[-1] + 1) / self.size) if len(rows) else (0.0, 0.0)
        # the colour fit's weights (the feather ring) and projector depend on the mask alone
        self._ring, self._projector = fit_weights(self.mask)
        self._fit = self._projector is not None

    def colour_fit(self, region: np.ndarray, face: np.ndarray, weights=None) -> np.ndarray:
        """The colour correction of one paste, per channel: ``corrected = g * face + a + b * x +
        c * y`` (grey levels; x, y run -0.5..0.5 across the box), matched to ``region`` over the
        feather ring. Returns (4, C) float32 rows ``g, a, b, c``.

        The gain ``g`` is the ratio of the two crops' weighted medians over the ring, kept within
        [MIN_GAIN, 1 / MIN_GAIN]: a ratio of levels, not a regression, because the ring also sees
        mouths and jaws that differ between the frame and the generated face, and a regression
        reads that as "no relation", flattens the gain and lifts a dark mouth to grey (measured: a
        demo mouth's correlation with the speech fell from 0.87 to 0.21). The plane is a weighted
        least-squares fit of ``region - g * face`` with one robust reweighting pass, so a mouth
        reaching into the ring does not tilt it.

        ``region``: the frame's crop under the box (h, w, C) uint8; ``face``: the generated face
        (size, size, C) uint8; ``weights``: :func:`fit_weights` of another mask than this Blender's."""
        ring, projector = (self._ring, self._projector) if weights is None else weights
        n = COLOUR_FIT_SIZE
        o = cv2.resize(region, (n, n), interpolation=cv2.INTER_AREA).reshape(n * n, -1).astype(np.float32)
        f = cv2.resize(face, (n, n), interpolation=cv2.INTER_AREA).reshape(n * n, -1).astype(np.float32)
        gain = np.clip((_weighted_median(o, ring) + 1.0) / (_weighted_median(f, ring) + 1.0),
                       MIN_GAIN, 1.0 / MIN_GAIN)                                # (C,)
        d = o - f * gain                                                        # (n*n, C)
        plane = projector @ d                                             # (3, C)
        # one Cauchy reweighting pass: pixels far off the plane (a mouth, a jaw) count less
        r = d - _DESIGN @ plane                                            # (n*n, C)
        for c in range(d.shape[1]):
            w = ring / (1.0 + (r[:, c] / ROBUST_SCALE) ** 2)
            aw = _DESIGN.T * w                                                  # (3, n*n)
            plane[:, c] = np.linalg.solve(aw @ _DESIGN, aw @ d[:, c])
        return np.vstack([gain[None], plane]).astype(np.float32)

    def weights(self, h: int, w: int, mask: Optional[np.ndarray] = None) -> Tuple[int, int, Optional[np.ndarray]]:
        """What a paste into an ``h`` x ``w`` box mixes: rows ``r1:r2`` of the box and their weights
        ``m``, (r2 - r1, w) float32 in [0, 1] (None when r2 <= r1). Every pixel of the box outside those
        rows keeps the frame's value. ``mask``: this paste's own (h, w) weights (see :meth:`paste`);
        None: the Blender's mask resized to the box. ``blend="none"``: the whole box, weight 1."""
        if self.blend == "none":
            return 0, h, np.ones((h, w), np.float32)
        if mask is None:
            r1, r2 = int(self._rows[0] * h), min(h, int(np.ceil(self._rows[1] * h)))
            return r1, r2, (cv2.resize(self.mask, (w, h))[r1:r2] if r2 > r1 else None)   # (rows, w)
        rows = np.nonzero(mask.max(axis=1) > 0)[0]
        r1, r2 = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        return r1, r2, (mask[r1:r2] if r2 > r1 else None)

    def paste(self, frame: np.ndarray, face: np.ndarray, coords: Coords, mask: Optional[np.ndarray] = None
              ) -> np.ndarray:
        """Paste ``face`` into ``frame`` in place and return ``frame``.

        ``frame``: (H, W, C) uint8, the source frame (its crop under the box is what the face
        fades into). ``face``: (size, size, C) uint8, the generated face, same channel order.
        ``coords``: (y1, y2, x1, x2) pixels, the box inside the frame. ``mask``: this paste's own
        weights over the box, (y2 - y1, x2 - x1) float32 in [0, 1] (e.g. :func:`landmark_mask`),
        instead of the Blender's mask resized to the box (feather only).
        """
        y1, y2, x1, x2 = coords
        h, w = y2 - y1, x2 - x1
        resized = cv2.resize(face, (w, h))                                  # (h, w, C), published resize
        if self.blend == "none":
            frame[y1:y2, x1:x2] = resized
            return frame
        r1, r2, m = self.weights(h, w, mask)
        weights = None if mask is None else fit_weights(mask)
        if r2 <= r1:
            return frame
        region = frame[y1:y2, x1:x2]                                        # view: written below
        gen = resized[r1:r2].astype(np.float32)                             # (rows, w, C)
        if (self._fit if weights is None else weights[1] is not None):
            coef = self.colour_fit(region, face, weights)                   # (4, C)
            xs = (np.arange(w, dtype=np.float32) + 0.5) / w - 0.5
            ys = (np.arange(r1, r2, dtype=np.float32) + 0.5) / h - 0.5
            gen = apply_colour(gen, coef, xs, ys)
        gen += 0.5                                                          # round, not truncate
        np.clip(gen, 0, 255, out=gen)
        # m * face + (1 - m) * frame, in one pass of OpenCV's (faster than numpy's several)
        region[r1:r2] = cv2.blendLinear(gen.astype(np.uint8), region[r1:r2], m, 1.0 - m)
        return frame


@functools.lru_cache(maxsize=8)
def _default_blender(blend: str, size: int) -> Blender:
    return Blender(blend, size)


def paste(frame: np.ndarray, face: np.ndarray, coords: Coords, blend: str,
          mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Paste ``face`` ((size, size, C) uint8) into ``frame`` ((H, W, C) uint8) at ``coords``
    ((y1, y2, x1, x2) pixels) in place with ``blend`` (``"feather"`` or ``"none"``) and return the
    frame. ``mask`` replaces :func:`feather_mask` for this call; without it the default Blender for
    the face's size is reused. Raises :class:`BlendError` for an unknown mode."""
    blender = _default_blender(blend, face.shape[0])
    if mask is not None and blend != "none" and not np.array_equal(mask, blender.mask):
        blender = Blender(blend, face.shape[0], mask)   # a custom mask: its projector is built per call
    return blender.paste(frame, face, coords)


def cut_crop(frame: np.ndarray, coords: Coords, img_size: int) -> np.ndarray:
    """The published crop: the box's pixels of an (H, W, 3) uint8 frame, resized to (S, S, 3)."""
    y1, y2, x1, x2 = coords
    return cv2.resize(frame[y1:y2, x1:x2], (img_size, img_size))


class CpuComposer:
    """The engine's compositor on the host, one frame at a time with OpenCV (:class:`Blender`).

    A compositor has seven steps, which :class:`lipsync.render.gpu.TorchComposer` implements on the
    generator's device with the same signatures: :meth:`upload` (decoded (H, W, 3) uint8 BGR frames
    into the compositor's form), :meth:`crops` ((B, S, S, 3) uint8 faces cut at (y1, y2, x1, x2)
    boxes), :meth:`prepared` (an avatar's saved crops into the form :meth:`crops` gives),
    :meth:`masks` (each paste's own weights, from the unpasted frames), :meth:`paste` (generated
    faces into frames at their boxes), :meth:`enhance` (with an ``enhancer``: the pasted boxes
    restored and mixed in through the same weights) and :meth:`download` (back to host frames).
    ``on_device`` says whether the generator should hand its faces back as device tensors.

    ``mask``: one of MASKS; ``"landmarks"`` finds dlib's 68 points of each face in its (unpasted)
    frame and pastes through :func:`landmark_mask` (the ellipse where they fail). ``enhancer``: a
    :class:`lipsync.render.enhance.FaceEnhancer` or None. Raises :class:`BlendError` for an unknown
    mode or mask, and face_detection.DetectorError naming ``pip install -r requirements-faces.txt``
    when the landmarks' packages are missing.
    """

    on_device = False

    def __init__(self, img_size: int, blend: str, mask: str = MASKS[0], enhancer=None):
        self.size = img_size
        self.enhancer = enhancer
        self.blender = Blender(blend, img_size)  # raises BlendError for an unknown mode
        mask = resolve_mask(mask, blend)
        if mask not in MASKS + ("none",):
            raise BlendError(f"mask must be one of {', '.join(MASKS)}, got {mask!r}")
        self.landmarker = None
        if mask == "landmarks" and blend != "none":
            from face_detection import get_landmarker

            self.landmarker = get_landmarker()

    def mask(self, frame: np.ndarray, box: Coords) -> Optional[np.ndarray]:
        """This paste's weights over ``box`` ((y1, y2, x1, x2)) from the landmarks of ``frame``
        ((H, W, 3) uint8 BGR, before the paste); None: the Blender's ellipse."""
        if self.landmarker is None:
            return None
        y1, y2, x1, x2 = box
        return landmark_mask(self.landmarker(frame, (x1, y1, x2, y2)), box)

    def upload(self, frames: Sequence[np.ndarray]) -> List[np.ndarray]:
        return list(frames)

    def crops(self, frames: Sequence[np.ndarray], boxes: Sequence[Coords]) -> np.ndarray:
        return np.stack([cut_crop(f, b, self.size) for f, b in zip(frames, boxes)])

    def prepared(self, crops: np.ndarray) -> np.ndarray:
        return crops

    def masks(self, frames: Sequence[np.ndarray], boxes: Sequence[Optional[Coords]]) -> List[Optional[np.ndarray]]:
        """:meth:`mask` of each frame and box (None for a None box), before the paste changes the frames."""
        return [None if box is None else self.mask(frame, box) for frame, box in zip(frames, boxes)]

    def paste(self, frames: List[np.ndarray], faces, boxes: Sequence[Optional[Coords]],
              masks: Optional[Sequence[Optional[np.ndarray]]] = None) -> List[np.ndarray]:
        """Paste (B, S, S, 3) uint8 faces into ``frames`` in place (a None box: frame unchanged).
        ``masks``: :meth:`masks` of these frames (None: found here)."""
        masks = self.masks(frames, boxes) if masks is None else masks
        for frame, face, box, mask in zip(frames, faces, boxes, masks):
            if box is not None:
                self.blender.paste(frame, face, box, mask)
        return frames

    def enhance(self, frames: List[np.ndarray], boxes: Sequence[Optional[Coords]],
                masks: Sequence[Optional[np.ndarray]]) -> List[np.ndarray]:
        """Restore the pasted faces in place: each box of ``frames`` (already pasted) resized to
        512 x 512, restored by ``self.enhancer`` (all of them in one call, MAX_BATCH faces per
        forward), resized back and mixed in through the weights of the paste (``masks``, as given to
        :meth:`paste`; :meth:`Blender.weights`), so a pixel the paste kept is kept. A None box, or no
        enhancer: unchanged."""
        todo = [(frame, box, mask) for frame, box, mask in zip(frames, boxes, masks) if box is not None]
        if self.enhancer is None or not todo:
            return frames
        from lipsync.render.enhance import ENHANCE_SIZE

        def resize(img, w, h):
            shrink = w < img.shape[1] or h < img.shape[0]
            return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

        crops = np.stack([resize(frame[y1:y2, x1:x2], ENHANCE_SIZE, ENHANCE_SIZE)
                          for frame, (y1, y2, x1, x2), _ in todo])                  # (P, 512, 512, 3)
        restored = self.enhancer.restore_crops(crops)                                 # (P, 512, 512, 3)
        for (frame, (y1, y2, x1, x2), mask), face in zip(todo, restored):
            h, w = y2 - y1, x2 - x1
            r1, r2, m = self.blender.weights(h, w, mask)
            if m is None:
                continue
            back = resize(face, w, h)[r1:r2]                                          # (rows, w, 3)
            region = frame[y1:y2, x1:x2]                                              # view: written below
            region[r1:r2] = cv2.blendLinear(back, region[r1:r2], m, 1.0 - m)
        return frames

    def download(self, frames: List[np.ndarray]) -> List[np.ndarray]:
        return frames
