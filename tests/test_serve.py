"""The server's API contract through FastAPI's TestClient (in-process): every endpoint and error
code, streamed frames equal to offline ones, idle frames, bad messages, the batcher and the
per-session queue. tests/test_serve_process.py runs a real serve.py for the rest."""
import json
import os
import shutil
import threading
import time

import cv2
import numpy as np
import pytest
import torch

import audio
from conftest import REFERENCE, reproducible_generator
from lipsync.render.avatar import load_avatar
from lipsync.render.engine import render
from lipsync.render.inference import InferenceConfig, run_inference
from lipsync.media.video import count_frames, probe_video
from media import astronaut, make_face_video, tone_wav
from serving import tiny_checkpoint

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.testclient import WebSocketDenialResponse  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from lipsync.render.forward import ForwardQueue, ForwardQueueClosed  # noqa: E402
from lipsync.serve.app import create_app  # noqa: E402
from lipsync.serve.state import ServerConfig, ServerState  # noqa: E402
from lipsync.serve.stream_output import IdleFrames, Outbox, StreamOptions  # noqa: E402

WAV = os.path.join(REFERENCE, "speechlike_16k.wav")
BOX = "40 200 60 196"  # top bottom left right: the astronaut's face at 256x256
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    ckpt = tiny_checkpoint(d / "wav2lip_tiny.pth")
    # the fixed plan: frames do not depend on how they were batched or on the CPU tuner, so the streamed
    # frames can be compared with the offline ones bit for bit
    generator = reproducible_generator(ckpt)
    photo = str(d / "photo.mp4")  # a PNG whatever its name says
    cv2.imwrite(str(d / "photo.png"), astronaut())
    shutil.copy(d / "photo.png", photo)
    text = d / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    wav = np.round(np.clip(audio.load_wav(WAV), -1, 1) * 32767).astype("<i2")
    return {"dir": d, "ckpt": ckpt, "gen": generator, "video": make_face_video(d / "face.mp4", 20),
            "photo": photo, "text": str(text), "tone": tone_wav(d / "tone.wav", 0.5),
            "pcm": wav[:int(0.6 * 16000)]}  # 0.6 s: 15 frames at 25 fps


class Frames:
    """frame_sink that keeps every frame by session."""

    def __init__(self):
        self.by_session = {}
        self.lock = threading.Lock()

    def __call__(self, sid, i, frame):
        with self.lock:
            self.by_session.setdefault(sid, {})[i] = frame.copy()

    def of(self, sid):
        got = self.by_session[sid]
        return [got[i] for i in range(len(got))]


def make_client(media, tmp_path, sink=None, **config):
    stream = config.pop("stream", StreamOptions())
    cfg = ServerConfig(avatars_dir=str(tmp_path / "avatars"), face_detector="lbp", stream=stream, **config)
    return TestClient(create_app(ServerState(media["gen"], cfg, frame_sink=sink)))


def upload(client, path, name="face.mp4", headers=None, **fields):
    with open(path, "rb") as fh:
        return client.post("/v1/avatars", files={"file": (name, fh)}, data=fields, headers=headers)


def read_stream(ws):
    """Messages until the end or an error: (talk frames [(header, jpeg)], idle [(header, jpeg)], last
    message, close code)."""
    frames, idle, last = [], [], None
    try:
        while True:
            header = ws.receive_json()
            if header["type"] in ("frame", "idle"):
                (frames if header["type"] == "frame" else idle).append((header, ws.receive_bytes()))
                continue
            last = header
            break
        ws.receive_text()  # the close
    except WebSocketDisconnect as exc:
        return frames, idle, last, exc.code
    raise AssertionError("the server sent something after its last message")


def refused(client, url):
    """The HTTP status with which the WebSocket handshake to ``url`` is refused."""
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect(url):
            pass
    return denied.value.status_code


def stream_pcm(ws, pcm, chunk_ms):
    step = max(1, int(round(16 * chunk_ms)))
    for k in range(0, len(pcm), step):
        ws.send_bytes(pcm[k:k + step].tobytes())
    ws.send_text(json.dumps({"type": "end"}))


@pytest.fixture(scope="module")
def served(media, tmp_path_factory):
    """One server with an avatar from the face video (box given) for the stream tests."""
    tmp = tmp_path_factory.mktemp("served")
    sink = Frames()
    with make_client(media, tmp, sink=sink) as client:
        r = upload(client, media["video"], box=BOX)
        assert r.status_code == 201, r.text
        avatar_id = r.json()["avatar_id"]
        yield client, avatar_id, sink, str(tmp / "avatars" / avatar_id)


