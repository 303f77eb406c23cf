"""One streaming session: PCM in over a WebSocket, lip-synced JPEG frames out, in order.

The protocol (docs/serving.md, "Streaming"): the client sends binary messages of 16 kHz mono signed 16-bit
little-endian PCM and finally the text message ``{"type": "end"}``; the server sends, for each
output frame ``i``, ``{"type": "frame", "index": i, "pts": i / fps}`` and then the frame as one
binary JPEG; after the end ``{"type": "end", "frames": n, ...}``; a problem is ``{"type": "error",
"message": ...}`` and a close.

How a session runs:

- The receiving coroutine turns each PCM message into mel windows as soon as they are final
  (:class:`lipsync.render.streaming.FrameWindows`) and queues them for the render thread.
- The render thread (:class:`lipsync.serve.render_feed.RenderFeed`) runs
  :func:`lipsync.render.engine.render_windows` (the one render path) on those
  windows with a ``generate`` function that goes through the server's cross-session
  :class:`lipsync.render.forward.ForwardQueue`, encodes each frame as JPEG and posts it to the session's
  :class:`~lipsync.serve.stream_output.Outbox`.
- The sending coroutine writes the outbox to the socket.
- While no audio arrives, an idle ticker sends ``{"type": "idle", ...}`` frames (see
  :class:`~lipsync.serve.stream_output.IdleFrames`): the avatar keeps moving, the talk frames'
  numbering and count are untouched.

Bounded everywhere: the outbox holds ``send_buffer`` frames (a slow reader loses the oldest idle,
then the oldest talk frames, and is told how many at the end); a client that sends audio faster
than it can be rendered is not read until the backlog is under ``max_pending`` frames (TCP
pushes back); a message over ``max_message_bytes`` ends the session with an error.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Deque, List, Optional, Tuple

import numpy as np

import audio
from lipsync.render.avatar import Avatar
from lipsync.render.engine import GenerateFn
from lipsync.render.streaming import FrameWindows, StreamError, pcm16_to_float
from lipsync.serve.render_feed import MAX_GROUP, RenderFeed
from lipsync.serve.stream_output import SAMPLE_BYTES, FrameSink, IdleFrames, Outbox, StreamOptions, encode_jpeg

log = logging.getLogger(__name__)

MAX_TEXT_BYTES = 4096

# WebSocket close codes (RFC 6455)
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001          # server shutting down
CLOSE_UNSUPPORTED = 1003         # a message that is not PCM or a known JSON message
CLOSE_POLICY = 1008              # no audio for too long
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011



# ------------------------------------------------------------------------------------------------
class SessionError(Exception):
    """Ends a session with an error message to the client and a close code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StreamSession:
    """One WebSocket stream of ``avatar``; :meth:`run` serves it until the end, an error or the
    client's departure, and always leaves the render thread stopped.

    ``generate``: the session's generate function (its share of the generator's forward queue). ``frame_sink(sid, i,
    frame)``: receives every talk frame before JPEG encoding (tests compare them with offline
    frames). ``idle``: the server's shared :class:`IdleFrames`. ``device``: the generator's device
    (for ``options.on_device``).
    """

    def __init__(self, sid: str, avatar: Avatar, generate: GenerateFn, options: StreamOptions, idle: IdleFrames,
                 frame_sink: Optional[FrameSink] = None, device=None):
        self.sid = sid
        self.avatar = avatar
        self.generate = generate
        self.options = options
        self.idle = idle
        self.frame_sink = frame_sink
        self.windows = FrameWindows(avatar.fps)
        self.feed = RenderFeed(sid, avatar, generate, options, device, self._emit,
                               finished=lambda n: self._post(("end", n)),
                               failed=lambda message: self._post(("error", message, CLOSE_INTERNAL)))
        self.sent = 0                      # talk frames written to the socket
        self.idle_index = 0                # idle frames queued (their numbering)
        self.idle_sent = 0
        self.ended = False                 # the client sent {"type": "end"}
        self.cancel = self.feed.cancel
        self.outbox: Optional[Outbox] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.started = time.monotonic()
        self.last_audio = self.started     # arrival of the last PCM message (monotonic seconds)
        self.last_audio_s = 0.0            # its duration, seconds
        self.ready_at: Deque[Tuple[int, float]] = deque()  # (talk frame, arrival of the audio that completed it)
        self.latencies: List[float] = []   # seconds from that arrival to the frame being sent
        self._pause = 0                    # idle frames in the current pause

    # ---- state other parts read -----------------------------------------------------------------
    def in_flight(self) -> bool:
        """Whether frames of this session wait for the generator (the forward queue waits for such sessions)."""
        return self.windows.frames > self.produced and not self.cancel.is_set()

    # ---- the render thread ----------------------------------------------------------------------
    @property
    def produced(self) -> int:
        """Talk frames rendered."""
        return self.feed.produced

    def _post(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outbox.put, item)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody to tell
            self.cancel.set()

    def _emit(self, i: int, frame: np.ndarray, tag) -> None:
        if self.frame_sink is not None:
            self.frame_sink(self.sid, i, frame)
        self._post(("frame", i, encode_jpeg(frame, self.options.jpeg_quality)))

    def _queue_windows(self, windows: np.ndarray, arrived: float) -> None:
        first = self.windows.frames - len(windows)
        self.ready_at.extend((first + k, arrived) for k in range(len(windows)))
        self.feed.put(windows)

    # ---- the coroutines -------------------------------------------------------------------------
    async def run(self, ws) -> None:
        """Serve the accepted WebSocket ``ws`` (Starlette) until the stream is over."""
        self.loop = asyncio.get_running_loop()
        self.outbox = Outbox(max(MAX_GROUP, self.options.send_buffer))
        self.feed.start()
        sender = asyncio.create_task(self._send(ws))
        receiver = asyncio.create_task(self._receive(ws))
        idler = asyncio.create_task(self._idle())
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done and receiver.exception() is not None:
                log.error("session %s: receiving failed", self.sid, exc_info=receiver.exception())
                self.fail("internal error while reading the stream", CLOSE_INTERNAL)
                await sender
            elif receiver in done and receiver.result() != "gone":
                await sender          # the end, or an error, is on its way out
        finally:
            for task in (receiver, sender, idler):
                task.cancel()
            await asyncio.gather(receiver, sender, idler, return_exceptions=True)
            self.stop()
            await asyncio.to_thread(self.feed.join, 10)

    def stop(self) -> None:
        """Stop rendering (idempotent): the render thread ends at its next frame."""
        self.feed.stop()

    def fail(self, message: str, code: int) -> None:
        """End the session with an error (from the event loop)."""
        self.stop()
        self.outbox.put(("error", message, code))

    async def _receive(self, ws) -> str:
        """Read the client's messages; returns "end" (the client ended the stream), "error" (the
        session is failing with a message), or "gone" (the client disconnected)."""
        opts = self.options
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                self.stop()
                return "gone"
            try:
                if msg.get("bytes") is not None:
                    self._on_audio(msg["bytes"])
                    while (self.windows.frames - self.produced > opts.max_pending and not self.cancel.is_set()):
                        await asyncio.sleep(0.01)   # not reading: the client's sends wait (TCP pushes back)
                elif msg.get("text") is not None:
                    if self._on_text(msg["text"]):
                        return "end"
            except SessionError as exc:
                self.fail(str(exc), exc.code)
                return "error"

    def _on_audio(self, data: bytes) -> None:
        if len(data) > self.options.max_message_bytes:
            limit = self.options.max_message_bytes
            raise SessionError(f"audio message of {len(data)} bytes is too large: at most {limit} bytes "
                               f"({limit / SAMPLE_BYTES / audio.SAMPLE_RATE * 1000:.0f} ms of 16 kHz 16-bit mono PCM); "
                               "send 10-500 ms per message", CLOSE_TOO_BIG)
        try:
            samples = pcm16_to_float(data)
        except StreamError as exc:
            raise SessionError(str(exc), CLOSE_UNSUPPORTED) from None
        now = time.monotonic()
        if samples.size:
            self.last_audio, self.last_audio_s = now, samples.size / audio.SAMPLE_RATE
        windows = self.windows.push(samples)
        if len(windows):
            self._queue_windows(windows, now)

    def _on_text(self, text: str) -> bool:
        """Handle a text message; True for the end of the stream."""
        if len(text) > MAX_TEXT_BYTES:
            raise SessionError(f"text message of {len(text)} characters is too large", CLOSE_TOO_BIG)
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise SessionError(f"text messages must be JSON, got {text[:60]!r}", CLOSE_UNSUPPORTED) from None
        if not isinstance(msg, dict) or msg.get("type") != "end":
            raise SessionError(f'unknown message {text[:60]!r}: the only text message is {{"type": "end"}}; audio '
                               "goes in binary messages", CLOSE_UNSUPPORTED)
        if self.ended:
            return True
        self.ended = True
        try:
            windows = self.windows.finish()
        except StreamError as exc:
            raise SessionError(str(exc), CLOSE_UNSUPPORTED) from None
        if len(windows):
            self._queue_windows(windows, time.monotonic())
        self.feed.end()
        return True

    async def _send(self, ws) -> None:
        from starlette.websockets import WebSocketDisconnect

        try:
            await self._send_all(ws)
        except (WebSocketDisconnect, OSError):
            self.stop()   # the client is gone: nobody to send to
        except RuntimeError as exc:  # Starlette: sending after the connection was closed
            if "close" not in str(exc).lower() and "disconnect" not in str(exc).lower():
                raise
            self.stop()

    async def _send_all(self, ws) -> None:
        fps = self.avatar.fps
        while True:
            item = await self.outbox.get()
            kind = item[0]
            if kind == "frame":
                i, data = item[1], item[2]
                await ws.send_text(json.dumps({"type": "frame", "index": i, "pts": round(i / fps, 6)}))
                await ws.send_bytes(data)
                self.sent += 1
                while self.ready_at and self.ready_at[0][0] < i:   # frames dropped for a slow reader
                    self.ready_at.popleft()
                if self.ready_at and self.ready_at[0][0] == i:
                    self.latencies.append(time.monotonic() - self.ready_at.popleft()[1])
            elif kind == "idle":
                await ws.send_text(json.dumps({"type": "idle", "index": item[1], "next_index": item[2]}))
                await ws.send_bytes(item[3])
                self.idle_sent += 1
            elif kind == "end":
                await ws.send_text(json.dumps({"type": "end", "frames": item[1], **self.stats()}))
                await ws.close(CLOSE_NORMAL)
                return
            else:  # error
                await ws.send_text(json.dumps({"type": "error", "message": item[1]}))
                await ws.close(item[2])
                return

    def stats(self) -> dict:
        """What the client is told at the end: frames sent and dropped, idle frames, latency (ms)
        from the arrival of the audio a frame needed to the frame being sent (p50, p95, max)."""
        lat = np.asarray(self.latencies) * 1000.0
        out = {"sent": self.sent, "dropped": self.outbox.dropped if self.outbox else 0, "idle": self.idle_sent}
        if lat.size:
            out["latency_ms"] = {"p50": round(float(np.percentile(lat, 50)), 1),
                                 "p95": round(float(np.percentile(lat, 95)), 1), "max": round(float(lat.max()), 1)}
        return out

    def _starved(self, now: float) -> bool:
        """No audio for longer than expected, and every frame its audio allowed is out."""
        opts = self.options
        return (not self.ended and self.produced == self.windows.frames
                and now > self.last_audio + self.last_audio_s + opts.idle_grace)

    async def _idle(self) -> None:
        opts = self.options
        period = 1.0 / self.avatar.fps
        tick = time.monotonic()
        while not self.ended and not self.cancel.is_set():
            tick += period
            now = time.monotonic()
            if tick < now - period:  # fell behind (a busy loop): skip, never burst
                tick = now
            while now < tick and now - self.last_audio <= opts.idle_timeout:  # low fps: wake for the timeout
                await asyncio.sleep(min(tick - now, 0.5))
                now = time.monotonic()
            if now - self.last_audio > opts.idle_timeout:
                self.fail(f"no audio for {opts.idle_timeout:g} s: the session is closed", CLOSE_POLICY)
                return
            if opts.idle_grace < 0 or not self._starved(now):
                self._pause = 0
                continue
            k = self.windows.frames
            j = self.idle.source_of(self.avatar, k, self._pause, opts.loop)
            data = await asyncio.to_thread(self.idle.jpeg, self.avatar, j)
            if self._starved(time.monotonic()):
                self.outbox.put(("idle", self.idle_index, k, data))
                self.idle_index += 1
                self._pause += 1
