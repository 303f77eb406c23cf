"""Raw PCM in an HTTP body: ``Content-Type: audio/L16;rate=R;channels=C`` (RFC 2586, RFC 3551 s4.5.11).

``audio/L16`` is signed 16-bit linear PCM, big-endian ("network byte order") as the RFCs define it;
``endianness=little-endian`` (the parameter IBM Watson's speech API uses) says the samples are
little-endian, as most programs produce them (and as the WebSocket protocol sends them). ``rate``
(Hz, 8000-192000) is required; ``channels`` (1 or 2, interleaved) defaults to 1. Anything but 16 kHz
mono is mixed down and resampled to it (FFmpeg's resampler through PyAV, which aiortc brings).

:func:`parse_l16` reads the header; a :class:`PcmDecoder` turns body chunks of any size into
16 kHz mono samples, carrying a sample split between chunks over to the next one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

import audio

L16 = "audio/l16"
RATES = (8000, 192000)         # Hz, the rates accepted
EXAMPLE = "audio/L16;rate=16000;channels=1;endianness=little-endian"


class PcmFormatError(ValueError):
    """A Content-Type that is not usable raw PCM; the message says what to send instead."""


@dataclass(frozen=True)
class PcmFormat:
    """``rate`` (Hz) and ``channels`` of 16-bit samples, ``little`` endian or big."""

    rate: int
    channels: int = 1
    little: bool = False

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel."""
        return 2 * self.channels


def is_l16(content_type: Optional[str]) -> bool:
    """Whether a Content-Type names raw 16-bit PCM (``audio/L16``, any parameters)."""
    return (content_type or "").split(";")[0].strip().lower() == L16


def parse_l16(content_type: str) -> PcmFormat:
    """The format an ``audio/L16;rate=...`` Content-Type declares; raises PcmFormatError for a
    missing or bad ``rate`` (Hz, 8000-192000), ``channels`` other than 1 or 2, an ``endianness``
    other than ``big-endian`` / ``little-endian`` or an unknown parameter."""
    kind, *params = [part.strip() for part in content_type.split(";")]
    if kind.lower() != L16:
        raise PcmFormatError(f"expected raw PCM, Content-Type: {EXAMPLE}; got {kind!r}")
    values = {}
    for param in filter(None, params):
        key, sep, value = param.partition("=")
        if not sep:
            raise PcmFormatError(f"Content-Type parameter {param!r} has no value (e.g. {EXAMPLE})")
        values[key.strip().lower()] = value.strip().strip('"').lower()
    unknown = set(values) - {"rate", "channels", "endianness"}
    if unknown:
        raise PcmFormatError(f"unknown audio/L16 parameter(s) {', '.join(sorted(unknown))}: give rate, channels "
                             f"and endianness (e.g. {EXAMPLE})")
    if "rate" not in values:
        raise PcmFormatError(f"audio/L16 needs its sample rate: {EXAMPLE}")
    try:
        rate = int(values["rate"])
        channels = int(values.get("channels", "1"))
    except ValueError:
        raise PcmFormatError(f"rate and channels must be whole numbers, got rate={values['rate']!r} "
                             f"channels={values.get('channels', '1')!r}") from None
    if not RATES[0] <= rate <= RATES[1]:
        raise PcmFormatError(f"rate={rate}: give a sample rate of {RATES[0]}-{RATES[1]} Hz (16000 is used as is; "
                             "others are resampled to it)")
    if channels not in (1, 2):
        raise PcmFormatError(f"channels={channels}: give 1 (mono) or 2 (interleaved stereo, mixed down)")
    endian = values.get("endianness", "big-endian")
    if endian not in ("big-endian", "little-endian"):
        raise PcmFormatError(f"endianness={endian!r}: give big-endian (audio/L16's default) or little-endian")
    return PcmFormat(rate, channels, endian == "little-endian")


class PcmDecoder:
    """Body chunks of ``fmt`` in, (n,) int16 samples at 16 kHz mono out, in order.

    :meth:`decode` takes chunks of any size (a sample split between two chunks is joined);
    :meth:`flush` returns the last samples the resampler holds and how many bytes were left over
    (not a whole sample of every channel: a body of the wrong length)."""

    def __init__(self, fmt: PcmFormat):
        self.fmt = fmt
        self._rest = b""
        self._resampler = None
        self._pts = 0
        if fmt.rate != audio.SAMPLE_RATE:
            import av

            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=audio.SAMPLE_RATE)

    def decode(self, chunk: bytes) -> np.ndarray:
        """The (n,) int16 16 kHz samples that ``chunk`` completes (n >= 0)."""
        data = self._rest + chunk
        whole = len(data) - len(data) % self.fmt.frame_bytes
        self._rest = data[whole:]
        x = np.frombuffer(data[:whole], dtype="<i2" if self.fmt.little else ">i2")      # (n * C,)
        if self.fmt.channels == 2:
            x = x.reshape(-1, 2).astype(np.int32).sum(1) // 2                                # (n,) mixed down
        x = x.astype(np.int16)
        return self._resample(x) if self._resampler is not None else x

    def flush(self):
        """``(samples, leftover_bytes)``: what the resampler still holds, (n,) int16, and the bytes
        that did not make a whole sample."""
        tail = np.zeros(0, np.int16)
        if self._resampler is not None:
            tail = self._frames(self._resampler.resample(None))
        return tail, len(self._rest)

    def _resample(self, x: np.ndarray) -> np.ndarray:
        import av

        if not len(x):
            return x
        frame = av.AudioFrame.from_ndarray(x[None], format="s16", layout="mono")   # (1, n) int16
        frame.sample_rate = self.fmt.rate
        frame.pts = self._pts
        self._pts += len(x)
        return self._frames(self._resampler.resample(frame))

    @staticmethod
    def _frames(frames) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]                             # (n,) int16 each
        return np.concatenate(parts).astype(np.int16) if parts else np.zeros(0, np.int16)
