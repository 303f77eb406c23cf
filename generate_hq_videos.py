"""Enhance raw clips (face restoration) into <clip>_hq.mp4 beside each clip, audio kept.

    python generate_hq_videos.py --data_root ../LSR2/demo/
    python generate_hq_videos.py --data_root DIR --enhancer codeformer --codeformer_dir ~/CodeFormer

Finished clips are skipped; outputs appear atomically; failures are summarised and make the exit
status 1.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser():
    from lipsync.core.cli import HelpFormatter, QUIET_HELP
    from lipsync.media.ffmpeg import add_ffmpeg_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_root", required=True,
                   help="corpus root: <data_root>/<group>/<clip>.<ext>, any video container in any letter case")
    p.add_argument("--enhancer", choices=("builtin", "codeformer"), default="builtin",
                   help="builtin: OpenCV denoise/sharpen (runs anywhere); codeformer: your CodeFormer checkout")
    p.add_argument("--codeformer_dir", default=None, help="CodeFormer checkout (with inference_codeformer.py)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="clips processed in parallel (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="redo clips whose _hq.mp4 exists")
    add_ffmpeg_arg(p)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.enhancer == "codeformer" and not args.codeformer_dir:
        parser.error("--enhancer codeformer needs --codeformer_dir (a CodeFormer checkout)")
    if args.codeformer_dir and not os.path.isfile(os.path.join(args.codeformer_dir, "inference_codeformer.py")):
        parser.error(f"--codeformer_dir {args.codeformer_dir!r} has no inference_codeformer.py")
    from lipsync.core.errors import run_main

    return run_main(enhance, args)


def enhance(args) -> int:
    from lipsync.core.progress import progress_bar

    from lipsync.train.corpus import DataPrepError, hq_path, report_not_clips, scan_raw_corpus
    from lipsync.train.dataprep import enhance_job, run_parallel
    from lipsync.media.ffmpeg import use_ffmpeg

    use_ffmpeg(args.ffmpeg)
    scan = scan_raw_corpus(args.data_root)
    report_not_clips(scan)
    clips = [c.raw for c in scan.clips if c.raw]
    if not clips:
        raise DataPrepError(f"no <group>/<clip> videos under {args.data_root!r}"
                            + (f" ({len(scan.not_clips)} other file(s), listed above)" if scan.not_clips else ""))
    todo = [c for c in clips if args.overwrite or not os.path.exists(hq_path(c))]
    skipped = len(clips) - len(todo)
    failures = []
    done = 0
    jobs = [(c, args.enhancer, args.codeformer_dir, args.ffmpeg) for c in todo]
    with progress_bar(total=len(jobs), desc="enhance", unit="clip", disable=args.quiet) as bar:
        for src, err, _ in run_parallel(enhance_job, jobs, args.workers):
            if err:
                failures.append((src, err))
            else:
                done += 1
            bar.update(1)
    print(f"{done} clips enhanced, {skipped} already done, {len(failures)} failed, "
          f"{len(scan.not_clips)} other file(s) not clips")
    for src, err in failures:
        print(f"  failed: {src}: {err}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
