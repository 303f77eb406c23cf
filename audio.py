"""Audio loading, the mel-spectrogram the published checkpoints were trained on, and the ONE
definition of how video frames line up with mel columns.

Alignment: video at ``fps`` frames/s, mel at ``sample_rate / hop_size`` (= 80) columns/s. Frame ``k``
is paired with the ``mel_step_size``-column (16 = 0.2 s) window starting at column
``int(80 * k / fps)``. That is what the published inference feeds the generator, and the training
code here uses the same function, so a model trained here and run here has no built-in offset.
(The published training code paired frame ``k`` with the window of frame ``k - 1``.)
"""
from __future__ import annotations

import functools
import math
import os
import subprocess
from typing import Optional, Tuple

import numpy as np
from scipy import signal

from lipsync.media import ffmpeg as media
from lipsync.media.ffmpeg import MediaError
from lipsync.media.probe import audio_input_args

from hparams import (AUDIO_KEYS, FMAX, FMIN, HOP_SIZE, MAX_ABS_VALUE, MEL_STEP_SIZE, MIN_LEVEL_DB, N_FFT, NUM_MELS,  # noqa: F401
                     PREEMPHASIS, REF_LEVEL_DB, SAMPLE_RATE, WIN_SIZE, HParams, hparams as default_hparams)


class AudioError(MediaError):
    """An audio input that cannot be read or used."""


# ffmpeg discovery lives in lipsync.media.ffmpeg (WAV2LIP_FFMPEG, --ffmpeg, feature detection); kept
# importable from here for callers that only need the binary.
ffmpeg_exe = media.ffmpeg_exe


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
# Lossless formats libsndfile reads exactly, with no timeline of their own (no start offset, no
# priming, no padding): read in-process. Everything else goes through ffmpeg and its timeline.
_SOUNDFILE_FORMATS = {"WAV", "WAVEX", "W64", "RF64", "AIFF", "FLAC"}


def _read_soundfile(path: str) -> Optional[Tuple[np.ndarray, int]]:
    """((samples,) float32 mono, rate in Hz) for a PCM WAV/AIFF/FLAC, or None for anything else."""
    try:
        import soundfile as sf
    except ImportError:
        return None
    try:
        if sf.info(path).format not in _SOUNDFILE_FORMATS:
            return None
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 - soundfile raises many types; ffmpeg below is the fallback
        return None
    return data.mean(axis=1), int(file_sr)


def _decode_with_ffmpeg(path: str, sr: int) -> np.ndarray:
    """(samples,) float32 mono at ``sr`` Hz: the file's first audio stream on the file's timeline
    (:func:`lipsync.media.probe.audio_timeline_filters`)."""
    try:
        a_in, a_out, _, _ = audio_input_args(path, 0)
    except media.MediaError as exc:
        raise AudioError(f"cannot read audio from {path!r}: {exc}") from None
    cmd = media.ffmpeg_command("-copyts", *a_in, *a_out, "-ac", "1", "-ar", str(sr), "-c:a", "pcm_f32le",
                               "-f", "f32le", "pipe:1")
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        reason = media.stderr_reason(proc.stderr, f"ffmpeg exit {proc.returncode}")
        raise AudioError(f"cannot read audio from {path!r}: {reason}")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def load_wav(path: str, sr: int = SAMPLE_RATE) -> np.ndarray:
    """(samples,) float32 mono at ``sr`` Hz from any audio ffmpeg reads, or the audio of a video.

    The samples are on the file's timeline: sample ``i`` is at ``i / sr`` s after the file's start
    (which is where a video's frame 0 is), so audio that starts after the file's start (muxed with
    an offset, an edit list) begins with that much silence, priming the container trims is
    dropped, and the audio ends where the container says (not after the codec's padding). These
    are the samples ``VideoWriter(audio_path=...)`` muxes. Raises :class:`AudioError` when the file
    is missing, has no audio stream, or cannot be decoded."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path!r}")
    read = _read_soundfile(path)
    if read is not None and read[0].size == 0:
        read = None  # a WAV whose header says 0 bytes (a recorder stopped before finishing it): ffmpeg reads on
    if read is not None:
        wav, file_sr = read
        if file_sr != sr and wav.size:
            import librosa

            wav = librosa.resample(wav, orig_sr=file_sr, target_sr=sr)
    else:
        wav = _decode_with_ffmpeg(path, sr)
    if wav.size == 0:
        raise AudioError(f"{path!r} contains no audio samples")
    return np.ascontiguousarray(wav, dtype=np.float32)


def save_wav(wav: np.ndarray, path: str, sr: int = SAMPLE_RATE) -> None:
    """Write (samples,) float audio as 16-bit PCM WAV at ``sr`` Hz; samples outside [-1, 1] are
    clipped."""
    from scipy.io import wavfile

    pcm = np.round(np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)
    wavfile.write(path, sr, pcm)


# --------------------------------------------------------------------------------------------
# Mel spectrogram (the published recipe)
# --------------------------------------------------------------------------------------------
def preemphasis(wav: np.ndarray, k: float, enabled: bool = True) -> np.ndarray:
    return signal.lfilter([1, -k], [1], wav) if enabled else wav


@functools.lru_cache(maxsize=8)
def _mel_basis(sample_rate: int, n_fft: int, num_mels: int, fmin: float, fmax: float) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin, fmax=fmax)


def _stft(y: np.ndarray, hp: HParams) -> np.ndarray:
    import librosa

    # reflect padding is what librosa < 0.10 did by default and what the checkpoints saw
    return librosa.stft(y=y, n_fft=hp.n_fft, hop_length=hp.hop_size, win_length=hp.win_size,
                        center=True, pad_mode="reflect")


def _amp_to_db(x: np.ndarray, hp: HParams) -> np.ndarray:
    min_level = np.exp(hp.min_level_db / 20 * np.log(10))
    return 20 * np.log10(np.maximum(min_level, x))


def _normalize(S: np.ndarray, hp: HParams) -> np.ndarray:
    scaled = (S - hp.min_level_db) / (-hp.min_level_db)
    if hp.symmetric_mels:
        out = (2 * hp.max_abs_value) * scaled - hp.max_abs_value
        lo = -hp.max_abs_value
    else:
        out = hp.max_abs_value * scaled
        lo = 0.0
    if hp.allow_clipping_in_normalization:
        out = np.clip(out, lo, hp.max_abs_value)
    return out


def melspectrogram(wav: np.ndarray, hp: HParams = default_hparams) -> np.ndarray:
    """(num_mels, T) float32 mel spectrogram, T = len(wav) // hop_size + 1."""
    wav = np.asarray(wav, dtype=np.float64)
    if wav.ndim != 1:
        raise AudioError(f"melspectrogram expects mono audio (1-D), got shape {wav.shape}")
    if wav.size == 0:
        raise AudioError("melspectrogram got an empty signal")
    wav = np.nan_to_num(wav, nan=0.0, posinf=0.0, neginf=0.0)
    D = _stft(preemphasis(wav, hp.preemphasis, hp.preemphasize), hp)
    return mel_of_stft(D, hp)