# ---------------------------------------------------------------------------------------------
# HTTP API
# ---------------------------------------------------------------------------------------------
def test_health_and_page(media, tmp_path):
    with make_client(media, tmp_path) as client:
        r = client.get("/healthz")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok" and body["img_size"] == 96 and body["sessions"]["max"] == 8
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_avatar_lifecycle(media, tmp_path):
    """Create (video with a box; a photo judged by content with its fps; a video with detection),
    list, get, delete; the folder is what load_avatar reads."""
    with make_client(media, tmp_path) as client:
        r = upload(client, media["video"], name="clip.bin", box=BOX)
        assert r.status_code == 201, r.text
        video = r.json()
        assert {k: video[k] for k in ("frames", "fps", "width", "height")} == \
            {"frames": 20, "fps": 25.0, "width": 256, "height": 256}
        photo = upload(client, media["photo"], name="photo.mp4", fps="30").json()
        assert photo["frames"] == 1 and photo["fps"] == 30.0 and photo["source_kind"] == "image"
        detected = upload(client, media["video"])  # lbp detection
        assert detected.status_code == 201, detected.text
        ids = {a["avatar_id"] for a in client.get("/v1/avatars").json()["avatars"]}
        assert ids == {video["avatar_id"], photo["avatar_id"], detected.json()["avatar_id"]}
        assert client.get(f"/v1/avatars/{video['avatar_id']}").json() == video
        load_avatar(str(tmp_path / "avatars" / video["avatar_id"]), 96)  # complete and checked
        assert client.delete(f"/v1/avatars/{video['avatar_id']}").status_code == 204
        assert client.get(f"/v1/avatars/{video['avatar_id']}").status_code == 404
        assert client.delete(f"/v1/avatars/{video['avatar_id']}").status_code == 404
        assert sorted(os.listdir(tmp_path / "avatars")) == sorted([".staging", photo["avatar_id"],
                                                                    detected.json()["avatar_id"]])
        assert os.listdir(tmp_path / "avatars" / ".staging") == []  # each request's uploads are gone


