"""Speech into a live session as it arrives, against the app served by uvicorn on this machine (the
test client would read a request body whole): a raw PCM body renders while it is still arriving and
gives the frames a file gives; a viewer's microphone track moves the avatar's mouth, the other
viewers hear it and the speaker does not; Content-Type and body errors. Skipped without aiortc."""
import asyncio
import json
import threading
import time

import numpy as np
import pytest

import audio
from media import mel_loudness, mouth_openness, photo_and_speech
from serving import free_port, tiny_checkpoint

pytest.importorskip("fastapi")
aiortc = pytest.importorskip("aiortc", reason="aiortc is not installed (pip install -r requirements-webrtc.txt)")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from aiortc.contrib.media import MediaPlayer  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from lipsync.render.generator import Generator  # noqa: E402
from lipsync.serve.app import create_app  # noqa: E402
from lipsync.serve.live import LiveOptions  # noqa: E402
from lipsync.serve.pcm import PcmDecoder, parse_l16  # noqa: E402
from lipsync.serve.state import ServerConfig, ServerState  # noqa: E402
from lipsync.serve.stream_output import StreamOptions  # noqa: E402
from test_webrtc import AUTH, BOX, FACE, TOKEN, Sink, Watcher, onset, wait_for  # noqa: E402

L16 = "audio/L16;rate=16000;channels=1;endianness=little-endian"


@pytest.fixture
def loud(assets, monkeypatch):
    """The oracle generator (tests/test_inference.py's): the mouth of the 96x96 face drawn darker the
    louder the frame's mel window, so a frame shows which audio it was made from."""

    def forward(mels, faces, keys, as_tensor):
        out = np.array(faces, copy=True)                                         # (B, 96, 96, 3)
        level = np.clip(170 - 30 * (np.asarray(mels).mean(axis=(1, 2)) + 4), 0, 255)   # mel in [-4, 4]
        out[:, 58:84, 30:66] = level[:, None, None, None].astype(np.uint8)
        return out

    monkeypatch.setattr(assets["gen"].queue, "forward", forward)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("live_speech")
    files = photo_and_speech(d, "face.png", {"speech": ("speech.wav", 0.5, 3.5), "mic": ("mic.wav", 0.5, 2.5)})
    gen = Generator(tiny_checkpoint(d / "tiny.pth"), device="cpu", precision="fp32")
    return {"dir": d, "gen": gen, **files}


class LiveServer:
    """``create_app(state)`` under uvicorn in a thread on a free local port; ``client``: httpx with the token."""

    def __init__(self, state):
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.loop = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30)
        self.client = httpx.Client(base_url=self.url, headers=AUTH, timeout=30)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not stop"

    def run(self, coro, timeout=10):
        """Run ``coro`` on the server's event loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def serve(assets, tmp_path, sink=None, live=None, **stream):
    cfg = ServerConfig(avatars_dir=str(tmp_path / "avatars"), face_detector="lbp", token=TOKEN,
                       live=live or LiveOptions(connect_timeout=5.0), stream=StreamOptions(**stream))
    return LiveServer(ServerState(assets["gen"], cfg, frame_sink=sink))


def new_session(client, assets):
    with open(assets["photo"], "rb") as fh:
        r = client.post("/v1/avatars", files={"file": ("face.png", fh)}, data={"box": BOX})
    assert r.status_code == 201, r.text
    r = client.post("/v1/sessions", json={"avatar_id": r.json()["avatar_id"]})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def pcm16(path):
    """A 16-bit wav as (n,) int16 (``load_wav`` gives its samples / 32768)."""
    return np.clip(np.round(audio.load_wav(path) * 32768), -32768, 32767).astype(np.int16)


class Body:
    """A chunked request body that the test releases piece by piece (an iterator httpx reads on its thread)."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.allowed = threading.Semaphore(0)
        self.sent = 0

    def release(self, n):
        for _ in range(n):
            self.allowed.release()

    def __iter__(self):
        for chunk in self.chunks:
            self.allowed.acquire()
            yield chunk
            self.sent += 1


