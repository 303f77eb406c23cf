"""A live session: speech queued from the server side, one picture-and-sound timeline, many viewers.

A :class:`LiveSession` belongs to an avatar and outlives any one viewer. Speech is queued whole
(:meth:`LiveSession.speak`: one utterance per call, its mel windows computed at once with
:class:`lipsync.render.streaming.FrameWindows`, exactly the offline ones) or as it arrives (a
:class:`lipsync.serve.speech.SpeechStream` from :meth:`LiveSession.open_stream`: a PCM body, a viewer's microphone; its
windows computed piece by piece, the same ones) and rendered by the session's
:class:`lipsync.serve.render_feed.RenderFeed` (the one render path, the generator's forward queue),
at most ``max_ahead`` frames ahead of what has been played.

One clock drives everything: a ticker at the avatar's fps. At tick ``n`` (time ``n / fps`` on the
session's clock) every viewer receives one video frame and the audio of that frame period,
``round((n + 1) * 16000 / fps) - round(n * 16000 / fps)`` samples of 16 kHz mono int16:

- while an utterance plays, talk frame ``k`` of it and the utterance's samples of
  ``[k / fps, (k + 1) / fps)`` (the pairing of an offline render's mp4);
- while nothing plays, an idle frame (:class:`lipsync.serve.stream_output.IdleFrames`: the avatar's
  own frames, no generation) and silence.

An utterance starts playing once ``lead`` seconds of its frames (or all of them) are rendered; if
the renderer falls behind mid-utterance the last frame is held with silence until it catches up
(``stalls`` counts those ticks; a stream's audio arriving late too), so picture and sound never
drift apart. :meth:`interrupt` drops every queued utterance at once: the next tick is idle and
silent. A microphone's own viewer gets silence instead of its voice.

This module knows nothing of WebRTC: a viewer is a :class:`Viewer` (two bounded queues that
:mod:`lipsync.serve.webrtc`'s tracks read).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Optional, Tuple

import numpy as np

import audio
from lipsync.render.avatar import Avatar
from lipsync.render.engine import GenerateFn
from lipsync.render.streaming import FrameWindows
from lipsync.serve.render_feed import MAX_GROUP, RenderFeed
from lipsync.serve.speech import LIVE_SLACK, SessionBusy, SpeechStream, Utterance
from lipsync.serve.stream_output import FrameSink, IdleFrames, StreamOptions

log = logging.getLogger(__name__)

PCM_MAX = 32767


@dataclass(frozen=True)
class LiveOptions:
    """How live (WebRTC) sessions run (``serve.py`` flags of the same names).

    ``max_viewers``: viewers (peer connections) per session; more get 503. ``lead``: seconds of an
    utterance rendered before it starts playing. ``max_ahead``: frames rendered ahead of playback
    at most (bounds a session's memory). ``viewer_buffer``: ticks queued per viewer before the
    oldest are dropped. ``connect_timeout``: seconds a viewer may take to connect.
    ``consent_timeout``: seconds after which a connected viewer that stopped answering ICE consent
    checks (RFC 7675: it vanished without closing) is dropped. ``ice_servers``:
    STUN/TURN URLs (``stun:host:port``, ``turn:host:port``) with ``ice_username`` and
    ``ice_credential`` for the TURN ones.
    """

    max_viewers: int = 4
    lead: float = 0.2
    max_ahead: int = 100
    viewer_buffer: int = 10
    connect_timeout: float = 30.0
    consent_timeout: float = 30.0
    ice_servers: Tuple[str, ...] = ()
    ice_username: Optional[str] = None
    ice_credential: Optional[str] = None


class SessionFull(Exception):
    """A viewer or an utterance beyond a session's limits; the message says which."""


class Viewer:
    """What one viewer receives: ``video`` items ``(tick, (H, W, 3) uint8 BGR frame)`` and ``audio``
    items ``(tick, (n,) int16 samples at 16 kHz)``, one of each per tick, in asyncio queues of at most
    ``capacity`` ticks (beyond it the oldest tick of that queue is dropped)."""

    def __init__(self, viewer_id: str, capacity: int):
        self.viewer_id = viewer_id
        self.capacity = max(1, capacity)
        self.video: asyncio.Queue = asyncio.Queue()
        self.audio: asyncio.Queue = asyncio.Queue()
        self.dropped = 0
        self.connected = False
        self.close: Optional[Callable[[], "asyncio.Future"]] = None   # set by whoever serves the viewer
        self.timer: Optional[asyncio.Task] = None                       # its connect timeout, if any
        self.listener: Optional[asyncio.Task] = None                    # what reads its microphone, if any

    def push(self, tick: int, frame: np.ndarray, samples: np.ndarray) -> None:
        for q, item in ((self.video, (tick, frame)), (self.audio, (tick, samples))):
            if q.qsize() >= self.capacity:
                q.get_nowait()
                self.dropped += q is self.video
            q.put_nowait(item)


class LiveSession:
    """One avatar's live session; :meth:`start` from the event loop, :meth:`close` to end it.

    ``generate``: the session's share of the generator's forward queue. ``frame_sink(sid, i, frame)``
    gets every talk frame as rendered (a test hook; ``i`` counts talk frames over the session).
    ``on_close()``: called once, after the session stopped (the server frees its slot).
    """

    def __init__(self, sid: str, avatar_id: str, avatar: Avatar, generate: GenerateFn, stream: StreamOptions, live: LiveOptions,
                 idle: IdleFrames, frame_sink: Optional[FrameSink] = None, device=None,
                 on_close: Optional[Callable[[], None]] = None):
        self.sid = sid
        self.avatar_id = avatar_id
        self.avatar = avatar
        self.fps = float(avatar.fps)
        self.stream = stream
        self.options = live
        self.idle = idle
        self.frame_sink = frame_sink
        self.on_close = on_close
        self.feed = RenderFeed(sid, avatar, generate, stream, device, self._emit, finished=lambda n: None,
                               failed=self._render_failed)
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.viewers: Dict[str, Viewer] = {}
        self.utterances: Deque[Utterance] = deque()
        self.tick = 0
        self.stalls = 0                      # ticks an utterance waited for its next frame
        self.spoken = 0                      # utterances played to the end
        self.interrupted = 0                 # utterances dropped by interrupt()
        self.skipped = 0                     # frames of a real-time stream skipped to catch up with it
        self.speech: Optional[SpeechStream] = None   # the one speech stream (PCM body or microphone), if any
        self.last_active = time.monotonic()  # last viewer or speech (the idle timeout counts from here)
        self.closed = False
        self.error: Optional[str] = None
        self._uids = itertools.count(1)
        self._ids = itertools.count(1)
        self._fed = 0                        # windows handed to the renderer, over the session
        self._drained = 0                    # of those, dropped before rendering
        self._pause = 0                      # idle ticks in the current pause
        self._last: Optional[np.ndarray] = None
        self._still: Optional[np.ndarray] = None
        self._task: Optional[asyncio.Task] = None

    # ---- what other parts read -----------------------------------------------------------------
    def in_flight(self) -> bool:
        """Whether frames of this session wait for the generator (the forward queue waits for such sessions)."""
        return self._fed - self._drained > self.feed.produced and not self.feed.cancel.is_set()

    def queued_seconds(self) -> float:
        """Seconds of speech queued and not yet played (of an open utterance: what has arrived)."""
        return sum(u.n - u.played for u in self.utterances) / self.fps

    def describe(self) -> dict:
        """The session as ``GET /v1/sessions/{id}`` shows it (``width`` x ``height``: the video sent,
        pixels, the avatar's frame cropped to even sizes)."""
        speaking = bool(self.utterances) and self.utterances[0].start_tick is not None
        frame = self.avatar.frames[0] if self.avatar.frames else self._still
        h, w = (frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2) if frame is not None else (None, None)
        return {"session_id": self.sid, "avatar_id": self.avatar_id, "fps": self.fps, "width": w, "height": h,
                "viewers": len(self.viewers),
                "speaking": speaking, "queued_seconds": round(self.queued_seconds(), 3), "spoken": self.spoken,
                "interrupted": self.interrupted, "stalls": self.stalls, "skipped": self.skipped, "ticks": self.tick,
                "speech_stream": None if self.speech is None else
                ("microphone of " + self.speech.source if self.speech.source else "pcm")}

    # ---- control (event loop) ------------------------------------------------------------------
    async def start(self) -> None:
        """Start the render thread and the ticker."""
        self.loop = asyncio.get_running_loop()
        if self.avatar.frames is None:
            self._still = await asyncio.to_thread(self.avatar.source.first_frame)
        self.feed.start()
        self._task = asyncio.create_task(self._run())

    def subscribe(self) -> Viewer:
        """A new viewer; raises SessionFull beyond ``max_viewers``."""
        if len(self.viewers) >= self.options.max_viewers:
            raise SessionFull(f"this session already has {self.options.max_viewers} viewer(s) (the most "
                              "--max_viewers allows)")
        viewer = Viewer(f"v{next(self._ids)}", self.options.viewer_buffer)
        self.viewers[viewer.viewer_id] = viewer
        self.last_active = time.monotonic()
        return viewer

    def unsubscribe(self, viewer: Viewer) -> None:
        if self.viewers.pop(viewer.viewer_id, None) is not None:
            self.last_active = time.monotonic()

    async def speak(self, samples: np.ndarray, max_seconds: float) -> dict:
        """Queue (n,) float32 samples at 16 kHz as one utterance after those queued; returns
        ``{"utterance", "frames", "seconds", "starts_after"}`` (seconds of speech ahead of it).
        Raises SessionFull when the speech queued would exceed ``max_seconds``, StreamError
        (an AudioError) for audio too short for one frame (0.1875 s)."""
        seconds = len(samples) / audio.SAMPLE_RATE
        ahead = self.queued_seconds()
        if ahead + seconds > max_seconds:
            raise SessionFull(f"{ahead:.1f} s of speech are queued; {seconds:.1f} s more would pass the "
                              f"{max_seconds:g} s a session may queue (interrupt, or wait)")

        def windows_of():
            fw = FrameWindows(self.fps)
            parts = [fw.push(samples), fw.finish()]
            return np.concatenate(parts)                     # (F, 80, 16)

        windows = await asyncio.to_thread(windows_of)
        pcm = np.round(np.clip(samples, -1.0, 1.0) * PCM_MAX).astype(np.int16)   # (n,) 16 kHz
        u = Utterance(next(self._uids), pcm, windows)
        self.utterances.append(u)
        self.last_active = time.monotonic()
        self._feed()
        return {"utterance": u.uid, "frames": u.n, "seconds": round(seconds, 3), "starts_after": round(ahead, 3)}

    def open_stream(self, source: Optional[str] = None, realtime: bool = False) -> SpeechStream:
        """A :class:`SpeechStream` into this session's speech; raises SessionBusy when the session
        already has one (one PCM body or microphone at a time)."""
        if self.closed:
            raise SessionBusy("the session has ended")
        if self.speech is not None:
            raise SessionBusy(f"this session already takes speech from {self.describe()['speech_stream']}; one "
                              "speech stream (a PCM body or a microphone) at a time")
        self.speech = SpeechStream(self, source, realtime)
        self.last_active = time.monotonic()
        return self.speech

    def interrupt(self) -> int:
        """Drop every queued utterance (the one playing too, and what a speech stream has sent so far):
        the next tick is idle and silent. Returns how many were dropped."""
        n = len(self.utterances)
        for u in self.utterances:
            u.dropped = True
        self.utterances.clear()
        self._drained += self.feed.drain()
        self.interrupted += n
        self.last_active = time.monotonic()
        return n

    def fail(self, message: str, code: int = 0) -> None:
        """End the session (from the event loop); ``message`` is kept as its error. ``code`` is
        ignored (the WebSocket sessions' signature, so the server can end both kinds alike)."""
        if self.error is None:
            self.error = message
        if not self.closed:
            self.loop.create_task(self.close())

    async def close(self) -> None:
        """End the session (idempotent): viewers disconnected, rendering stopped, slot freed."""
        if self.closed:
            return
        self.closed = True
        if self.speech is not None:
            self.speech.finish()
        self.feed.stop()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for viewer in list(self.viewers.values()):
            if viewer.close is not None:
                with contextlib.suppress(Exception):
                    await viewer.close()
        self.viewers.clear()
        await asyncio.to_thread(self.feed.join, 10)
        if self.on_close is not None:
            self.on_close()

    # ---- the render thread ---------------------------------------------------------------------
    def _emit(self, i: int, frame: np.ndarray, uid) -> None:
        if self.frame_sink is not None:
            self.frame_sink(self.sid, i, frame)
        with contextlib.suppress(RuntimeError):   # the event loop is closed: nobody to show it to
            self.loop.call_soon_threadsafe(self._arrived, uid, frame)

    def _render_failed(self, message: str) -> None:
        log.error("live session %s: %s", self.sid, message)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.fail, message)

    def _arrived(self, uid: int, frame: np.ndarray) -> None:
        for u in self.utterances:
            if u.uid == uid:
                if u.received >= u.played:       # else a frame skipped to catch up: dropped
                    u.frames[u.received] = frame
                u.received += 1
                return
        # an interrupted utterance's frame: dropped

    # ---- the clock (event loop) ----------------------------------------------------------------
    def _feed(self) -> None:
        """Hand windows to the renderer, up to ``max_ahead`` frames past what has been played."""
        ahead = sum(max(0, u.fed - u.played) for u in self.utterances)
        for u in self.utterances:
            while u.fed < u.n and ahead < self.options.max_ahead:
                windows = u.take_windows(min(MAX_GROUP, self.options.max_ahead - ahead))
                if not len(windows):
                    break
                self.feed.put(windows, tag=u.uid)
                self._fed += len(windows)
                ahead += len(windows)
            if u.fed < u.n or u.open:
                return

    def _samples_of(self, tick: int) -> Tuple[int, int]:
        """The 16 kHz sample range ``[a, b)`` of ``tick`` on the session's clock."""
        sr = audio.SAMPLE_RATE
        return round(tick * sr / self.fps), round((tick + 1) * sr / self.fps)

    def _next(self) -> Tuple[np.ndarray, np.ndarray, Optional[str]]:
        """This tick's frame, samples and the viewer whose microphone they are (see the module's docstring)."""
        a, b = self._samples_of(self.tick)
        silence = np.zeros(b - a, np.int16)
        u = self.utterances[0] if self.utterances else None
        lead = max(1, int(round(self.options.lead * self.fps)))
        if u is not None and u.start_tick is None:
            if u.open and u.stream.overdue(self.stream.idle_grace):
                u.stream.cut()                         # a stream that paused before its first frames
                u = self.utterances[0] if self.utterances else None
        if u is not None and u.start_tick is None:
            need = lead if u.open else min(u.n, lead)
            if need and u.received >= need:
                u.start_tick = self.tick
        if u is None or u.start_tick is None:
            return self._idle_frame(), silence, None
        if u.realtime:                                 # keep a live voice's delay bounded: skip what it is behind by
            behind = u.n - u.played - lead - int(round(LIVE_SLACK * self.fps))
            if behind > 0:
                for k in range(u.played, u.played + behind):
                    u.frames.pop(k, None)
                u.played += behind
                u.start_tick -= behind
                self.skipped += behind
        frame = u.frames.pop(u.played, None)
        if frame is None:                              # the renderer (or a stream's audio) is behind: hold, in silence
            if u.open and u.played >= u.n and u.stream.overdue(self.stream.idle_grace):
                u.stream.cut()                         # the stream paused: its last frames, then idle
            if not u.open and u.played >= u.n:         # cut with nothing left to play
                self.utterances.popleft()
                self.spoken += 1
                return self._idle_frame(), silence, None
            self.stalls += 1
            u.start_tick += 1
            return (self._last if self._last is not None else self._idle_frame()), silence, u.source
        a0, _ = self._samples_of(u.start_tick)
        samples = u.pcm(a - a0, b - a0)
        u.played += 1
        self._pause = 0
        if u.played == u.n and not u.open:
            self.utterances.popleft()
            self.spoken += 1
        self._last = frame
        return frame, samples, u.source

    def _idle_frame(self) -> np.ndarray:
        frames = self.avatar.frames
        if frames is None:
            return self._still
        j = self.idle.source_of(self.avatar, self.feed.consumed, self._pause, self.stream.loop)
        self._pause += 1
        return frames[j]

    async def _run(self) -> None:
        period = 1.0 / self.fps
        t0 = time.monotonic()
        try:
            while not self.closed:
                # never skip a tick: the viewers' audio clocks count samples, so a skipped tick
                # would put the sound behind the picture; a late tick goes out at once instead
                wait = t0 + self.tick * period - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif wait < -1.0:                     # over a second behind (a stalled loop): start over
                    t0 = time.monotonic() - self.tick * period
                frame, samples, source = self._next()
                self._feed()
                for viewer in list(self.viewers.values()):
                    # a viewer never hears its own microphone back (an echo, 0.4 s late)
                    viewer.push(self.tick, frame, np.zeros_like(samples) if viewer.viewer_id == source else samples)
                self.tick += 1
                if self._expired():
                    self.fail(f"no viewer and no speech for {self.stream.idle_timeout:g} s: the session is closed")
                    return
        except Exception as exc:  # noqa: BLE001 - a bug, but it must end this session, not the server
            log.exception("live session %s: the clock failed", self.sid)
            self.fail(f"internal error: {type(exc).__name__}: {exc}")

    def _expired(self) -> bool:
        if self.viewers or self.utterances:
            self.last_active = time.monotonic()
            return False
        return time.monotonic() - self.last_active > self.stream.idle_timeout