def mel_of_stft(D: np.ndarray, hp: HParams = default_hparams) -> np.ndarray:
    """(num_mels, T) float32 normalised mel spectrogram of a (n_fft // 2 + 1, T) STFT (the second
    half of :func:`melspectrogram`; the streaming mel of :mod:`lipsync.render.streaming` shares it)."""
    mel = np.dot(_mel_basis(hp.sample_rate, hp.n_fft, hp.num_mels, hp.fmin, hp.fmax), np.abs(D))
    S = _amp_to_db(mel, hp) - hp.ref_level_db
    if hp.signal_normalization:
        S = _normalize(S, hp)
    return S.astype(np.float32)


def mel_params(hp: HParams = default_hparams) -> dict:
    """The hparams that define a mel spectrogram (``hparams.AUDIO_KEYS``), as recorded beside a
    cached mel: two mels are interchangeable exactly when these are equal."""
    return {k: getattr(hp, k) for k in AUDIO_KEYS}


def mel_columns_per_second(hp: HParams = default_hparams) -> float:
    return hp.sample_rate / hp.hop_size


# --------------------------------------------------------------------------------------------
# Frame <-> mel alignment: the one place it is defined
# --------------------------------------------------------------------------------------------
def frame_to_mel_start(frame_index, fps: float, hp: HParams = default_hparams):
    """First mel column of the window paired with video frame ``frame_index`` (int or array)."""
    cols = mel_columns_per_second(hp)
    if isinstance(frame_index, np.ndarray):
        return (cols * frame_index.astype(np.float64) / float(fps)).astype(np.int64)
    return int(cols * (frame_index / float(fps)))


def mel_chunk_starts(n_mel_cols: int, fps: float, n_frames: int | None = None,
                     step: int = MEL_STEP_SIZE, hp: HParams = default_hparams) -> list[int]:
    """Start column of the mel window for each output frame.

    With ``n_frames=None`` this is the published inference sequence: windows until one would run
    past the end, then one last window clamped to end at the final column. With ``n_frames`` given
    (e.g. :func:`num_frames_for_audio`), the same sequence continues with clamped windows, so the
    video can last as long as the audio.
    """
    if n_mel_cols < step:
        raise AudioError(f"audio too short: {n_mel_cols} mel columns, need at least {step} "
                         f"({step / mel_columns_per_second(hp):.2f} s)")
    last = n_mel_cols - step
    starts: list[int] = []
    k = 0
    while True:
        s = frame_to_mel_start(k, fps, hp)
        if s > last:
            break
        starts.append(s)
        k += 1
    starts.append(last)  # the published loop always ends with the clamped window
    if n_frames is not None:
        if n_frames < len(starts):
            return starts[:n_frames]
        starts.extend([last] * (n_frames - len(starts)))
    return starts


def num_frames_for_audio(num_samples: int, fps: float, hp: HParams = default_hparams) -> int:
    """How many video frames cover ``num_samples`` of audio (rounded up, at least one)."""
    return max(1, math.ceil(num_samples * float(fps) / hp.sample_rate - 1e-6))


def crop_mel_window(mel: np.ndarray, frame_index: int, fps: float, step: int = MEL_STEP_SIZE,
                    hp: HParams = default_hparams) -> np.ndarray | None:
    """(num_mels, step) window for one frame, or None when the window would run past the end."""
    start = frame_to_mel_start(frame_index, fps, hp)
    if start < 0 or start + step > mel.shape[1]:
        return None
    return mel[:, start:start + step]
