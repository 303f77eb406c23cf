"""Inference speed, memory and precision on a generated 720p talking-head clip, in one run.

    python benchmarks/inference_benchmark.py                      # everything below, ~10 min on 2 cores
    python benchmarks/inference_benchmark.py --only engine --seconds 8
    python benchmarks/inference_benchmark.py --trained demo_out/checkpoints/wav2lip_checkpoint_step000000600.pth

Sections (each run is a child process, so peak RSS is its own):

- ``engine``: the full-width 96 generator (generated weights; speed does not depend on the values),
  ``lbp`` detection: a cold run with every-frame detection, the same face prepared and saved as an
  avatar, then a new audio from the saved avatar, in fp32 and (where the CPU has bf16 matrix units)
  bf16; a cold run with the default sparse detection; the 32 s clip against the 8 s one for memory.
  Targets: the saved-avatar run spends no time in detection or face cropping and takes <= 0.6x the
  cold run's wall time (both fp32); the bf16 generator >= 3x the fp32 one; RSS of 32 s <= 1.3x 8 s.
- ``published``: the published algorithm (a transcription: every frame held in RAM, BatchNorm not
  folded, batches of 128, AVI then re-encode) against ours on the same input, box given, same
  weights, with the machine idle and with a CPU hog (one busy process) beside both.
- ``detection``: boxes from sparse detection (every 5th frame on a downscaled copy, interpolated)
  against every-frame detection and against the known boxes of generated clips (the synthetic
  corpus): IoU, and the time in the detector (also on the 720p clip).
- ``precision`` (with ``--trained CKPT``): a trained generator's bf16 frames against its fp32 frames:
  PSNR, share of pixels within 2.6 and 4 grey levels, worst pixel.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lipsync.core.cli import HelpFormatter  # noqa: E402

BOX = [80, 640, 400, 880]  # top bottom left right around the face in the 720p frame
SECTIONS = ("engine", "published", "detection", "precision", "s3fd")
DEVICE = {"name": "cpu"}  # set from --device; children get it in their options


def make_inputs(workdir: str, seconds: int, tag: str = ""):
    """A 1280x720 25 fps clip (a photograph on a canvas, swaying) and speech-like audio, both
    ``seconds`` long; ``tag`` makes another audio of the same length (a different cut)."""
    import cv2
    import numpy as np
    from skimage import data

    import audio
    from lipsync.media.video import VideoWriter

    video = os.path.join(workdir, f"face_{seconds}s_720p.mp4")
    wav_path = os.path.join(workdir, f"speech_{seconds}s{tag}.wav")
    if not os.path.exists(video):
        face = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
        canvas = np.full((720, 1280, 3), 90, np.uint8)
        canvas[104:616, 384:896] = face
        with VideoWriter(video, 1280, 720, 25) as w:
            for k in range(25 * seconds):
                w.write(cv2.warpAffine(canvas, sway(k), (1280, 720), borderMode=cv2.BORDER_REFLECT))
    if not os.path.exists(wav_path):
        sr = audio.SAMPLE_RATE
        ref = audio.load_wav(os.path.join(ROOT, "tests", "fixtures", "reference", "speechlike_16k.wav"), sr)
        if tag:
            ref = ref[::-1].copy()
        reps = int(np.ceil(seconds * sr / len(ref)))
        audio.save_wav(np.tile(ref, reps)[: seconds * sr], wav_path, sr)
    return video, wav_path


def sway(k: int):
    """The clip's 2x3 affine motion at frame k (pixels)."""
    import numpy as np

    return np.float32([[1, 0, 6 * np.sin(k / 9)], [0, 1, 3 * np.cos(k / 13)]])


def make_weights(workdir: str) -> str:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fill_rule import fill_state_dict
    from models import Wav2Lip

    gen = os.path.join(workdir, "wav2lip_generated.pth")
    if not os.path.exists(gen):
        torch.save({"state_dict": fill_state_dict(Wav2Lip().state_dict(), 0)}, gen)
    return gen


