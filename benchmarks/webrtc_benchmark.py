"""Live sessions over WebRTC: how many stay real time, and what a viewer costs in bytes.

    python benchmarks/webrtc_benchmark.py                          # tiny fp32, N = 1 2 4 8, 10 s windows
    python benchmarks/webrtc_benchmark.py --model 96 --precision bf16 --sessions 1 2

One ``serve.py`` (a real subprocess, as users run it) gets one avatar (a generated 25 fps face
video of --avatar_size, box given; generated weights: speed does not depend on their values). For
each N of --sessions, one after another, until a row is not real time: N live sessions
(``POST /v1/sessions``), one aiortc viewer each (in this process, on loopback: recvonly video and
audio, every frame decoded, as a browser would), then every session is given --seconds + 3 s of
speech at once (``POST .../speak``, a wav), and a window of --seconds is measured from 1.5 s after
that:

- frames/s per viewer: video frames the viewer received in the window over its length; the worst
  viewer is shown. The session's clock sends one frame per tick whatever happens, so this alone
  says the clock, the encoder and the network kept up;
- stalled: the share of ticks in the window at which a session's next talk frame was not rendered
  yet (the last frame held, in silence: ``stalls`` of ``GET /v1/sessions/{id}``); the worst session;
- real time: every viewer received >= 0.95 x fps frames/s and no session stalled on more than 5%
  of the ticks (the lip-synced frames, not held ones, came at >= 0.95 x fps);
- bytes/s per viewer: RTP payload bytes of video + audio the server sent to a viewer in the
  window (the sender reports' octet counts, as the viewer's ``getStats()`` gives them:
  ``remote-outbound-rtp``), mean over the viewers; packet headers (RTP, SRTP, UDP, IP: about 50
  bytes a packet) not counted;
- server CPU: the server process's CPU time over the window, cores; idle: the same over 3 s before
  the speech (the clock, idle frames and encoding for the viewers, no generation); viewers CPU
  likewise for this process (decoding every viewer's VP8 and Opus: it shares the machine with the
  server).

Then, for the same avatar and speech, one WebSocket stream (``/v1/stream``, real-time pace, 40 ms
messages) against the same server: its bytes/s are the JPEG frames plus their JSON headers over
the stream's length (WebSocket framing and TCP/IP not counted). The CPU (``cpu_capabilities``),
the load average and a table follow.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import time
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import audio  # noqa: E402
from lipsync.core.cli import HelpFormatter  # noqa: E402

REAL_TIME = 0.95            # of the avatar's fps, received, and of the ticks, not stalled
START_AFTER = 1.5           # seconds from the speak requests to the window (the utterances started)
EXTRA_SPEECH = 3.0          # seconds of speech past the window
IDLE_WINDOW = 3.0           # seconds of server CPU measured before the speech (idle frames: encoding, no generation)


def build_parser() -> argparse.ArgumentParser:
    from serve_benchmark import MODELS, frame_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="numbers of live sessions (one viewer each), measured one after another until one is not "
                        "real time")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the measured window, seconds")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="generator width (generated weights)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the server's --precision")
    p.add_argument("--avatar_size", type=frame_size, default=(640, 360), metavar="WxH",
                   help="size of the generated avatar video (the video sent)")
    p.add_argument("--workdir", default=None, help="where the weights, avatar and server log go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    return p


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read().decode())


class Viewer:
    """One aiortc viewer of a session: arrival times of its video frames; sender-report counters."""

    def __init__(self, url: str, sid: str):
        self.url, self.sid = url, sid
        self.arrivals = []
        self.pc = None

    async def connect(self, client) -> None:
        import aiortc

        self.pc = aiortc.RTCPeerConnection()
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.on("track", lambda track: asyncio.ensure_future(self._read(track)))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        r = await client.post(f"{self.url}/v1/sessions/{self.sid}/offer",
                              json={"sdp": self.pc.localDescription.sdp, "type": "offer"})
        r.raise_for_status()
        await self.pc.setRemoteDescription(aiortc.RTCSessionDescription(sdp=r.json()["sdp"], type="answer"))

    async def _read(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            if track.kind == "video":
                self.arrivals.append(time.monotonic())

    async def sent(self) -> dict:
        """kind -> (bytes, packets, sender's clock in seconds) of the last sender report."""
        out = {}
        for s in (await self.pc.getStats()).values():
            if s.type == "remote-outbound-rtp":
                out[s.kind] = (s.bytesSent, s.packetsSent, s.remoteTimestamp.timestamp())
        return out


def rate(before: dict, after: dict) -> float:
    """Payload bytes per second between two :meth:`Viewer.sent` readings, video + audio."""
    total = 0.0
    for kind in after:
        if kind in before and after[kind][2] > before[kind][2]:
            total += (after[kind][0] - before[kind][0]) / (after[kind][2] - before[kind][2])
    return total


async def measure(server, avatar_id: str, n: int, seconds: float, wavs: list, fps: float) -> dict:
    """One row: ``n`` sessions, one viewer each, all speaking."""
    import httpx

    from serve_benchmark import ProcessMeter

    url = server.url
    async with httpx.AsyncClient(timeout=120) as client:
        sids = []
        for _ in range(n):
            r = await client.post(f"{url}/v1/sessions", json={"avatar_id": avatar_id})
            r.raise_for_status()
            sids.append(r.json()["session_id"])
        viewers = [Viewer(url, sid) for sid in sids]
        await asyncio.gather(*(v.connect(client) for v in viewers))
        deadline = time.monotonic() + 60
        while min(len(v.arrivals) for v in viewers) < 25:
            if time.monotonic() > deadline:
                raise RuntimeError(f"viewers still waiting for frames after 60 s: {[len(v.arrivals) for v in viewers]}")
            await asyncio.sleep(0.1)

        meter = ProcessMeter(server.proc.pid).start()     # idle: the clock, idle frames, encoding; no generation
        await asyncio.sleep(IDLE_WINDOW)
        idle = meter.stop()

        async def speak(sid, wav):
            with open(wav, "rb") as fh:
                r = await client.post(f"{url}/v1/sessions/{sid}/speak", files={"audio": ("speech.wav", fh.read())})
            r.raise_for_status()

        await asyncio.gather(*(speak(sid, wavs[i % len(wavs)]) for i, sid in enumerate(sids)))
        await asyncio.sleep(START_AFTER)
        state0 = [(await client.get(f"{url}/v1/sessions/{sid}")).json() for sid in sids]
        sent0 = [await v.sent() for v in viewers]
        meter = ProcessMeter(server.proc.pid).start()
        own0 = time.process_time()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        t1 = time.monotonic()
        own = time.process_time() - own0
        usage = meter.stop()
        state1 = [(await client.get(f"{url}/v1/sessions/{sid}")).json() for sid in sids]
        sent1 = [await v.sent() for v in viewers]
        received = [sum(1 for t in v.arrivals if t0 <= t < t1) / (t1 - t0) for v in viewers]
        stalled = [(b["stalls"] - a["stalls"]) / max(1, b["ticks"] - a["ticks"]) for a, b in zip(state0, state1)]
        still_speaking = all(b["speaking"] for b in state1)
        bytes_s = [rate(a, b) for a, b in zip(sent0, sent1)]
        for v in viewers:
            await v.pc.close()
        for sid in sids:
            await client.delete(f"{url}/v1/sessions/{sid}")
    worst = min(received)
    return {"sessions": n, "fps_worst": worst, "stalled_worst": max(stalled), "bytes_s": float(np.mean(bytes_s)),
            "server_cores": usage["cpu_s"] / usage["wall_s"], "idle_cores": idle["cpu_s"] / idle["wall_s"],
            "viewer_cores": own / (t1 - t0),
            "rss_mb": usage["rss_mb"], "speaking": still_speaking,
            "real_time": still_speaking and worst >= REAL_TIME * fps and max(stalled) <= 1 - REAL_TIME}


def websocket_bytes(url: str, avatar_id: str, pcm: np.ndarray, fps: float) -> dict:
    """One WebSocket stream of ``pcm`` at real-time pace: JPEG + JSON header bytes per second."""
    from lipsync.serve.client import stream_audio

    t0 = time.monotonic()
    result = stream_audio(url, avatar_id, pcm, chunk_ms=40.0, speed=1.0)
    took = time.monotonic() - t0
    if result.error:
        raise RuntimeError(f"the WebSocket stream failed: {result.error}")
    headers = sum(len(json.dumps({"type": "frame", "index": k, "pts": k / fps})) for k in result.frames)
    jpeg = sum(len(b) for b in result.frames.values())
    seconds = len(pcm) / audio.SAMPLE_RATE
    return {"bytes_s": (jpeg + headers) / seconds, "frames": len(result.frames), "jpeg_mean": jpeg / len(result.frames),
            "wall_s": took}


HEADER = ("| N sessions x 1 viewer | frames/s per viewer (worst) | stalled ticks (worst) | bytes/s per viewer "
          "| server CPU (cores) | server CPU idle (cores) | viewers CPU (cores) | server RSS MB | real time |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(r: dict) -> str:
    rt = "yes" if r["real_time"] else ("no" if r["speaking"] else "no (a session ran out of speech in the window)")
    return (f"| {r['sessions']} | {r['fps_worst']:.1f} | {100 * r['stalled_worst']:.1f}% | {r['bytes_s'] / 1000:.0f} kB/s "
            f"| {r['server_cores']:.2f} | {r['idle_cores']:.2f} | {r['viewer_cores']:.2f} | {r['rss_mb']:.0f} | {rt} |")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("aiortc") is None:
        raise SystemExit("error: this benchmark needs aiortc: pip install -r requirements-webrtc.txt")
    if args.seconds < 2 or min(args.sessions) < 1:
        raise SystemExit("error: --seconds must be at least 2 and --sessions at least 1")
    from audio import save_wav
    from lipsync.render.cpu import cpu_capabilities
    from serve_benchmark import FPS, make_avatar_video, make_weights, speech, upload_avatar
    from serving import Server

    caps = cpu_capabilities()
    width, height = args.avatar_size
    print(f"CPU: {caps.line()}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')} (the server inherits it)")
    print(f"{args.model} generator, {args.precision}; avatar {width}x{height} at {FPS} fps; window {args.seconds:g} s; "
          f"real time = every viewer >= {REAL_TIME * FPS:g} frames/s and every session stalled on <= "
          f"{100 * (1 - REAL_TIME):g}% of ticks\n", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="webrtc_bench_")
    os.makedirs(workdir, exist_ok=True)
    ckpt = make_weights(workdir, args.model)
    video, box = make_avatar_video(workdir, width, height)
    speech_s = args.seconds + START_AFTER + EXTRA_SPEECH
    wavs = []
    for i in range(4):   # sessions say different things
        path = os.path.join(workdir, f"speech_{i}.wav")
        save_wav(speech(speech_s, 7919 * i).astype(np.float32) / 32768, path)
        wavs.append(path)
    server = Server(ckpt, os.path.join(workdir, "avatars"), os.path.join(workdir, "server.log"),
                    "--precision", args.precision, "--max_sessions", str(max(args.sessions)),
                    "--max_viewers", "1", start_timeout=300)
    rows = []
    try:
        avatar_id = upload_avatar(server.url, video, box)["avatar_id"]
        print(f"# {server.health()['model']}", flush=True)
        asyncio.run(measure(server, avatar_id, 1, 2.0, wavs, FPS))     # warm-up (tuner, kernels, codecs)
        print(HEADER, flush=True)
        for n in args.sessions:
            r = asyncio.run(measure(server, avatar_id, n, args.seconds, wavs, FPS))
            r["load"] = os.getloadavg()[0]
            rows.append(r)
            print(row(r), flush=True)
            if not r["real_time"]:
                break
        ws = websocket_bytes(server.url, avatar_id, speech(args.seconds, 0), FPS)
        one = rows[0]
        print(f"\nbytes/s per viewer, same avatar and speech: WebRTC (VP8 + Opus, RTP payload) "
              f"{one['bytes_s'] / 1000:.0f} kB/s; WebSocket (JPEG quality 80 + JSON headers) {ws['bytes_s'] / 1000:.0f} "
              f"kB/s ({ws['frames']} frames, {ws['jpeg_mean'] / 1000:.1f} kB each); ratio "
              f"{ws['bytes_s'] / one['bytes_s']:.1f}x")
        best = max((r["sessions"] for r in rows if r["real_time"]), default=0)
        print(f"largest real-time N: {best}; load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        server.stop()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": caps.line(), "model": args.model, "precision": args.precision, "rows": rows,
                       "websocket": ws}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
