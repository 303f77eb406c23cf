"""serve.py as a real process (uvicorn on a free local port): many sessions at once with a slow
reader, a client sending garbage and one vanishing; SIGTERM during a stream and uploads; restart
keeps avatars; stream_client.py; refusal of a public --host without --token."""
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

import audio
from conftest import REFERENCE
from lipsync.render.avatar import load_avatar
from media import make_face_video
from serving import Server, tiny_checkpoint

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from lipsync.serve.client import ClientError, pcm16, stream_audio  # noqa: E402

WAV = os.path.join(REFERENCE, "speechlike_16k.wav")
BOX = "40 200 60 196"
BOX_720P = "112 562 300 980"  # the same face in the 1280x720 video


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_process")
    ckpt = tiny_checkpoint(d / "wav2lip_tiny.pth")
    wav = audio.load_wav(WAV)
    return {"dir": d, "ckpt": ckpt, "video": make_face_video(d / "face.mp4", 20), "pcm": pcm16(wav),
            "video_720p": make_face_video(d / "face720.mp4", 10, size=(1280, 720)),
            "long": make_face_video(d / "long.mp4", 100)}


def stopped_cleanly(server, expected_errors=()):
    """SIGTERM: uvicorn shuts down gracefully, then re-raises the signal, which serve.py turns into
    exit status 143 (128 + SIGTERM, as a shell reports it), with nothing logged as an error but
    ``expected_errors``."""
    code = server.stop()
    log = server.output()
    errors = [line for line in log.splitlines() if line.startswith("ERROR") or "Traceback" in line]
    assert code in (0, 128 + signal.SIGTERM), log
    assert all(any(e in line for e in expected_errors) for line in errors), log
    return code


def no_leftovers(avatars_dir):
    """Everything in an avatars folder is a complete avatar (checked against its checksums)."""
    for name in os.listdir(avatars_dir):
        if name == ".staging":
            assert os.listdir(os.path.join(avatars_dir, name)) == [], "an upload was left behind"
            continue
        assert not name.startswith("."), f"leftover {name}"
        load_avatar(os.path.join(avatars_dir, name), 96)


def test_many_sessions_at_once(assets, tmp_path):
    """4 sessions streaming at real-time pace with 20-200 ms messages, plus one that stops reading
    (its 720p frames overflow the socket buffers), one that sends garbage and one that vanishes
    mid-stream: the 4 get every frame in order (while the slow one is not reading at all), the slow
    one loses frames but gets the rest in order with the last one, and is told how many it lost; the
    server is left with no session; frames of several sessions went through the generator together."""
    server = Server(assets["ckpt"], tmp_path / "avatars", tmp_path / "log.txt", "--send_buffer", "16")
    try:
        avatar_id = server.upload(assets["video"], box=BOX).json()["avatar_id"]
        large_id = server.upload(assets["video_720p"], box=BOX_720P).json()["avatar_id"]
        pcm = assets["pcm"][:int(1.6 * 16000)]
        n = audio.num_frames_for_audio(len(pcm), 25.0)
        n_slow = audio.num_frames_for_audio(len(assets["pcm"]), 25.0)
        results = {}
        others_done = threading.Event()

        def run(name, avatar=avatar_id, sound=pcm, **kw):
            try:
                results[name] = stream_audio(server.url, avatar, sound, **kw)
            except Exception as exc:  # noqa: BLE001 - reported by the assertions below
                results[name] = exc

        def stall(i):
            if i == 0:
                others_done.wait(300)
                # and until the generator has made the slow stream's frames too (the others' and its
                # own, at least), so that its queue overflows however soon the others were done
                deadline = time.monotonic() + 120
                while server.health()["batches"]["frames"] < 4 * n + n_slow and time.monotonic() < deadline:
                    time.sleep(0.1)
                time.sleep(1.0)  # composing and queueing the last ones

        def garbage():
            from websockets.sync.client import connect

            with connect(f"ws://127.0.0.1:{server.port}/v1/stream?avatar_id={avatar_id}") as ws:
                ws.send(pcm[:800].tobytes())
                ws.send(b"\x00" * 1001)  # half a sample: not PCM16
                results["garbage"] = [ws.recv(timeout=120) for _ in range(1)]
                try:
                    ws.recv(timeout=60)
                except Exception:  # noqa: BLE001 - the close
                    pass
                results["garbage_code"] = ws.close_code

        normal = [threading.Thread(target=run, args=(f"s{c}",), kwargs={"chunk_ms": c}) for c in (20, 50, 100, 200)]
        extra = [threading.Thread(target=run, args=("slow", large_id, assets["pcm"]),
                                  kwargs={"speed": 0, "on_frame": stall, "recv_buffer": 4096}),
                 threading.Thread(target=run, args=("gone",), kwargs={"stop_after": 3}),
                 threading.Thread(target=garbage)]
        for t in normal + extra:
            t.start()
        for t in normal:
            t.join(300)
        others_done.set()
        for t in extra:
            t.join(300)

        for c in (20, 50, 100, 200):
            r = results[f"s{c}"]
            assert not isinstance(r, Exception), r
            assert r.error is None and r.order == list(range(n)), (c, r.order, r.error)
            assert r.end["frames"] == n and r.end["dropped"] == 0 and r.close_code == 1000
        slow = results["slow"]
        assert not isinstance(slow, Exception), slow
        assert slow.end["frames"] == n_slow and slow.end["sent"] + slow.end["dropped"] == n_slow
        assert slow.end["dropped"] > 0 and slow.order == sorted(slow.order) and slow.order[-1] == n_slow - 1
        assert len(slow.order) == slow.end["sent"]
        assert results["gone"].order == [0, 1, 2] and results["gone"].end is None
        error = json.loads(results["garbage"][0])
        assert error["type"] == "error" and "odd number" in error["message"] and results["garbage_code"] == 1003

        for _ in range(100):
            health = server.health()
            if health["sessions"]["streams"] == 0:
                break
            time.sleep(0.1)
        assert health["sessions"]["streams"] == 0 and health["status"] == "ok"
        assert health["batches"]["most_sessions_per_call"] >= 2
    finally:
        stopped_cleanly(server)