def test_ids_that_the_server_did_not_make_are_404(media, tmp_path):
    """../.., absolute paths, other names: 404 everywhere, even when a folder of that name exists."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "avatar.json").write_text("{}")
    with make_client(media, tmp_path) as client:
        bad = ["..%2F..", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "..", str(outside).replace("/", "%2F"),
               "ABCDEF0123456789", "0123456789abcdef"]
        for avatar_id in bad:
            assert client.get(f"/v1/avatars/{avatar_id}").status_code == 404, avatar_id
            assert client.delete(f"/v1/avatars/{avatar_id}").status_code == 404, avatar_id
        for avatar_id in ["../..", str(outside), "../outside", "0123456789abcdef"]:
            assert refused(client, f"/v1/stream?avatar_id={avatar_id}") == 404
            with open(media["tone"], "rb") as fh:
                r = client.post("/v1/lipsync", data={"avatar_id": avatar_id}, files={"audio": ("a.wav", fh)})
            assert r.status_code == 404, avatar_id
        assert (outside / "avatar.json").exists()


def test_uploads_over_the_limit_are_413_and_nothing_is_kept(media, tmp_path):
    """By Content-Length, and for a chunked upload (no length) as soon as the limit is passed."""
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(300_000))
    with make_client(media, tmp_path, max_upload_mb=0.1) as client:
        assert upload(client, str(big)).status_code == 413
        boundary = "xyzzy"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp4\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()

        def chunked():
            yield head
            for _ in range(30):
                yield os.urandom(10_000)
            yield f"\r\n--{boundary}--\r\n".encode()

        r = client.post("/v1/avatars", content=chunked(),
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413
        with open(media["tone"], "rb") as a, open(str(big), "rb") as f:
            r = client.post("/v1/lipsync", files={"audio": ("a.wav", a), "face": ("f.mp4", f)})
        assert r.status_code == 413
        assert client.get("/v1/avatars").json()["avatars"] == []
        leftovers = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "avatars") for f in files]
        assert leftovers == []


def test_file_types_are_judged_by_content(media, tmp_path):
    """415 for a text file named .mp4, for speech given as a face and for a video given as audio
    that has no sound; 422 for missing or malformed fields."""
    with make_client(media, tmp_path) as client:
        r = upload(client, media["text"], name="face.mp4")
        assert r.status_code == 415 and "not a video or photo" in r.json()["detail"]
        assert upload(client, media["tone"], name="face.mp4").status_code == 415
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        with open(media["text"], "rb") as fh:
            r = client.post("/v1/lipsync", data={"avatar_id": avatar_id}, files={"audio": ("speech.wav", fh)})
        assert r.status_code == 415 and "not audio" in r.json()["detail"]
        with open(media["video"], "rb") as fh:  # a video without an audio track
            r = client.post("/v1/lipsync", data={"avatar_id": avatar_id}, files={"audio": ("speech.wav", fh)})
        assert r.status_code == 415

        assert client.post("/v1/avatars", data={"box": BOX}).status_code == 422
        assert upload(client, media["video"], box="1 2 3").status_code == 422
        assert upload(client, media["video"], box="10 0 0 10").status_code == 422  # empty box: the engine's message
        assert upload(client, media["photo"], fps="abc").status_code == 422
        assert upload(client, media["photo"], fps="-5").status_code == 422
        with open(media["tone"], "rb") as a, open(media["video"], "rb") as f:
            both = client.post("/v1/lipsync", data={"avatar_id": avatar_id},
                               files={"audio": ("a.wav", a), "face": ("f.mp4", f)})
        assert both.status_code == 422
        assert client.post("/v1/lipsync", data={"avatar_id": avatar_id}).status_code == 422
        for field, value in (("target_face", "0"), ("box", BOX), ("fps", "10")):  # an avatar keeps its own
            with open(media["tone"], "rb") as a:
                r = client.post("/v1/lipsync", data={"avatar_id": avatar_id, field: value},
                                files={"audio": ("a.wav", a)})
            assert r.status_code == 422 and repr(field) in r.json()["detail"], r.text
        with open(media["tone"], "rb") as a:
            assert client.post("/v1/lipsync", files={"audio": ("a.wav", a)}).status_code == 422
        assert client.get("/healthz").status_code == 200


def test_lipsync_is_what_inference_writes(media, tmp_path):
    """POST /v1/lipsync (avatar_id, or a face file with a box) returns the mp4 of inference.py's
    frames for that face and audio."""
    sink = Frames()
    with make_client(media, tmp_path, sink=sink) as client:
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        with open(media["tone"], "rb") as a:
            r = client.post("/v1/lipsync", data={"avatar_id": avatar_id}, files={"audio": ("speech.wav", a)})
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        out = tmp_path / "served.mp4"
        out.write_bytes(r.content)
        assert count_frames(probe_video(str(out))) == 13  # 0.5 s at 25 fps, rounded up
        ours = sink.of(next(iter(sink.by_session)))
        with open(media["tone"], "rb") as a, open(media["video"], "rb") as f:
            r2 = client.post("/v1/lipsync", data={"box": BOX}, files={"audio": ("a.wav", a), "face": ("f.bin", f)})
        assert r2.status_code == 200
        with open(media["tone"], "rb") as a:  # an avatar keeps its own box and frame rate
            r3 = client.post("/v1/lipsync", data={"avatar_id": avatar_id, "fps": "30"}, files={"audio": ("a.wav", a)})
        assert r3.status_code == 422 and "avatar" in r3.json()["detail"]
    expected = {}
    cfg = InferenceConfig(checkpoint_path=media["ckpt"], face=None, avatar=str(tmp_path / "avatars" / avatar_id),
                          audio=media["tone"], outfile=str(tmp_path / "offline.mp4"), progress=False)
    run_inference(cfg, frame_sink=lambda i, f: expected.__setitem__(i, f.copy()), generator=media["gen"])
    assert len(ours) == len(expected) == 13
    assert all(np.array_equal(ours[i], expected[i]) for i in range(13))
    second = [s for s in sink.by_session if sink.of(s) is not ours][-1]
    assert all(np.array_equal(a, expected[i]) for i, a in enumerate(sink.of(second)))
    assert not (tmp_path / "avatars" / ".staging").exists() or not os.listdir(tmp_path / "avatars" / ".staging")


def test_token(media, tmp_path):
    """With a token, every HTTP request and WebSocket needs it (header or ?token=), else 401."""
    with make_client(media, tmp_path, token=TOKEN) as client:
        for path in ("/healthz", "/", "/v1/avatars", "/v1/avatars/0123456789abcdef"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert client.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get(f"/healthz?token={TOKEN}").status_code == 200
        assert upload(client, media["video"], box=BOX).status_code == 401
        r = upload(client, media["video"], box=BOX, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201
        avatar_id = r.json()["avatar_id"]
        for url in (f"/v1/stream?avatar_id={avatar_id}", f"/v1/stream?avatar_id={avatar_id}&token=nope"):
            assert refused(client, url) == 401
        with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}&token={TOKEN}") as ws:
            stream_pcm(ws, media["pcm"][:4000], 100)
            frames, _, last, code = read_stream(ws)
        assert last["type"] == "end" and len(frames) == last["frames"] == 7 and code == 1000


def test_token_covers_what_no_route_has(media, tmp_path):
    """The page's files, paths no route has (the browser's favicon), a method a path does not take
    and a path one slash off: 401 without the token, their usual answer with it."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with make_client(media, tmp_path, token=TOKEN) as client:
        for method, path, status in [("GET", "/web/app.js", 200), ("GET", "/favicon.ico", 404),
                                     ("POST", "/healthz", 405), ("GET", "/healthz/", 307)]:
            r = client.request(method, path, follow_redirects=False)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
            assert "needs a token" in r.json()["detail"]
            assert client.request(method, path, headers=auth, follow_redirects=False).status_code == status, path
        assert refused(client, "/v1/other") == 401


