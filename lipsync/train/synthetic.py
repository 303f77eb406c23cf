"""A synthetic talking-face corpus whose true mouth motion is known for any audio.

Faces are real photographs that installed packages ship (scikit-image's astronaut, matplotlib's
grace_hopper), varied per identity: colour, scale, position, flip, small rotation, background, sensor
noise and a small head sway. The photograph's own mouth is painted over with skin and a drawn mouth
takes its place, open and shaped by the audio around each frame:

- opening(k) = clip((dB(band energy 200-1000 Hz) + 30) / 30, 0, 1) over the audio from
  (k - 0.5) / fps to (k + 1.5) / fps, then a 3-frame moving average. The F1 band carries most
  energy of open vowels, so this tracks jaw opening.
- width(k) = clip((spectral centroid of the same window - 600 Hz) / 1600 Hz, 0, 1): a high second
  formant (/i/) spreads the lips, a low one (/u/, /o/) rounds them.

Both are functions of the audio alone (:func:`mouth_track`), so :func:`render_frames` renders the
true video for any (identity, audio) pair, and :func:`measure_opening` reads the opening back from
any frame (generated or not) for scoring.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np

from hparams import SAMPLE_RATE as SR
from lipsync.core.errors import Wav2LipError
from lipsync.core.fileio import atomic_write

FPS = 25.0
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
# Audio: espeak-ng speech when installed, otherwise a speech-like synthesiser
# ------------------------------------------------------------------------------------------------
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (660, 1720, 2410),
          (570, 840, 2410), (440, 1020, 2240), (490, 1350, 1690)]
SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "a bright morning follows every long night", "please open the window and let the air in",
    "we will meet again at the old bridge", "numbers like seven and eleven are odd",
    "the rain in spain stays mainly in the plain", "bring the blue book back to me tomorrow",
]


def _resonator(x: np.ndarray, freq: float, bw: float, sr: int) -> np.ndarray:
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bw / sr)
    theta = 2 * np.pi * freq / sr
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, x)


def synth_speech(rng: np.random.Generator, seconds: float, sr: int = SR) -> np.ndarray:
    """Voiced syllables (glottal pulses through formant resonators, varying pitch and vowel), some
    fricative onsets, and pauses between words and phrases."""
    n = int(seconds * sr)
    out = np.zeros(n, np.float64)
    t = int(rng.uniform(0.1, 0.3) * sr)
    base_f0 = rng.uniform(95, 210)
    while t < n - int(0.1 * sr):
        for _ in range(int(rng.integers(1, 4))):  # a word of 1-3 syllables
            dur = int(rng.uniform(0.12, 0.28) * sr)
            if t + dur >= n:
                break
            if rng.random() < 0.35:  # fricative onset
                fl = int(rng.uniform(0.04, 0.09) * sr)
                noise = _resonator(rng.standard_normal(fl), rng.uniform(3500, 6000), 1500, sr)
                out[t:t + fl] += 0.25 * noise * np.hanning(fl)
                t += fl
            f0 = base_f0 * rng.uniform(0.85, 1.2) * np.linspace(1.05, 0.92, dur)
            phase = np.cumsum(f0 / sr)
            pulses = np.diff(np.floor(phase), prepend=0.0)
            f1, f2, f3 = VOWELS[int(rng.integers(len(VOWELS)))]
            v = _resonator(pulses, f1, 90, sr) + 0.6 * _resonator(pulses, f2, 120, sr) + 0.3 * _resonator(pulses, f3, 160, sr)
            env = np.minimum(1.0, np.minimum(np.arange(dur), dur - np.arange(dur)) / (0.03 * sr))
            if t + dur > n:
                break
            out[t:t + dur] += v * env * rng.uniform(0.6, 1.0)
            t += dur + int(rng.uniform(0.0, 0.04) * sr)
        t += int((rng.uniform(0.25, 0.6) if rng.random() < 0.25 else rng.uniform(0.05, 0.12)) * sr)
    peak = np.max(np.abs(out)) or 1.0
    return (0.5 * out / peak).astype(np.float32)


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_speech(rng: np.random.Generator, seconds: float, workdir: str, sr: int = SR) -> np.ndarray:
    import audio

    voice = str(rng.choice(["en", "en-us", "en+f3", "en+m3", "en+f2"]))
    text = " ".join(rng.choice(SENTENCES, size=3))
    path = os.path.join(workdir, f"espeak_{rng.integers(1 << 30)}.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(int(rng.integers(130, 190))), "-p",
                    str(int(rng.integers(30, 70))), "-w", path, text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wav = audio.load_wav(path, sr)
    os.remove(path)
    wav = wav[: int(seconds * sr)]
    if len(wav) < int(seconds * sr):
        wav = np.pad(wav, (0, int(seconds * sr) - len(wav)))
    peak = np.max(np.abs(wav)) or 1.0
    return (0.5 * wav / peak).astype(np.float32)


def make_speech(rng: np.random.Generator, seconds: float, workdir: str, use_espeak: Optional[bool] = None) -> Tuple[np.ndarray, str]:
    """(``seconds`` of 16 kHz mono float32 speech, its source: ``"espeak-ng"`` or ``"synthesiser"``).
    ``use_espeak``: None picks espeak-ng when it is installed."""
    use = espeak_available() if use_espeak is None else use_espeak
    if use:
        return espeak_speech(rng, seconds, workdir), "espeak-ng"
    return synth_speech(rng, seconds), "synthesiser"


# The --speech flag of synthetic_corpus.py and demo.py. The built-in synthesiser is the one source
# every machine has, so a corpus (and the demo's outcome) need not depend on an optional system package.
SPEECH_CHOICES = ("synth", "espeak", "auto")
SPEECH_HELP = "the built-in synthesiser (synth), espeak-ng (espeak), or espeak-ng when installed (auto)"


class SpeechError(Wav2LipError, ValueError):
    """Speech asked for that this machine cannot make, or a corpus made with other speech."""


def speech_source(choice: str) -> str:
    """The source a ``--speech`` choice makes on this machine, as :func:`make_speech` names it
    (``"espeak-ng"`` or ``"synthesiser"``). Raises :class:`SpeechError` for ``espeak`` without espeak-ng."""
    if choice not in SPEECH_CHOICES:
        raise SpeechError(f"--speech must be one of {', '.join(SPEECH_CHOICES)}, got {choice!r}")
    if choice == "espeak" and not espeak_available():
        raise SpeechError("--speech espeak: espeak-ng is not installed (apt-get install espeak-ng), or use --speech synth")
    if choice == "synth" or (choice == "auto" and not espeak_available()):
        return "synthesiser"
    return "espeak-ng"


# ------------------------------------------------------------------------------------------------
# The mouth as a function of the audio
# ------------------------------------------------------------------------------------------------
def mouth_track(wav: np.ndarray, n_frames: int, fps: float = FPS, sr: int = SR) -> Tuple[np.ndarray, np.ndarray]:
    """(opening, width), each (n_frames,) in [0, 1]; see the module docstring."""
    wav = np.asarray(wav, np.float64)
    spec_n = 1024
    freqs = np.fft.rfftfreq(spec_n, 1 / sr)
    band = (freqs >= 200) & (freqs <= 1000)
    opening = np.zeros(n_frames)
    width = np.zeros(n_frames)
    for k in range(n_frames):
        a = int(max(0, (k - 0.5) / fps * sr))
        b = int(min(len(wav), (k + 1.5) / fps * sr))
        seg = wav[a:b]
        if len(seg) < 32:
            continue
        spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), spec_n)) ** 2
        energy = spec[band].sum() / len(seg)
        db = 10 * np.log10(energy + 1e-10)
        opening[k] = np.clip((db + 30) / 30, 0, 1)
        total = spec.sum()
        centroid = (freqs * spec).sum() / total if total > 1e-12 else 600.0
        width[k] = np.clip((centroid - 600) / 1600, 0, 1) if opening[k] > 0.05 else 0.5
    kernel = np.ones(3) / 3
    opening = np.convolve(np.pad(opening, 1, mode="edge"), kernel, mode="valid")
    width = np.convolve(np.pad(width, 1, mode="edge"), kernel, mode="valid")
    return opening.astype(np.float32), width.astype(np.float32)


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


def render_frames(ident: Identity, wav: np.ndarray, fps: float = FPS, n_frames: Optional[int] = None
                  ) -> Iterator[np.ndarray]:
    """The true video of ``ident`` saying ``wav``."""
    import audio

    n = n_frames or audio.num_frames_for_audio(len(wav), fps)
    opening, width = mouth_track(wav, n, fps)
    renderer = Renderer(ident)
    for k in range(n):
        yield renderer.render(k, float(opening[k]), float(width[k]))


def measure_opening(frame: np.ndarray, ident: Identity, k: int, renderer: Optional[Renderer] = None) -> float:
    """How open the mouth in ``frame`` looks: the share of dark pixels in the mouth region."""
    renderer = renderer or Renderer(ident)
    x1, y1, x2, y2 = renderer.mouth_roi(k)
    roi = cv2.cvtColor(frame[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY).astype(np.float32)
    if roi.size == 0:
        return 0.0
    return float((roi < 60).mean())


# ------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------
def write_clip(path: str, ident: Identity, wav: np.ndarray, fps: float = FPS, extra: Optional[dict] = None) -> dict:
    """Write ``path`` (H.264 + 16 kHz AAC) and its truth ``<path without .mp4>.json``."""
    import tempfile

    import audio
    from lipsync.media.video import VideoWriter

    n = audio.num_frames_for_audio(len(wav), fps)
    opening, width = mouth_track(wav, n, fps)
    renderer = Renderer(ident)
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = os.path.join(tmp, "speech.wav")
        audio.save_wav(wav, wav_path, SR)
        s = ident.frame_size
        with VideoWriter(path, s, s, fps, audio_path=wav_path) as writer:
            for k in range(n):
                writer.write(renderer.render(k, float(opening[k]), float(width[k])))
    truth = {
        "fps": fps, "frames": n, "sample_rate": SR, "identity": ident.to_dict(),
        "opening": [round(float(v), 4) for v in opening], "width": [round(float(v), 4) for v in width],
        "face_boxes": [list(renderer.face_box(k)) for k in range(n)], **(extra or {}),
    }
    truth_path = os.path.splitext(path)[0] + ".json"
    with atomic_write(truth_path) as tmp, open(tmp, "w") as fh:
        json.dump(truth, fh)
    return truth


def corpus_plan(n_clips: int, seed: int, clips_per_group: int = 4, seconds: float = 3.0) -> List[dict]:
    """Deterministic list of clips: group, clip name, identity, audio seed."""
    rng = np.random.default_rng(seed)
    plan = []
    n_groups = max(1, int(np.ceil(n_clips / clips_per_group)))
    photos = sorted(PHOTOS)
    for g in range(n_groups):
        group = f"{rng.integers(10**17, 10**18)}{g % 10}"  # LRS2-like numeric ids
        ident = random_identity(rng, photo=photos[g % len(photos)])
        for c in range(clips_per_group):
            if len(plan) == n_clips:
                break
            plan.append({"group": group, "clip": f"{c + 1:05d}", "identity": ident,
                         "audio_seed": int(rng.integers(0, 2**31 - 1)), "seconds": seconds})
    return plan


def write_preprocessed(root: str, groups: int = 4, seconds: float = 1.2, seed: int = 0) -> List[str]:
    """The preprocess.py output contract, written straight from the renderer (crops at the truth
    boxes, no detector): a fast fixture for training tests and benchmarks. Returns ``group/clip``s."""
    import audio
    from lipsync.train.dataprep import DONE, write_audio_and_mel, write_json_atomic

    rng = np.random.default_rng(seed)
    clips = []
    n = int(round(seconds * FPS))
    for g in range(groups):
        ident = random_identity(rng, photo=sorted(PHOTOS)[g % len(PHOTOS)])
        wav = synth_speech(rng, seconds)
        d = os.path.join(root, f"g{g}", "00001")
        os.makedirs(d, exist_ok=True)
        renderer = Renderer(ident)
        opening, width = mouth_track(wav, n)
        for k in range(n):
            x1, y1, x2, y2 = renderer.face_box(k)
            cv2.imwrite(os.path.join(d, f"{k}.jpg"), renderer.render(k, opening[k], width[k])[y1:y2, x1:x2])
        write_audio_and_mel(wav, os.path.join(d, "audio.wav"), os.path.join(d, "mel.npy"))
        write_json_atomic({"fps": FPS, "frames": n, "faces": n, "mel_params": audio.mel_params()},
                          os.path.join(d, DONE), indent=None)
        clips.append(f"g{g}/00001")
    return clips
