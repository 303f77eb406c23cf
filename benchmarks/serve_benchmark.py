"""Real-time server capacity: N simulated clients stream speech at real-time pace to one serve.py.

    python benchmarks/serve_benchmark.py                        # CPU: tiny and 96, fp32 (+ bf16), N = 1 2 4 8
    python benchmarks/serve_benchmark.py --models 96 --precisions bf16 --sessions 1 2
    python benchmarks/serve_benchmark.py --device cuda --sessions 1 8 32 64     # benchmarks/gpu_check.sh

For each generator (generated weights: speed does not depend on their values) and precision, one
``serve.py`` process (a real subprocess, as users run it) gets one avatar (a generated 25 fps face
video of --avatar_size, box given) and a warm-up of two short streams; then, for each N, N clients
(asyncio, in this process) each stream --seconds of speech-like audio in --chunk_ms messages on a
real-time schedule (message m due at t0 + m * chunk; the clients start spread over one second, as
independent users would) and read every frame. A client gives up 2 s after its audio ended if
frames are still missing. Per N:

- frames/s per session: over the frames whose mel window the audio completes before the end
  message (the last ~0.2 s of frames are completed by the end, at once), (frames received - 1) /
  (arrival of the last - arrival of the first). A server that keeps up delivers the avatar's 25
  frames/s; the worst session is shown.
- latency, ms (p50 and p95 over those frames of every session): from the moment the message
  carrying the last sample frame k's mel window needs (sample 200 * (int(80 k / fps) + 15) + 399)
  was due to be sent, to the arrival of frame k's JPEG; both on this process's monotonic clock. The
  due time is used, not the send time, so a client held up by a server that stopped reading its
  socket counts that wait. It holds the server's queueing, batching, generation, compositing, JPEG
  encoding and the local network, not the model's 0.2 s look-ahead (which passes before the audio
  is there). A frame still missing when the client gave up counts with the time until then, and the
  row's latencies are then lower bounds (">").
- server CPU: the server process's CPU time (user + system) over the run's wall time, in cores;
  clients CPU likewise for this process (the clients share the machine with the server); server
  RSS: its largest resident set sampled every 0.2 s during the run, MB.
- frames per generator call: how many frames (of one session catching up, or of several) the
  server ran through the generator at once.
- real time: every session got every frame, in order, at >= 24 frames/s, with p95 latency <= 400 ms.

The largest real-time N of each generator and precision is printed after the table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import audio  # noqa: E402
from lipsync.core.cli import HelpFormatter  # noqa: E402

MODELS = {"tiny": 0.25, "96": 1.0}  # generator width (96x96 faces): the tests' tiny one, the published layout
REAL_TIME_FPS = 24.0
REAL_TIME_P95_MS = 400.0
GRACE_S = 2.0  # a client gives up this long after its audio ended (a server still behind then is not real time)
FPS = 25


def frame_size(text: str):
    """"WIDTHxHEIGHT" -> (width, height) in pixels, each even and at least 128; argparse's error otherwise."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        width = height = 0
    if width < 128 or height < 128 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, even numbers >= 128 (like 640x360), got {text!r}")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="numbers of simultaneous clients, measured one after another")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the server's --device")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=None,
                   help="generators: tiny (quarter width) and 96 (full width, the published layout); "
                        "None: both on the CPU, 96 on CUDA")
    p.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                   help="None: fp32, plus bf16 where the CPU has bf16 matrix units (AMX, AVX512-BF16); "
                        "fp16 and fp32 on CUDA")
    p.add_argument("--seconds", type=float, default=None,
                   help="seconds of speech each client streams, per N (None: 10 on the CPU, 3 on CUDA, "
                        "where gpu_check.sh gives the whole run 120 s)")
    p.add_argument("--chunk_ms", type=float, default=40.0, help="audio per WebSocket message, ms")
    p.add_argument("--avatar_size", type=frame_size, default="640x360",
                   help="the avatar video's WIDTHxHEIGHT, pixels")
    p.add_argument("--workdir", default=None,
                   help="generated weights, avatar video and server logs (None: a temporary folder)")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    return p


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def make_weights(workdir: str, model: str) -> str:
    """A generator checkpoint of ``model`` (MODELS) with generated weights; returns its path."""
    import torch

    from fill_rule import fill_state_dict
    from models import Wav2Lip

    path = os.path.join(workdir, f"wav2lip_{model}_generated.pth")
    if not os.path.exists(path):
        state = fill_state_dict(Wav2Lip(img_size=96, width=MODELS[model]).state_dict(), 0)
        torch.save({"state_dict": state}, path)
    return path