def test_sessions_beyond_max_get_503_and_avatars_in_use_409(media, tmp_path):
    with make_client(media, tmp_path, max_sessions=1) as client:
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
            ws.send_bytes(media["pcm"][:1600].tobytes())
            assert refused(client, f"/v1/stream?avatar_id={avatar_id}") == 503
            with open(media["tone"], "rb") as a:
                r = client.post("/v1/lipsync", data={"avatar_id": avatar_id}, files={"audio": ("a.wav", a)})
            assert r.status_code == 503
            assert client.delete(f"/v1/avatars/{avatar_id}").status_code == 409
            assert client.get("/healthz").json()["sessions"]["streams"] == 1
            stream_pcm(ws, media["pcm"][1600:4000], 100)
            assert read_stream(ws)[2]["type"] == "end"
        for _ in range(100):  # the slot is released when the handler returns
            if client.get("/healthz").json()["sessions"]["streams"] == 0:
                break
            time.sleep(0.05)
        assert client.delete(f"/v1/avatars/{avatar_id}").status_code == 204


def test_playlists_are_not_uploads(media, tmp_path):
    """An HLS playlist named .mp4 or .wav that points at a video on the server's disk is refused (415)
    as a face and as audio: ffmpeg would read the server's file for it."""
    on_server = tmp_path / "private.ts"
    make_face_video(tmp_path / "private.mp4", 10, audio=media["tone"])
    from lipsync.media.ffmpeg import ffmpeg_command, ffmpeg_path
    import subprocess
    subprocess.run(ffmpeg_command("-i", ffmpeg_path(str(tmp_path / "private.mp4")), "-c:v", "mpeg2video", "-c:a",
                                  "mp2", "-y", ffmpeg_path(str(on_server))), check=True, capture_output=True)
    playlist = tmp_path / "innocent.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:0.4,\n{on_server}\n#EXT-X-ENDLIST\n")
    with make_client(media, tmp_path) as client:
        assert upload(client, str(playlist), box=BOX).status_code == 415
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        with open(playlist, "rb") as fh:
            r = client.post("/v1/lipsync", data={"avatar_id": avatar_id}, files={"audio": ("speech.wav", fh)})
        assert r.status_code == 415
    from lipsync.serve.uploads import upload_format_ok
    assert upload_format_ok("mov,mp4,m4a,3gp,3g2,mj2") and upload_format_ok("matroska,webm")
    assert upload_format_ok("png_pipe") and upload_format_ok("wav")
    assert not any(upload_format_ok(f) for f in ("hls", "concat", "dash", "", "sdp", "image2,hls"))


