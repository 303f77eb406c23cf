"""WebRTC out (/v1/sessions) through FastAPI's TestClient, watched by an aiortc client on this
machine: both tracks arrive at the avatar's size and fps, the audio is the spoken file, talk frames
and speech arrive together, interruption, a second viewer, limits, and peers that close, never
connect or vanish free what they held. Skipped without aiortc (pip install -r requirements-webrtc.txt)."""
import asyncio
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import audio
from media import astronaut, photo_and_speech
from serving import tiny_checkpoint

pytest.importorskip("fastapi")
aiortc = pytest.importorskip("aiortc", reason="aiortc is not installed (pip install -r requirements-webrtc.txt)")
from fastapi.testclient import TestClient  # noqa: E402
from scipy import signal  # noqa: E402

from lipsync.render.generator import Generator  # noqa: E402
from lipsync.serve.app import create_app  # noqa: E402
from lipsync.serve.live import LiveOptions  # noqa: E402
from lipsync.serve.state import ServerConfig, ServerState  # noqa: E402
from lipsync.serve.stream_output import StreamOptions  # noqa: E402

BOX = "40 200 60 196"          # top bottom left right of the face in the 256x256 photo
FACE = (slice(40, 200), slice(60, 196))
FPS = 25.0
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("webrtc")
    files = photo_and_speech(d, "face.png", {"short": ("short.wav", 0.5, 1.5), "long": ("long.wav", 0, 4)})
    gen = Generator(tiny_checkpoint(d / "tiny.pth"), device="cpu", precision="fp32")
    return {"dir": d, "gen": gen, **files}


class Sink:
    """frame_sink: talk frames rendered, by session."""

    def __init__(self):
        self.frames = {}

    def __call__(self, sid, i, frame):
        self.frames.setdefault(sid, []).append(frame)


def make_client(media, tmp_path, sink=None, live=None, **config):
    cfg = ServerConfig(avatars_dir=str(tmp_path / "avatars"), face_detector="lbp", token=TOKEN,
                       live=live or LiveOptions(connect_timeout=2.0), **config)
    return TestClient(create_app(ServerState(media["gen"], cfg, frame_sink=sink)))


def new_session(client, media):
    with open(media["photo"], "rb") as fh:
        r = client.post("/v1/avatars", files={"file": ("face.png", fh)}, data={"box": BOX}, headers=AUTH)
    assert r.status_code == 201, r.text
    avatar_id = r.json()["avatar_id"]
    r = client.post("/v1/sessions", json={"avatar_id": avatar_id}, headers=AUTH)
    assert r.status_code == 201, r.text
    return avatar_id, r.json()


def speak(client, sid, path):
    with open(path, "rb") as fh:
        return client.post(f"/v1/sessions/{sid}/speak", files={"audio": ("speech.wav", fh)}, headers=AUTH)