# ---------------------------------------------------------------------------------------------
def test_a_pcm_body_is_spoken_as_it_arrives(assets, tmp_path, loud):
    """The first frames are rendered, and the session speaks, while most of the body has not been
    sent; the frames are those of the same speech sent as a file (the same windows, bit for bit).
    The same over the WebSocket protocol's messages (WS /v1/sessions/{id}/speak)."""
    sink = Sink()
    pcm = pcm16(assets["speech"])                           # 3 s
    with serve(assets, tmp_path, sink=sink, idle_grace=30.0) as srv:
        client = srv.client
        sid = new_session(client, assets)
        # the same speech as a file first: the frames to expect
        with open(assets["speech"], "rb") as fh:
            r = client.post(f"/v1/sessions/{sid}/speak", files={"audio": ("s.wav", fh)})
        assert r.status_code == 202, r.text
        n = r.json()["frames"]
        wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["spoken"] == 1, timeout=30)
        offline = list(sink.frames[sid])
        assert len(offline) == n == audio.num_frames_for_audio(len(pcm), 25.0)

        # 100 ms pieces, little-endian as declared; a sample split across two pieces on purpose
        data = pcm.astype("<i2").tobytes()
        cuts = list(range(0, len(data), 3201)) + [len(data)]
        body = Body(data[a:b] for a, b in zip(cuts, cuts[1:]))
        result = {}
        poster = threading.Thread(target=lambda: result.update(r=client.post(
            f"/v1/sessions/{sid}/speak", content=iter(body), headers={"Content-Type": L16})))
        poster.start()
        try:
            body.release(8)                                  # 0.8 s of the 3 s
            wait_for(lambda: len(sink.frames[sid]) > n, timeout=20)
            wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["speaking"], timeout=20)
            state = client.get(f"/v1/sessions/{sid}").json()
            assert body.sent <= 8 and state["speech_stream"] == "pcm", (body.sent, state)
            assert client.post(f"/v1/sessions/{sid}/speak", content=b"\0\0" * 4000,
                               headers={"Content-Type": L16}).status_code == 409   # one stream at a time
        finally:
            body.release(len(body.chunks))
            poster.join(30)
        r = result["r"]
        assert r.status_code == 202, r.text
        assert r.json()["frames"] == n and r.json()["seconds"] == round(len(pcm) / 16000, 3), r.json()
        wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["spoken"] == 2, timeout=30)
        streamed = sink.frames[sid][n:]
        assert len(streamed) == n
        assert all(np.array_equal(a, b) for a, b in zip(offline, streamed))
        assert client.get(f"/v1/sessions/{sid}").json()["speech_stream"] is None

        # the WebSocket protocol's messages into the session: the same frames, rendering before the end
        ws_url = srv.url.replace("http", "ws") + f"/v1/sessions/{sid}/speak"
        with connect(ws_url, additional_headers=AUTH) as ws:
            for k in range(0, 8 * 1600, 1600):                  # 0.8 s in 100 ms messages
                ws.send(pcm[k:k + 1600].astype("<i2").tobytes())
            wait_for(lambda: len(sink.frames[sid]) > 2 * n, timeout=20)
            assert client.get(f"/v1/sessions/{sid}").json()["speech_stream"] == "pcm"
            for k in range(8 * 1600, len(pcm), 1600):
                ws.send(pcm[k:k + 1600].astype("<i2").tobytes())
            ws.send(json.dumps({"type": "end"}))
            end = json.loads(ws.recv(timeout=30))
        assert end["type"] == "end" and end["frames"] == n, end
        wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["spoken"] == 3, timeout=30)
        assert all(np.array_equal(a, b) for a, b in zip(offline, sink.frames[sid][2 * n:]))
        with connect(ws_url, additional_headers=AUTH) as ws:
            ws.send(b"\0\0\0")
            error = json.loads(ws.recv(timeout=10))
            assert error["type"] == "error" and "odd" in error["message"], error
        for sent in ([b"\0\0" * 500], []):        # audio too short for a frame, or none: refused as a body is
            with connect(ws_url, additional_headers=AUTH) as ws:
                for data in sent:
                    ws.send(data)
                ws.send(json.dumps({"type": "end"}))
                error = json.loads(ws.recv(timeout=10))
                assert error["type"] == "error" and "too short" in error["message"], error
        with pytest.raises(InvalidStatus) as refused:
            with connect(ws_url.replace(sid, "live-000000000000"), additional_headers=AUTH):
                pass
        assert refused.value.response.status_code == 404