def test_what_one_request_may_cost_is_limited(media, tmp_path):
    """Frames over --max_frame_pixels, face videos over --max_avatar_seconds and /v1/lipsync audio
    over --max_audio_seconds are refused with 422 naming the flag; error messages do not show the
    server's paths."""
    with make_client(media, tmp_path, max_frame_pixels=200 * 200, max_avatar_seconds=0.5,
                     max_audio_seconds=0.3) as client:
        r = upload(client, media["photo"], box=BOX)
        assert r.status_code == 422 and "--max_frame_pixels" in r.json()["detail"]
    with make_client(media, tmp_path, max_avatar_seconds=0.5, max_audio_seconds=0.3) as client:
        r = upload(client, media["video"], box=BOX)  # 20 frames at 25 fps: 0.8 s
        assert r.status_code == 422 and "--max_avatar_seconds" in r.json()["detail"]
        avatar_id = upload(client, media["photo"], box=BOX).json()["avatar_id"]
        with open(media["tone"], "rb") as a:  # 0.5 s
            r = client.post("/v1/lipsync", data={"avatar_id": avatar_id}, files={"audio": ("a.wav", a)})
        assert r.status_code == 422 and "--max_audio_seconds" in r.json()["detail"]
        blank = tmp_path / "blank.png"
        cv2.imwrite(str(blank), np.full((128, 128, 3), 127, np.uint8))
        r = upload(client, str(blank))  # no box, and no face to find
        detail = r.json()["detail"]
        assert r.status_code == 422 and "no face found" in detail and "the uploaded face" in detail
        assert str(tmp_path) not in detail and ".staging" not in detail


def test_queued_preparations_do_not_stall_the_server(media, tmp_path, monkeypatch):
    """Avatars are prepared one at a time on their own thread: while uploads wait for it, listings
    and streams answer at once; beyond --max_sessions waiting uploads, 503. A /v1/lipsync job keeps
    its avatar in use (DELETE gets 409 while it runs)."""
    from lipsync.serve.avatar_store import AvatarInUse, AvatarStore

    release = threading.Event()
    real_create = AvatarStore.create

    def slow_create(self, *args, **kwargs):
        release.wait(60)
        return real_create(self, *args, **kwargs)

    with make_client(media, tmp_path, max_sessions=2) as client:
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        monkeypatch.setattr(AvatarStore, "create", slow_create)
        statuses = []
        uploads = [threading.Thread(target=lambda: statuses.append(upload(client, media["photo"], box=BOX).status_code))
                   for _ in range(8)]
        for t in uploads:
            t.start()
        deadline = time.monotonic() + 30
        while len(statuses) < 6 and time.monotonic() < deadline:  # 1 preparing + 1 waiting; the rest 503 at once
            time.sleep(0.05)
        t0 = time.monotonic()
        assert client.get("/v1/avatars").status_code == 200
        with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
            stream_pcm(ws, media["pcm"][:4000], 100)
            assert read_stream(ws)[2]["type"] == "end"
        waited = time.monotonic() - t0
        release.set()
        for t in uploads:
            t.join(60)
        assert sorted(statuses) == [201] * 2 + [503] * 6 and waited < 20, (statuses, waited)
    monkeypatch.undo()

    tried = []
    holder = {}

    def delete_while_rendering(sid, i, frame):
        if i == 0:
            try:
                holder["state"].store.delete(holder["id"])
            except AvatarInUse as exc:
                tried.append(exc)

    cfg = ServerConfig(avatars_dir=str(tmp_path / "avatars2"), face_detector="lbp")
    holder["state"] = ServerState(media["gen"], cfg, frame_sink=delete_while_rendering)
    with TestClient(create_app(holder["state"])) as client:
        holder["id"] = upload(client, media["video"], box=BOX).json()["avatar_id"]
        with open(media["tone"], "rb") as a:
            r = client.post("/v1/lipsync", data={"avatar_id": holder["id"]}, files={"audio": ("a.wav", a)})
        assert r.status_code == 200 and len(tried) == 1
        assert client.delete(f"/v1/avatars/{holder['id']}").status_code == 204