# ------------------------------------------------------------------------------------------------
# children
# ------------------------------------------------------------------------------------------------
def peak_rss() -> dict:
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ffmpeg_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child_run(opts: dict) -> dict:
    """One inference.py run in this process: timings, frames, peak memory."""
    from lipsync.render.inference import InferenceConfig, run_inference

    t0 = time.perf_counter()
    summary = run_inference(InferenceConfig(progress=False, det_cache_dir="", **opts))
    return {"frames": summary.frames, "seconds": summary.seconds, "wall": time.perf_counter() - t0,
            "tuning": summary.tuning, **peak_rss()}


def child_baseline(opts: dict) -> dict:
    """The published algorithm: read every frame, box given, generate in batches of 128, AVI, mux."""
    import cv2

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import audio
    from models import load_model
    from published_reference import published_frames, published_mel_chunks

    t0 = time.perf_counter()
    cap = cv2.VideoCapture(opts["face"])
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    mel = audio.melspectrogram(audio.load_wav(opts["audio"], audio.SAMPLE_RATE))
    model = load_model(opts["checkpoint_path"]).model.eval()
    y1, y2, x1, x2 = opts["box"]
    out = published_frames(model, frames, published_mel_chunks(mel, fps), [(y1, y2, x1, x2)] * len(frames))
    tmp_avi = opts["outfile"] + ".avi"
    h, w = out[0].shape[:2]
    writer = cv2.VideoWriter(tmp_avi, cv2.VideoWriter_fourcc(*"DIVX"), fps, (w, h))
    for f in out:
        writer.write(f)
    writer.release()
    subprocess.run([audio.ffmpeg_exe(), "-y", "-loglevel", "error", "-i", opts["audio"], "-i", tmp_avi,
                    "-qscale:v", "1", opts["outfile"]], check=True)
    os.remove(tmp_avi)
    wall = time.perf_counter() - t0
    return {"frames": len(out), "seconds": {"total": wall}, "wall": wall, "tuning": "published", **peak_rss()}


def child_s3fd(opts: dict) -> dict:
    """S3FD frames/s on 720p frames (weights from --s3fd_path, else generated: speed does not depend
    on their values), fp32 and fp16 (CUDA), at detection scales 1 and 0.5, batches of 16 (2 on a CPU)."""
    import numpy as np
    import torch

    from face_detection.sfd import S3FDDetector

    path = opts.get("s3fd_path")
    if not path:
        from face_alignment.detection.sfd.net_s3fd import s3fd

        path = os.path.join(opts["workdir"], "s3fd_generated.pth")
        state = s3fd().state_dict()
        for key, value in state.items():  # confident "no face" everywhere, so post-processing sees what it
            if "mbox_conf" in key:        # sees on real video (a few candidates), not every anchor
                value.zero_()
                if key.endswith("bias"):
                    value[:-1], value[-1] = 10.0, -10.0
        torch.save(state, path)
    n = 16 if opts["device"] == "cuda" else 2  # S3FD takes seconds per 720p frame on a CPU
    frames = [np.random.default_rng(k).integers(0, 256, (720, 1280, 3), dtype=np.uint8) for k in range(n)]
    out = {}
    for half in (False, True):
        if half and opts["device"] != "cuda":
            continue
        det = S3FDDetector(device=opts["device"], weights_path=path, half=half)
        for scale in (1.0, 0.5):
            batch = [f if scale == 1 else f[::2, ::2].copy() for f in frames]
            det.detect(batch)  # warm-up (kernel choice)
            t0 = time.perf_counter()
            reps = 3 if opts["device"] == "cuda" else 1
            for _ in range(reps):
                det.detect(batch)
            out[f"{'fp16' if half else 'fp32'} scale {scale:g}"] = reps * len(batch) / (time.perf_counter() - t0)
    return out


