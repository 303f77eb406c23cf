"""WebRTC out (aiortc): a viewer of a :class:`lipsync.serve.live.LiveSession` as a peer connection
with one video track (VP8/H.264 as negotiated) and one audio track (Opus).

Both tracks read the viewer's queues, which the session's clock fills one tick at a time: the video
frame of tick ``n`` has ``pts = n / fps`` (90 kHz clock), the audio of tick ``n`` is the 16 kHz
samples of that frame period (the Opus encoder resamples to 48 kHz). Both leave the server as the
tick happens, so the RTCP sender reports of the two streams map their timestamps to the same wall
clock and the browser plays them in sync.

The microphone in: an offer whose audio transceiver the browser sends on (``sendrecv``, or
``sendonly``: the page added the microphone's track) makes that track the session's speech, a
real-time :class:`lipsync.serve.speech.SpeechStream` (one per session: a second gets SessionBusy).
Its Opus audio (48 kHz) is resampled to 16 kHz mono (FFmpeg's resampler, through PyAV) as it
arrives; the avatar's mouth follows it about ``--webrtc_lead`` + 0.2 s later, the other viewers
hear it with the picture, and the viewer who sends it hears silence (not its own voice, late).
Video the browser offers to send is declined (the answer is ``sendonly`` for video).

aiortc is optional (``pip install -r requirements-webrtc.txt``); :func:`require_aiortc` says so when
it is missing.
"""
from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
from typing import List, Optional, Tuple

import numpy as np

import audio
from lipsync.serve.live import LiveOptions, LiveSession, Viewer
from lipsync.serve.speech import SpeechEnded, SpeechStream

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90000              # RTP video clock, Hz
AUDIO_FRAME = audio.SAMPLE_RATE // 50   # samples of one 20 ms audio frame (one Opus packet)
INSTALL = "pip install -r requirements-webrtc.txt (or: pip install aiortc)"


class WebRTCUnavailable(Exception):
    """aiortc is not installed; the message names the pip command."""


def require_aiortc():
    """The ``aiortc`` module; raises WebRTCUnavailable (naming the pip command) when it is missing."""
    try:
        import aiortc
    except ImportError as exc:
        raise WebRTCUnavailable(f"WebRTC needs the aiortc package, which is not installed: {INSTALL} "
                                f"({type(exc).__name__}: {exc})") from None
    return aiortc


def set_consent_timeout(seconds: float) -> Tuple[float, int]:
    """Make a peer that stops answering ICE consent checks (RFC 7675) count as gone after about
    ``seconds`` (+-20%: aioice randomizes the interval) instead of aioice's 30 (a check every 5 s,
    6 failures). Checks are every ``min(5, seconds / 3)`` s; the peer is gone after
    ``round(seconds / interval)`` unanswered ones in a row. aioice reads these from module
    constants at every check, so this holds for every connection of the process. Returns the
    previous ``(interval, failures)`` (for :func:`restore_consent`). Raises WebRTCUnavailable
    without aiortc, ValueError for ``seconds <= 0``."""
    require_aiortc()
    import aioice.ice

    if not seconds > 0:
        raise ValueError(f"the consent timeout must be positive, got {seconds}")
    before = (aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES)
    interval = min(5.0, seconds / 3)
    aioice.ice.CONSENT_INTERVAL = interval
    aioice.ice.CONSENT_FAILURES = max(1, round(seconds / interval))
    return before


def restore_consent(before: Tuple[float, int]) -> None:
    """Undo :func:`set_consent_timeout` (``before``: what it returned)."""
    import aioice.ice

    aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES = before


def ice_servers(options: LiveOptions) -> List[dict]:
    """The ``iceServers`` of an RTCConfiguration (the browser's form): one entry per URL, with the
    username and credential on ``turn:``/``turns:`` ones."""
    out = []
    for url in options.ice_servers:
        entry = {"urls": url}
        if url.startswith(("turn:", "turns:")) and options.ice_username is not None:
            entry.update(username=options.ice_username, credential=options.ice_credential or "")
        out.append(entry)
    return out


def _tracks(viewer: Viewer, fps: float):
    """The viewer's (video, audio) aiortc tracks."""
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError
    from av import AudioFrame, VideoFrame

    def fresh(q: asyncio.Queue):
        """On the first read: drop what queued up while the connection was being set up, so both
        tracks start at the same tick."""
        while q.qsize() > 1:
            q.get_nowait()

    class Track(MediaStreamTrack):
        def __init__(self, kind, q):
            self.kind = kind
            super().__init__()
            self.q = q
            self.first = True

        async def next_item(self):
            if self.readyState != "live":
                raise MediaStreamError
            if self.first:
                fresh(self.q)
                self.first = False
            return await self.q.get()

    class Video(Track):
        async def recv(self):
            tick, frame = await self.next_item()
            h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2   # 4:2:0 chroma needs even sizes
            out = VideoFrame.from_ndarray(frame[:h, :w], format="bgr24")   # (H, W, 3) uint8 BGR
            out.pts = round(tick * VIDEO_CLOCK / fps)
            out.time_base = fractions.Fraction(1, VIDEO_CLOCK)
            return out

    class Audio(Track):
        """20 ms frames (aiortc sends one RTP packet timestamp per frame it reads, so a frame must be
        exactly one Opus packet long), cut from the ticks' samples as they come."""

        def __init__(self, kind, q):
            super().__init__(kind, q)
            self.buf = np.zeros(0, np.int16)
            self.pts: Optional[int] = None      # 16 kHz sample of self.buf[0] on the session's clock

        async def recv(self):
            while len(self.buf) < AUDIO_FRAME:
                tick, samples = await self.next_item()
                if self.pts is None:
                    self.pts = round(tick * audio.SAMPLE_RATE / fps)
                self.buf = np.concatenate([self.buf, samples])
            # stereo, both channels the same: aiortc's encoder upmixes mono with a 3 dB cut
            pcm = np.repeat(self.buf[:AUDIO_FRAME], 2)[None]                                   # (1, 2 n) int16, L R L R
            out = AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
            out.sample_rate = audio.SAMPLE_RATE
            out.pts = self.pts
            out.time_base = fractions.Fraction(1, audio.SAMPLE_RATE)
            self.buf, self.pts = self.buf[AUDIO_FRAME:], self.pts + AUDIO_FRAME
            return out

    return Video("video", viewer.video), Audio("audio", viewer.audio)


