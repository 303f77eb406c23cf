"""Measure the audio-video offset of every preprocessed clip with a trained expert; report it, and with
--fix shift the audio of clips that are a few frames out of sync and drop unusable clips from the
filelists.

    python sync_correct.py --data_root lrs2_preprocessed --checkpoint_path checkpoints/lipsync_expert.pth
    python sync_correct.py --data_root lrs2_preprocessed --checkpoint_path checkpoints/lipsync_expert.pth \\
        --filelists_dir filelists --fix

Each clip is scored over its longest run of consecutive face frames (see evaluate.py for LSE-D /
LSE-C). Offset > 0: the audio leads the video; the fix delays it by that many frames (< 0: advances
it), keeping the clip's length. A clip is excluded when its confidence (LSE-C) is under
--min_confidence (by default 0.6 x the median over the corpus, since each expert has its own scale),
when |offset| > --max_offset, or when it cannot be scored. With --fix:
- shifted clips get a new audio.wav and mel.npy; the first fix keeps the original as audio.orig.wav
  and done.json records the total shift, so running again measures from the original and never
  shifts twice;
- excluded clips are removed from train.txt / val.txt / test.txt in --filelists_dir.
The report (JSON; default DATA_ROOT/sync_report.json) lists every clip with its offset, scores,
action and reason, and the counts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def build_parser():
    from lipsync.core.cli import DEVICE_HELP, HelpFormatter, QUIET_HELP
    from lipsync.media.ffmpeg import add_ffmpeg_arg

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_root", required=True, help="preprocessed root (preprocess.py's output)")
    p.add_argument("--checkpoint_path", required=True, help="a trained lip-sync expert")
    p.add_argument("--filelists_dir", default="filelists", help="train/val/test lists to clean with --fix")
    p.add_argument("--report", default=None, help="report path (default: DATA_ROOT/sync_report.json)")
    p.add_argument("--fix", action="store_true", help="shift audio and rewrite the filelists (default: report only)")
    p.add_argument("--max_offset", type=int, default=8, help="largest |offset| corrected, in frames (default: %(default)s)")
    p.add_argument("--min_confidence", default="auto",
                   help="LSE-C under which a clip is excluded; 'auto' = 0.6 x the corpus median (default)")
    p.add_argument("--vshift", type=int, default=15, help="offsets searched, in frames each way (default: %(default)s)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help=DEVICE_HELP)
    add_ffmpeg_arg(p)
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return p


AUTO_CONFIDENCE_RATIO = 0.6
ORIGINAL = "audio.orig.wav"


def apply_shift(clip_dir: str, total_shift: int) -> None:
    """audio.wav (+ mel.npy) = the original audio shifted by ``total_shift`` frames; done.json last."""
    import audio
    from lipsync.train.dataprep import DONE, read_done, write_audio_and_mel, write_json_atomic
    from lipsync.core.fileio import atomic_write
    from lipsync.eval.evaluation import SR, shift_audio

    wav_path = os.path.join(clip_dir, "audio.wav")
    orig = os.path.join(clip_dir, ORIGINAL)
    if not os.path.isfile(orig):
        with atomic_write(orig, ".wav") as tmp:
            shutil.copy2(wav_path, tmp)
    write_audio_and_mel(shift_audio(audio.load_wav(orig, SR), total_shift), wav_path, os.path.join(clip_dir, "mel.npy"))
    done = read_done(clip_dir)
    done["audio_shift_frames"] = int(total_shift)
    write_json_atomic(done, os.path.join(clip_dir, DONE))


def clean_filelists(filelists_dir: str, excluded: set) -> dict:
    """Drop excluded clips from each list (atomically); returns {split: removed count}."""
    from lipsync.train.data import filelist_clip
    from lipsync.train.dataprep import write_text_atomic

    removed = {}
    for split in ("train", "val", "test"):
        path = os.path.join(filelists_dir, f"{split}.txt")
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            lines = fh.readlines()
        keep = [ln for ln in lines if filelist_clip(ln, excluded.__contains__) not in excluded]
        removed[split] = len(lines) - len(keep)
        if removed[split]:
            write_text_atomic(path, "".join(keep))
    return removed


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_confidence != "auto":
        try:
            args.min_confidence = float(args.min_confidence)
        except ValueError:
            parser.error(f"--min_confidence must be a number or 'auto', got {args.min_confidence!r}")
    if args.max_offset < 0 or args.max_offset > args.vshift:
        parser.error(f"--max_offset must be in 0..--vshift ({args.vshift})")
    from lipsync.core.errors import run_main

    return run_main(correct, args)


def correct(args) -> int:
    import numpy as np
    from lipsync.core.progress import progress_bar

    import audio
    from lipsync.train.corpus import DataPrepError, list_preprocessed
    from lipsync.train.dataprep import read_done, write_json_atomic
    from lipsync.core.device import resolve_device
    from lipsync.core.errors import Wav2LipError
    from lipsync.eval.evaluation import SR, ExpertScorer, score_preprocessed_clip, shift_audio
    from lipsync.media.ffmpeg import use_ffmpeg

    use_ffmpeg(args.ffmpeg)
    if not os.path.isdir(args.data_root):
        raise DataPrepError(f"--data_root not found: {args.data_root}")
    if args.fix and not os.path.isdir(args.filelists_dir):
        raise DataPrepError(f"--filelists_dir not found: {args.filelists_dir} (run generate_filelists.py first, "
                            f"or give the folder that holds train.txt)")
    scorer = ExpertScorer(args.checkpoint_path, resolve_device(args.device))
    names = [name for name, _ in list_preprocessed(args.data_root)]
    if not names:
        raise DataPrepError(f"no preprocessed clips under {args.data_root}")

    t0 = time.perf_counter()
    rows = []
    for name in progress_bar(names, desc="measure offsets", unit="clip", disable=args.quiet):
        d = os.path.join(args.data_root, name)
        prior = int(read_done(d).get("audio_shift_frames", 0))
        row = {"clip": name, "prior_shift": prior}
        try:
            orig = os.path.join(d, ORIGINAL)
            if os.path.isfile(orig):
                wav = shift_audio(audio.load_wav(orig, SR), prior)
            else:
                wav = audio.load_wav(os.path.join(d, "audio.wav"), SR)
            s = score_preprocessed_clip(scorer, d, args.vshift, wav=wav)
            row.update(offset=s.offset, lse_d=round(s.lse_d, 4), lse_c=round(s.lse_c, 4), windows=s.windows)
        except (Wav2LipError, OSError) as exc:  # this clip's fault; anything else is a bug
            row["error"] = str(exc)
        rows.append(row)

    confs = [r["lse_c"] for r in rows if "lse_c" in r]
    if args.min_confidence == "auto":
        min_conf = AUTO_CONFIDENCE_RATIO * float(np.median(confs)) if confs else 0.0
    else:
        min_conf = float(args.min_confidence)

    reasons = {}
    excluded = set()
    for r in rows:
        if "error" in r:
            r["action"], r["reason"] = "exclude", "unscorable: " + r["error"]
        elif r["lse_c"] < min_conf:
            r["action"], r["reason"] = "exclude", f"low confidence ({r['lse_c']:.3f} < {min_conf:.3f})"
        elif abs(r["offset"]) > args.max_offset:
            r["action"], r["reason"] = "exclude", f"offset {r['offset']:+d} beyond +-{args.max_offset}"
        elif r["offset"] != 0:
            r["action"] = "shift"
        else:
            r["action"] = "keep"
        if r["action"] == "exclude":
            excluded.add(r["clip"])
            key = r["reason"].split(" (")[0].split(":")[0]
            key = "offset beyond bound" if key.startswith("offset") else key
            reasons[key] = reasons.get(key, 0) + 1

    removed = {}
    if args.fix:
        for r in progress_bar([r for r in rows if r["action"] == "shift"], desc="shift audio", unit="clip", disable=args.quiet):
            d = os.path.join(args.data_root, r["clip"])
            total = r["prior_shift"] + r["offset"]
            apply_shift(d, total)
            r["shift_applied"] = r["offset"]
            r["total_shift"] = total
            after = score_preprocessed_clip(scorer, d, args.vshift)
            r["offset_after"] = after.offset
        removed = clean_filelists(args.filelists_dir, excluded)

    counts = {"clips": len(rows), "in_sync": sum(r["action"] == "keep" for r in rows),
              "out_of_sync_correctable": sum(r["action"] == "shift" for r in rows),
              "excluded": len(excluded), "excluded_by_reason": reasons}
    if args.fix:
        counts["shifted"] = sum("shift_applied" in r for r in rows)
        counts["removed_from_filelists"] = removed
    report = {"data_root": os.path.abspath(args.data_root), "checkpoint_path": args.checkpoint_path,
              "fixed": args.fix, "max_offset": args.max_offset, "min_confidence": round(min_conf, 4),
              "min_confidence_rule": "auto: %.1f x median LSE-C" % AUTO_CONFIDENCE_RATIO
              if args.min_confidence == "auto" else "given", "vshift": args.vshift, "counts": counts,
              "seconds": round(time.perf_counter() - t0, 1), "clips": rows}
    report_path = args.report or os.path.join(args.data_root, "sync_report.json")
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    write_json_atomic(report, report_path)

    offsets = [r["offset"] for r in rows if "offset" in r]
    hist = {k: offsets.count(k) for k in sorted(set(offsets))}
    print(f"{len(rows)} clips measured: {counts['in_sync']} in sync, {counts['out_of_sync_correctable']} off by "
          f"1..{args.max_offset} frames{' (shifted)' if args.fix else ''}, {len(excluded)} excluded "
          f"({', '.join(f'{n} {k}' for k, n in reasons.items()) or 'none'}); min confidence {min_conf:.3f}")
    print(f"offsets (frames: clips): {hist}")
    if args.fix:
        print(f"removed from filelists: {removed}")
    elif counts["out_of_sync_correctable"] or excluded:
        print("report only: run again with --fix to shift the audio and clean the filelists")
    print(f"report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