def child_detection(opts: dict) -> dict:
    """Every-frame vs sparse (the defaults: every 5th frame, automatic scale, re-detection below IoU
    0.7) lbp detection, as inference uses the boxes (padded, smoothed): on generated clips with known
    face boxes (the synthetic corpus) their IoU with each other and with the truth, and the time
    each took in the detector; on the 720p clip, the time."""
    import glob

    import numpy as np

    from face_detection import box_iou
    from lipsync.render.boxes import DetectionSettings, FaceFinder, coords_from_detections
    from lipsync.media.frames import FaceSource

    def boxes(frames, settings):
        spent = []
        finder = FaceFinder(settings, "cpu", timer=spent.append)
        dets = finder.run(iter(frames))
        coords = coords_from_detections(dets, frames[0].shape[:2], (0, 10, 0, 0), smooth=True)
        xyxy = [None if c is None else (c[2], c[0], c[3], c[1]) for c in coords]
        return xyxy, sum(spent), finder.dense_frames

    every, sparse = DetectionSettings(detector="lbp", every=1, scale=1.0), DetectionSettings(detector="lbp", every=5,
                                                                                            scale=0.0)
    out = {"clips": 0, "frames": 0, "every_s": 0.0, "sparse_s": 0.0, "redetected": 0, "iou": [], "iou_truth_every": [],
           "iou_truth_sparse": []}
    for clip in sorted(glob.glob(os.path.join(opts["corpus"], "*", "*.mp4"))):
        truth = json.load(open(clip[:-4] + ".json"))["face_boxes"]
        frames = list(FaceSource(clip).frames())
        a, ta, _ = boxes(frames, every)
        b, tb, re = boxes(frames, sparse)
        out["clips"] += 1
        out["frames"] += len(frames)
        out["every_s"] += ta
        out["sparse_s"] += tb
        out["redetected"] += re
        out["iou"] += [box_iou(x, y) if x and y else 0.0 for x, y in zip(a, b)]
        out["iou_truth_every"] += [box_iou(x, t) if x else 0.0 for x, t in zip(a, truth)]
        out["iou_truth_sparse"] += [box_iou(y, t) if y else 0.0 for y, t in zip(b, truth)]
    for key in ("iou", "iou_truth_every", "iou_truth_sparse"):
        v = np.array(out[key])
        out[key] = {"mean": float(v.mean()), "p05": float(np.percentile(v, 5)), "min": float(v.min())}
    frames = list(FaceSource(opts["face"]).frames())
    out["hd_frames"] = len(frames)
    out["hd_every_s"], out["hd_sparse_s"] = boxes(frames, every)[1], boxes(frames, sparse)[1]
    return out


def child_generator(opts: dict) -> dict:
    """The generator alone (what the engine calls, conversions included), fp32 and bf16, after its
    CPU tuning settled: frames/s over 3 calls of 64 frames."""
    import numpy as np

    from lipsync.render.generator import Generator

    rng = np.random.default_rng(0)
    mels = rng.standard_normal((64, 80, 16)).astype(np.float32)
    faces = rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
    out = {}
    for precision in opts["precisions"]:
        gen = Generator(opts["checkpoint_path"], device=opts["device"], precision=precision, face_cache_mb=0)
        for _ in range(3):  # kernels built, threads and micro-batch tried
            gen.generate(mels, faces)
        t0 = time.perf_counter()
        for _ in range(3):
            gen.generate(mels, faces)
        out[precision] = {"fps": 3 * 64 / (time.perf_counter() - t0), "tuning": gen.tuning()}
    return out


def child_precision(opts: dict) -> dict:
    """A trained generator's frames in bf16 against fp32 on the same input (box given, hard paste so
    only the generator differs)."""
    import audio
    from lipsync.render.avatar import prepare_avatar
    from lipsync.render.avatar_settings import AvatarSettings
    from lipsync.render.engine import render
    from lipsync.render.generator import Generator

    wav = audio.load_wav(opts["audio"], audio.SAMPLE_RATE)
    outs = {}
    for precision in ("fp32", "bf16"):
        gen = Generator(opts["checkpoint_path"], device=opts["device"],
                        precision=precision if opts["device"] == "cpu" else precision.replace("bf16", "fp16"))
        avatar = prepare_avatar(opts["face"], AvatarSettings(box=tuple(opts["box"])), gen.img_size, progress=False)
        outs[precision] = [f[opts["box"][0]:opts["box"][1], opts["box"][2]:opts["box"][3]].copy()
                           for f in render(gen, avatar, wav, blend="none")]
    return compare_frames(outs["fp32"], outs["bf16"])