def test_pcm_content_types_and_bad_bodies(assets, tmp_path):
    with serve(assets, tmp_path) as srv:
        client = srv.client
        sid = new_session(client, assets)
        url = f"/v1/sessions/{sid}/speak"
        tone = (np.sin(np.arange(8000) * 0.05) * 8000).astype(np.int16)     # 0.5 s at 16 kHz
        for content_type, why in [("audio/mpeg", "audio/L16"), ("audio/L16", "sample rate"),
                                  ("audio/L16;rate=fast", "whole numbers"), ("audio/L16;rate=1000", "8000-192000"),
                                  ("audio/L16;rate=16000;channels=6", "channels=6"),
                                  ("audio/L16;rate=16000;endianness=middle", "endianness"),
                                  ("audio/L16;rate=16000;bits=16", "unknown")]:
            r = client.post(url, content=tone.tobytes(), headers={"Content-Type": content_type})
            assert r.status_code == 415 and why in r.json()["detail"], (content_type, r.text)
        assert client.get(f"/v1/sessions/{sid}").json()["spoken"] == 0          # nothing was queued
        r = client.post(url, content=tone.astype("<i2").tobytes() + b"\1", headers={"Content-Type": L16})
        assert r.status_code == 422 and "1 byte(s) that are not a whole sample" in r.json()["detail"], r.text
        r = client.post(url, content=tone[:1000].tobytes(), headers={"Content-Type": L16})
        assert r.status_code == 422 and "too short" in r.json()["detail"], r.text
        # big-endian (audio/L16's default), 48 kHz stereo: mixed down and resampled to the same 0.5 s
        stereo = np.repeat(np.repeat(tone, 3), 2).astype(">i2").tobytes()
        r = client.post(url, content=stereo, headers={"Content-Type": "audio/L16;rate=48000;channels=2"})
        assert r.status_code == 202 and abs(r.json()["seconds"] - 0.5) < 0.01, r.text
        assert abs(r.json()["frames"] - audio.num_frames_for_audio(8000, 25.0)) <= 1, r.json()
        assert srv.client.post(url, content=tone.tobytes(), headers={"Content-Type": L16,
                                                                     "Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/v1/sessions/live-000000000000/speak", content=tone.tobytes(),
                           headers={"Content-Type": L16}).status_code == 404


def test_pcm_decoder_joins_split_samples_and_resamples():
    tone = (np.sin(np.arange(48000) * 2 * np.pi * 440 / 48000) * 10000).astype(np.int16)   # 1 s at 48 kHz
    decoder = PcmDecoder(parse_l16("audio/L16;rate=48000;channels=2;endianness=little-endian"))
    data = np.repeat(tone, 2).astype("<i2").tobytes()
    parts = [decoder.decode(data[a:a + 1001]) for a in range(0, len(data), 1001)]
    tail, leftover = decoder.flush()
    out = np.concatenate(parts + [tail])
    assert leftover == 0 and abs(len(out) - 16000) <= 32, len(out)
    expected = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 10000)
    k = 200   # past the resampler's start-up
    lag = int(np.argmax([np.dot(out[k:k + 8000], expected[k - d:k - d + 8000]) for d in range(0, 64)]))
    err = out[k:k + 8000] - expected[k - lag:k - lag + 8000]
    assert np.abs(err).max() < 200, np.abs(err).max()   # a 440 Hz tone survives 48 -> 16 kHz


class Speaker(Watcher):
    """A viewer whose offer sends a wav as its microphone (aiortc's MediaPlayer: real-time pace)."""

    def __init__(self, client, sid, wav):
        super().__init__(client, sid)
        self.wav = wav
        self.player = None

    async def _connect(self, answer):
        self.player = MediaPlayer(self.wav)
        self.pc = aiortc.RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTrack(self.player.audio)           # sendrecv audio: the microphone contract
        self.pc.on("track", lambda track: asyncio.ensure_future(self._read(track)))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"sdp": self.pc.localDescription.sdp, "type": "offer"}
        r = await asyncio.to_thread(self.client.post, f"/v1/sessions/{self.sid}/offer", json=offer, headers=AUTH)
        if r.status_code == 200:
            self.viewer_id = r.json()["viewer_id"]
            await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=r.json()["sdp"], type="answer"))
        return r