def make_avatar_video(workdir: str, width: int, height: int, seconds: int = 4):
    """A ``width`` x ``height`` 25 fps face video (a photograph, swaying); returns (path, box) with
    the face box as "top bottom left right"."""
    import cv2

    from lipsync.media.video import VideoWriter
    from media import astronaut

    path = os.path.join(workdir, f"avatar_{width}x{height}.mp4")
    side = int(min(width, height) * 0.8) // 2 * 2
    top, left = (height - side) // 2, (width - side) // 2
    if not os.path.exists(path):
        canvas = np.full((height, width, 3), 90, np.uint8)
        canvas[top:top + side, left:left + side] = astronaut((side, side))
        with VideoWriter(path, width, height, FPS) as w:
            for k in range(FPS * seconds):
                shift = np.float32([[1, 0, 0.02 * side * np.sin(k / 9)], [0, 1, 0.01 * side * np.cos(k / 13)]])
                w.write(cv2.warpAffine(canvas, shift, (width, height), borderMode=cv2.BORDER_REFLECT))
    return path, f"{top} {top + side} {left} {left + side}"


def speech(seconds: float, offset: int) -> np.ndarray:
    """``seconds`` of speech-like 16 kHz int16 PCM (the test fixture, repeated), started ``offset``
    samples in, so that clients do not all say the same thing at the same time."""
    from lipsync.serve.client import pcm16

    ref = audio.load_wav(os.path.join(ROOT, "tests", "fixtures", "reference", "speechlike_16k.wav"))
    n = int(round(seconds * audio.SAMPLE_RATE))
    reps = (n + offset) // len(ref) + 1
    return pcm16(np.tile(ref, reps)[offset:offset + n])


def upload_avatar(url: str, path: str, box: str) -> dict:
    """POST ``path`` to /v1/avatars with ``box`` (multipart, by urllib); returns the server's JSON."""
    boundary = uuid.uuid4().hex
    with open(path, "rb") as fh:
        data = fh.read()
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="box"\r\n\r\n{box}\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="avatar.mp4"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode(), data, f"\r\n--{boundary}--\r\n".encode()]
    req = urllib.request.Request(url + "/v1/avatars", data=b"".join(parts), method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read().decode("utf-8"))


# ------------------------------------------------------------------------------------------------
# clients
# ------------------------------------------------------------------------------------------------
def _connect():
    try:
        from websockets.asyncio.client import connect
    except ImportError:  # websockets < 13
        from websockets.client import connect
    return connect


class ClientRun:
    """What one simulated client saw: ``t0`` (monotonic seconds) when message 0 was due (message ``m``
    is due at ``t0 + m * step / 16000``), ``step`` samples per message, ``arrived`` (talk frame index
    -> monotonic arrival time), the ``end`` message (None if none came), an ``error`` message, and
    ``cut_at``: when the client gave up waiting for frames (None: it got the end)."""

    def __init__(self, step: int):
        self.step = step
        self.t0 = None
        self.arrived = {}
        self.order = []
        self.end = None
        self.error = None
        self.cut_at = None

    def due(self, k: int, fps: float) -> float:
        """When the message with the last sample frame ``k``'s mel window needs was due to be sent."""
        need = audio.HOP_SIZE * (audio.frame_to_mel_start(k, fps) + audio.MEL_STEP_SIZE - 1) + audio.N_FFT // 2
        return self.t0 + (need - 1) // self.step * self.step / audio.SAMPLE_RATE


async def client(url: str, avatar_id: str, pcm: np.ndarray, chunk_ms: float, delay: float, grace: float) -> ClientRun:
    """One simulated user: waits ``delay`` seconds, streams ``pcm`` at real-time pace (message ``m``
    is sent at ``t0 + m * chunk``, or as soon after as the server reads), reads every message, and
    gives up ``grace`` seconds after its audio ended if the server has not finished by then."""
    from lipsync.serve.client import ws_url

    await asyncio.sleep(delay)
    run = ClientRun(max(1, int(round(audio.SAMPLE_RATE * chunk_ms / 1000.0))))
    async with _connect()(ws_url(url, avatar_id), max_size=None, open_timeout=120, close_timeout=5) as ws:
        async def send():
            for k in range(0, len(pcm), run.step):
                await asyncio.sleep(max(0.0, run.t0 + k / audio.SAMPLE_RATE - time.monotonic()))
                await ws.send(pcm[k:k + run.step].tobytes())
            await ws.send(json.dumps({"type": "end"}))

        async def receive():
            header = None
            async for msg in ws:
                if isinstance(msg, str):
                    header = json.loads(msg)
                    if header.get("type") == "end":
                        run.end = header
                    elif header.get("type") == "error":
                        run.error = header.get("message")
                    continue
                if header is not None and header.get("type") == "frame":
                    run.arrived[int(header["index"])] = time.monotonic()
                    run.order.append(int(header["index"]))
                header = None

        run.t0 = time.monotonic()
        sender = asyncio.create_task(send())
        try:
            await asyncio.wait_for(receive(), len(pcm) / audio.SAMPLE_RATE + grace)
        except asyncio.TimeoutError:
            run.cut_at = time.monotonic()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return run


