"""Speech of a live session (:mod:`lipsync.serve.live`): an :class:`Utterance` (16 kHz int16 samples
and one mel window per frame, whole or growing as its audio arrives) and a :class:`SpeechStream`
(speech pushed in pieces: a PCM body, the WebSocket protocol's PCM messages, a viewer's microphone),
whose windows are computed piece by piece with :class:`lipsync.render.streaming.FrameWindows`, the
same windows an offline render of the whole audio gets.
"""
from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Deque, Dict, Optional

import numpy as np

import audio
from lipsync.render.streaming import PCM_SCALE, FrameWindows, StreamError

if TYPE_CHECKING:
    from lipsync.serve.live import LiveSession

LIVE_SLACK = 0.5     # seconds a real-time stream's playback may fall behind its lead before frames are skipped


class Utterance:
    """One utterance: its 16 kHz int16 samples and one mel window per frame. A whole one (a file)
    has them all at once; an ``open`` one (a :class:`SpeechStream`'s) grows as its audio arrives."""

    def __init__(self, uid: int, pcm: Optional[np.ndarray] = None, windows: Optional[np.ndarray] = None,
                 stream: Optional["SpeechStream"] = None):
        self.uid = uid
        self.stream = stream
        self.source = stream.source if stream is not None else None   # the viewer whose microphone it is
        self.realtime = stream is not None and stream.realtime
        self.open = stream is not None           # more audio may come
        self.dropped = False                     # interrupted
        self._pcm: Deque[np.ndarray] = deque()   # (n,) int16 chunks, 16 kHz, from sample self._base on
        self._base = 0
        self.samples = 0
        self._pending = np.zeros((0, audio.NUM_MELS, audio.MEL_STEP_SIZE), np.float32)  # (P, 80, 16) not fed
        self.n = 0                               # windows known = frames of the utterance so far
        self.frames: Dict[int, np.ndarray] = {}  # rendered, not yet played
        self.fed = 0                             # windows handed to the renderer (or skipped)
        self.received = 0                        # frames back from it
        self.played = 0                          # frames played (or skipped)
        self.start_tick: Optional[int] = None
        if pcm is not None:
            self.add(pcm, windows)

    def add(self, pcm: Optional[np.ndarray], windows: np.ndarray) -> None:
        """Append (n,) int16 samples and the (G, 80, 16) windows they completed."""
        if pcm is not None and len(pcm):
            self._pcm.append(pcm)
            self.samples += len(pcm)
        if len(windows):
            self._pending = windows if not len(self._pending) else np.concatenate([self._pending, windows])
            self.n += len(windows)

    def take_windows(self, k: int) -> np.ndarray:
        """The next ``k`` windows for the renderer, (k, 80, 16); windows of frames already skipped are dropped."""
        behind = max(0, min(self.played - self.fed, len(self._pending)))
        if behind:
            self._pending, self.fed = self._pending[behind:], self.fed + behind
        out, self._pending = self._pending[:k], self._pending[k:]
        self.fed += len(out)
        return out

    def pcm(self, a: int, b: int) -> np.ndarray:
        """Samples ``[a, b)`` of the utterance, (b - a,) int16, zero past what has arrived; samples
        well before ``a`` are let go (playback only moves forward)."""
        while self._pcm and self._base + len(self._pcm[0]) < a - audio.SAMPLE_RATE // 100:
            self._base += len(self._pcm.popleft())
        parts, pos = [], self._base
        for chunk in self._pcm:
            if pos >= b:
                break
            lo, hi = max(a - pos, 0), min(b - pos, len(chunk))
            if hi > lo:
                parts.append(chunk[lo:hi])
            pos += len(chunk)
        got = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        return got if len(got) == b - a else np.pad(got, (0, b - a - len(got)))


class SessionBusy(Exception):
    """A second speech stream (a PCM body or a microphone) for a session that already has one."""


class SpeechEnded(Exception):
    """Speech pushed into a stream that has ended, or whose session has."""


