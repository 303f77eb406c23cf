"""Detect faces and write per-frame face crops, the 16 kHz audio and its mel for every clip.

    python preprocess.py --data_root ../LSR2/demo --preprocessed_root ../LSR2/lrs2_preprocessed_288x288-demo \
        --batch_size 128
    python preprocess.py --data_root DIR --preprocessed_root OUT --face_detector lbp --shard 0/4

Clips are <data_root>/<group>/<clip>.<ext> in any container ffmpeg reads (.mp4, .MP4, .mov, .mkv,
.webm, .avi, ...); other files are counted, listed and left out. Output:
<preprocessed_root>/<group>/<clip>/<frame>.jpg (frame = index in the 25 fps stream on the file's
timeline; other rates are resampled to 25 fps first), audio.wav (the audio on the same timeline, so
a stream that starts late keeps its delay), mel.npy and done.json. A finished clip is skipped on
rerun; an interrupted one is redone. Clips that fail (corrupt, no face, no audio) are listed in
<preprocessed_root>/failures.json, with the files that are not clips, and make the exit status 1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def build_parser():
    from face_detection import BACKENDS, BACKENDS_HELP
    from lipsync.core.device import DEVICE_CHOICES

    from lipsync.core.cli import DEVICE_HELP, HelpFormatter, QUIET_HELP
    from lipsync.media.ffmpeg import add_ffmpeg_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_root", required=True, help="raw corpus: <data_root>/<group>/<clip>.<ext> (any video)")
    p.add_argument("--preprocessed_root", required=True, help="where the crops go")
    p.add_argument("--batch_size", type=int, default=32, help="frames per face-detection batch")
    p.add_argument("--ngpu", type=int, default=1, help="worker processes, one detector each (one per GPU)")
    p.add_argument("--face_detector", choices=BACKENDS, default="sfd", help=BACKENDS_HELP)
    p.add_argument("--s3fd_path", default=None, help="S3FD weights (default: face_detection/detection/sfd/s3fd.pth)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--hq", choices=("prefer", "only", "ignore"), default="prefer",
                   help="use <clip>_hq.mp4 where present (prefer), only those (only), or never (ignore)")
    p.add_argument("--shard", default=None, help="i/n: process every n-th clip starting at i")
    add_ffmpeg_arg(p)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return p


def _worker(device: str, args: dict, jobs: list, results):
    """Process ``jobs`` with one detector on ``device``; report each clip on ``results``."""
    from face_detection import get_detector
    from lipsync.train.dataprep import preprocess_clip
    from lipsync.media.ffmpeg import use_ffmpeg

    try:
        use_ffmpeg(args["ffmpeg"])  # a spawned worker starts with the default choice
        detector = get_detector(args["face_detector"], device=device, weights_path=args["s3fd_path"])
    except Exception as exc:  # noqa: BLE001 - every job of this worker fails with the reason
        for key, _, _ in jobs:
            results.put((key, None, f"detector: {exc}"))
        return
    for key, src, out_dir in jobs:
        try:
            results.put((key, preprocess_clip(src, out_dir, detector, args["batch_size"]), None))
        except Exception as exc:  # noqa: BLE001 - recorded in failures.json
            results.put((key, None, f"{type(exc).__name__}: {exc}"))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.ngpu < 1:
        parser.error("--batch_size and --ngpu must be >= 1")
    from lipsync.core.errors import run_main

    return run_main(preprocess, args)


def preprocess(args) -> int:
    import multiprocessing as mp
    import queue

    from lipsync.core.progress import progress_bar

    from face_detection import get_detector
    from lipsync.train.corpus import (DataPrepError, parse_shard, pick_source, report_not_clips, scan_raw_corpus,
                                      take_shard)
    from lipsync.train.dataprep import clip_out_dir, is_done, write_json_atomic
    from lipsync.core.device import resolve_device
    from lipsync.media.ffmpeg import use_ffmpeg

    use_ffmpeg(args.ffmpeg)
    shard = parse_shard(args.shard)
    device = resolve_device(args.device)
    scan = scan_raw_corpus(args.data_root)
    report_not_clips(scan)
    clips = take_shard(scan.clips, shard)
    if not clips:
        raise DataPrepError(f"no <group>/<clip> videos under {args.data_root!r}"
                            + (f" ({len(scan.not_clips)} other file(s), listed above)" if scan.not_clips else ""))

    jobs, skipped_done, no_source = [], 0, 0
    for clip in clips:
        out_dir = clip_out_dir(args.preprocessed_root, clip)
        src = pick_source(clip, args.hq)
        if src is None:
            no_source += 1
        elif is_done(out_dir):
            skipped_done += 1
            shutil.rmtree(out_dir + ".partial", ignore_errors=True)  # left by an interrupted rerun
        else:
            jobs.append((clip.key, src, out_dir))
    os.makedirs(args.preprocessed_root, exist_ok=True)

    if device.type == "cuda":
        import torch

        devices = [f"cuda:{i % torch.cuda.device_count()}" for i in range(args.ngpu)]
    else:
        devices = [str(device)] * args.ngpu
    opts = {"face_detector": args.face_detector, "s3fd_path": args.s3fd_path, "batch_size": args.batch_size,
            "ffmpeg": args.ffmpeg}

    # fail fast on a detector that cannot be built (missing S3FD weights), before any work
    if jobs:
        get_detector(args.face_detector, device="cpu", weights_path=args.s3fd_path)

    failures, done_now, frames = [], 0, 0
    t0 = time.perf_counter()
    with progress_bar(total=len(jobs), desc="preprocess", unit="clip", disable=args.quiet) as bar:
        def record(key, rec, err):
            nonlocal done_now, frames
            if err:
                failures.append({"clip": key, "reason": err})
            else:
                done_now += 1
                frames += rec["frames"]
            bar.update(1)
            bar.set_postfix(frames_per_s=f"{frames / max(1e-9, time.perf_counter() - t0):.1f}")

        if len(devices) == 1 or len(jobs) <= 1:
            results: "queue.Queue" = queue.Queue()
            _worker(devices[0], opts, jobs, results)
            while not results.empty():
                record(*results.get())
        else:
            ctx = mp.get_context("spawn")
            results = ctx.Queue()
            procs = [ctx.Process(target=_worker, args=(dev, opts, jobs[i::len(devices)], results), daemon=True)
                     for i, dev in enumerate(devices)]
            for p in procs:
                p.start()
            for _ in range(len(jobs)):
                record(*results.get())
            for p in procs:
                p.join()

    report = os.path.join(args.preprocessed_root, "failures.json" if shard[1] == 1 else f"failures_shard{shard[0]}of{shard[1]}.json")
    not_clips = [{"path": path, "reason": why} for path, why in scan.not_clips]
    write_json_atomic({"failures": failures, "processed": done_now, "skipped_done": skipped_done,
                       "no_source": no_source, "not_clips": not_clips}, report, indent=1)
    elapsed = time.perf_counter() - t0
    print(f"{done_now} clips preprocessed ({frames} frames, {frames / max(elapsed, 1e-9):.1f} frames/s), "
          f"{skipped_done} already done, {no_source} without a source for --hq {args.hq}, {len(failures)} failed, "
          f"{len(not_clips)} other file(s) not clips" + (f" (see {report})" if failures or not_clips else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
