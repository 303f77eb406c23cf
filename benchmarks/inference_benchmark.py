"""Inference speed and memory on a generated 720p talking-head clip.

    python benchmarks/inference_benchmark.py                  # 8 s and 32 s, box given and detected
    python benchmarks/inference_benchmark.py --seconds 8 --baseline

Reports seconds per phase (decode, detect, generate, blend, encode), end-to-end frames/s and peak RSS
of the inference process (ffmpeg children reported separately). The generator is the full-width 96
model with generated weights (speed does not depend on the values). ``--baseline`` also times a
transcription of the published script's algorithm (every frame held in RAM, no BatchNorm folding,
AVI then re-encode) on the same input, for a same-machine comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_inputs(workdir: str, seconds: int):
    import cv2
    import numpy as np
    from skimage import data

    import audio
    from lipsync.video import VideoWriter

    video = os.path.join(workdir, f"face_{seconds}s_720p.mp4")
    wav_path = os.path.join(workdir, f"speech_{seconds}s.wav")
    if not os.path.exists(video):
        face = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
        canvas = np.full((720, 1280, 3), 90, np.uint8)
        canvas[104:616, 384:896] = face
        with VideoWriter(video, 1280, 720, 25) as w:
            for k in range(25 * seconds):
                M = np.float32([[1, 0, 6 * np.sin(k / 9)], [0, 1, 3 * np.cos(k / 13)]])
                w.write(cv2.warpAffine(canvas, M, (1280, 720), borderMode=cv2.BORDER_REFLECT))
    if not os.path.exists(wav_path):
        ref = audio.load_wav(os.path.join(ROOT, "tests", "fixtures", "reference", "speechlike_16k.wav"), 16000)
        reps = int(np.ceil(seconds * 16000 / len(ref)))
        audio.save_wav(np.tile(ref, reps)[: seconds * 16000], wav_path, 16000)
    return video, wav_path


def make_weights(workdir: str):
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fill_rule import fill_state_dict
    from models import Wav2Lip

    gen = os.path.join(workdir, "wav2lip_generated.pth")
    if not os.path.exists(gen):
        model = Wav2Lip()
        torch.save({"state_dict": fill_state_dict(model.state_dict(), 0)}, gen)
    return gen


def child_run(args):
    """One inference in this process; prints a JSON line with timings and peak memory."""
    from lipsync.inference import InferenceConfig, run_inference

    cfg = InferenceConfig(checkpoint_path=args.ckpt, face=args.video, audio=args.wav, outfile=args.out,
                          box=args.box, face_detector=args.detector, s3fd_path=args.s3fd, det_cache_dir="",
                          blend="none", progress=False, device="cpu", det_scale=args.det_scale)
    summary = run_inference(cfg)
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"frames": summary.frames, "seconds": summary.seconds, "peak_rss_mb": self_rss,
                      "ffmpeg_peak_rss_mb": child_rss}))


def baseline_run(args):
    """The published algorithm: read every frame, detect/box, generate, AVI, then ffmpeg mux."""
    import cv2
    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import audio
    from models import load_model
    from published_reference import published_frames, published_mel_chunks

    t0 = time.perf_counter()
    cap = cv2.VideoCapture(args.video)
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    mel = audio.melspectrogram(audio.load_wav(args.wav, 16000))
    chunks = published_mel_chunks(mel, fps)
    model = load_model(args.ckpt).model.eval()
    y1, y2, x1, x2 = args.box
    out = published_frames(model, frames, chunks, [(y1, y2, x1, x2)] * len(frames))
    tmp_avi = args.out + ".avi"
    h, w = out[0].shape[:2]
    writer = cv2.VideoWriter(tmp_avi, cv2.VideoWriter_fourcc(*"DIVX"), fps, (w, h))
    for f in out:
        writer.write(f)
    writer.release()
    subprocess.run([audio.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", args.wav, "-i", tmp_avi,
                    "-qscale:v", "1", args.out], check=True)
    os.remove(tmp_avi)
    total = time.perf_counter() - t0
    print(json.dumps({"frames": len(out), "seconds": {"total": total},
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "ffmpeg_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    del torch, np


def spawn(mode, **kw):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode]
    for k, v in kw.items():
        if isinstance(v, (list, tuple)):
            cmd += [f"--{k}", *map(str, v)]
        elif v is not None:
            cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, nargs="+", default=[8, 32])
    p.add_argument("--detectors", nargs="+", default=["box", "lbp"],
                   help="box: box given; lbp or sfd: detection (sfd needs real weights: --s3fd_path)")
    p.add_argument("--baseline", action="store_true", help="also time the published algorithm (box given)")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wav2lip_bench"))
    p.add_argument("--det_scale", type=float, default=1.0)
    p.add_argument("--json", default=None, help="also write the results here")
    # internal
    p.add_argument("--child", choices=["run", "baseline"])
    p.add_argument("--ckpt"); p.add_argument("--video"); p.add_argument("--wav"); p.add_argument("--out")  # noqa: E702
    p.add_argument("--box", type=int, nargs=4, default=[-1, -1, -1, -1])
    p.add_argument("--detector", default="lbp")
    p.add_argument("--s3fd", default=None, help="S3FD weights for the sfd rows (default: the usual path)")
    args = p.parse_args(argv)
    if args.child == "run":
        return child_run(args)
    if args.child == "baseline":
        return baseline_run(args)

    import torch

    os.makedirs(args.workdir, exist_ok=True)
    gen = make_weights(args.workdir)
    box = [80, 640, 400, 880]  # top bottom left right around the face in the 720p frame
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    header = (f"{'input':<10}{'faces':<8}{'frames':>7}{'decode':>8}{'detect':>8}{'generate':>9}{'blend':>7}"
              f"{'encode':>8}{'total s':>9}{'fps':>7}{'RSS MB':>8}")
    print(header)
    results = []
    for seconds in args.seconds:
        video, wav = make_inputs(args.workdir, seconds)
        out = os.path.join(args.workdir, "out.mp4")
        for det in args.detectors:
            r = spawn("run", ckpt=gen, video=video, wav=wav, out=out,
                      box=box if det == "box" else None, detector="lbp" if det == "box" else det,
                      s3fd=args.s3fd, det_scale=args.det_scale)
            s = r["seconds"]
            row = dict(input=f"{seconds}s 720p", faces=det, **r)
            results.append(row)
            print(f"{row['input']:<10}{det:<8}{r['frames']:>7}{s.get('decode', 0):>8.1f}{s.get('detect', 0):>8.1f}"
                  f"{s.get('generate', 0):>9.1f}{s.get('blend', 0):>7.1f}{s.get('encode', 0):>8.1f}"
                  f"{s['total']:>9.1f}{r['frames'] / s['total']:>7.2f}{r['peak_rss_mb']:>8.0f}")
        if args.baseline:
            r = spawn("baseline", ckpt=gen, video=video, wav=wav, out=out, box=box)
            results.append(dict(input=f"{seconds}s 720p", faces="box (published algorithm)", **r))
            print(f"{seconds}s 720p  published algorithm, box: {r['frames']} frames, {r['seconds']['total']:.1f} s, "
                  f"{r['frames'] / r['seconds']['total']:.2f} fps, peak RSS {r['peak_rss_mb']:.0f} MB")
    print("phase columns are seconds of work in each stage; stages overlap, so they can add up to more "
          "than the total")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