class SpeechStream:
    """Speech that arrives in pieces (an HTTP body of PCM, a viewer's microphone), spoken as it comes.

    :meth:`push` takes (n,) int16 samples at 16 kHz; their mel windows are computed at once
    (:class:`lipsync.render.streaming.FrameWindows`: frame ``k`` is final when the audio reaches
    about ``k / fps + 0.2125`` s) and handed to the renderer, so the first frames render while the
    rest of the audio is still on its way. The pieces form an open utterance in the session's queue.
    When playback has caught up with the audio and the next piece is overdue (the last one's
    arrival plus its duration plus ``--idle_grace``), the utterance is closed (its last 0.2 s of
    frames completed as at the end of a file) and the face goes idle; the next piece opens a new
    utterance. :meth:`LiveSession.interrupt` drops the open utterance too; the next piece opens a
    new one. :meth:`finish` ends the stream.

    ``source``: the viewer id whose microphone this is (that viewer hears silence instead of its own
    voice), or None. ``realtime``: the audio comes at the pace it is spoken (a microphone): when
    playback falls more than ``LIVE_SLACK`` seconds behind it (stalls add up), frames are skipped to
    catch up, so the delay stays bounded.
    """

    def __init__(self, session: "LiveSession", source: Optional[str], realtime: bool):
        self.session = session
        self.source = source
        self.realtime = realtime
        self.current: Optional[Utterance] = None
        self.windows: Optional[FrameWindows] = None
        self.due = time.monotonic()               # when the next piece is expected
        self.samples = 0                          # over the stream
        self.uids: list = []                      # its utterances
        self.frames = 0                           # their frames
        self.closed = False

    def push(self, pcm: np.ndarray) -> None:
        """Add (n,) int16 samples at 16 kHz (from the event loop); raises SpeechEnded once the stream or
        its session has ended."""
        if self.closed or self.session.closed:
            raise SpeechEnded("the session has ended" if self.session.closed else "the speech stream has ended")
        if not len(pcm):
            return
        s = self.session
        u = self.current
        if u is None or u.dropped or not u.open:
            u = self.current = Utterance(next(s._uids), stream=self)
            self.windows = FrameWindows(s.fps)
            self.uids.append(u.uid)
            s.utterances.append(u)
        windows = self.windows.push(pcm.astype(np.float32) / PCM_SCALE)        # (G, 80, 16)
        u.add(pcm, windows)
        self.frames += len(windows)
        self.samples += len(pcm)
        now = time.monotonic()
        self.due = max(now, self.due) + len(pcm) / audio.SAMPLE_RATE
        s.last_active = now
        s._feed()

    def overdue(self, grace: float) -> bool:
        """Whether the next piece is later than expected by more than ``grace`` seconds (negative: never)."""
        return grace >= 0 and time.monotonic() > self.due + grace

    def cut(self) -> None:
        """Close the open utterance: its last frames complete as at the end of a file (one too short
        for a single frame, under 0.1875 s, is dropped)."""
        u, self.current = self.current, None
        if u is None or not u.open:
            return
        u.open = False
        if u.dropped:
            return
        try:
            tail = self.windows.finish()
        except StreamError:
            tail = np.zeros((0, audio.NUM_MELS, audio.MEL_STEP_SIZE), np.float32)
        u.add(None, tail)
        self.frames += len(tail)
        s = self.session
        if u.n == 0 and u in s.utterances:
            s.utterances.remove(u)
        s._feed()

    def finish(self) -> dict:
        """End the stream (idempotent): what is queued plays out. Returns ``{"utterances": [ids],
        "frames", "seconds"}`` (frames of its utterances, seconds of audio received)."""
        if not self.closed:
            self.cut()
            self.closed = True
            if self.session.speech is self:
                self.session.speech = None
        return {"utterances": list(self.uids), "frames": self.frames,
                "seconds": round(self.samples / audio.SAMPLE_RATE, 3)}
