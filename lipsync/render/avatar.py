"""Avatars: a face prepared once (frames, face boxes, crops at the generator's size), to be lip-synced
to any number of audios, and saved to a folder and loaded back.

An avatar folder holds ``avatar.json`` (format, version, how it was made, checksums), a copy of the
source video or photo (``source.<ext>``), ``boxes.npy`` ((N, 4) int32 (y1, y2, x1, x2) per source
frame, -1 where no face) and ``crops.npy`` ((N, S, S, 3) uint8 BGR faces at the generator's size S,
zeros where no face). Loading checks all of it: a folder made with other settings, another face size
or format version, or whose files were changed or cut short, is refused with a message that says
how to prepare it again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

import face_detection
from lipsync.render.blending import cut_crop
from lipsync.render.boxes import (Coords, DetectionCache, FaceFinder, array_to_boxes, coords_from_detections,
                                  dets_to_array)
from lipsync.core.errors import Wav2LipError
from lipsync.media.frames import FaceSource, frames_by_index, output_order
from lipsync.core.pipeline import Timings
from lipsync.core.progress import progress_bar
from lipsync.core.fileio import current_umask, file_sha256
from lipsync.render.avatar_settings import AvatarSettings
from lipsync.render.settings import NO_BOX
from lipsync.render.tracking import target_rule

AVATAR_FORMAT = "wav2lip-avatar"
AVATAR_VERSION = 2  # 2: avatar.json carries its own checksum ("meta_sha256")


class AvatarError(Wav2LipError, ValueError):
    """An avatar that cannot be prepared, or a folder that cannot be used; the message says why."""


class Avatar:
    """A prepared face: its source, boxes per source frame, and (when prepared for saving or loaded
    from a folder) the crops at the generator's size.

    ``coords[j]``: (y1, y2, x1, x2) box of source frame j, or None (no face: the frame passes
    through). ``crops``: (N, S, S, 3) uint8 or None (then crops are cut from decoded frames).
    ``key``: identifies the face and settings (for caches of what the generator computes from it).
    """

    def __init__(self, source: FaceSource, settings: AvatarSettings, img_size: int,
                 coords: Optional[List[Optional[Coords]]], key: str, crops: Optional[np.ndarray] = None,
                 fixed_box: Optional[Coords] = None, folder: Optional[str] = None, from_cache: bool = False):
        self.source = source
        self.settings = settings
        self.img_size = img_size
        self.coords = coords
        self.fixed_box = fixed_box
        self.crops = crops
        self.key = key
        self.folder = folder
        self.detection_cached = from_cache
        self.frames: Optional[List[np.ndarray]] = None  # decoded frames, once held in memory

    # ---- what it is ----
    @property
    def fps(self) -> float:
        return self.source.fps

    @property
    def rate(self):
        return self.source.rate

    @property
    def n_frames(self) -> Optional[int]:
        """Source frames (None until a pass over a video with a fixed box has counted them)."""
        if self.coords is not None:
            return len(self.coords)
        return self.source.count

    @property
    def size(self) -> Tuple[int, int]:
        """(width, height) of the prepared frames, pixels."""
        h, w = self.source.first_frame().shape[:2]
        return w, h

    def box(self, j: int) -> Optional[Coords]:
        return self.fixed_box if self.fixed_box is not None else self.coords[j]

    def missing(self) -> List[int]:
        """Source frames without a face."""
        return [] if self.coords is None else [j for j, c in enumerate(self.coords) if c is None]

    # ---- frames and faces ----
    def hold_frames(self, max_mb: float) -> bool:
        """Keep the decoded source frames in memory when they fit in ``max_mb`` (for serving an avatar
        to many sessions without decoding it again); returns whether they are held."""
        n = self.n_frames or 0
        w, h = self.size
        if n == 0 or n * w * h * 3 > max_mb * 2 ** 20:
            return False
        if self.frames is None:
            self.frames = list(self.source.frames())
        return True

    def output_frames(self, n_out: Optional[int], loop: str) -> Iterator[Tuple[int, np.ndarray]]:
        """(source index, frame) for output frames 0..n_out-1 (endless with None), as ``loop`` orders
        them; frames are copies the caller may paste into."""
        if self.frames is not None:
            return frames_by_index(self.frames, n_out, loop)
        return output_order(self.source, n_out, loop)


# ------------------------------------------------------------------------------------------------
# Preparing
# ------------------------------------------------------------------------------------------------
def prepare_avatar(face: str, settings: AvatarSettings, img_size: int, device="cpu",
                   cache: Optional[DetectionCache] = None, with_crops: bool = False,
                   timings: Optional[Timings] = None, progress: bool = True,
                   source_kind: Optional[str] = None) -> Avatar:
    """Read ``face`` (video or photo), find its face boxes and, with ``with_crops``, cut every crop.

    Detection results are cached in ``cache`` per file and settings. Raises AvatarError when no
    frame has a face (the message suggests --box and the other detector) or the box is outside
    the frame; FrameSourceError / VideoError for an unreadable input.
    """
    timings = timings or Timings()
    source = FaceSource(face, fps=settings.fps, static=settings.static, transform=settings.transform,
                        kind=source_kind)
    key = _source_key(face, settings, img_size)
    if tuple(settings.box) != NO_BOX:
        avatar = Avatar(source, settings, img_size, None, key, fixed_box=_check_box(settings.box, source))
    else:
        dets, cached = _detect(source, settings, device, cache, timings, progress)
        coords = coords_from_detections(dets, source.first_frame().shape[:2], settings.pads,
                                        smooth=not settings.nosmooth)
        if all(c is None for c in coords):
            kind, n = target_rule(settings.detection.target)
            if kind == "index":
                raise AvatarError(f"--target_face {n}: no frame of {face!r} has a face number {n} (faces are "
                                  "numbered 0, 1, ... from the left on the first frame with faces); give a "
                                  "smaller number, or X,Y of the face")
            raise AvatarError(f"no face found in any frame of {face!r}: give the face box with "
                              "--box TOP BOTTOM LEFT RIGHT, or try another --face_detector "
                              f"({', '.join(face_detection.BACKENDS)})")
        avatar = Avatar(source, settings, img_size, coords, key, from_cache=cached)
    if with_crops:
        avatar.crops = _cut_all(avatar, timings, progress)
        if avatar.coords is None:
            avatar.coords = [avatar.fixed_box] * len(avatar.crops)
    return avatar


def _source_key(face: str, settings: AvatarSettings, img_size: int) -> str:
    st = os.stat(face)
    ident = [os.path.realpath(face), st.st_size, st.st_mtime_ns, settings.record(), img_size]
    return hashlib.sha1(repr(ident).encode("utf-8")).hexdigest()[:16]


def _check_box(box: Sequence[int], source: FaceSource) -> Coords:
    y1, y2, x1, x2 = box
    h, w = source.first_frame().shape[:2]
    if not (0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w):
        raise AvatarError(f"--box {list(box)} (top bottom left right) is outside the {w}x{h} frame")
    return (y1, y2, x1, x2)


def _detect(source: FaceSource, settings: AvatarSettings, device, cache: Optional[DetectionCache],
            timings: Timings, progress: bool):
    det = settings.detection
    key = None
    if cache is not None and cache.directory:
        t = settings.transform
        key = cache.key(source.path, [t.resize_factor, list(t.crop), t.rotate, source.static, source.fps]
                        + det.identity())
        dets = cache.load(key)
        if dets is not None:
            source.count = len(dets)
            return dets, True
    finder = FaceFinder(det, device, timer=lambda s: timings.add("detect", s))
    total = 1 if source.static else (source.info.approx_frames or None)
    with progress_bar(total=total, desc="detect faces", unit="frame", disable=not progress, leave=False) as bar:
        t0 = time.perf_counter()
        dets = finder.run(source.frames(), on_frame=lambda: bar.update(1))
        timings.add("decode", time.perf_counter() - t0 - timings.detect)
    if not dets:
        raise AvatarError(f"no frames could be read from {source.path!r}")
    source.count = len(dets)
    if key is not None:
        cache.save(key, dets)
    return dets, False


def _cut_all(avatar: Avatar, timings: Timings, progress: bool) -> np.ndarray:
    """(N, S, S, 3) uint8 crops of every source frame (zeros where no face)."""
    s = avatar.img_size
    crops: List[np.ndarray] = []
    with progress_bar(total=avatar.n_frames, desc="crop faces", unit="frame", disable=not progress, leave=False) as bar:
        for j, frame in enumerate(avatar.source.frames()):
            t0 = time.perf_counter()
            box = avatar.box(j) if (avatar.coords is None or j < len(avatar.coords)) else None
            crops.append(np.zeros((s, s, 3), np.uint8) if box is None else cut_crop(frame, box, s))
            timings.add("crop", time.perf_counter() - t0)
            bar.update(1)
    avatar.source.count = len(crops)
    return np.stack(crops) if crops else np.zeros((0, s, s, 3), np.uint8)


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------
def save_avatar(avatar: Avatar, folder: str) -> str:
    """Write ``avatar`` (prepared ``with_crops``) to ``folder``, atomically: the folder appears
    complete or not at all, and an avatar already there is replaced only once the new one is
    written. Refuses a non-empty folder that is not an avatar. Returns the folder's path."""
    if avatar.crops is None:
        raise AvatarError("internal error: only an avatar prepared with its crops can be saved")
    folder = os.path.abspath(folder)
    check_save_target(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(folder) + ".", suffix=".partial", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it private
    old = tmp + ".old"
    try:
        _write_folder(avatar, tmp)
        if os.path.isdir(folder):
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(folder):
            os.rename(old, folder)  # interrupted between the renames: the previous avatar stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


AVATAR_FILES = ("avatar.json", "boxes.npy", "crops.npy")


def check_save_target(folder: str) -> None:
    """Refuse (AvatarError) a ``--save_avatar`` path that is a file, or a non-empty folder that is not
    an avatar this program saved (only its own files in it): replacing it would delete the rest."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise AvatarError(f"--save_avatar {folder!r} is a file; give a new or empty folder")
    if not os.path.isdir(folder) or not os.listdir(folder):
        return
    try:
        meta = read_avatar_meta(folder)
        ours = set(AVATAR_FILES) | {meta["source"]}
    except AvatarError:
        ours = set()
    others = sorted(set(os.listdir(folder)) - ours)
    if not ours or others:
        raise AvatarError(f"--save_avatar {folder!r} is a folder with other files in it ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}); give a new or empty folder (or a saved avatar's "
                          "folder to replace)")


def _write_folder(avatar: Avatar, tmp: str) -> None:
    ext = os.path.splitext(avatar.source.path)[1].lower()
    source_name = "source" + (ext if ext.isascii() and len(ext) <= 6 else "")
    shutil.copyfile(avatar.source.path, os.path.join(tmp, source_name))
    np.save(os.path.join(tmp, "boxes.npy"), dets_to_array(avatar.coords))
    np.save(os.path.join(tmp, "crops.npy"), np.ascontiguousarray(avatar.crops))
    w, h = avatar.size
    meta = {
        "format": AVATAR_FORMAT, "version": AVATAR_VERSION, "img_size": avatar.img_size,
        "settings": avatar.settings.record(), "source": source_name,
        "source_kind": "image" if avatar.source.is_image else "video", "frames": len(avatar.crops),
        "fps": avatar.fps, "rate": str(avatar.rate), "width": w, "height": h,
        "original": os.path.basename(avatar.source.path), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sha256": {name: file_sha256(os.path.join(tmp, name)) for name in (source_name, "boxes.npy", "crops.npy")},
    }
    meta["meta_sha256"] = _meta_digest(meta)
    with open(os.path.join(tmp, "avatar.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)


def _meta_digest(meta: dict) -> str:
    """sha256 of avatar.json's content other than this digest (canonical JSON: sorted keys)."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _remake_hint(folder: str, meta: dict) -> str:
    original = meta.get("original") if isinstance(meta, dict) else None
    face = original or "FACE_VIDEO"
    return (f"prepare it again: python inference.py --checkpoint_path CHECKPOINT --face {face} "
            f"--save_avatar {folder} [the detection flags you want]")


def read_avatar_meta(folder: str) -> dict:
    """avatar.json of ``folder``, checked for format and version; raises AvatarError."""
    folder = os.path.abspath(folder)
    path = os.path.join(folder, "avatar.json")
    if not os.path.isdir(folder):
        raise AvatarError(f"--avatar folder not found: {folder!r}")
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise AvatarError(f"{folder!r} is not an avatar folder (no avatar.json); "
                          + _remake_hint(folder, {})) from None
    except (OSError, ValueError) as exc:
        raise AvatarError(f"{path!r} is damaged ({exc}); " + _remake_hint(folder, {})) from None
    if not isinstance(meta, dict) or meta.get("format") != AVATAR_FORMAT:
        raise AvatarError(f"{path!r} is not a wav2lip avatar description; " + _remake_hint(folder, {}))
    if meta.get("version") != AVATAR_VERSION:
        raise AvatarError(f"{folder!r} is avatar format version {meta.get('version')!r}; this version reads "
                          f"{AVATAR_VERSION}: " + _remake_hint(folder, meta))
    need = {"img_size": int, "settings": dict, "source": str, "source_kind": str, "frames": int, "fps": (int, float),
            "sha256": dict}
    for name, typ in need.items():
        if not isinstance(meta.get(name), typ):
            raise AvatarError(f"{path!r} is damaged (field {name!r} missing or wrong); " + _remake_hint(folder, meta))
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise AvatarError(f"{path!r} was edited (it does not match its own checksum); " + _remake_hint(folder, meta))
    return meta


def check_avatar_settings(meta: dict, folder: str, img_size: int, wanted: Optional[dict]) -> None:
    """Refuse an avatar made for another face size, or (``wanted``: settings the user asked for,
    as :meth:`AvatarSettings.record` keys) with other settings."""
    if meta["img_size"] != img_size:
        raise AvatarError(f"avatar {folder!r} was prepared for a {meta['img_size']}x{meta['img_size']} generator, "
                          f"this checkpoint is {img_size}x{img_size}; " + _remake_hint(folder, meta))
    recorded = meta["settings"]
    for name, value in (wanted or {}).items():
        if name in recorded and _norm(recorded[name]) != _norm(value):
            why = (" (--preset published needs boxes found on every frame, at full size)"
                   if name in ("det_every", "det_scale") else "")
            raise AvatarError(f"avatar {folder!r} was prepared with --{name} {recorded[name]!r}, not {value!r}{why}; "
                              f"use its settings (leave the flag out) or " + _remake_hint(folder, meta))


def _norm(v):
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else (float(v) if isinstance(v, (int, float))
                                                                     and not isinstance(v, bool) else v)


def settings_from_record(rec: dict) -> AvatarSettings:
    """The :class:`AvatarSettings` an avatar.json records (detector weights path not kept; with a
    fixed box, the published detection)."""
    try:
        settings = AvatarSettings.from_record(rec)
    except (KeyError, TypeError, ValueError) as exc:
        raise AvatarError(f"avatar settings are damaged ({exc})") from None
    if not (math.isfinite(settings.fps) and settings.fps > 0):
        raise AvatarError(f"avatar settings are damaged (fps {settings.fps!r})")
    return settings


def load_avatar(folder: str, img_size: int, wanted: Optional[dict] = None, verify: bool = True) -> Avatar:
    """Load an avatar folder for a generator of face size ``img_size``; ``wanted``: settings the user
    gave explicitly, which must match. Every file is checked against its recorded checksum and shape
    (``verify=False`` skips the checksums, e.g. for a folder this process just wrote). Raises
    AvatarError with a message that says how to prepare the avatar again."""
    folder = os.path.abspath(folder)
    meta = read_avatar_meta(folder)
    check_avatar_settings(meta, folder, img_size, wanted)
    names = (meta["source"], "boxes.npy", "crops.npy")
    for name in names:
        path = os.path.join(folder, name)
        if os.path.basename(name) != name or not os.path.isfile(path):
            raise AvatarError(f"avatar {folder!r} is incomplete ({name} is missing); " + _remake_hint(folder, meta))
        if verify and file_sha256(path) != meta["sha256"].get(name):
            raise AvatarError(f"avatar {folder!r} was changed or cut short ({name} does not match its checksum); "
                              + _remake_hint(folder, meta))
    try:
        boxes = np.load(os.path.join(folder, "boxes.npy"))
        crops = np.load(os.path.join(folder, "crops.npy"), mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise AvatarError(f"avatar {folder!r} has an unreadable array ({exc}); " + _remake_hint(folder, meta)) from None
    n, s = meta["frames"], meta["img_size"]
    if boxes.shape != (n, 4) or crops.shape != (n, s, s, 3) or crops.dtype != np.uint8:
        raise AvatarError(f"avatar {folder!r} arrays do not match avatar.json ({n} frames at {s}x{s}); "
                          + _remake_hint(folder, meta))
    settings = settings_from_record(meta["settings"])
    source = FaceSource(os.path.join(folder, meta["source"]), fps=settings.fps, static=settings.static,
                        transform=settings.transform, kind=meta["source_kind"])
    source.count = n
    coords = array_to_boxes(boxes)
    w, h = source.first_frame().shape[1::-1]
    if (meta.get("width"), meta.get("height")) != (w, h):
        raise AvatarError(f"avatar {folder!r} frames are {w}x{h}, avatar.json says {meta.get('width')}x"
                          f"{meta.get('height')}; " + _remake_hint(folder, meta))
    if any(c is not None and not (0 <= c[0] < c[1] <= h and 0 <= c[2] < c[3] <= w) for c in coords):
        raise AvatarError(f"avatar {folder!r} has boxes outside its {w}x{h} frames; " + _remake_hint(folder, meta))
    key = hashlib.sha1(repr([meta["sha256"], img_size]).encode()).hexdigest()[:16]
    return Avatar(source, settings, img_size, coords, key, crops=crops, folder=folder)