def test_a_microphone_track_is_the_sessions_speech(assets, tmp_path, loud):
    """An offer sending a microphone track: the avatar's mouth follows it (the oracle generator's
    mouth against the wav's loudness, frame by frame) where it was still while idle; a second
    viewer hears the speech with it, the speaker hears silence; when the microphone stops the face
    goes idle; a second microphone gets 409; the stream ends with its viewer."""
    sink = Sink()
    with serve(assets, tmp_path, sink=sink) as srv:
        client = srv.client
        sid = new_session(client, assets)
        listener = Watcher(client, sid)
        speaker = Speaker(client, sid, assets["mic"])
        other = Speaker(client, sid, assets["mic"])
        try:
            assert listener.connect().status_code == 200
            listener.wait(video=10, audio=10)
            idle_until = len(listener.video)
            r = speaker.connect()
            assert r.status_code == 200 and r.json()["microphone"], r.text
            r = other.connect()
            assert r.status_code == 409 and "microphone of " + speaker.viewer_id in r.json()["detail"], r.text
            wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["speaking"], timeout=20)
            state = client.get(f"/v1/sessions/{sid}").json()
            assert state["speech_stream"] == f"microphone of {speaker.viewer_id}", state
            # the 2 s wav ends: its last frames, then idle
            wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["spoken"] >= 1, timeout=30)
            wait_for(lambda: not client.get(f"/v1/sessions/{sid}").json()["speaking"], timeout=10)
            time.sleep(0.5)
            spoken = audio.load_wav(assets["mic"])
            # the frames rendered from the microphone: mouth k opens with the wav's mel window k
            rendered = sink.frames[sid]
            n = audio.num_frames_for_audio(len(spoken), 25.0)
            assert abs(len(rendered) - n) <= 3, (len(rendered), n)
            k = min(len(rendered), n)
            opening = np.array([mouth_openness(f[FACE]) for f in rendered[:k]])
            corr = np.corrcoef(opening, mel_loudness(spoken, n)[:k])[0, 1]
            assert corr > 0.9, corr
            # what the listener received: a still mouth while idle, a moving one while the microphone spoke
            received = np.array([mouth_openness(f[FACE]) for _, f, _ in listener.video])
            idle, talk = received[3:idle_until], received[idle_until:]
            assert idle.std() < 1.0 and talk.std() > 10 * max(idle.std(), 0.3), (idle.std(), talk.std())
            assert np.abs(received[-5:] - idle.mean()).max() < 3, received[-10:]          # idle again
            # the listener hears the microphone's speech, the speaker hears silence
            heard, _ = listener.pcm16k()
            # (in 0.4 s pieces: two Opus passes, the jitter buffer and any stall shift the pieces a little;
            # aiortc's sender upmixes the mono wav 3 dB down)
            found = [onset(heard, spoken[a:a + 6400]) for a in range(0, 25600, 6400)]
            assert all(corr > 0.9 and 0.4 < level < 1.4 for _, corr, level in found), found
            assert np.all(np.diff([at for at, _, _ in found]) > 0), found
            echo = np.concatenate([p for _, p in speaker.audio]) if speaker.audio else np.zeros(1)
            assert np.abs(echo).max() < 100, np.abs(echo).max()
            state = client.get(f"/v1/sessions/{sid}").json()
            assert state["viewers"] == 2 and state["speech_stream"] == f"microphone of {speaker.viewer_id}", state
            speaker.close()                                           # the microphone leaves with its viewer
            wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["speech_stream"] is None, timeout=10)
        finally:
            for peer in (other, speaker, listener):
                peer.close()
        wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["viewers"] == 0, timeout=10)


def test_a_live_voice_the_renderer_fell_behind_catches_up(assets, tmp_path, loud, monkeypatch):
    """A real-time stream (a microphone's) whose renderer stalls for 3 s: frames are skipped so that
    playback stays within --webrtc_lead + 0.5 s of the voice, instead of running 3 s late."""
    forward = assets["gen"].queue.forward
    stalled = threading.Event()

    def slow_once(mels, faces, keys, as_tensor):
        if not stalled.is_set():
            stalled.set()
            time.sleep(3.0)
        return forward(mels, faces, keys, as_tensor)

    monkeypatch.setattr(assets["gen"].queue, "forward", slow_once)
    pcm = pcm16(assets["speech"])                               # 3 s
    with serve(assets, tmp_path) as srv:
        sid = new_session(srv.client, assets)
        session = srv.state.sessions[sid]

        async def talk():
            stream = session.open_stream(source="v1", realtime=True)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for k in range(0, len(pcm), 640):                   # 40 ms pieces at the pace they are spoken
                stream.push(pcm[k:k + 640])
                await asyncio.sleep(max(0.0, t0 + (k + 640) / 16000 - loop.time()))
            stream.finish()

        started = time.monotonic()
        srv.run(talk(), timeout=30)
        wait_for(lambda: srv.client.get(f"/v1/sessions/{sid}").json()["spoken"] == 1, timeout=30)
        took = time.monotonic() - started
        state = srv.client.get(f"/v1/sessions/{sid}").json()
    n = audio.num_frames_for_audio(len(pcm), 25.0)
    # behind by ~75 frames when the renderer comes back, allowed 5 (lead) + 12 (0.5 s): most are skipped
    assert 40 <= state["skipped"] < n, state
    assert took < 3.0 + 3.0, took      # without catching up: the 3 s of speech + 3 s stalled + the lead