def session_numbers(run: ClientRun, n_samples: int, fps: float) -> dict:
    """frames/s and latencies (s) of one session, over the frames whose mel window the audio completes
    before the end message (the last ~0.2 s of frames are completed by the end, at once). A frame
    that had not arrived when the client gave up counts with the time until then: a lower bound."""
    expected = audio.num_frames_for_audio(n_samples, fps)
    ks = [k for k in range(expected)
          if audio.HOP_SIZE * (audio.frame_to_mel_start(k, fps) + audio.MEL_STEP_SIZE - 1) + audio.N_FFT // 2
          <= n_samples]
    got = [k for k in ks if k in run.arrived]
    rate = 0.0
    if len(got) > 1:
        span = run.arrived[got[-1]] - run.arrived[got[0]]
        rate = (len(got) - 1) / span if span > 0 else float("inf")
    lat = [(run.arrived[k] if k in run.arrived else run.cut_at) - run.due(k, fps)
           for k in ks if k in run.arrived or run.cut_at is not None]
    return {"fps": rate, "latencies": np.asarray(lat), "frames": len(run.arrived), "expected": expected,
            "in_order": run.order == sorted(run.order), "error": run.error, "cut": run.cut_at is not None,
            "dropped": (run.end or {}).get("dropped", 0), "ended": run.end is not None}


# ------------------------------------------------------------------------------------------------
# the server's process
# ------------------------------------------------------------------------------------------------
class ProcessMeter:
    """CPU seconds and the largest RSS of process ``pid`` (from /proc) while it runs: ``start()``, then
    ``stop()`` returns {"cpu_s", "wall_s", "rss_mb"}."""

    def __init__(self, pid: int, period: float = 0.2):
        self.pid, self.period = pid, period
        self.peak_kb = 0
        self._stop = threading.Event()

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def _sample(self):
        while not self._stop.wait(self.period):
            self.peak_kb = max(self.peak_kb, self.rss_kb())

    def start(self) -> "ProcessMeter":
        self.t0, self.cpu0, self.peak_kb = time.monotonic(), self.cpu_seconds(), self.rss_kb()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join()
        return {"cpu_s": self.cpu_seconds() - self.cpu0, "wall_s": time.monotonic() - self.t0,
                "rss_mb": max(self.peak_kb, self.rss_kb()) / 1024}


def run_clients(url: str, avatar_id: str, n: int, seconds: float, chunk_ms: float, grace: float = GRACE_S) -> list:
    """``n`` clients at once, starting spread over one second; their ClientRuns (or exceptions)."""
    async def all_clients():
        tasks = [client(url, avatar_id, speech(seconds, 7919 * i), chunk_ms, i / n, grace) for i in range(n)]
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(all_clients())


def measure(server, avatar_id: str, n: int, seconds: float, chunk_ms: float) -> dict:
    """One row: ``n`` sessions against ``server``."""
    from serving import get_json

    before = get_json(server.url + "/healthz")["batches"]
    meter = ProcessMeter(server.proc.pid).start()
    own0 = time.process_time()
    results = run_clients(server.url, avatar_id, n, seconds, chunk_ms)
    own = time.process_time() - own0
    usage = meter.stop()
    after = get_json(server.url + "/healthz")["batches"]
    n_samples = int(round(seconds * audio.SAMPLE_RATE))
    failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    sessions = [session_numbers(r, n_samples, FPS) for r in results if not isinstance(r, BaseException)]
    failures += [s["error"] for s in sessions if s["error"]]
    lat = np.concatenate([s["latencies"] for s in sessions] or [np.zeros(0)]) * 1000.0
    p50, p95 = (float(np.percentile(lat, q)) for q in (50, 95)) if lat.size else (float("nan"),) * 2
    worst_fps = min((s["fps"] for s in sessions), default=0.0)
    complete = (not failures and len(sessions) == n
                and all(s["frames"] == s["expected"] and s["in_order"] and s["ended"] and not s["dropped"]
                        for s in sessions))
    behind = sum(s["expected"] - s["frames"] for s in sessions if s["cut"])
    calls = after["calls"] - before["calls"]
    return {"sessions": n, "fps_worst": worst_fps, "fps_mean": float(np.mean([s["fps"] for s in sessions] or [0])),
            "p50_ms": p50, "p95_ms": p95, "server_cores": usage["cpu_s"] / usage["wall_s"],
            "client_cores": own / usage["wall_s"], "rss_mb": usage["rss_mb"],
            "frames_per_call": (after["frames"] - before["frames"]) / calls if calls else 0.0,
            "complete": complete, "failures": failures[:3], "behind": behind,
            "real_time": complete and worst_fps >= REAL_TIME_FPS and p95 <= REAL_TIME_P95_MS}


