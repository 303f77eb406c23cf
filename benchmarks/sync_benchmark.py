"""How well a trained expert measures audio-video offsets, and how sync_correct.py does on a corpus
with known damage.

    python benchmarks/sync_benchmark.py --data_root demo_out/preprocessed --filelists_dir demo_out/filelists \
        --checkpoint_path demo_out/checkpoints/checkpoint_step000001200.pth

1. Every clip of --split with its audio advanced by k frames (the audio leads by k), k in
   -6..6: the measured offset minus k, per clip and overall.
2. The same clips with another clip's audio ("corrupted"): their confidence (LSE-C) next to the
   clips' own.
3. A copy of the whole preprocessed corpus where a third of the clips are shifted by 1..6 frames
   (either way) and two get another clip's audio, corrected with ``sync_correct.py --fix``: how
   many were fixed (measured in sync afterwards) and whether the corrupted clips left the
   filelists.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--data_root", required=True, help="preprocessed root (preprocess.py's output)")
    p.add_argument("--filelists_dir", required=True, help="folder with the train / val / test lists")
    p.add_argument("--checkpoint_path", required=True, help="the trained lip-sync expert")
    p.add_argument("--split", default="test", help="whose clips are shifted: train, val or test")
    p.add_argument("--max_k", type=int, default=6, help="audio shifts k = -max_k..max_k frames are measured")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    import audio
    import sync_correct
    from lipsync.train.data import read_filelist
    from lipsync.eval.evaluation import SR, ExpertScorer, measure_known_shifts, score_preprocessed_clip, shift_audio

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    clips = read_filelist(args.filelists_dir, args.split, args.data_root)
    scorer = ExpertScorer(args.checkpoint_path)
    ks = list(range(-args.max_k, args.max_k + 1))
    per_clip, errors, own_conf, corrupt_conf = {}, [], [], []
    wavs = [audio.load_wav(os.path.join(c, "audio.wav"), SR) for c in clips]
    for i, clip in enumerate(clips):
        measured = measure_known_shifts(scorer, clip, ks, wav=wavs[i])
        per_clip[os.path.relpath(clip, args.data_root)] = measured
        errors += [m - k for m, k in zip(measured, ks)]
        own_conf.append(score_preprocessed_clip(scorer, clip, wav=wavs[i]).lse_c)
        if len(clips) > 1:
            corrupt_conf.append(score_preprocessed_clip(scorer, clip, wav=wavs[(i + 1) % len(clips)]).lse_c)
    errors = np.abs(np.array(errors))
    result = {
        "clips": len(clips), "k": ks, "measured": per_clip,
        "offset_abs_error_mean": round(float(errors.mean()), 3), "offset_abs_error_max": int(errors.max()),
        "within_1_frame": round(float(np.mean(errors <= 1)), 3), "exact": round(float(np.mean(errors == 0)), 3),
        "lse_c_own_audio": [round(v, 3) for v in own_conf], "lse_c_other_clip_audio": [round(v, 3) for v in corrupt_conf],
    }

    work = tempfile.mkdtemp(prefix="sync_bench_")
    try:
        root, fl = os.path.join(work, "pre"), os.path.join(work, "fl")
        shutil.copytree(args.data_root, root)
        shutil.copytree(args.filelists_dir, fl)
        rng = np.random.default_rng(0)
        from lipsync.train.corpus import list_preprocessed

        names = [n for n, _ in list_preprocessed(args.data_root)]
        order = [names[i] for i in rng.permutation(len(names))]
        shifted = {n: int(rng.choice([-1, 1]) * rng.integers(1, args.max_k + 1)) for n in order[: max(1, len(names) // 3)]}
        corrupted = order[len(shifted):len(shifted) + 2]
        for n, k in shifted.items():
            path = os.path.join(root, n, "audio.wav")
            audio.save_wav(shift_audio(audio.load_wav(path, SR), -k), path, SR)
        for j, n in enumerate(corrupted):   # the audio of a clip that is neither shifted nor corrupted
            donor = order[-1 - j]
            shutil.copy(os.path.join(args.data_root, donor, "audio.wav"), os.path.join(root, n, "audio.wav"))
        report = os.path.join(work, "report.json")
        sync_correct.main(["--data_root", root, "--checkpoint_path", args.checkpoint_path, "--filelists_dir", fl,
                           "--report", report, "--fix", "--quiet", "--device", "cpu"])
        rep = json.load(open(report))
        rows = {r["clip"]: r for r in rep["clips"]}
        listed = "".join(open(os.path.join(fl, f)).read() for f in os.listdir(fl) if f.endswith(".txt"))
        result["correction"] = {
            "shifted_by": shifted,
            "measured": {n: rows[n].get("offset") for n in shifted},
            "fixed": sum(1 for n in shifted if abs(rows[n].get("offset_after", 99)) <= 1),
            "offset_after": {n: rows[n].get("offset_after") for n in shifted},
            "corrupted": corrupted,
            "corrupted_lse_c": [rows[n].get("lse_c") for n in corrupted],
            "corrupted_excluded": sum(1 for n in corrupted if rows[n]["action"] == "exclude" and n not in listed),
            "clean_clips_excluded": sum(1 for n in names if n not in shifted and n not in corrupted
                                        and rows[n]["action"] == "exclude"),
            "counts": rep["counts"], "min_confidence": rep["min_confidence"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: v for k, v in result.items() if k != "measured"}, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