class Watcher:
    """An aiortc viewer in its own event loop thread: records (arrival, frame) and (arrival, samples)."""

    def __init__(self, client, sid):
        self.client, self.sid = client, sid
        self.video, self.audio = [], []        # (monotonic s, (H, W, 3) uint8 BGR) / (monotonic s, (n,) int16 48 kHz)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pc = None
        self.viewer_id = None

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def connect(self, answer=True):
        return self.call(self._connect(answer))

    async def _connect(self, answer):
        self.pc = aiortc.RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", lambda track: asyncio.ensure_future(self._read(track)))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        r = await asyncio.to_thread(self.client.post, f"/v1/sessions/{self.sid}/offer", json=offer, headers=AUTH)
        if r.status_code != 200 or not answer:
            return r
        body = r.json()
        self.viewer_id = body["viewer_id"]
        await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        return r

    async def _read(self, track):
        while True:
            try:
                frame = await track.recv()
            except aiortc.mediastreams.MediaStreamError:
                return
            now = time.monotonic()
            if track.kind == "video":
                self.video.append((now, frame.to_ndarray(format="bgr24"), frame.pts))
            else:
                pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0]   # (n,) int16, 48 kHz
                self.audio.append((now, pcm))

    def wait(self, video=0, audio=0, timeout=20.0):
        end = time.monotonic() + timeout
        while (len(self.video) < video or len(self.audio) < audio) and time.monotonic() < end:
            time.sleep(0.05)
        assert len(self.video) >= video and len(self.audio) >= audio, (len(self.video), len(self.audio))

    def close(self):
        if not self.thread.is_alive():      # closed already
            return
        if self.pc is not None:
            self.call(self.pc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def talking(self, photo):
        """Per received video frame: whether its face differs from the photo (a generated mouth)."""
        return [np.abs(f[FACE].astype(int) - photo[FACE]).mean() > 6 for _, f, _ in self.video]

    def pcm16k(self):
        """The received audio at 16 kHz: (n,) float32 in [-1, 1), and each sample's arrival time."""
        x = np.concatenate([p for _, p in self.audio]).astype(np.float32) / 32768
        t = np.concatenate([np.full(len(p), at) for at, p in self.audio])
        return signal.resample_poly(x, 1, 3).astype(np.float32), t[::3][:len(x) // 3 + 1]


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def envelope(x):
    """RMS of each 10 ms of 16 kHz samples."""
    return np.sqrt((x[:len(x) // 160 * 160].reshape(-1, 160) ** 2).mean(1))


def onset(x, spoken):
    """Where ``spoken`` starts in ``x`` (both 16 kHz), the correlation of their 10 ms envelopes there
    (Opus keeps the sound, not the waveform) and the level received over the level sent."""
    k = int(np.argmax(signal.correlate(x, spoken, mode="valid")))
    seg = x[k:k + len(spoken)]
    return k, float(np.corrcoef(envelope(seg), envelope(spoken))[0, 1]), float(seg.std() / spoken.std())


# ---------------------------------------------------------------------------------------------
def test_tracks_speech_sync_interrupt_and_a_second_viewer(media, tmp_path):
    sink = Sink()
    photo = astronaut().astype(int)
    with make_client(media, tmp_path, sink=sink) as client:
        _, session = new_session(client, media)
        sid = session["session_id"]
        assert session["fps"] == FPS and (session["width"], session["height"]) == (256, 256)
        first = Watcher(client, sid)
        try:
            assert first.connect().status_code == 200
            first.wait(video=25, audio=25)
            # idle: the photo, silent, at the avatar's size and fps
            f = first.video[-1][1]
            assert f.shape == (256, 256, 3) and not any(first.talking(photo))
            pts = np.diff([p for _, _, p in first.video[-20:]])
            assert set(pts.tolist()) == {3600}, pts   # 90 kHz / 25 fps
            span = first.video[-1][0] - first.video[-21][0]
            assert abs(20 / span - FPS) < 4, 20 / span
            assert np.abs(np.concatenate([p for _, p in first.audio])).max() < 100

            # speech from the server side: the same samples, and the mouth moves with them
            heard = len(first.audio)
            asked = time.monotonic()
            r = speak(client, sid, media["short"])
            assert r.status_code == 202, r.text
            n = r.json()["frames"]
            assert n == audio.num_frames_for_audio(16000, FPS)
            wait_for(lambda: client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["spoken"] == 1)
            time.sleep(0.3)
            spoken = audio.load_wav(media["short"])
            x, arrival = first.pcm16k()
            k, corr, level = onset(x, spoken)
            assert corr > 0.95 and 0.8 < level < 1.25, (corr, level)
            assert k >= sum(len(p) for _, p in first.audio[:heard]) // 3 - 1600
            talk = first.talking(photo)
            assert sum(talk) >= n - 3, (sum(talk), n)
            t_video = first.video[talk.index(True)][0]
            t_audio = arrival[k]
            print(f"speak -> first talk frame {t_video - asked:.3f} s; talk frame - speech onset, as they arrive: "
                  f"{(t_video - t_audio) * 1000:+.0f} ms")
            assert abs(t_video - t_audio) < 0.1, (t_video, t_audio)   # within a few frames, as they arrive
            assert len(sink.frames[sid]) == n

            # a second viewer of the same session; the third is one too many
            second = Watcher(client, sid)
            try:
                assert second.connect().status_code == 200
                second.wait(video=10, audio=10)
                assert client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["viewers"] == 2
                # barge-in: idle and silent within a few frames
                r = speak(client, sid, media["long"])
                assert r.status_code == 202
                wait_for(lambda: client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["speaking"])
                time.sleep(0.5)
                seen = len(second.video)
                r = client.delete(f"/v1/sessions/{sid}/speak", headers=AUTH)
                assert r.json() == {"interrupted": 1}
                stopped = time.monotonic()
                time.sleep(1.0)
                later = [(t, talking) for (t, _, _), talking in zip(second.video[seen:], second.talking(photo)[seen:])]
                assert not any(talking for t, talking in later if t > stopped + 0.2), later
                tail = [p for t, p in second.audio if t > stopped + 0.2]
                assert tail and np.abs(np.concatenate(tail)).max() < 100
                state = client.get(f"/v1/sessions/{sid}", headers=AUTH).json()
                assert state["interrupted"] == 1 and state["queued_seconds"] == 0
            finally:
                second.close()
            # a closed peer leaves the session
            wait_for(lambda: client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["viewers"] == 1)
        finally:
            first.close()
        wait_for(lambda: client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["viewers"] == 0)
        assert client.delete(f"/v1/sessions/{sid}", headers=AUTH).status_code == 204
        assert client.get(f"/v1/sessions/{sid}", headers=AUTH).status_code == 404
        assert client.get("/healthz", headers=AUTH).json()["sessions"]["live"] == 0


def test_limits_timeouts_and_no_leaks(media, tmp_path):
    """Token, unknown ids, malformed bodies; session slots shared with the WebSocket streams; a flood
    of offers gets max_viewers, and the peers that never connect are dropped after connect_timeout;
    a session without viewers or speech ends after idle_timeout, freeing its slot and its avatar."""
    live = LiveOptions(max_viewers=2, connect_timeout=1.0)
    with make_client(media, tmp_path, live=live, max_sessions=1, stream=StreamOptions(idle_timeout=2.0)) as client:
        avatar_id, session = new_session(client, media)
        sid = session["session_id"]
        assert client.post("/v1/sessions", json={"avatar_id": avatar_id}).status_code == 401
        assert client.post(f"/v1/sessions/{sid}/speak").status_code == 401
        assert client.post("/v1/sessions", json={"avatar_id": avatar_id}, headers=AUTH).status_code == 503
        assert client.get("/v1/sessions/live-000000000000", headers=AUTH).status_code == 404
        assert client.post(f"/v1/sessions/{sid}/offer", content=b"{", headers=AUTH).status_code == 422
        bad = client.post(f"/v1/sessions/{sid}/offer", json={"sdp": "v=0", "type": "offer"}, headers=AUTH)
        assert bad.status_code == 422, bad.text
        assert client.delete(f"/v1/avatars/{avatar_id}", headers=AUTH).status_code == 409
        with open(media["photo"], "rb") as fh:   # a picture is not speech
            r = client.post(f"/v1/sessions/{sid}/speak", files={"audio": ("a.wav", fh)}, headers=AUTH)
        assert r.status_code == 415, r.text
        flood = [Watcher(client, sid) for _ in range(6)]
        try:
            codes = [w.connect(answer=False).status_code for w in flood]
            assert codes.count(200) == 2 and codes.count(503) == 4, codes
            assert client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["viewers"] == 2
            wait_for(lambda: client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["viewers"] == 0, timeout=5)
        finally:
            for w in flood:
                w.close()
        # nobody watching, nothing said: the session ends by itself
        wait_for(lambda: client.get(f"/v1/sessions/{sid}", headers=AUTH).status_code == 404, timeout=8)
        wait_for(lambda: client.get("/healthz", headers=AUTH).json()["sessions"]["live"] == 0)   # its slot, once stopped
        assert client.delete(f"/v1/avatars/{avatar_id}", headers=AUTH).status_code == 204


def test_without_aiortc_the_error_names_the_pip_command(media, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "aiortc", None)
    with make_client(media, tmp_path) as client:
        with open(media["photo"], "rb") as fh:
            avatar_id = client.post("/v1/avatars", files={"file": ("f.png", fh)}, data={"box": BOX},
                                    headers=AUTH).json()["avatar_id"]
        r = client.post("/v1/sessions", json={"avatar_id": avatar_id}, headers=AUTH)
        assert r.status_code == 501 and "pip install -r requirements-webrtc.txt" in r.json()["detail"]


VANISHING = """
import asyncio, sys
import aiortc

async def main():
    pc = aiortc.RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    print(pc.localDescription.sdp.replace("\\r\\n", "\\n").replace("\\n", "\\\\n"), flush=True)
    answer = (await asyncio.to_thread(sys.stdin.readline)).strip().replace("\\\\n", "\\r\\n")
    await pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=answer, type="answer"))
    pc.on("track", lambda track: asyncio.ensure_future(drain(track)))
    await asyncio.sleep(3600)

async def drain(track):
    while True:
        await track.recv()

asyncio.run(main())
"""


def test_a_vanished_peer_is_dropped_and_shutdown_ends_sessions(media, tmp_path):
    """A viewer killed without a goodbye (no DTLS close) is dropped once ICE consent checks fail
    (every 5 s, 6 failures by default; here --consent_timeout 0.6: every 0.2 s, 3 failures); the
    server's shutdown (SIGTERM) ends the live sessions, and their viewers see the connection close."""
    import aioice.ice

    assert (aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES) == (5, 6)
    client = make_client(media, tmp_path, live=LiveOptions(connect_timeout=2.0, consent_timeout=0.6))
    with client:
        assert aioice.ice.CONSENT_INTERVAL == pytest.approx(0.2) and aioice.ice.CONSENT_FAILURES == 3
        state = client.app.state.server
        _, session = new_session(client, media)
        sid = session["session_id"]
        peer = subprocess.Popen([sys.executable, "-c", VANISHING], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        try:
            offer = peer.stdout.readline().strip().replace("\\n", "\r\n")
            r = client.post(f"/v1/sessions/{sid}/offer", json={"sdp": offer, "type": "offer"}, headers=AUTH)
            assert r.status_code == 200, r.text
            peer.stdin.write(r.json()["sdp"].replace("\r\n", "\\n") + "\n")
            peer.stdin.flush()
            viewer = state.sessions[sid].viewers[r.json()["viewer_id"]]
            wait_for(lambda: viewer.connected, timeout=10)
        finally:
            peer.kill()
            peer.wait()
        wait_for(lambda: client.get(f"/v1/sessions/{sid}", headers=AUTH).json()["viewers"] == 0, timeout=10)
        watcher = Watcher(client, sid)
        try:
            watcher.connect()
            watcher.wait(video=5)
            assert state.health()["sessions"] == {"streams": 0, "live": 1, "viewers": 1, "lipsync_jobs": 0, "max": 8}
        except BaseException:
            watcher.close()
            raise
    try:
        assert not state.sessions
        assert (aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES) == (5, 6)   # put back at shutdown
        wait_for(lambda: watcher.pc.connectionState in ("closed", "failed"), timeout=10)
    finally:
        watcher.close()
