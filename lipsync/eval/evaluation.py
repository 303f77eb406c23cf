"""Lip-sync scores (LSE-D, LSE-C, AV offset), image scores (PSNR, SSIM) and audio shifting.

The sync protocol is syncnet_python's: one video feature per 5-frame window starting at frame i and
one audio feature per frame; for every window i and offset j in [-V, V], the distance between video
feature i and audio feature i + j (zero features past either end); per video, the mean over windows
of each offset's distance gives a curve, and

- LSE-D = its minimum,
- LSE-C = its median minus its minimum (confidence),
- AV offset = -(the j at the minimum): > 0 when the audio leads the video (the video is late), in
  frames; delaying the audio by that many frames puts it in sync.

LSE-D and LSE-C take the best offset, so they barely move when the whole audio track is shifted by
a few frames (only the windows whose partner falls off the end change). How well a video is in sync
*as it is* is the AV offset, and the distance and confidence at offset 0 (``dist_at_0``,
``conf_at_0`` = median minus the distance at 0), which this module reports as well.

Two scorers fill in the features: :class:`ExpertScorer` (this project's lip-sync expert, any
checkpoint ``load_model`` reads) and :class:`SyncNetV2Scorer` (syncnet_python's SyncNet with that
release's preprocessing: 224x224 BGR face-track crops, python_speech_features MFCCs).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

import audio
from lipsync.core.errors import Wav2LipError

FPS = 25.0
SR = audio.SAMPLE_RATE
VSHIFT = 15
T = 5


class EvaluationError(Wav2LipError, ValueError):
    """Input the evaluation cannot score; the message says why."""


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------
@dataclass
class SyncScore:
    lse_d: float
    lse_c: float
    offset: int                 # frames; > 0: the audio leads (the video is late)
    windows: int
    curve: List[float] = field(default_factory=list)  # mean distance at offsets -vshift..+vshift

    @property
    def dist_at_0(self) -> float:
        return self.curve[len(self.curve) // 2]

    @property
    def conf_at_0(self) -> float:
        return float(np.median(self.curve)) - self.dist_at_0

    def to_dict(self) -> dict:
        return {"lse_d": round(self.lse_d, 4), "lse_c": round(self.lse_c, 4), "offset": self.offset,
                "dist_at_0": round(self.dist_at_0, 4), "conf_at_0": round(self.conf_at_0, 4),
                "windows": self.windows, "curve": [round(v, 4) for v in self.curve]}


def offset_distances(video_feat: torch.Tensor, audio_feat: torch.Tensor, vshift: int = VSHIFT) -> torch.Tensor:
    """(n, 2 vshift + 1): distance between video feature i and audio feature i + j - vshift, with the
    audio features zero-padded by vshift on both sides (as syncnet_python's calc_pdist)."""
    n = video_feat.shape[0]
    if audio_feat.shape[0] < n:
        raise EvaluationError(f"{n} video windows but only {audio_feat.shape[0]} audio windows")
    padded = torch.nn.functional.pad(audio_feat[:n].float(), (0, 0, vshift, vshift))
    win = padded.unfold(0, 2 * vshift + 1, 1).permute(0, 2, 1)   # (n, 2v+1, D)
    diff = video_feat.float()[:, None, :] - win + 1e-6            # pairwise_distance's eps
    return diff.norm(dim=2)


def sync_score(video_feat: torch.Tensor, audio_feat: torch.Tensor, vshift: int = VSHIFT) -> SyncScore:
    if video_feat.shape[0] < 1:
        raise EvaluationError("no complete 5-frame window to score")
    mdist = offset_distances(video_feat, audio_feat, vshift).mean(0)
    minval, minidx = torch.min(mdist, 0)
    return SyncScore(lse_d=float(minval), lse_c=float(torch.median(mdist) - minval), offset=int(vshift - minidx),
                     windows=int(video_feat.shape[0]), curve=[float(v) for v in mdist.flip(0)])


# ------------------------------------------------------------------------------------------------
# Scorers
# ------------------------------------------------------------------------------------------------
def _batched(fn, items: torch.Tensor, batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(items[i:i + batch]) for i in range(0, len(items), batch)]) if len(items) else items