def compare_frames(a, b) -> dict:
    """PSNR (dB) and absolute differences (grey levels) between two lists of uint8 frames."""
    import numpy as np

    diff = np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"psnr_db": float(10 * np.log10(255 ** 2 / mse)) if mse > 0 else float("inf"),
            "within_2.6": float(np.mean(diff <= 2.6)), "within_4": float(np.mean(diff <= 4)),
            "p999_abs": float(np.percentile(diff, 99.9)), "max_abs": int(diff.max()), "frames": len(a)}


CHILDREN = {"run": child_run, "baseline": child_baseline, "detection": child_detection, "precision": child_precision,
            "s3fd": child_s3fd, "generator": child_generator}


def spawn(mode: str, **opts) -> dict:
    if mode in ("run", "precision", "s3fd", "generator"):
        opts.setdefault("device", DEVICE["name"])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, json.dumps(opts)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------
def row(name: str, r: dict) -> str:
    s = r["seconds"]
    return (f"{name:<44}{r['frames']:>6}{s.get('decode', 0):>7.1f}{s.get('detect', 0):>7.1f}{s.get('crop', 0):>6.1f}"
            f"{s.get('generate', 0):>7.1f}{s.get('blend', 0):>6.1f}{s.get('encode', 0):>7.1f}{r['wall']:>7.1f}"
            f"{r['frames'] / r['wall']:>7.1f}{r['peak_rss_mb']:>7.0f}  {r['tuning']}")


HEADER = (f"{'run':<44}{'frames':>6}{'decode':>7}{'detect':>7}{'crop':>6}{'gen':>7}{'blend':>6}{'encode':>7}"
          f"{'wall s':>7}{'fps':>7}{'RSS MB':>7}  threads / micro-batch")


COLD = {"every": ("cold, every-frame detection, fp32", dict(det_every=1, det_scale=1.0)),
        "sparse": ("cold, sparse detection (default), fp32", dict()),
        "box": ("cold, box given, fp32", dict(box=BOX))}


def engine_section(work: str, gen: str, seconds: list, bf16: bool, fast: str = "bf16",
                   cold=("every", "sparse")) -> dict:
    video, wav = make_inputs(work, seconds[0])
    _, wav_b = make_inputs(work, seconds[0], tag="b")
    avatar = os.path.join(work, "avatar")
    common = dict(checkpoint_path=gen, face_detector="lbp", outfile=os.path.join(work, "out.mp4"))
    runs = {}
    print(HEADER)
    plan = [(COLD[c][0], dict(face=video, audio=wav, precision="fp32", **COLD[c][1])) for c in cold]
    plan += [(f"prepare ({cold[0]}) + save avatar, then audio A, fp32",
              dict(face=video, audio=wav, precision="fp32", save_avatar=avatar, **COLD[cold[0]][1])),
             ("saved avatar, new audio B, fp32", dict(face=None, avatar=avatar, audio=wav_b, precision="fp32"))]
    if bf16:
        plan.append((f"saved avatar, new audio B, {fast}", dict(face=None, avatar=avatar, audio=wav_b, precision=fast)))
    for name, opts in plan:
        runs[name] = spawn("run", **common, **opts)
        print(row(name, runs[name]), flush=True)
    for s in seconds[1:]:
        v, w = make_inputs(work, s)
        for tag, opts in ((f"{seconds[0]}s", dict(face=video, audio=wav)), (f"{s}s", dict(face=v, audio=w))):
            name = f"memory: {tag} clip, box given, fp32"
            runs[name] = spawn("run", **common, box=BOX, precision="fp32", **opts)
            print(row(name, runs[name]), flush=True)
    runs["cold"] = COLD[cold[0]][0]
    return runs