async def listen(stream: SpeechStream, track) -> None:
    """Feed a remote audio track (av.AudioFrame of any rate and layout, Opus: 48 kHz stereo) to
    ``stream`` as 16 kHz mono int16 until the track ends; then finish the stream."""
    import av
    from aiortc.mediastreams import MediaStreamError

    resampler = av.AudioResampler(format="s16", layout="mono", rate=audio.SAMPLE_RATE)
    try:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for out in resampler.resample(frame):
                stream.push(out.to_ndarray().reshape(-1).astype(np.int16))   # (n,) int16, 16 kHz
    except SpeechEnded:          # the session ended
        return
    finally:
        stream.finish()


async def answer(session: LiveSession, sdp: str, kind: str) -> dict:
    """Answer a viewer's SDP offer for ``session``: ``{"sdp", "type": "answer", "viewer_id",
    "microphone": bool}`` (whether the offer's audio track became the session's speech).

    Raises WebRTCUnavailable without aiortc, SessionFull beyond the session's viewers, SessionBusy
    for an offer sending a microphone to a session that already takes a speech stream, ValueError
    for an offer aiortc cannot use (not an offer, no audio or video to receive). The viewer is
    removed when its connection fails or closes, or when it has not connected within
    ``connect_timeout`` seconds (a peer that vanished); its microphone stream ends with it.
    """
    aiortc = require_aiortc()
    if kind != "offer":
        raise ValueError(f"expected an SDP offer (type 'offer'), got type {kind!r}")
    opts = session.options
    servers = [aiortc.RTCIceServer(**entry) for entry in ice_servers(opts)]
    viewer = session.subscribe()
    pc = aiortc.RTCPeerConnection(aiortc.RTCConfiguration(iceServers=servers))
    incoming: list = []                  # the tracks the offer sends
    pc.on("track", incoming.append)
    speech: Optional[SpeechStream] = None
    listener: Optional[asyncio.Task] = None

    closing: Optional[asyncio.Future] = None

    async def close():
        # once, in a task of its own: a caller cancelled midway (the connect timer, a request) must not
        # cut the peer connection's close short (aiortc would keep its ICE transport's task forever)
        nonlocal closing
        if closing is None:
            closing = asyncio.ensure_future(shut())
        await asyncio.shield(closing)

    async def shut():
        session.unsubscribe(viewer)
        for task in (listener, viewer.timer):
            if task is not None:
                task.cancel()
        if speech is not None:
            speech.finish()
        await pc.close()

    viewer.close = close

    @pc.on("connectionstatechange")
    async def on_state():
        state = pc.connectionState
        log.info("live session %s viewer %s: %s", session.sid, viewer.viewer_id, state)
        if state == "connected":
            viewer.connected = True
        elif state in ("failed", "closed"):
            await close()

    async def give_up():
        await asyncio.sleep(opts.connect_timeout)
        if not viewer.connected and viewer.viewer_id in session.viewers:
            log.info("live session %s viewer %s: not connected after %g s", session.sid, viewer.viewer_id,
                     opts.connect_timeout)
            await close()

    try:
        for track in _tracks(viewer, session.fps):
            pc.addTrack(track)
        await pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=sdp, type="offer"))
        kinds = {t.kind for t in pc.getTransceivers() if t.direction in ("sendonly", "sendrecv")}
        if not {"audio", "video"} & kinds:
            raise ValueError("the offer receives neither audio nor video (add recvonly transceivers)")
        sent = {track.kind for track in incoming}
        for t in pc.getTransceivers():
            if t.kind == "video" and "video" in sent:
                t.direction = "sendonly"           # the browser's camera: declined, never decoded
        mic = next((track for track in incoming if track.kind == "audio"), None)
        if mic is not None:
            speech = session.open_stream(source=viewer.viewer_id, realtime=True)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception:
        await close()
        raise
    viewer.timer = session.loop.create_task(give_up())   # held: the loop keeps only weak references to tasks
    if mic is not None:
        listener = viewer.listener = session.loop.create_task(listen(speech, mic))
    return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type, "viewer_id": viewer.viewer_id,
            "microphone": mic is not None}


async def close_viewer(session: LiveSession, viewer_id: str) -> bool:
    """Disconnect one viewer; False when the session has no such viewer."""
    viewer = session.viewers.get(viewer_id)
    if viewer is None:
        return False
    if viewer.close is not None:
        with contextlib.suppress(Exception):
            await viewer.close()
    session.unsubscribe(viewer)
    return True
