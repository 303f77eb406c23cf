"""preprocess.py throughput (frames/s) per face detector on a generated corpus, and how well each
detector finds the synthetic faces (share of frames with a box, IoU with the truth boxes).

    python benchmarks/preprocess_benchmark.py --clips 8
    python benchmarks/preprocess_benchmark.py --detectors lbp sfd --s3fd_path face_detection/detection/sfd/s3fd.pth
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    from lipsync.core.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--clips", type=int, default=8, help="synthetic clips to generate")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each clip, seconds")
    p.add_argument("--detectors", nargs="+", default=["lbp"], help="face detectors to time (lbp, sfd)")
    p.add_argument("--s3fd_path", default=None, help="S3FD weights for sfd (default: face_detection/detection/sfd/s3fd.pth)")
    p.add_argument("--batch_size", type=int, default=32, help="frames per face-detection batch")
    args = p.parse_args(argv)

    import numpy as np

    import preprocess
    import synthetic_corpus
    from face_detection import box_iou as iou, get_detector
    from lipsync.media.video import iter_frames, probe_video

    work = tempfile.mkdtemp(prefix="prep_bench_")
    try:
        raw = os.path.join(work, "raw")
        synthetic_corpus.main(["--out", raw, "--clips", str(args.clips), "--seconds", str(args.seconds), "--quiet"])
        clips = sorted(glob.glob(os.path.join(raw, "*", "*.mp4")))
        for det in args.detectors:
            pre = os.path.join(work, f"pre_{det}")
            t0 = time.perf_counter()
            preprocess.main(["--data_root", raw, "--preprocessed_root", pre, "--face_detector", det, "--device", "cpu",
                             "--batch_size", str(args.batch_size), "--quiet"]
                            + (["--s3fd_path", args.s3fd_path] if args.s3fd_path else []))
            elapsed = time.perf_counter() - t0
            frames = sum(json.load(open(d))["frames"] for d in glob.glob(os.path.join(pre, "*", "*", "done.json")))
            detector = get_detector(det, weights_path=args.s3fd_path)
            found, total, ious = 0, 0, []
            for clip in clips:
                truth = json.load(open(clip[:-4] + ".json"))
                for k, box in enumerate(detector.detect(list(iter_frames(probe_video(clip))))):
                    total += 1
                    if box is not None:
                        found += 1
                        ious.append(iou(box, truth["face_boxes"][k]))
            print(f"{det}: {frames} frames in {elapsed:.1f} s = {frames / elapsed:.1f} frames/s (1 process, "
                  f"{os.cpu_count()} cores); faces found in {found}/{total} frames ({100 * found / total:.1f}%), "
                  f"IoU with truth mean {np.mean(ious):.3f}, min {np.min(ious):.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