def engine_targets(runs: dict, seconds: list, bf16: bool, fast: str = "bf16") -> list:
    cold = runs[runs["cold"]]
    warm = runs["saved avatar, new audio B, fp32"]
    lines = [("saved avatar: no detection, no face cropping",
              warm["seconds"]["detect"] == 0 and warm["seconds"]["crop"] == 0,
              f"detect {warm['seconds']['detect']:.2f} s, crop {warm['seconds']['crop']:.2f} s"),
             (f"saved avatar wall time <= 0.6x {runs['cold']}", warm["wall"] <= 0.6 * cold["wall"],
              f"{warm['wall'] / cold['wall']:.2f}x ({warm['wall']:.1f} s vs {cold['wall']:.1f} s)")]
    if bf16:
        b = runs[f"saved avatar, new audio B, {fast}"]
        ratio = (b["frames"] / b["seconds"]["generate"]) / (warm["frames"] / warm["seconds"]["generate"])
        print(f"{fast} against fp32 inside whole runs (decode, paste and the encoder share the cores): generate phase "
              f"{ratio:.2f}x, wall time {warm['wall'] / b['wall']:.2f}x")
    if len(seconds) > 1:
        a, z = runs[f"memory: {seconds[0]}s clip, box given, fp32"], runs[f"memory: {seconds[1]}s clip, box given, fp32"]
        lines.append((f"RSS {seconds[1]} s <= 1.3x {seconds[0]} s", z["peak_rss_mb"] <= 1.3 * a["peak_rss_mb"],
                      f"{z['peak_rss_mb']:.0f} MB vs {a['peak_rss_mb']:.0f} MB ({z['peak_rss_mb'] / a['peak_rss_mb']:.2f}x)"))
    return lines


