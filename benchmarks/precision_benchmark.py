"""fp32, bf16 and int8 generators, torch and ONNX Runtime, on this CPU in one run: the generator alone,
whole inference.py runs, and (with a trained generator) their faces against fp32's.

    python benchmarks/precision_benchmark.py                   # speed: ~10 min on 2 cores
    python benchmarks/precision_benchmark.py --trained demo_out/checkpoints/wav2lip_checkpoint_step000000600.pth \\
        --quality_face demo_out/corpus/GROUP/00001.mp4 --quality_audio demo_out/heldout_speech.wav

Prints the CPU's capabilities first (VNNI decides int8's kernels and settings, bf16 matrix units
bf16's speed). Speed uses the full-width 96 generator (generated weights: speed does not depend on
the values) on the 8 s 720p clip of ``inference_benchmark.py``, box given (no detection), default
feather blend, each run a child process:

- end to end (inference.py runs): torch fp32, torch bf16 (with bf16 matrix units, or ``--bf16
  always``), ONNX Runtime fp32 (the checkpoint's export), ONNX Runtime int8 (precision int8) twice:
  first with an empty cache (export, calibration on this job's faces and speech, quantization), then
  again (the cached file);
- the generator alone: the same four generators in one process, 64-frame calls after 3 to warm up,
  rounds interleaved so that another process's load falls on all of them; median frames/s.

Quality (``--trained``): on every output frame of the job (lbp boxes without padding, found on every
frame, as the demo's inference), the generated faces of torch bf16, ONNX Runtime fp32, int8 as it runs
here and int8 with 8-bit weights computed op by op (what a CPU with VNNI computes) against torch
fp32's; PSNR, 99.9th percentile and worst pixel in 0-255 levels, judged by
``lipsync.render.quantize.INT8_THRESHOLD``; beside them, what the output's own H.264 encode does to
the fp32 frames inside the face boxes (the threshold's reference).

Target (issue #21): on a CPU with VNNI, int8 end to end takes at most 0.5x the wall time of the fp32
run, with faces within the threshold.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inference_benchmark as ib  # noqa: E402
from lipsync.core.cli import HelpFormatter  # noqa: E402


def child_alone(opts: dict) -> dict:
    """Frames/s of each generator alone (what the engine calls, conversions included)."""
    import audio
    from lipsync.render.avatar import prepare_avatar
    from lipsync.render.avatar_settings import AvatarSettings
    from lipsync.render.generator import Generator
    from lipsync.render.onnx_model import OnnxGenerator
    from lipsync.render.quantize import calibration_from_avatar

    avatar = prepare_avatar(opts["face"], AvatarSettings(box=tuple(opts["box"])), 96, progress=False)
    c = calibration_from_avatar(avatar, audio.load_wav(opts["audio"], audio.SAMPLE_RATE))
    mels, faces = c.mels[:64], c.faces[:64]
    gens = {f"torch {p}": Generator(opts["checkpoint_path"], device="cpu", precision=p, face_cache_mb=0)
            for p in ["fp32"] + (["bf16"] if opts["bf16"] else [])}
    gens["ONNX Runtime fp32"] = OnnxGenerator(opts["fp32_onnx"])
    gens["ONNX Runtime int8"] = OnnxGenerator(opts["int8_onnx"])
    for g in gens.values():
        for _ in range(3):  # kernels built, threads and micro-batch tried
            g.generate(mels, faces)
    times = {name: [] for name in gens}
    for _ in range(opts["rounds"]):
        for name, g in gens.items():
            t0 = time.perf_counter()
            g.generate(mels, faces)
            times[name].append(time.perf_counter() - t0)
    return {name: {"fps": 64 / statistics.median(t), "tuning": gens[name].tuning().split(" | ")[0]}
            for name, t in times.items()}


def child_quality(opts: dict) -> dict:
    """Generated faces of every output frame of a job, each precision against torch fp32, and the
    H.264 round trip of fp32 frames inside their face boxes."""
    import numpy as np

    import audio
    from lipsync.media.frames import source_index
    from lipsync.media.video import iter_frames, probe_video
    from lipsync.render.avatar import prepare_avatar
    from lipsync.render.avatar_settings import settings_from_flags
    from lipsync.render.engine import windows_of
    from lipsync.render.generator import Generator
    from lipsync.render.inference import InferenceConfig, run_inference
    from lipsync.render.onnx_model import OnnxGenerator, export
    from lipsync.render.quantize import (Calibration, calibration_from_avatar, compare_faces, quantize_generator,
                                         run_faces, unfused_session)

    work = opts["workdir"]
    flags = dict(face_detector="lbp", pads=(0, 0, 0, 0), det_every=1, det_scale=1.0)
    fp32_torch = Generator(opts["checkpoint_path"], device="cpu", precision="fp32", face_cache_mb=0)
    avatar = prepare_avatar(opts["face"], settings_from_flags(flags), fp32_torch.img_size, with_crops=True,
                            progress=False)
    wav = audio.load_wav(opts["audio"], audio.SAMPLE_RATE)
    n_out, windows = windows_of(wav, avatar.fps)
    src = [source_index(k, avatar.n_frames, "repeat") for k in range(n_out)]
    keep = [k for k in range(n_out) if avatar.box(src[k]) is not None]
    job = Calibration(windows[keep], avatar.crops[[src[k] for k in keep]], "the whole job")
    rows = np.arange(len(keep))
    faces = {"torch fp32": fp32_torch.generate(job.mels, job.faces)}
    bf16 = Generator(opts["checkpoint_path"], device="cpu", precision="bf16")
    faces["torch bf16"] = bf16.generate(job.mels, job.faces)
    fp32_onnx = os.path.join(work, "quality_fp32.onnx")
    export(opts["checkpoint_path"], fp32_onnx, kind="generator")
    faces["ONNX Runtime fp32"] = OnnxGenerator(fp32_onnx).generate(job.mels, job.faces)
    calib = calibration_from_avatar(avatar, wav, audio_name=os.path.basename(opts["audio"]))
    out = {}
    for name, reduce_range in (("here", None), ("vnni", False)):
        path = os.path.join(work, f"quality_int8_{name}.onnx")
        info = quantize_generator(fp32_onnx, path, calib, reduce_range=reduce_range)
        label = (f"ONNX Runtime int8, {'7' if info['quantizer']['reduce_range'] else '8'}-bit weights"
                 + (", as this CPU runs it" if name == "here" else ", computed op by op (VNNI's numbers)"))
        faces[label] = (OnnxGenerator(path).generate(job.mels, job.faces) if name == "here"
                        else run_faces(unfused_session(path), job, rows))
        if name == "here":
            out[f"{label}: its own check (a third of the calibration samples)"] = info["quality"]
    for name, f in faces.items():
        if name != "torch fp32":
            out[name] = compare_faces(faces["torch fp32"], f)
    raw = {}
    cfg = InferenceConfig(checkpoint_path=opts["checkpoint_path"], face=opts["face"], audio=opts["audio"],
                          outfile=os.path.join(work, "quality_fp32.mp4"), device="cpu", precision="fp32",
                          det_cache_dir="", progress=False, **flags)
    run_inference(cfg, frame_sink=lambda i, f: raw.__setitem__(i, f.copy()))
    decoded = list(iter_frames(probe_video(cfg.outfile)))
    boxes = [avatar.box(src[k]) for k in keep]
    region = [np.concatenate([f[y1:y2, x1:x2].reshape(-1) for f, (y1, y2, x1, x2) in zip(frames, boxes)])
              for frames in ([raw[k] for k in keep], [decoded[k] for k in keep])]
    out["H.264 encode of the fp32 frames (CRF 18, face boxes)"] = {**compare_faces(region[0][None], region[1][None]),
                                                                    "frames": len(keep)}
    return out


CHILDREN = {"alone": child_alone, "quality": child_quality}


def spawn(mode: str, **opts) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, json.dumps(opts)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--seconds", type=int, default=8, help="length of the generated 720p clip and speech, s")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per generator alone")
    p.add_argument("--trained", default=None, help="a trained generator for the quality section (e.g. the demo's); "
                                                   "without it that section is skipped")
    p.add_argument("--quality_face", default=None, help="face video for the quality section (None: the 720p clip)")
    p.add_argument("--quality_audio", default=None, help="speech for the quality section (None: the clip's speech)")
    p.add_argument("--bf16", choices=("auto", "always"), default="auto",
                   help="torch bf16 speed rows: auto = only on a CPU with bf16 matrix units (elsewhere torch emulates "
                        "bf16: 12x slower than fp32 on a 2-core Zen 2, 5 minutes for the 8 s clip)")
    p.add_argument("--skip", nargs="*", default=[], choices=("end_to_end", "alone", "quality"), help="sections to skip")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "wav2lip_bench"), help="inputs and outputs")
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--child", nargs=2, metavar=("MODE", "OPTIONS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0

    import onnxruntime
    import torch

    from lipsync.render.cpu import cpu_capabilities
    from lipsync.render.quantize import INT8_THRESHOLD

    caps = cpu_capabilities()
    os.makedirs(args.workdir, exist_ok=True)
    gen = ib.make_weights(args.workdir)
    video, wav = ib.make_inputs(args.workdir, args.seconds)
    print(f"CPU: {caps.line()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    results = {"cpu": caps.line()}
    bf16 = caps.bf16_matrix or args.bf16 == "always"
    if not bf16:
        print("torch bf16 speed rows skipped: no bf16 matrix units here, bf16 would be emulated (--bf16 always runs "
              "them)")
    cache = os.path.join(args.workdir, "int8_cache")
    common = dict(face=video, audio=wav, box=ib.BOX, outfile=os.path.join(args.workdir, "precision.mp4"))
    if "end_to_end" not in args.skip:
        print(f"\n== end to end: {args.seconds} s 720p clip, full-width 96 generator, box given, feather blend ==")
        print(ib.HEADER)
        for f in glob.glob(os.path.join(cache, "*.onnx")):
            os.remove(f)
        runs = results["end_to_end"] = {}
        plan = [("torch fp32", dict(checkpoint_path=gen, precision="fp32"))]
        plan += [("torch bf16", dict(checkpoint_path=gen, precision="bf16"))] if bf16 else []
        int8 = dict(checkpoint_path=gen, precision="int8", int8_cache_dir=cache)
        plan += [("ONNX Runtime int8, empty cache (export + quantize)", int8), ("ONNX Runtime int8, cached", int8),
                 ("ONNX Runtime fp32", None)]
        for name, opts in plan:
            if opts is None:  # the export the int8 runs made
                opts = dict(checkpoint_path=glob.glob(os.path.join(cache, "*-fp32.onnx"))[0], precision="fp32")
            runs[name] = ib.spawn("run", **common, **opts, device="cpu")
            print(ib.row(name, runs[name]), flush=True)
        base = runs["torch fp32"]
        for name, r in runs.items():
            print(f"{name}: wall {r['wall'] / base['wall']:.2f}x torch fp32's, generate phase "
                  f"{r['seconds']['generate'] / base['seconds']['generate']:.2f}x")
        ratio = runs["ONNX Runtime int8, cached"]["wall"] / base["wall"]
        verdict = ("met" if ratio <= 0.5 else "MISSED") if caps.vnni else "not measurable here (no VNNI)"
        print(f"target, on a CPU with VNNI: int8 end to end <= 0.5x fp32: {ratio:.2f}x: {verdict}")
    if "alone" not in args.skip:
        int8_files = glob.glob(os.path.join(cache, "*-int8.onnx"))
        if not int8_files:
            raise SystemExit("the generator-alone section uses the int8 file of the end-to-end section: run that first")
        fp32_onnx = glob.glob(os.path.join(cache, "*-fp32.onnx"))[0]
        a = results["alone"] = spawn("alone", checkpoint_path=gen, face=video, audio=wav, box=ib.BOX, rounds=args.rounds,
                                     bf16=bf16, fp32_onnx=fp32_onnx, int8_onnx=int8_files[0])
        print(f"\n== the generator alone (64-frame calls, median of {args.rounds} interleaved rounds) ==")
        for name, r in a.items():
            print(f"{name:<20} {r['fps']:7.1f} frames/s  {r['fps'] / a['torch fp32']['fps']:5.2f}x torch fp32  "
                  f"({r['tuning']})")
        if bf16 and not caps.bf16_matrix:
            print("(no bf16 matrix units on this CPU: bf16 is emulated)")
    if "quality" not in args.skip:
        if not args.trained:
            print("\nquality: skipped (give --trained CKPT, e.g. the demo's generator)")
        else:
            face, speech = args.quality_face or video, args.quality_audio or wav
            q = results["quality"] = spawn("quality", checkpoint_path=args.trained, face=face, audio=speech,
                                           workdir=args.workdir)
            print(f"\n== faces against torch fp32's, {args.trained} on {face} + {speech} ==")
            print(f"threshold (lipsync.render.quantize.INT8_THRESHOLD): {INT8_THRESHOLD.line()}")
            for name, c in q.items():
                verdict = "" if name.startswith("H.264") else f"; {'within' if INT8_THRESHOLD.met(c) else 'OUTSIDE'}"
                print(f"{name}: PSNR {c['psnr_db']:.1f} dB, 99.9th percentile {c['p999_abs']:g}, worst {c['max_abs']}, "
                      f"{100 * c['within_4']:.2f}% within 4 levels ({c['frames']} frames{verdict})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
