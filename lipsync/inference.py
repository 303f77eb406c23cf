"""Lip-sync a face video (or photo) to an audio track: the engine behind ``inference.py``.

Frames stream from the decoder through the generator to the encoder; memory does not grow with the
video's length. Face boxes come from a first detection pass (cached per video and settings) or from
``box``. With ``blend="none"`` and ``loop="repeat"`` the frames are those of the published script
(hard paste of the generated face into the box, video cycled from the start), except that the output
runs to the end of the audio.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

import audio
from face_detection import DEFAULT_S3FD_PATH, get_detector
from lipsync.device import resolve_device
from lipsync.video import VideoWriter, is_image_path, iter_frames, probe_video, read_image
from lipsync.blending import feather_mask, paste
from lipsync.errors import Wav2LipError

log = logging.getLogger(__name__)

Coords = Tuple[int, int, int, int]  # (y1, y2, x1, x2), the published order
SMOOTH_T = 5
BACKWARD_SEGMENT = 32  # frames decoded at a time when playing the video backwards (pingpong)


class InferenceError(Wav2LipError, ValueError):
    """Input that inference cannot use; the message says what to change."""


@dataclass
class InferenceConfig:
    checkpoint_path: str
    face: str
    audio: str
    outfile: str = "results/result_voice.mp4"
    static: bool = False
    fps: float = 25.0
    pads: Sequence[int] = (0, 10, 0, 0)
    face_det_batch_size: int = 16
    wav2lip_batch_size: int = 128
    resize_factor: int = 1
    crop: Sequence[int] = (0, -1, 0, -1)
    box: Sequence[int] = (-1, -1, -1, -1)
    rotate: bool = False
    nosmooth: bool = False
    face_detector: str = "sfd"
    s3fd_path: Optional[str] = None
    det_scale: float = 1.0
    device: str = "auto"
    blend: str = "feather"
    loop: str = "repeat"
    on_missing_face: str = "passthrough"
    det_cache_dir: Optional[str] = None
    half: bool = False
    progress: bool = True


@dataclass
class InferenceSummary:
    outfile: str
    frames: int
    fps: float
    frames_without_face: int
    detection_cached: bool
    seconds: dict = field(default_factory=dict)

    def line(self) -> str:
        def rate(phase):
            s = self.seconds.get(phase)
            return f"{self.frames / s:.1f} fps" if s else "-"

        total = self.seconds.get("total", 0.0)
        det = "cached" if self.detection_cached else rate("detect")
        return (f"wrote {self.outfile}: {self.frames} frames ({self.frames / self.fps:.2f} s at {self.fps:g} fps), "
                f"{self.frames_without_face} without a face | decode {rate('decode')}, detect {det}, "
                f"generate {rate('generate')}, blend {rate('blend')}, encode {rate('encode')} | "
                f"total {total:.1f} s ({self.frames / total if total else 0:.1f} fps)")


# ------------------------------------------------------------------------------------------------
# Frame source: the face video or photo, after --resize_factor, --rotate and --crop
# ------------------------------------------------------------------------------------------------
class FaceSource:
    def __init__(self, cfg: InferenceConfig):
        self.cfg = cfg
        if not os.path.isfile(cfg.face):
            raise InferenceError(f"--face file not found: {cfg.face!r}")
        self.is_image = is_image_path(cfg.face)
        if self.is_image:
            self.image = self.prepare(read_image(cfg.face))
            self.info = None
            self.fps = float(cfg.fps)
        else:
            self.info = probe_video(cfg.face)
            self.fps = self.info.fps
        self.static = self.is_image or cfg.static
        self._count: Optional[int] = 1 if self.static else None
        self._first: Optional[np.ndarray] = None

    def first_frame(self) -> np.ndarray:
        if self._first is None:
            self._first = next(self.frames(), None)
            if self._first is None:
                raise InferenceError(f"no frames could be read from {self.cfg.face!r}")
        return self._first.copy()

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        c = self.cfg
        if c.resize_factor > 1:
            frame = cv2.resize(frame, (frame.shape[1] // c.resize_factor, frame.shape[0] // c.resize_factor))
        if c.rotate:
            frame = cv2.rotate(frame, cv2.ROTATE_90_CLOCKWISE)
        y1, y2, x1, x2 = c.crop
        if x2 == -1:
            x2 = frame.shape[1]
        if y2 == -1:
            y2 = frame.shape[0]
        frame = frame[y1:y2, x1:x2]
        if frame.size == 0:
            raise InferenceError(f"--crop {list(c.crop)} leaves nothing of the frame")
        return frame

    def frames(self, start: int = 0, end: Optional[int] = None) -> Iterator[np.ndarray]:
        """Source frames [start, end) (just the first one for a photo or --static)."""
        if self.is_image:
            yield self.image.copy()
            return
        if self.static:
            end = 1
        for frame in iter_frames(self.info, self.fps, start, end):
            yield self.prepare(frame)

    @property
    def count(self) -> Optional[int]:
        return self._count

    def set_count(self, n: int):
        self._count = n


def source_index(i: int, n: int, loop: str) -> int:
    """Which source frame output frame ``i`` shows, for a source of ``n`` frames."""
    if n <= 1:
        return 0
    if loop == "pingpong":
        period = 2 * n - 2
        k = i % period
        return k if k < n else period - k
    return i % n


def frames_in_output_order(src: FaceSource, n_out: int, loop: str) -> Iterator[Tuple[int, np.ndarray]]:
    """(source index, frame) for each output frame, decoding as it goes (constant memory)."""
    if src.static:
        first = src.first_frame()
        for _ in range(n_out):
            yield 0, first.copy()
        return
    produced = 0
    n = 0
    for frame in src.frames():  # first forward pass; also counts the frames
        yield n, frame
        n += 1
        produced += 1
        if produced == n_out:
            return
    src.set_count(n)
    while produced < n_out:
        idx = source_index(produced, n, loop)
        if loop == "pingpong" and n > 1 and (produced % (2 * n - 2)) >= n:
            # going backwards: decode a segment ending at idx and play it reversed
            start = max(1, idx - BACKWARD_SEGMENT + 1)
            segment = list(src.frames(start, idx + 1))
            for k, frame in zip(range(idx, start - 1, -1), reversed(segment)):
                yield k, frame
                produced += 1
                if produced == n_out:
                    return
        else:
            for k, frame in enumerate(src.frames(idx)):
                yield idx + k, frame
                produced += 1
                if produced == n_out or (loop == "pingpong" and idx + k == n - 1):
                    break


# ------------------------------------------------------------------------------------------------
# Face boxes
# ------------------------------------------------------------------------------------------------
def smooth_boxes(boxes: np.ndarray, T: int = SMOOTH_T) -> np.ndarray:
    """The published temporal smoothing: each box becomes the mean of a forward window of T boxes
    (the last T for the tail), in place, truncated to int, in frame order."""
    boxes = boxes.copy()
    n = len(boxes)
    for i in range(n):
        window = boxes[max(0, n - T):] if i + T > n else boxes[i:i + T]
        boxes[i] = np.mean(window, axis=0)
    return boxes


def coords_from_detections(dets: List[Optional[Tuple[int, int, int, int]]], frame_hw: Tuple[int, int],
                           pads: Sequence[int], smooth: bool) -> List[Optional[Coords]]:
    """Padded, clipped and (per run of consecutive detections) smoothed boxes as (y1, y2, x1, x2)."""
    h, w = frame_hw
    pady1, pady2, padx1, padx2 = pads
    padded: List[Optional[list]] = []
    for d in dets:
        if d is None:
            padded.append(None)
            continue
        x1, y1, x2, y2 = d
        padded.append([max(0, x1 - padx1), max(0, y1 - pady1), min(w, x2 + padx2), min(h, y2 + pady2)])
    out: List[Optional[Coords]] = [None] * len(dets)
    i = 0
    while i < len(padded):
        if padded[i] is None:
            i += 1
            continue
        j = i
        while j < len(padded) and padded[j] is not None:
            j += 1
        run = np.array(padded[i:j], dtype=np.int64)
        if smooth:
            run = smooth_boxes(run)
        for k, (x1, y1, x2, y2) in enumerate(run.tolist()):
            out[i + k] = (y1, y2, x1, x2) if (x2 > x1 and y2 > y1) else None
        i = j
    return out


def _cache_key(cfg: InferenceConfig, src: FaceSource) -> str:
    st = os.stat(cfg.face)
    parts = [os.path.realpath(cfg.face), st.st_size, st.st_mtime_ns, cfg.face_detector, cfg.det_scale,
             cfg.resize_factor, list(cfg.crop), cfg.rotate, src.static, src.fps]
    if cfg.face_detector == "sfd":
        wpath = cfg.s3fd_path or DEFAULT_S3FD_PATH
        if os.path.isfile(wpath):
            wst = os.stat(wpath)
            parts += [os.path.realpath(wpath), wst.st_size, wst.st_mtime_ns]
    return hashlib.sha1(repr(parts).encode("utf-8")).hexdigest()


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wav2lip", "detections")


def detect_faces(cfg: InferenceConfig, src: FaceSource, device, timings: dict) -> Tuple[list, bool]:
    """Raw detections (x1, y1, x2, y2) or None for every source frame; second result: from cache."""
    cache_dir = cfg.det_cache_dir if cfg.det_cache_dir is not None else default_cache_dir()
    cache_path = os.path.join(cache_dir, _cache_key(cfg, src) + ".npy") if cache_dir else None
    if cache_path and os.path.isfile(cache_path):
        try:
            arr = np.load(cache_path)
        except (OSError, ValueError):
            arr = None  # unreadable cache entry: detect again and overwrite it
        if arr is not None and arr.ndim == 2 and arr.shape[1] == 4:
            src.set_count(len(arr))
            return [None if r[0] < 0 else tuple(int(v) for v in r) for r in arr], True

    detector = get_detector(cfg.face_detector, device=device, weights_path=cfg.s3fd_path)
    dets: list = []
    batch: list = []
    total = 1 if src.static else (src.info.approx_frames or None)
    t_decode = t_detect = 0.0

    def flush():
        nonlocal t_detect
        t0 = time.perf_counter()
        if cfg.det_scale != 1.0:
            small = [cv2.resize(f, None, fx=cfg.det_scale, fy=cfg.det_scale, interpolation=cv2.INTER_AREA)
                     for f in batch]
            found = [None if b is None else tuple(int(round(v / cfg.det_scale)) for v in b)
                     for b in detector.detect(small)]
        else:
            found = detector.detect(batch)
        dets.extend(found)
        t_detect += time.perf_counter() - t0
        batch.clear()

    from tqdm import tqdm

    with tqdm(total=total, desc="detect faces", unit="frame", disable=not cfg.progress, leave=False) as bar:
        frames = src.frames()
        while True:
            t0 = time.perf_counter()
            frame = next(frames, None)
            t_decode += time.perf_counter() - t0
            if frame is None:
                break
            batch.append(frame)
            if len(batch) >= cfg.face_det_batch_size:
                n = len(batch)
                flush()
                bar.update(n)
        if batch:
            n = len(batch)
            flush()
            bar.update(n)
    timings["detect"] = t_detect
    timings["decode_detect_pass"] = t_decode
    src.set_count(len(dets))
    if cache_path:
        os.makedirs(cache_dir, exist_ok=True)
        arr = np.array([d if d is not None else (-1, -1, -1, -1) for d in dets], dtype=np.int32).reshape(-1, 4)
        tmp = cache_path + f".{os.getpid()}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, cache_path)
    return dets, False


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def load_generator(path: str, device) -> Tuple[torch.nn.Module, int]:
    from models import load_model
    from models.fuse import fold_batchnorm

    loaded = load_model(path, kind="generator", device="cpu")
    model = fold_batchnorm(loaded.model).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), loaded.img_size


def model_inputs(faces: List[np.ndarray], mels: List[np.ndarray], img_size: int, device):
    """The published input: (masked face, face) on channels, [0, 1]; mel as (B, 1, 80, 16)."""
    batch = np.stack(faces)
    masked = batch.copy()
    masked[:, img_size // 2:] = 0
    x = np.concatenate((masked, batch), axis=3).astype(np.float32) / np.float32(255.0)
    img = torch.from_numpy(x).permute(0, 3, 1, 2)
    if device.type == "cpu":
        img = img.contiguous(memory_format=torch.channels_last)
    mel = torch.from_numpy(np.stack(mels)[:, None].astype(np.float32))
    return mel.to(device), img.to(device)


# On the CPU, small forward batches keep the activations in cache: 8 frames run ~20% faster per
# frame than 128 and need a fraction of the memory (measured on 2 cores, full-width 96 model).
CPU_MICRO_BATCH = 8


def generate(model, mel_b, img_b, device, half=False) -> List[np.ndarray]:
    """Generated faces as uint8 BGR (the published ``(pred * 255).astype(uint8)``)."""
    step = CPU_MICRO_BATCH if device.type == "cpu" else len(mel_b)
    out = []
    with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=half and device.type == "cuda"):
        for k in range(0, len(mel_b), step):
            pred = model(mel_b[k:k + step], img_b[k:k + step])
            out.extend((pred.float().cpu().numpy().transpose(0, 2, 3, 1) * 255.0).astype(np.uint8))
    return out


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
class _Worker(threading.Thread):
    """Runs ``fn`` in a thread; an exception is kept and re-raised by :meth:`check`."""

    def __init__(self, fn, name):
        super().__init__(daemon=True, name=name)
        self.fn = fn
        self.error: Optional[BaseException] = None

    def run(self):
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.error = exc

    def check(self):
        if self.error is not None:
            raise self.error


_END = object()


def _put(q: queue.Queue, item, consumer: _Worker):
    """Put into a bounded queue unless its consumer died (then re-raise the consumer's error)."""
    while True:
        consumer.check()
        if not consumer.is_alive():
            raise InferenceError("internal error: a pipeline stage stopped early")
        try:
            q.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def _validate(cfg: InferenceConfig):
    if cfg.blend not in ("feather", "none"):
        raise InferenceError(f"--blend must be feather or none, got {cfg.blend!r}")
    if cfg.loop not in ("repeat", "pingpong"):
        raise InferenceError(f"--loop must be repeat or pingpong, got {cfg.loop!r}")
    if cfg.on_missing_face not in ("passthrough", "fail"):
        raise InferenceError(f"--on_missing_face must be passthrough or fail, got {cfg.on_missing_face!r}")
    if cfg.resize_factor < 1:
        raise InferenceError("--resize_factor must be >= 1")
    if cfg.wav2lip_batch_size < 1 or cfg.face_det_batch_size < 1:
        raise InferenceError("batch sizes must be >= 1")
    if not 0 < cfg.det_scale <= 1:
        raise InferenceError("--det_scale must be in (0, 1]")
    if not os.path.isfile(cfg.checkpoint_path):
        raise InferenceError(f"--checkpoint_path not found: {cfg.checkpoint_path!r}")
    if not os.path.isfile(cfg.audio):
        raise InferenceError(f"--audio file not found: {cfg.audio!r}")


def run_inference(cfg: InferenceConfig, frame_sink: Optional[Callable[[int, np.ndarray], None]] = None
                  ) -> InferenceSummary:
    """Lip-sync ``cfg.face`` to ``cfg.audio`` into ``cfg.outfile``.

    ``frame_sink(i, frame)``, when given, also receives every output frame before encoding (tests).
    """
    t_start = time.perf_counter()
    _validate(cfg)
    device = resolve_device(cfg.device)
    timings: dict = {}

    model, img_size = load_generator(cfg.checkpoint_path, device)
    src = FaceSource(cfg)
    fps = src.fps

    wav = audio.load_wav(cfg.audio, 16000)
    mel = audio.melspectrogram(wav)
    if not np.isfinite(mel).all():
        raise InferenceError("the audio produced a non-finite spectrogram")
    n_out = audio.num_frames_for_audio(len(wav), fps)
    starts = audio.mel_chunk_starts(mel.shape[1], fps, n_frames=n_out)

    # ---- face boxes per source frame ----
    cached = False
    if cfg.box[0] != -1:
        y1, y2, x1, x2 = cfg.box
        h, w = src.first_frame().shape[:2]
        if not (0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w):
            raise InferenceError(f"--box {list(cfg.box)} (top bottom left right) is outside the {w}x{h} frame")
        coords_of = lambda j: (y1, y2, x1, x2)  # noqa: E731
    else:
        dets, cached = detect_faces(cfg, src, device, timings)
        if not dets:
            raise InferenceError(f"no frames could be read from {cfg.face!r}")
        frame_hw = src.first_frame().shape[:2]
        coords = coords_from_detections(dets, frame_hw, cfg.pads, smooth=not cfg.nosmooth)
        missing = [j for j, c in enumerate(coords) if c is None]
        if len(missing) == len(coords):
            raise InferenceError(f"no face found in any frame of {cfg.face!r}: give the face box with "
                                 "--box TOP BOTTOM LEFT RIGHT, or try the other --face_detector")
        if missing and cfg.on_missing_face == "fail":
            raise InferenceError(f"no face in {len(missing)} frame(s) of {cfg.face!r} (first: frame "
                                 f"{missing[0]}); use --on_missing_face passthrough to keep them unchanged")
        coords_of = coords.__getitem__

    # ---- stream: decode -> generate -> paste -> encode ----
    out_h, out_w = src.first_frame().shape[:2]
    mask = feather_mask(img_size) if cfg.blend == "feather" else None
    # frames in flight are bounded: on the CPU the generator runs micro-batches anyway, so frames are
    # handed on in small chunks (a 128-frame chunk of 720p frames alone is 350 MB)
    chunk = cfg.wav2lip_batch_size if device.type != "cpu" else min(cfg.wav2lip_batch_size, 2 * CPU_MICRO_BATCH)
    frames_q: queue.Queue = queue.Queue(maxsize=chunk)
    paste_q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    t_decode = [0.0]
    t_blend = [0.0]
    missing_out = [0]

    def decode():
        it = frames_in_output_order(src, n_out, cfg.loop)
        while not stop.is_set():
            t0 = time.perf_counter()
            item = next(it, _END)
            t_decode[0] += time.perf_counter() - t0
            while not stop.is_set():
                try:
                    frames_q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is _END:
                return

    writer = VideoWriter(cfg.outfile, out_w, out_h, fps, audio_path=cfg.audio)

    def encode():
        t_enc = 0.0
        index = 0
        while True:
            item = paste_q.get()
            if item is _END:
                break
            t0 = time.perf_counter()
            done = []
            for frame, face, c in item:
                if face is not None:
                    frame = paste(frame, face, c, cfg.blend, mask)
                done.append(frame)
            t_blend[0] += time.perf_counter() - t0
            for frame in done:
                if frame_sink is not None:
                    frame_sink(index, frame)
                index += 1
                t1 = time.perf_counter()
                writer.write(frame)
                t_enc += time.perf_counter() - t1
        timings["encode_write"] = t_enc

    decoder = _Worker(decode, "decode")
    encoder = _Worker(encode, "encode")
    decoder.start()
    encoder.start()

    from tqdm import tqdm

    t_gen = 0.0
    try:
        with tqdm(total=n_out, desc="lip-sync", unit="frame", disable=not cfg.progress, leave=False) as bar:
            pending: list = []  # (frame, coords or None, face crop or None, mel) in output order
            n_faces = 0
            i = 0
            finished = False
            while not finished:
                try:
                    item = frames_q.get(timeout=0.5)
                except queue.Empty:
                    decoder.check()
                    encoder.check()
                    continue
                if item is _END:
                    finished = True
                else:
                    j, frame = item
                    c = coords_of(j)
                    if c is None:
                        missing_out[0] += 1
                        pending.append((frame, None, None, None))
                    else:
                        y1, y2, x1, x2 = c
                        face = cv2.resize(frame[y1:y2, x1:x2], (img_size, img_size))
                        s = starts[i]
                        pending.append((frame, c, face, mel[:, s:s + audio.MEL_STEP_SIZE]))
                        n_faces += 1
                    i += 1
                if pending and (n_faces >= chunk or finished):
                    t0 = time.perf_counter()
                    with_face = [p for p in pending if p[1] is not None]
                    preds: list = []
                    if with_face:
                        mel_b, img_b = model_inputs([p[2] for p in with_face], [p[3] for p in with_face],
                                                    img_size, device)
                        preds = generate(model, mel_b, img_b, device, cfg.half)
                    t_gen += time.perf_counter() - t0
                    out = []
                    for frame, c, face, _ in pending:
                        out.append((frame, preds.pop(0) if c is not None else None, c))
                    _put(paste_q, out, encoder)
                    bar.update(len(pending))
                    pending, n_faces = [], 0
        _put(paste_q, _END, encoder)
        encoder.join()
        decoder.join()
        decoder.check()
        encoder.check()
        if writer.frames != n_out:
            raise InferenceError(f"internal error: wrote {writer.frames} frames, expected {n_out}")
        writer.close()
    except BaseException:
        stop.set()
        writer.abort()
        try:
            paste_q.put_nowait(_END)
        except queue.Full:
            pass
        raise
    finally:
        stop.set()

    timings["decode"] = t_decode[0] + timings.pop("decode_detect_pass", 0.0)
    timings["generate"] = t_gen
    timings["blend"] = t_blend[0]
    timings["encode"] = timings.pop("encode_write", 0.0)
    timings["total"] = time.perf_counter() - t_start
    return InferenceSummary(outfile=cfg.outfile, frames=n_out, fps=fps, frames_without_face=missing_out[0],
                            detection_cached=cached, seconds=timings)