class Hog:
    """A busy process (one core's worth of spinning) while the block runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def published_section(work: str, gen: str, seconds: int) -> dict:
    video, wav = make_inputs(work, seconds)
    common = dict(checkpoint_path=gen, face=video, audio=wav, box=BOX, outfile=os.path.join(work, "pub.mp4"))
    runs = {}
    print(HEADER)
    for load in ("idle", "CPU hog beside"):
        for name, mode, opts in (("published algorithm", "baseline", {}),
                                 ("ours, parity mode (fp32, hard paste)", "run", dict(blend="none")),
                                 ("ours, defaults (auto precision, feather)", "run", {})):
            label = f"{name}, {load}"
            if load == "idle":
                runs[label] = spawn(mode, **common, **opts)
            else:
                with Hog():
                    runs[label] = spawn(mode, **common, **opts)
            print(row(label, runs[label]), flush=True)
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    p.add_argument("--seconds", type=int, nargs="+", default=[8, 32],
                   help="clip lengths, s: the first for every section, the others for the memory comparison")
    p.add_argument("--trained", default=None, help="a trained generator checkpoint for the precision section "
                                                   "(e.g. the demo's); without it that section is skipped")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wav2lip_bench"), help="inputs and outputs")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the generator runs")
    p.add_argument("--cold", nargs="+", choices=tuple(COLD), default=["every", "sparse"],
                   help="engine section: how the cold runs find the face (the first also prepares the avatar)")
    p.add_argument("--s3fd_path", default=None, help="S3FD weights for the s3fd section (None: generated weights)")
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--child", nargs=2, metavar=("MODE", "OPTIONS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0

    import torch

    from lipsync.render.cpu import cpu_capabilities

    DEVICE["name"] = args.device
    caps = cpu_capabilities()
    os.makedirs(args.workdir, exist_ok=True)
    gen = make_weights(args.workdir)
    print(f"CPU: {caps.line()}; torch {torch.__version__}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    fast = "bf16" if args.device == "cpu" else "fp16"
    bf16 = caps.bf16_matrix if args.device == "cpu" else True
    results = {"cpu": caps.line()}
    targets = []
    if "engine" in args.only:
        print(f"\n== engine: {args.seconds[0]} s 720p clip, full-width 96 generator, lbp detection ==")
        results["engine"] = engine_section(args.workdir, gen, args.seconds, bf16, fast, args.cold)
        targets += engine_targets(results["engine"], args.seconds, bf16, fast)
        if bf16:
            g = results["generator"] = spawn("generator", checkpoint_path=gen, precisions=["fp32", fast])
            ratio = g[fast]["fps"] / g["fp32"]["fps"]
            print(f"generator alone (64-frame calls, tuned): fp32 {g['fp32']['fps']:.1f} frames/s "
                  f"({g['fp32']['tuning']}), {fast} {g[fast]['fps']:.1f} frames/s ({g[fast]['tuning']})")
            targets.append((f"{fast} generator >= 3x fp32 (the generator alone)", ratio >= 3, f"{ratio:.2f}x"))
        if not bf16:
            print("bf16: this CPU has no bf16 matrix units; bf16 rows skipped")
    if "published" in args.only:
        print(f"\n== against the published algorithm: {args.seconds[0]} s 720p, box given, same weights ==")
        r = results["published"] = published_section(args.workdir, gen, args.seconds[0])
        for load in ("idle", "CPU hog beside"):
            pub = r[f"published algorithm, {load}"]["wall"]
            for name in ("ours, parity mode (fp32, hard paste)", "ours, defaults (auto precision, feather)"):
                ours = r[f"{name}, {load}"]["wall"]
                print(f"{load}: {name} took {ours / pub:.2f}x the published algorithm's wall time")
    if "detection" in args.only:
        video, _ = make_inputs(args.workdir, args.seconds[0])
        corpus = os.path.join(args.workdir, "synthetic")
        if not os.path.isdir(corpus):
            subprocess.run([sys.executable, os.path.join(ROOT, "synthetic_corpus.py"), "--out", corpus, "--clips", "4",
                            "--clips_per_group", "1", "--seconds", "4", "--speech", "synth", "--quiet"], check=True)
        d = results["detection"] = spawn("detection", face=video, corpus=corpus)
        print(f"\n== detection, lbp: {d['clips']} generated 256x256 clips with known boxes ({d['frames']} frames) ==")
        for name in ("every", "sparse"):
            t = d[f"iou_truth_{name}"]
            print(f"{name:>6}: {d[name + '_s']:.1f} s in the detector; IoU with the known box mean {t['mean']:.3f}, "
                  f"5th percentile {t['p05']:.3f}")
        i = d["iou"]
        print(f"IoU sparse vs every-frame: mean {i['mean']:.3f}, 5th percentile {i['p05']:.3f}, min {i['min']:.3f}; "
              f"{d['redetected']} frames re-detected between keyframes; detector time ratio "
              f"{d['sparse_s'] / d['every_s']:.2f}")
        print(f"720p clip ({d['hd_frames']} frames): every frame {d['hd_every_s']:.1f} s, sparse {d['hd_sparse_s']:.1f} s "
              f"in the detector (ratio {d['hd_sparse_s'] / d['hd_every_s']:.2f})")
    if "precision" in args.only:
        if args.trained:
            video, wav = make_inputs(args.workdir, args.seconds[0])
            c = results["precision"] = spawn("precision", checkpoint_path=args.trained, face=video, audio=wav, box=BOX)
            print(f"\n== bf16 vs fp32, trained generator {args.trained}: PSNR {c['psnr_db']:.1f} dB, "
                  f"{100 * c['within_2.6']:.2f}% of pixels within 2.6 grey levels, {100 * c['within_4']:.2f}% within 4, "
                  f"99.9th percentile {c['p999_abs']:.1f}, worst {c['max_abs']} ==")
        else:
            print("\nprecision: skipped (give --trained CKPT, e.g. the demo's generator)")
    if "s3fd" in args.only:
        r = results["s3fd"] = spawn("s3fd", workdir=args.workdir, s3fd_path=args.s3fd_path)
        print("\n== S3FD on 720p frames: " + ", ".join(f"{k} {v:.1f} frames/s" for k, v in r.items()))
    if targets:
        print("\ntargets:")
        for name, ok, value in targets:
            print(f"  {'met   ' if ok else 'MISSED'} {name}: {value}")
    print("phase columns are seconds of work per stage; stages overlap in threads, so they can add up to more "
          "than the wall time")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
