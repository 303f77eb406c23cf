"""Speech arriving in pieces -> the mel windows of the frames it completes, as soon as they are final.

:class:`StreamingMel` computes mel columns from 16 kHz samples as they arrive, with the recipe of
:func:`audio.melspectrogram` (pre-emphasis, centred STFT with reflect padding, mel, dB,
normalisation): column ``t`` covers samples ``[200 t - 400, 200 t + 400)``, so it is final (the
same whatever comes after) once sample ``200 t + 399`` has arrived (and sample 400, which the
reflect padding of the first columns reads). Each column is computed once, from the same samples
and with the same functions as the offline mel, so every complete column equals the offline one
(tests/test_streaming.py measures the difference: 0 on this machine, and at most float32 rounding
where a BLAS blocks the mel projection differently).

:class:`FrameWindows` turns those columns into the (80, 16) window of each output frame: frame ``k``
needs columns ``int(80 k / fps)`` .. ``+ 15``, so it can be made once the audio reaches
``k / fps + 0.2 s`` (plus 25 ms of STFT half-window): that look-ahead is inherent to the model. At
the end of the audio the reflect padding of the last columns and the clamped last windows complete
the sequence: frames and windows are exactly those of :func:`lipsync.render.engine.windows_of` for the same
samples.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
from scipy import signal

import audio
from hparams import HParams, hparams as default_hparams

PCM_SCALE = 32768.0  # signed 16-bit PCM -> float in [-1, 1)


class StreamError(audio.AudioError):
    """Streamed audio that cannot be used (malformed PCM, too short at the end); the message says why."""


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Signed 16-bit little-endian mono PCM bytes -> (samples,) float32 in [-1, 1).

    Raises StreamError for an odd number of bytes (not whole samples)."""
    if len(data) % 2:
        raise StreamError(f"PCM audio must be whole 16-bit samples: got {len(data)} bytes (an odd number)")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / PCM_SCALE


class StreamingMel:
    """Mel columns of a growing signal, each computed once, when it is final.

    ``push(samples)`` takes (n,) float samples at ``hp.sample_rate`` Hz and returns the
    (num_mels, c) float32 columns that became final (c >= 0); ``finish()`` returns the remaining
    columns (those that read the reflect padding at the end). Columns come out in order;
    ``columns`` counts them; after ``finish`` there are ``samples // hop + 1``, as offline.
    """

    def __init__(self, hp: HParams = default_hparams):
        self.hp = hp
        self.half = hp.n_fft // 2    # samples of the STFT window on each side of a column's centre
        self.samples = 0             # samples pushed so far
        self.columns = 0             # columns returned so far
        self.finished = False
        self._zi = np.zeros(1)       # pre-emphasis filter state (-k times the previous sample)
        self._buf = np.zeros(0)      # pre-emphasised samples from index self._start on
        self._start = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add (n,) samples; returns the (num_mels, c) float32 columns that became final."""
        if self.finished:
            raise StreamError("audio arrived after the end of the stream")
        x = np.nan_to_num(np.asarray(samples, dtype=np.float64).ravel(), nan=0.0, posinf=0.0, neginf=0.0)
        if x.size:
            if self.hp.preemphasize:
                # lfilter with carried state: the arithmetic of audio.preemphasis on the whole signal
                x, self._zi = signal.lfilter([1, -self.hp.preemphasis], [1], x, zi=self._zi)
            self._buf = np.concatenate([self._buf, x])
            self.samples += x.size
        # column t reads samples up to 200 t + 399, and the first ones read sample 400 (the padding)
        final = (self.samples - self.half) // self.hp.hop_size + 1 if self.samples > self.half else 0
        return self._columns(final, end=False)

    def finish(self) -> np.ndarray:
        """The end of the signal: the last columns, with reflect padding at the end. Raises
        StreamError when no audio arrived."""
        if self.finished:
            return self._empty()
        if self.samples == 0:
            raise StreamError("the stream ended before any audio arrived")
        out = self._columns(self.samples // self.hp.hop_size + 1, end=True)
        self.finished = True
        self._buf = np.zeros(0)
        return out

    def _empty(self) -> np.ndarray:
        return np.zeros((self.hp.num_mels, 0), np.float32)

    def _columns(self, total: int, end: bool) -> np.ndarray:
        """Columns ``self.columns .. total - 1`` (``end``: with the reflect padding at the end)."""
        hp, half, hop = self.hp, self.half, self.hp.hop_size
        if total <= self.columns:
            return self._empty()
        lo = self.columns * hop - half                 # first sample the next column reads (may be < 0)
        if self._start == 0 and lo < 0:
            # the start is still held: prepend its reflection (np.pad, as librosa pads)
            sig, origin = np.pad(self._buf, (half, half if end else 0), mode="reflect"), -half
        else:
            sig, origin = (np.pad(self._buf, (0, half), mode="reflect") if end else self._buf), self._start
        seg = sig[lo - origin:lo - origin + (total - self.columns - 1) * hop + hp.n_fft]
        cols = mel_columns(seg, hp)
        self.columns = total
        keep = self.columns * hop - half             # later columns read from here on
        if keep > self._start:
            self._buf = self._buf[keep - self._start:]
            self._start = keep
        return cols


def mel_columns(seg: np.ndarray, hp: HParams = default_hparams) -> np.ndarray:
    """(num_mels, c) float32 mel columns of an already padded, pre-emphasised segment of
    ``(c - 1) * hop + n_fft`` samples: :func:`audio.melspectrogram`'s STFT frames and scaling."""
    import librosa

    D = librosa.stft(y=seg, n_fft=hp.n_fft, hop_length=hp.hop_size, win_length=hp.win_size, center=False)
    return audio.mel_of_stft(D, hp)