class ExpertScorer:
    """This project's expert: lower halves of the face crops resized to its input size, BGR in
    [0, 1] (as training reads them), and the mel window paired with each frame in training."""

    name = "expert"

    def __init__(self, checkpoint_path: str, device="cpu", batch_size: int = 64):
        from models import load_model

        loaded = load_model(checkpoint_path, kind="expert", device=device)
        self.model = loaded.model.to(device).eval()
        self.img_size = loaded.img_size
        self.device = torch.device(device)
        self.batch_size = batch_size

    def face_input(self, crop: np.ndarray) -> np.ndarray:
        s = self.img_size
        return cv2.resize(crop, (s, s))[s // 2:]

    def features(self, faces: Sequence[np.ndarray], wav: np.ndarray, fps: float = FPS
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Video features of the windows starting at frames 0..n-5 that have a whole mel window,
        and the audio features of the same frames. ``faces``: face crops (BGR, any size) or the
        lower halves :meth:`face_input` makes."""
        mel = audio.melspectrogram(np.asarray(wav, np.float32))
        n = len(faces) - T + 1
        while n > 0 and audio.crop_mel_window(mel, n - 1, fps) is None:
            n -= 1
        if n < 1:
            raise EvaluationError(f"too short to score: {len(faces)} frames, {len(wav) / SR:.2f} s of audio "
                                  f"(need {T} frames and their audio)")
        s = self.img_size
        halves = [f if f.shape[:2] == (s // 2, s) else self.face_input(f) for f in faces[:n + T - 1]]
        frames = torch.from_numpy(np.stack(halves).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        windows = frames.unfold(0, T, 1).permute(0, 4, 1, 2, 3).reshape(n, 3 * T, s // 2, s)
        mels = torch.from_numpy(np.stack([audio.crop_mel_window(mel, k, fps) for k in range(n)])[:, None])
        m = self.model
        dev = self.device

        def embed(enc, x):
            return torch.nn.functional.normalize(enc(x.to(dev)).flatten(1), p=2, dim=1).cpu()

        v = _batched(lambda x: embed(m.face_encoder, x), windows, self.batch_size)
        a = _batched(lambda x: embed(m.audio_encoder, x), mels, self.batch_size)
        return v, a


class SyncNetV2Scorer:
    """syncnet_python's SyncNet: 224x224 crops made by :func:`syncnet_crop`, raw BGR 0-255; 13
    MFCCs of the 16-bit audio, 20 columns (0.2 s) per window starting at 4 x frame. Windows start at
    frames 0 .. min(frames, samples // 640) - 6, as in that release. Expects 25 fps video."""

    name = "syncnet"

    def __init__(self, model_path: str, device="cpu", batch_size: int = 20):
        from models.syncnet_v2 import load_syncnet_v2

        self.model = load_syncnet_v2(model_path, device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @staticmethod
    def mfcc(wav: np.ndarray) -> np.ndarray:
        import python_speech_features

        pcm = np.clip(np.round(np.asarray(wav, np.float64) * 32768.0), -32768, 32767).astype(np.int16)
        return python_speech_features.mfcc(pcm, SR).T.astype(np.float32)  # (13, frames at 100 Hz)

    def features(self, crops: Sequence[np.ndarray], wav: np.ndarray, fps: float = FPS
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        if abs(fps - FPS) > 1e-3:
            raise EvaluationError(f"syncnet_python's SyncNet scores 25 fps video, got {fps:g} fps")
        cc = torch.from_numpy(self.mfcc(wav))
        min_length = min(len(crops), len(wav) // 640)
        n = min_length - T
        if n < 1:
            raise EvaluationError(f"too short to score: {len(crops)} frames, {len(wav) / SR:.2f} s of audio")
        dev = self.device
        lips_all = torch.from_numpy(np.stack(crops[:n + T - 1]))  # (N, H, W, 3) uint8; float per batch

        def lips(idx):
            x = torch.stack([lips_all[i:i + T] for i in idx]).float()       # (b, T, H, W, 3)
            return self.model.forward_lip(x.permute(0, 4, 1, 2, 3).to(dev)).cpu()

        def auds(idx):
            x = torch.stack([cc[:, 4 * i:4 * i + 20] for i in idx])[:, None]  # (b, 1, 13, 20)
            return self.model.forward_aud(x.to(dev)).cpu()

        idx = torch.arange(n)
        return _batched(lips, idx, self.batch_size), _batched(auds, idx, self.batch_size)


def syncnet_track(boxes: np.ndarray) -> np.ndarray:
    """(n, 3) half-size, centre y, centre x of each box, median-filtered over 13 frames (as
    syncnet_python smooths a face track)."""
    from scipy.signal import medfilt

    rows = track_rows(boxes)
    return np.stack([medfilt(rows[:, c], kernel_size=13) for c in range(3)], axis=1)


def track_rows(boxes) -> np.ndarray:
    """(n, 3) half-size, centre y, centre x of (x1, y1, x2, y2) boxes, unfiltered."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    half = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    return np.stack([half, (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2], axis=1)


def syncnet_crop(frame: np.ndarray, track_row: Sequence[float], crop_scale: float = 0.4) -> np.ndarray:
    """syncnet_python's crop: a square from one half-size above the box centre to (1 + 2 crop_scale)
    below and (1 + crop_scale) to each side, the frame padded with grey 110, resized to 224x224."""
    bs, y, x = track_row
    bsi = int(bs * (1 + 2 * crop_scale))
    padded = np.pad(frame, ((bsi, bsi), (bsi, bsi), (0, 0)), "constant", constant_values=110)
    my, mx = y + bsi, x + bsi
    face = padded[int(my - bs):int(my + bs * (1 + 2 * crop_scale)),
                  int(mx - bs * (1 + crop_scale)):int(mx + bs * (1 + crop_scale))]
    return cv2.resize(face, (224, 224))


# ------------------------------------------------------------------------------------------------
# Videos on disk
# ------------------------------------------------------------------------------------------------
def fill_missing_boxes(boxes: List[Optional[Sequence[int]]]) -> np.ndarray:
    """Linear interpolation over frames without a detection (nearest at the ends), as a face track."""
    have = [i for i, b in enumerate(boxes) if b is not None]
    if not have:
        raise EvaluationError("no face found in any frame")
    known = np.array([boxes[i] for i in have], np.float64)
    idx = np.arange(len(boxes))
    return np.stack([np.interp(idx, have, known[:, c]) for c in range(4)], axis=1)


def crop_box(frame: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The (x1, y1, x2, y2) box of a frame, rounded and clipped to it."""
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    return frame[max(0, y1):min(h, y2), max(0, x1):min(w, x2)]


@dataclass
class ScoredVideo:
    faces: List[np.ndarray]          # expert face inputs (lower halves), if an expert scores
    syncnet_crops: List[np.ndarray]  # 224x224 crops, if syncnet scores
    wav: np.ndarray
    frames: int
    frames_without_face: int


def read_video_for_scoring(path: str, detector="lbp", box: Optional[Sequence[int]] = None,
                           expert: Optional[ExpertScorer] = None, with_syncnet: bool = False,
                           device="cpu", s3fd_path: Optional[str] = None, batch_size: int = 16,
                           progress: bool = False) -> ScoredVideo:
    """Decode at 25 fps, find the face in every frame (or use ``box`` = x1 y1 x2 y2), and keep only
    what the scorers need (the crops), so long videos fit in memory. ``detector``: a FaceDetector or
    a backend name."""
    from lipsync.core.progress import progress_bar

    from lipsync.media.video import VideoError, iter_frames, probe_video

    try:
        info = probe_video(path)
    except VideoError as exc:
        raise EvaluationError(str(exc)) from None
    if not info.has_audio:
        raise EvaluationError(f"{path}: the video has no audio track")
    wav = audio.load_wav(path, SR)
    boxes = track = None
    missing = 0
    if box is None:  # a detection pass first: the face track is smoothed over the whole video
        from face_detection import get_detector

        det = get_detector(detector, device=device, weights_path=s3fd_path) if isinstance(detector, str) else detector
        raw, batch = [], []
        with progress_bar(desc=f"detect {os.path.basename(path)}", unit="frame", disable=not progress, leave=False) as bar:
            for frame in iter_frames(info, FPS):
                batch.append(frame)
                if len(batch) == batch_size:
                    raw += det.detect(batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                raw += det.detect(batch)
        if not raw:
            raise EvaluationError(f"{path}: no frames could be read")
        missing = sum(b is None for b in raw)
        boxes = fill_missing_boxes(raw)
        track = syncnet_track(boxes) if with_syncnet else None
    fixed_row = track_rows(box)[0] if box is not None else None  # a fixed box is its own smoothed track
    faces, crops, n = [], [], 0
    for k, frame in enumerate(iter_frames(info, FPS)):
        if boxes is not None and k >= len(boxes):
            break
        if expert is not None:
            faces.append(expert.face_input(crop_box(frame, box if boxes is None else boxes[k])))
        if with_syncnet:
            crops.append(syncnet_crop(frame, fixed_row if track is None else track[k]))
        n += 1
    if not n:
        raise EvaluationError(f"{path}: no frames could be read")
    return ScoredVideo(faces, crops, wav, n, missing)


# ------------------------------------------------------------------------------------------------
# Preprocessed clips (preprocess.py's output)
# ------------------------------------------------------------------------------------------------
def longest_run(frames: Iterable[int]) -> Tuple[int, int]:
    """(first, length) of the longest run of consecutive frame numbers."""
    best, cur_start, prev, best_start = 0, None, None, 0
    for f in sorted(frames):
        if prev is None or f != prev + 1:
            cur_start = f
        prev = f
        if f - cur_start + 1 > best:
            best, best_start = f - cur_start + 1, cur_start
    return best_start, best


def score_preprocessed_clip(scorer: ExpertScorer, clip_dir: str, vshift: int = VSHIFT,
                            wav: Optional[np.ndarray] = None) -> SyncScore:
    """Score one preprocessed clip (frame crops ``<k>.jpg`` + ``audio.wav``) over its longest run
    of consecutive face frames, with the audio from that run's first frame."""
    stems = [os.path.splitext(f)[0] for f in os.listdir(clip_dir) if f.endswith(".jpg")]
    start, n = longest_run(int(s) for s in stems if s.isdigit())
    if n < T:
        raise EvaluationError(f"{clip_dir}: fewer than {T} consecutive face frames")
    if wav is None:
        wav = audio.load_wav(os.path.join(clip_dir, "audio.wav"), SR)
    faces = []
    for k in range(start, start + n):
        img = cv2.imread(os.path.join(clip_dir, f"{k}.jpg"))
        if img is None:
            raise EvaluationError(f"{clip_dir}: unreadable image {k}.jpg")
        faces.append(scorer.face_input(img))
    offset = int(round(start * SR / FPS))
    v, a = scorer.features(faces, wav[offset:], FPS)
    return sync_score(v, a, vshift)


def measure_known_shifts(scorer: ExpertScorer, clip_dir: str, shifts: Sequence[int],
                         wav: Optional[np.ndarray] = None, vshift: int = VSHIFT) -> List[int]:
    """The AV offsets (frames) ``scorer`` measures on a preprocessed clip whose audio is moved by
    each of ``shifts`` (frames; k > 0: the audio leads the video by k). A scorer that measures them
    exactly returns ``list(shifts)``. ``wav``: the clip's 16 kHz audio, if already loaded.
    Raises :class:`EvaluationError` for a clip with too few consecutive face frames."""
    if wav is None:
        wav = audio.load_wav(os.path.join(clip_dir, "audio.wav"), SR)
    return [score_preprocessed_clip(scorer, clip_dir, vshift, wav=shift_audio(wav, -k)).offset for k in shifts]


# ------------------------------------------------------------------------------------------------
# Audio shifting
# ------------------------------------------------------------------------------------------------
def shift_audio(wav: np.ndarray, frames: float, fps: float = FPS, sr: int = SR) -> np.ndarray:
    """Delay (``frames`` > 0) or advance (< 0) the audio by a number of video frames, keeping its
    length: silence comes in at one end and the other end is cut."""
    n = int(round(abs(frames) * sr / fps))
    wav = np.asarray(wav)
    if n == 0:
        return wav.copy()
    if n >= len(wav):
        return np.zeros_like(wav)
    pad = np.zeros(n, wav.dtype)
    return np.concatenate([pad, wav[:-n]]) if frames > 0 else np.concatenate([wav[n:], pad])


# ------------------------------------------------------------------------------------------------
# Image scores against a reference video
# ------------------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def compare_videos(path: str, reference: str) -> dict:
    """Mean PSNR (dB) and SSIM over the frames both videos have, at 25 fps, frame by frame."""
    from lipsync.media.video import VideoError, iter_frames, probe_video

    try:
        a_info, b_info = probe_video(path), probe_video(reference)
    except VideoError as exc:
        raise EvaluationError(str(exc)) from None
    if (a_info.width, a_info.height) != (b_info.width, b_info.height):
        raise EvaluationError(f"{path} is {a_info.width}x{a_info.height} but the reference {reference} is "
                              f"{b_info.width}x{b_info.height}")
    p, s = [], []
    for fa, fb in zip(iter_frames(a_info, FPS), iter_frames(b_info, FPS)):
        p.append(psnr(fa, fb))
        s.append(ssim(fa, fb))
    if not p:
        raise EvaluationError(f"no frames to compare between {path} and {reference}")
    finite = [v for v in p if math.isfinite(v)]
    return {"psnr": round(float(np.mean(finite)), 3) if finite else float("inf"),
            "ssim": round(float(np.mean(s)), 4), "frames_compared": len(p)}