def test_token_values_are_hidden_in_the_access_log():
    import logging

    import serve
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', (
        "127.0.0.1:5", "GET", f"/v1/stream?avatar_id=ab&token={TOKEN}&x=1", "1.1", 101), None)
    assert serve._HideToken().filter(record)
    assert TOKEN not in record.getMessage() and "token=***&x=1" in record.getMessage()


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_ms", [10, 37.5, 160, 500])
def test_streamed_frames_equal_offline_frames(media, served, chunk_ms):
    """Any message size from 10 to 500 ms: the offline frame count, frames in order with pts = i / fps,
    and every frame (before JPEG) equal to render() of the same avatar and audio."""
    client, avatar_id, sink, folder = served
    pcm = media["pcm"]
    before = set(sink.by_session)
    with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
        stream_pcm(ws, pcm, chunk_ms)
        frames, _, last, code = read_stream(ws)
    n = audio.num_frames_for_audio(len(pcm), 25.0)
    assert n == 15 and last == {**last, "type": "end", "frames": n, "dropped": 0, "sent": n} and code == 1000
    assert [h["index"] for h, _ in frames] == list(range(n))
    assert [h["pts"] for h, _ in frames] == [round(i / 25.0, 6) for i in range(n)]
    (sid,) = set(sink.by_session) - before
    streamed = sink.of(sid)
    offline = list(render(media["gen"], load_avatar(folder, 96), pcm.astype(np.float32) / 32768))
    assert len(streamed) == len(offline) == n
    for i, (a, b) in enumerate(zip(streamed, offline)):
        assert np.array_equal(a, b), f"frame {i} differs"
        jpeg = cv2.imdecode(np.frombuffer(frames[i][1], np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(jpeg.astype(int) - a).mean() < 4  # the JPEG is that frame


def test_offline_and_live_frames_take_one_path(media, served, monkeypatch):
    """A window's walk: offline render() and a streaming session both get their windows from
    FrameWindows, crop and generate in engine._generated_groups, run the forward pass on the
    generator's ForwardQueue and paste with the CpuComposer."""
    import lipsync.render.engine as engine
    from lipsync.render.blending import CpuComposer
    from lipsync.render.streaming import FrameWindows

    seen = []

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            seen.append(name)
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)

    for owner, name in ((FrameWindows, "push"), (engine, "_generated_groups"), (ForwardQueue, "_forward"),
                        (CpuComposer, "paste")):
        spy(owner, name)
    client, avatar_id, _, folder = served
    pcm = media["pcm"]
    list(render(media["gen"], load_avatar(folder, 96), pcm.astype(np.float32) / 32768))
    offline, seen[:] = set(seen), []
    with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
        stream_pcm(ws, pcm, 100)
        read_stream(ws)
    assert offline == set(seen) == {"push", "_generated_groups", "_forward", "paste"}


def test_the_device_composer_path(media, tmp_path):
    """What a CUDA server runs (crop and paste by lipsync.render.gpu.TorchComposer, crops and faces as
    device tensors through the forward queue), here on the CPU: frames equal render(..., on_device=True)
    up to a grey level on a few pixels."""
    sink = Frames()
    pcm = media["pcm"][:6400]
    with make_client(media, tmp_path, sink=sink, stream=StreamOptions(on_device=True)) as client:
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
            stream_pcm(ws, pcm, 100)
            frames, _, last, _ = read_stream(ws)
    (sid,) = sink.by_session
    streamed = sink.of(sid)
    avatar = load_avatar(str(tmp_path / "avatars" / avatar_id), 96)
    offline = list(render(media["gen"], avatar, pcm.astype(np.float32) / 32768, on_device=True))
    assert len(streamed) == len(offline) == last["frames"] == len(frames) == 10
    for a, b in zip(streamed, offline):
        # torch's float reductions (the paste's colour fit) round with the thread count the CPU
        # tuner last chose: a grey level on a few pixels
        diff = np.abs(a.astype(int) - b)
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 10


def test_frames_leave_before_the_end(media, served):
    """Without the end message, every frame whose window the audio sent so far completes arrives."""
    client, avatar_id, _, _ = served
    k = 4
    need = 200 * (audio.frame_to_mel_start(k, 25.0) + 15) + 400
    with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
        ws.send_bytes(media["pcm"][:need].tobytes())
        got = []
        while len(got) <= k:
            header = ws.receive_json()
            ws.receive_bytes()
            if header["type"] == "frame":
                got.append(header["index"])
        ws.send_text(json.dumps({"type": "end"}))
        frames, _, last, _ = read_stream(ws)
    assert got == list(range(k + 1))
    assert last["frames"] == audio.num_frames_for_audio(need, 25.0) == k + 1 + len(frames)


@pytest.mark.parametrize("send, message, code", [
    (lambda ws, pcm: ws.send_bytes(b"\x01\x02\x03"), "odd number", 1003),
    (lambda ws, pcm: ws.send_text("hello"), "must be JSON", 1003),
    (lambda ws, pcm: ws.send_text('{"type": "start"}'), "unknown message", 1003),
    (lambda ws, pcm: ws.send_text("[" * 3000), "must be JSON", 1003),  # nesting deeper than the parser goes
    (lambda ws, pcm: ws.send_bytes(np.zeros(40000, "<i2").tobytes()), "too large", 1009),
    (lambda ws, pcm: ws.send_text('{"type": "end"}'), "before any audio", 1003),
    (lambda ws, pcm: (ws.send_bytes(pcm[:1000].tobytes()), ws.send_text('{"type": "end"}')), "too short", 1003),
])
def test_bad_messages_end_the_session_not_the_server(media, served, send, message, code):
    client, avatar_id, _, _ = served
    with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
        send(ws, media["pcm"])
        _, _, last, close_code = read_stream(ws)
    assert last["type"] == "error" and message in last["message"] and close_code == code
    assert client.get("/healthz").json()["status"] == "ok"


def test_idle_frames_while_no_audio_arrives(media, tmp_path):
    """No audio for a while: idle messages with the avatar's own frames, numbered apart from the
    talk frames; the talk frames and their count are the same as without the pause."""
    with make_client(media, tmp_path, stream=StreamOptions(idle_grace=0.05)) as client:
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        pcm = media["pcm"]
        with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
            idle_before = []
            while len(idle_before) < 3:  # idle from the start, before any audio
                header = ws.receive_json()
                idle_before.append((header, ws.receive_bytes()))
            ws.send_bytes(pcm[:4800].tobytes())   # 0.3 s completes the windows of frames 0..2
            time.sleep(0.6)                        # a pause in the speech
            stream_pcm(ws, pcm[4800:], 100)
            frames, idle, last, _ = read_stream(ws)
    idle = idle_before + idle
    n = audio.num_frames_for_audio(len(pcm), 25.0)
    assert [h["index"] for h, _ in frames] == list(range(n)) and last["frames"] == n
    assert all(h["type"] == "idle" for h, _ in idle)
    assert [h["index"] for h, _ in idle] == list(range(len(idle)))
    assert len(idle) > 3 and any(h["next_index"] == 3 for h, _ in idle)
    assert last["idle"] == len(idle)
    # an idle frame is the source frame the swing points at, unchanged (up to JPEG)
    from lipsync.media.frames import source_index
    header, data = idle[0]
    j = source_index(header["next_index"] + IdleFrames.offset(0, 25), 20, "repeat")
    source = load_avatar(str(tmp_path / "avatars" / avatar_id), 96).source
    expected = list(source.frames(j, j + 1))[0]
    shown = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.abs(shown.astype(int) - expected).mean() < 4


@pytest.mark.parametrize("fps", [None, "0.2"])
def test_silent_sessions_time_out(media, tmp_path, fps):
    """After --idle_timeout without audio, also for an avatar whose frames are seconds apart."""
    with make_client(media, tmp_path, stream=StreamOptions(idle_timeout=0.3)) as client:
        face = media["video"] if fps is None else media["photo"]
        avatar_id = upload(client, face, box=BOX, **({"fps": fps} if fps else {})).json()["avatar_id"]
        t0 = time.monotonic()
        with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
            _, _, last, code = read_stream(ws)
    assert last["type"] == "error" and "no audio" in last["message"] and code == 1008
    assert time.monotonic() - t0 < 2.5


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------
def test_forward_queue_runs_sessions_together(media):
    """Requests of sessions with frames in flight share one generator call; each gets its rows."""
    rng = np.random.default_rng(0)
    mels = rng.standard_normal((6, 80, 16)).astype(np.float32)
    faces = rng.integers(0, 255, (6, 96, 96, 3), dtype=np.uint8)
    alone = media["gen"].generate(mels, faces)
    batcher = ForwardQueue(media["gen"].queue.forward, max_batch=64, max_wait=5.0, busy=lambda: {"a", "b", "c"})
    results = {}

    def call(owner, rows):
        results[owner] = batcher.generate(mels[rows], faces[rows], owner=owner)

    threads = [threading.Thread(target=call, args=(o, r)) for o, r in
               (("a", slice(0, 1)), ("b", slice(1, 4)), ("c", slice(4, 6)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert batcher.stats.calls == 1 and batcher.stats.most_sessions == 3 and batcher.stats.frames == 6
    assert np.array_equal(np.concatenate([results["a"], results["b"], results["c"]]), alone)
    batcher.close()
    with pytest.raises(ForwardQueueClosed):
        batcher.generate(mels[:1], faces[:1], owner="a")


def test_forward_queue_takes_device_tensors(media):
    """Crops as tensors (sessions composing on the device) get tensors back, numpy gets numpy, in
    one call."""
    rng = np.random.default_rng(1)
    mels = rng.standard_normal((3, 80, 16)).astype(np.float32)
    faces = rng.integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)
    alone = media["gen"].generate(mels, faces)
    batcher = ForwardQueue(media["gen"].queue.forward, max_batch=64, max_wait=5.0, busy=lambda: {"t", "n"})
    results = {}
    threads = [threading.Thread(target=lambda: results.__setitem__(
                   "t", batcher.generate_for("t")(mels[:2], torch.from_numpy(faces[:2]), None))),
               threading.Thread(target=lambda: results.__setitem__("n", batcher.generate_for("n")(mels[2:], faces[2:], None)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    batcher.close()
    assert isinstance(results["t"], torch.Tensor) and isinstance(results["n"], np.ndarray)
    assert batcher.stats.calls == 1
    assert np.array_equal(np.concatenate([results["t"].numpy(), results["n"]]), alone)


def test_forward_queue_does_not_wait_for_idle_sessions(media):
    """A lone session (nobody else busy) runs at once, however long max_wait is."""
    batcher = ForwardQueue(media["gen"].queue.forward, max_batch=4, max_wait=30.0, busy=lambda: {"a"})
    mels = np.zeros((6, 80, 16), np.float32)
    faces = np.zeros((6, 96, 96, 3), np.uint8)
    out = batcher.generate(mels, faces, owner="a")  # larger than max_batch: runs whole, alone
    assert out.shape == (6, 96, 96, 3) and batcher.stats.calls == 1
    batcher.close()


def test_a_session_behind_its_audio_catches_up_in_larger_batches(media, tmp_path, monkeypatch):
    """Windows that wait for the generator (here: every call 50 ms slower, the audio sent at once in
    40 ms messages, one frame each) go to its next call together, up to MAX_GROUP: far fewer calls
    than frames, and the same frames."""
    from lipsync.serve.sessions import MAX_GROUP

    generator = media["gen"]
    sizes = []

    forward = generator.queue.forward

    def slow(mels, faces, keys, as_tensor):
        sizes.append(len(mels))
        time.sleep(0.05)
        return forward(mels, faces, keys, as_tensor)

    monkeypatch.setattr(generator.queue, "forward", slow)
    sink = Frames()
    pcm = media["pcm"]
    with make_client(media, tmp_path, sink=sink) as client:
        avatar_id = upload(client, media["video"], box=BOX).json()["avatar_id"]
        with client.websocket_connect(f"/v1/stream?avatar_id={avatar_id}") as ws:
            stream_pcm(ws, pcm, 40)
            frames, _, last, _ = read_stream(ws)
    monkeypatch.undo()
    n = audio.num_frames_for_audio(len(pcm), 25.0)
    assert last["frames"] == len(frames) == sum(sizes) == n
    assert len(sizes) <= n // 2 and max(sizes) <= MAX_GROUP, sizes
    (sid,) = sink.by_session
    offline = list(render(generator, load_avatar(str(tmp_path / "avatars" / avatar_id), 96),
                          pcm.astype(np.float32) / 32768))
    assert all(np.array_equal(a, b) for a, b in zip(sink.of(sid), offline))


def test_outbox_drops_idle_first_then_the_oldest_talk_frames():
    import asyncio

    async def scenario():
        box = Outbox(3)
        box.put(("idle", 0, 0, b"i0"))
        box.put(("frame", 0, b"f0"))
        box.put(("frame", 1, b"f1"))
        box.put(("frame", 2, b"f2"))          # full: the idle frame goes
        box.put(("idle", 1, 3, b"i1"))        # full of talk frames: the idle frame is not queued
        box.put(("frame", 3, b"f3"))          # the oldest talk frame goes
        box.put(("end", 4))                   # control messages are never dropped
        return [await box.get() for _ in range(4)], box

    got, box = asyncio.run(scenario())
    assert [g[:2] for g in got] == [("frame", 1), ("frame", 2), ("frame", 3), ("end", 4)]
    assert box.dropped == 1 and box.dropped_idle == 2


def test_idle_swing():
    assert [IdleFrames.offset(m, 3) for m in range(9)] == [1, 2, 3, 2, 1, 0, 1, 2, 3]
