"""A synthetic talking-face corpus whose true mouth motion is known for any audio.

Faces are real photographs with a drawn mouth (:mod:`lipsync.train.synthetic_faces`), open and
shaped by the audio around each frame:

- opening(k) = clip((dB(band energy 200-1000 Hz) + 30) / 30, 0, 1) over the audio from
  (k - 0.5) / fps to (k + 1.5) / fps, then a 3-frame moving average. The F1 band carries most
  energy of open vowels, so this tracks jaw opening.
- width(k) = clip((spectral centroid of the same window's 700-3000 Hz band - 900 Hz) / 1200 Hz, 0, 1)
  (0.5 while the mouth is shut): the band holds the second formant, and a high one (/i/) spreads
  the lips, a low one (/u/, /o/) rounds them. On the built-in synthesiser's voiced frames that
  centroid's 5th-95th percentiles are 900-2080 Hz, so the width uses its whole range (the centroid
  of the whole spectrum sat below 725 Hz on 3 voiced frames in 4, leaving the width near 0).

Both are functions of the audio alone (:func:`mouth_track`), so :func:`render_frames` renders the
true video for any (identity, audio) pair, and :func:`~lipsync.train.synthetic_faces.measure_opening`
reads the opening back from any frame (generated or not) for scoring. Speech comes from espeak-ng
or from a built-in synthesiser (:func:`make_speech`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np

from hparams import SAMPLE_RATE as SR
from lipsync.core.errors import Wav2LipError
from lipsync.core.fileio import atomic_write
from lipsync.train.synthetic_faces import PHOTOS, Identity, Renderer, random_identity

FPS = 25.0


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
    f2_band = (freqs >= 700) & (freqs <= 3000)
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
        total = spec[f2_band].sum()
        centroid = (freqs[f2_band] * spec[f2_band]).sum() / total if total > 1e-12 else 900.0
        width[k] = np.clip((centroid - 900) / 1200, 0, 1) if opening[k] > 0.05 else 0.5
    kernel = np.ones(3) / 3
    opening = np.convolve(np.pad(opening, 1, mode="edge"), kernel, mode="valid")
    width = np.convolve(np.pad(width, 1, mode="edge"), kernel, mode="valid")
    return opening.astype(np.float32), width.astype(np.float32)


def render_frames(ident: Identity, wav: np.ndarray, fps: float = FPS, n_frames: Optional[int] = None
                  ) -> Iterator[np.ndarray]:
    """The true video of ``ident`` saying ``wav``."""
    import audio

    n = n_frames or audio.num_frames_for_audio(len(wav), fps)
    opening, width = mouth_track(wav, n, fps)
    renderer = Renderer(ident)
    for k in range(n):
        yield renderer.render(k, float(opening[k]), float(width[k]))


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


def synthetic_calibration(img_size: int, samples: int = 96, seed: int = 0):
    """Calibration data for an int8 generator when no face of the user's is at hand
    (``export_onnx.py --int8`` without ``--calibration_face``, ``serve.py --precision int8``): the
    built-in synthesiser's speech said by one identity per photograph in turn, each frame cropped at
    the identity's known face box and resized to ``img_size``. Returns a
    :class:`lipsync.render.quantize.Calibration` of ``samples`` (mel window, face crop) pairs."""
    from lipsync.render.blending import cut_crop
    from lipsync.render.engine import windows_of
    from lipsync.render.quantize import Calibration

    rng = np.random.default_rng(seed)
    wav = synth_speech(rng, samples / FPS + 0.5)
    n, windows = windows_of(wav, FPS)  # (n, 80, 16), n > samples
    opening, width = mouth_track(wav, n)
    renderers = [Renderer(random_identity(rng, photo=p)) for p in sorted(PHOTOS)]
    faces = []
    for k in range(samples):
        renderer = renderers[k % len(renderers)]
        x1, y1, x2, y2 = renderer.face_box(k)
        faces.append(cut_crop(renderer.render(k, opening[k], width[k]), (y1, y2, x1, x2), img_size))
    names = " and ".join(sorted(PHOTOS))
    return Calibration(windows[:samples], np.stack(faces),
                       f"synthetic clip ({names} identities, synthesised speech, seed {seed}; {samples} frames)")