def test_sigterm_restart_and_stream_client(assets, tmp_path):
    """SIGTERM while a stream runs, an avatar is being prepared and another upload is still
    arriving: the stream ends with an error message and a clean close (1001); the prepared avatar is
    finished, or (cut by --shutdown_timeout) its client is told and nothing is made; the unfinished
    upload is dropped; nothing half-made remains. A restarted server has the avatars, and
    stream_client.py writes the frames it receives with the audio."""
    avatars = tmp_path / "avatars"
    server = Server(assets["ckpt"], avatars, tmp_path / "log1.txt", "--shutdown_timeout", "3")
    avatar_id = server.upload(assets["video"], box=BOX).json()["avatar_id"]
    body = b"x" * 100_000
    partial = socket.create_connection(("127.0.0.1", server.port))  # an upload that never finishes arriving
    partial.sendall(b"POST /v1/avatars HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    + f"Content-Length: {2 * len(body)}\r\n\r\n".encode() + body)
    result = {}
    streaming = threading.Event()

    def stream():
        result["stream"] = stream_audio(server.url, avatar_id, assets["pcm"], chunk_ms=100,
                                        on_frame=lambda i: streaming.set())

    def upload():  # detection over 100 frames takes a while
        try:
            result["upload"] = server.upload(assets["long"])
        except httpx.TransportError as exc:
            result["upload"] = exc

    threads = [threading.Thread(target=stream), threading.Thread(target=upload)]
    for t in threads:
        t.start()
    staging = avatars / ".staging"
    deadline = time.monotonic() + 120
    while not (staging.exists() and any((staging / d / "face").exists() for d in os.listdir(staging))):
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.01)
    assert streaming.wait(120), server.output()
    # the upload that never finishes is cut when --shutdown_timeout runs out (uvicorn says so)
    stopped_cleanly(server, expected_errors=["timeout graceful shutdown exceeded"])
    for t in threads:
        t.join(120)
    partial.close()

    r = result["stream"]
    assert r.error == "the server is shutting down" and r.close_code == 1001 and r.order == list(range(len(r.order)))
    made = sorted(n for n in os.listdir(avatars) if not n.startswith("."))
    up = result["upload"]
    if isinstance(up, httpx.Response) and up.status_code == 201:
        assert made == sorted([avatar_id, up.json()["avatar_id"]])
    else:  # cut by --shutdown_timeout: told so, and nothing made
        assert isinstance(up, httpx.Response) and up.status_code == 503 and made == [avatar_id], (up, made)
    no_leftovers(avatars)

    # one session slot, and a /v1/lipsync upload trickling in: it holds no slot (the stream below
    # gets one), and is answered 408 when --upload_timeout runs out
    again = Server(assets["ckpt"], avatars, tmp_path / "log2.txt", "--max_sessions", "1", "--upload_timeout", "4")
    trickle = socket.create_connection(("127.0.0.1", again.port))
    trickle.sendall(b"POST /v1/lipsync HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: 100000\r\n\r\n--b\r\n")
    try:
        assert sorted(a["avatar_id"] for a in httpx.get(again.url + "/v1/avatars").json()["avatars"]) == made
        import stream_client

        wav = tmp_path / "speech.wav"
        audio.save_wav(assets["pcm"][:12000].astype(np.float32) / 32768, str(wav))
        out = tmp_path / "streamed.mp4"
        assert stream_client.main([str(wav), "--avatar_id", avatar_id, "--url", again.url, "--outfile", str(out),
                                   "--chunk_ms", "40", "--speed", "4", "--quiet"]) == 0
        from lipsync.media.probe import probe_media
        from lipsync.media.video import count_frames, probe_video

        assert count_frames(probe_video(str(out))) == audio.num_frames_for_audio(12000, 25.0)
        assert probe_media(str(out)).audio is not None
        with pytest.raises(ClientError, match="404"):
            stream_audio(again.url, "0123456789abcdef", assets["pcm"][:4000])
        trickle.settimeout(30)
        assert trickle.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        trickle.close()
        stopped_cleanly(again)


def test_a_public_host_needs_a_token(assets, capsys):
    import serve

    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com"):
        assert serve.main(["--checkpoint_path", assets["ckpt"], "--host", host]) == 2
        assert "--token" in capsys.readouterr().err
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert serve.is_local(host), host
    args = serve.build_parser().parse_args(["--checkpoint_path", assets["ckpt"], "--host", "0.0.0.0",
                                            "--token", "a-long-token"])
    serve.check_args(args)  # accepted
    args.token = "short"
    with pytest.raises(serve.ServeError, match="at least 8"):
        serve.check_args(args)