def row(model: str, precision: str, r: dict) -> str:
    """One line of the markdown table; latencies of a run cut short are lower bounds (">")."""
    if r["real_time"]:
        rt = "yes"
    elif r["behind"]:
        rt = f"no: {r['behind']} frames still to come {GRACE_S:g} s after the audio ended"
    elif r["complete"]:
        rt = "no"
    else:
        rt = "no (frames lost: " + "; ".join(r["failures"]) + ")"
    bound = ">" if r["behind"] else ""
    return (f"| {model} | {precision} | {r['sessions']} | {r['fps_worst']:.1f} "
            f"| {bound}{r['p50_ms']:.0f} / {bound}{r['p95_ms']:.0f} "
            f"| {r['server_cores']:.2f} | {r['client_cores']:.2f} | {r['rss_mb']:.0f} | {r['frames_per_call']:.1f} | {rt} |")


HEADER = ("| model | precision | N | frames/s per session (worst) | latency p50 / p95 ms | server CPU (cores) "
          "| clients CPU (cores) | server RSS MB | frames per generator call | real time |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def wait_idle(server, timeout: float = 30.0) -> None:
    """Until the server has no session left (the last ones close after their end message)."""
    deadline = time.monotonic() + timeout
    while server.health()["sessions"]["streams"] and time.monotonic() < deadline:
        time.sleep(0.1)


def bench_server(workdir: str, model: str, precision: str, args, width: int, height: int) -> list:
    """Every N of --sessions against one server of ``model`` in ``precision``; rows as they come."""
    from serving import Server

    ckpt = make_weights(workdir, model)
    video, box = make_avatar_video(workdir, width, height)
    tag = f"{model}_{precision}"
    server = Server(ckpt, os.path.join(workdir, f"avatars_{tag}"), os.path.join(workdir, f"server_{tag}.log"),
                    "--device", args.device, "--precision", precision, "--max_sessions", str(max(args.sessions)),
                    start_timeout=300)
    rows = []
    try:
        avatar_id = upload_avatar(server.url, video, box)["avatar_id"]
        print(f"# {model} {precision}: {server.health()['model']}; load average {os.getloadavg()[0]:.2f}", flush=True)
        run_clients(server.url, avatar_id, 2, 2.0, args.chunk_ms, grace=60)   # warm-up (tuner, kernels)
        wait_idle(server)
        for n in args.sessions:
            r = measure(server, avatar_id, n, args.seconds, args.chunk_ms)
            r.update(model=model, precision=precision, load=os.getloadavg()[0])
            rows.append(r)
            print(row(model, precision, r), flush=True)
            wait_idle(server)
    finally:
        server.stop()
    return rows


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lipsync.render.cpu import cpu_capabilities

    caps = cpu_capabilities()
    cuda = args.device == "cuda"
    models = args.models or (["96"] if cuda else ["tiny", "96"])
    precisions = args.precisions or (["fp16", "fp32"] if cuda else ["fp32"] + (["bf16"] if caps.bf16_matrix else []))
    if args.seconds is None:
        args.seconds = 3.0 if cuda else 10.0
    if args.seconds < 1 or min(args.sessions) < 1:
        raise SystemExit("error: --seconds must be at least 1 and --sessions at least 1")
    width, height = args.avatar_size
    print(f"CPU: {caps.line()}")
    print(f"load average (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{args.seconds:g} s of speech per client at real-time pace in {args.chunk_ms:g} ms messages; avatar "
          f"{width}x{height} at {FPS} fps; real time = every session >= {REAL_TIME_FPS:g} frames/s with p95 latency "
          f"<= {REAL_TIME_P95_MS:g} ms\n", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="serve_bench_")
    os.makedirs(workdir, exist_ok=True)
    print(HEADER, flush=True)
    rows = []
    for model in models:
        for precision in precisions:
            try:
                rows += bench_server(workdir, model, precision, args, width, height)
            except (AssertionError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
                print(f"# {model} {precision}: failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}",
                      flush=True)
    print()
    for model in models:
        for precision in precisions:
            tried = [r for r in rows if r["model"] == model and r["precision"] == precision]
            if tried:
                ok = [r["sessions"] for r in tried if r["real_time"]]
                print(f"largest real-time N, {model} {precision}: {max(ok) if ok else 'none'} "
                      f"(of {' '.join(str(r['sessions']) for r in tried)})")
    print(f"load average at the end (1, 5, 15 min): {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu": caps.line(), "device": args.device, "seconds": args.seconds, "rows": rows}, fh, indent=1)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