class FrameWindows:
    """The mel window of each output frame of a stream at ``fps`` frames/s, as soon as it is final.

    ``push(samples)`` and ``finish()`` return (G, num_mels, 16) float32 windows for the next G
    frames (G >= 0), in frame order: before the end, frame ``k`` comes once its window's columns are
    final (the audio reaches about ``k / fps + 0.225`` s); ``finish`` adds the rest, clamped as
    :func:`audio.mel_chunk_starts` clamps them, so that ``frames == audio.num_frames_for_audio(
    samples, fps)`` and every window equals the offline one. ``finish`` raises StreamError for audio
    too short for one window (0.1875 s), as offline inference does.
    """

    def __init__(self, fps: float, hp: HParams = default_hparams):
        if not fps > 0:
            raise StreamError(f"frame rate must be positive, got {fps}")
        self.fps = float(fps)
        self.hp = hp
        self.mel = StreamingMel(hp)
        self.step = audio.MEL_STEP_SIZE
        self.frames = 0                                    # windows returned so far = the next frame's index
        self.total: Optional[int] = None                   # frames of the whole stream, once finished
        self._cols = np.zeros((hp.num_mels, 0), np.float32)  # columns from index self._col0 on
        self._col0 = 0

    @property
    def samples(self) -> int:
        return self.mel.samples

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add (n,) float samples at the mel's sample rate; returns the windows they complete."""
        self._add(self.mel.push(samples))
        starts: List[int] = []
        while True:
            s = audio.frame_to_mel_start(self.frames + len(starts), self.fps, self.hp)
            if s + self.step > self.mel.columns:
                break
            starts.append(s)
        return self._take(starts)

    def finish(self) -> np.ndarray:
        """The end of the stream: the remaining windows (the last ones clamped to the end)."""
        if self.total is not None:
            return self._windows([])
        self._add(self.mel.finish())
        cols = self.mel.columns
        if cols < self.step:
            raise StreamError(f"the audio is too short: {self.samples / self.hp.sample_rate:.3f} s gives "
                              f"{cols} mel columns; a frame needs {self.step}, which takes at least "
                              f"{(self.step - 1) * self.hp.hop_size / self.hp.sample_rate:.4g} s")
        self.total = audio.num_frames_for_audio(self.samples, self.fps, self.hp)
        starts = audio.mel_chunk_starts(cols, self.fps, n_frames=self.total, step=self.step, hp=self.hp)
        return self._take(starts[self.frames:])

    # ---- internals -------------------------------------------------------------------------------
    def _add(self, cols: np.ndarray) -> None:
        if cols.shape[1]:
            self._cols = np.concatenate([self._cols, cols], axis=1)

    def _windows(self, starts: List[int]) -> np.ndarray:
        if not starts:
            return np.zeros((0, self.hp.num_mels, self.step), np.float32)
        return np.stack([self._cols[:, s - self._col0:s - self._col0 + self.step] for s in starts])

    def _take(self, starts: List[int]) -> np.ndarray:
        out = self._windows(starts)
        self.frames += len(starts)
        # keep what later windows read: the next frame's window, or the clamped last window at the
        # end (which starts at most ``step`` columns before the columns final now)
        nxt = audio.frame_to_mel_start(self.frames, self.fps, self.hp)
        keep = max(0, min(nxt, self.mel.columns - self.step))
        if keep > self._col0:
            self._cols = self._cols[:, keep - self._col0:]
            self._col0 = keep
        return out


def warm_up_mel() -> None:
    """Compute a few mel columns once: the first STFT imports librosa's (numba compiles and loads its
    caches), seconds that would otherwise stall the first render or the first stream. Callers run it
    in a thread while the model loads (inference) or before serving (the server)."""
    FrameWindows(25.0).push(np.zeros(default_hparams.sample_rate // 2, np.float32))  # 0.5 s: some columns are final
