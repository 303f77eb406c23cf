"""Face detectors on videos made from real photographs (lipsync.train.face_videos): per detector,
recall, mean box IoU against the videos' true boxes (the photographs' face boxes by eye, carried
through each frame's warp), false detections, and frames/s on this CPU.

    python benchmarks/detection_benchmark.py                      # lbp, dlib_hog, dlib_cnn (those installed)
    python benchmarks/detection_benchmark.py --s3fd_path face_detection/detection/sfd/s3fd.pth   # + sfd
    python benchmarks/detection_benchmark.py --frames 10 --out det.json

A true face counts when at least 60% of it shows (the one passed in front of hides the other in the
``crossing`` scene); a detection hits it at IoU >= 0.3. Results: docs/faces.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    from lipsync.core.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--detectors", nargs="+", default=["lbp", "dlib_hog", "dlib_cnn"],
                   help="backends to measure (sfd is added when --s3fd_path is given)")
    p.add_argument("--s3fd_path", default=None, help="S3FD weights: measure sfd too")
    p.add_argument("--frames", type=int, default=25, help="frames per scene")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="frame size in pixels (default: lipsync.train.face_videos.FRAME_SIZE)")
    p.add_argument("--device", default="cpu", help="device for sfd")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    from face_detection import DetectorError, get_detector
    from lipsync.render.cpu import cpu_capabilities
    from lipsync.train.face_videos import FRAME_SIZE, make_videos, score_detections

    torch.set_num_threads(os.cpu_count() or 1)
    size = tuple(args.size) if args.size else FRAME_SIZE
    detectors = list(args.detectors) + (["sfd"] if args.s3fd_path and "sfd" not in args.detectors else [])
    videos = make_videos(args.frames, size)
    cpu = cpu_capabilities().line()
    print(f"CPU: {cpu}; torch threads {torch.get_num_threads()}")
    print(f"{len(videos)} scenes x {args.frames} frames of {size[0]}x{size[1]}")
    results = {"cpu": cpu, "frames_per_scene": args.frames, "size": list(size), "detectors": {}}
    print(f"{'detector':10s} {'recall':>7s} {'mean IoU':>9s} {'false':>6s} {'frames/s':>9s}   recall per scene")
    for name in detectors:
        try:
            det = get_detector(name, device=args.device, weights_path=args.s3fd_path)
        except DetectorError as exc:
            print(f"{name:10s} skipped: {exc}")
            continue
        det.detect_all(videos[0].frames[:1])  # warm-up (first-call allocations)
        seconds, hits, faces, false, ious, scenes = 0.0, 0, 0, 0, [], {}
        for video in videos:
            t0 = time.perf_counter()
            found = det.detect_all(video.frames)
            seconds += time.perf_counter() - t0
            s = score_detections(video, [[f.box for f in frame] for frame in found])
            hits, faces, false = hits + s["hits"], faces + s["faces"], false + s["false_positives"]
            ious += [s["mean_iou"]] * s["hits"]
            scenes[video.name] = s
        n = sum(len(v.frames) for v in videos)
        row = {"recall": hits / faces, "mean_iou": sum(ious) / len(ious) if ious else 0.0, "false_positives": false,
               "frames_per_s": n / seconds, "faces": faces, "scenes": scenes}
        results["detectors"][name] = row
        per_scene = " ".join(f"{k}={v['recall']:.2f}" for k, v in scenes.items())
        print(f"{name:10s} {row['recall']:7.3f} {row['mean_iou']:9.3f} {false:6d} {row['frames_per_s']:9.1f}   {per_scene}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
