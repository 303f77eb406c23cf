"""Score lip-synced videos the way the Wav2Lip paper does: LSE-D, LSE-C and the AV offset, with this
project's expert and/or syncnet_python's SyncNet; PSNR / SSIM against reference videos when given.

    python evaluate.py --videos results/result_voice.mp4 --checkpoint_path checkpoints/lipsync_expert.pth
    python evaluate.py --video_list results.txt --syncnet_model syncnet_v2.model --out scores.json
    python evaluate.py --videos out.mp4 --references truth.mp4 --checkpoint_path expert.pth

For every 5-frame window and every offset in +-vshift frames, the distance between the window's
video feature and the audio feature at that offset; per video, LSE-D = the minimum over offsets of
the mean distance (lower is better), LSE-C = median minus minimum (higher is better), AV offset =
the offset at the minimum (> 0: the audio leads the video). Because LSE-D / LSE-C take the best
offset, a video whose whole audio is a few frames off scores almost as well as an in-sync one; the
AV offset and the distance / confidence at offset 0 (dist_at_0, conf_at_0) say whether it is in sync
as it stands. Videos are read at 25 fps; the face is
found in each frame with --face_detector (frames without one take the box interpolated from their
neighbours) or given with --box. syncnet_v2.model is syncnet_python's published weight file; this
script never downloads it. Numbers from the project's own expert are on that expert's scale and
compare only with numbers from the same expert.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser():
    from face_detection import BACKENDS, BACKENDS_HELP
    from lipsync.core.cli import DEVICE_HELP, HelpFormatter, QUIET_HELP
    from lipsync.media.ffmpeg import add_ffmpeg_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--videos", nargs="+", help="videos to score")
    src.add_argument("--video_list", help="text file with one video path per line (relative to the file)")
    p.add_argument("--references", nargs="+", default=None,
                   help="reference videos (one per scored video, same size) for PSNR / SSIM")
    p.add_argument("--checkpoint_path", help="this project's lip-sync expert (lipsync_expert.pth or a training checkpoint)")
    p.add_argument("--syncnet_model", help="syncnet_python's syncnet_v2.model, a local file")
    p.add_argument("--vshift", type=int, default=15, help="offsets searched, in frames each way (default: %(default)s)")
    p.add_argument("--face_detector", default="sfd", choices=BACKENDS, help="face detector for every frame: " + BACKENDS_HELP)
    p.add_argument("--s3fd_path", default=None, help="S3FD weights (default face_detection/detection/sfd/s3fd.pth)")
    p.add_argument("--box", type=int, nargs=4, default=None, metavar=("X1", "Y1", "X2", "Y2"),
                   help="a fixed face box for every frame instead of detection")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help=DEVICE_HELP)
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    add_ffmpeg_arg(p)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return p


def read_video_list(path: str) -> list:
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as fh:
        lines = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    return [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint_path and not args.syncnet_model:
        parser.error("give --checkpoint_path (this project's expert), --syncnet_model (syncnet_v2.model), or both")
    if args.vshift < 1:
        parser.error("--vshift must be >= 1")
    from lipsync.core.errors import run_main

    return run_main(evaluate, args)


def evaluate(args) -> int:
    from lipsync.core.device import resolve_device
    from lipsync.core.errors import Wav2LipError
    from lipsync.eval.evaluation import (EvaluationError, ExpertScorer, SyncNetV2Scorer, compare_videos,
                                    read_video_for_scoring, sync_score)
    from lipsync.media.ffmpeg import use_ffmpeg
    from face_detection import get_detector

    use_ffmpeg(args.ffmpeg)
    videos = args.videos or read_video_list(args.video_list)
    if not videos:
        raise EvaluationError("no videos to score")
    if args.references is not None and len(args.references) != len(videos):
        raise EvaluationError(f"--references: {len(args.references)} given for {len(videos)} videos")
    missing = [v for v in videos + (args.references or []) if not os.path.isfile(v)]
    if missing:
        raise EvaluationError(f"file not found: {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    device = resolve_device(args.device)
    expert = ExpertScorer(args.checkpoint_path, device) if args.checkpoint_path else None
    syncnet = SyncNetV2Scorer(args.syncnet_model, device) if args.syncnet_model else None
    detector = None if args.box else get_detector(args.face_detector, device=device, weights_path=args.s3fd_path)

    results, failures = [], 0
    t0 = time.perf_counter()
    for i, path in enumerate(videos):
        row = {"video": path}
        try:
            data = read_video_for_scoring(path, detector, args.box, expert, syncnet is not None, device,
                                          progress=not args.quiet)
            row["frames"] = data.frames
            row["frames_without_face"] = data.frames_without_face
            for scorer, inputs in ((expert, data.faces), (syncnet, data.syncnet_crops)):
                if scorer is not None:
                    v, a = scorer.features(inputs, data.wav)
                    row[scorer.name] = sync_score(v, a, args.vshift).to_dict()
            if args.references:
                row["reference"] = args.references[i]
                row.update(compare_videos(path, args.references[i]))
        except (Wav2LipError, OSError) as exc:  # this video's fault; anything else is a bug
            row["error"] = str(exc)
            failures += 1
        results.append(row)
        if not args.quiet or "error" in row:  # --quiet hides progress, never a video's error
            print(format_row(row), flush=True)

    summary = summarize(results)
    report = {"videos": results, "mean": summary, "vshift": args.vshift, "face_detector": args.face_detector,
              "checkpoint_path": args.checkpoint_path, "syncnet_model": args.syncnet_model,
              "seconds": round(time.perf_counter() - t0, 1)}
    if len(results) > 1 or args.quiet:
        print("mean: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
    if failures:
        print(f"error: {failures} of {len(videos)} video(s) could not be scored (see the messages above)", file=sys.stderr)
        return 1
    return 0


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['video']}: error: {row['error']}"
    parts = []
    for name in ("expert", "syncnet"):
        if name in row:
            s = row[name]
            parts.append(f"{name} LSE-D {s['lse_d']:.3f} LSE-C {s['lse_c']:.3f} offset {s['offset']:+d} "
                         f"(at 0: dist {s['dist_at_0']:.3f} conf {s['conf_at_0']:.3f})")
    if "psnr" in row:
        parts.append(f"PSNR {row['psnr']:.2f} dB SSIM {row['ssim']:.4f}")
    return f"{row['video']}: " + " | ".join(parts)


def summarize(results: list) -> dict:
    import numpy as np

    out = {}
    ok = [r for r in results if "error" not in r]
    for name in ("expert", "syncnet"):
        for key in ("lse_d", "lse_c"):
            vals = [r[name][key] for r in ok if name in r]
            if vals:
                out[f"{name}_{key}"] = round(float(np.mean(vals)), 4)
    for key in ("psnr", "ssim"):
        vals = [r[key] for r in ok if key in r]
        if vals:
            out[key] = round(float(np.mean(vals)), 4)
    out["scored"] = len(ok)
    return out


if __name__ == "__main__":
    sys.exit(main())
