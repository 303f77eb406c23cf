"""The demo's expert along its training: validation and test ROC AUC of every 100th checkpoint, and per
test clip at the end.

    python demo.py --out demo_out                                   # or any finished demo folder
    OMP_NUM_THREADS=1 python benchmarks/expert_curve.py demo_out curve_1thread
    python benchmarks/expert_curve.py demo_out curve_lr --hparams syncnet_lr=5e-4

Trains the expert exactly as demo.py does (its hparams, ``--steps``, ``--seed``; extra ``--hparams``
appended) on the corpus already prepared in ``RUN/preprocessed`` with ``RUN/filelists``, into
``OUT/checkpoints`` (every 100th step kept), then prints one line per checkpoint: validation AUC on
512 pairs of the val split, test AUC and accuracy on 1024 pairs of the test split (the demo's
``expert_val_auc``), and the last checkpoint's AUC on each test clip alone. Run it with another
``OMP_NUM_THREADS`` to see what another summation order does to the same training.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    from lipsync.core.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run", help="a demo folder with preprocessed/ and filelists/")
    p.add_argument("out", help="folder for the checkpoints and curve.json")
    p.add_argument("--steps", type=int, default=1200, help="expert training steps (the demo's default)")
    p.add_argument("--seed", type=int, default=0, help="the demo's --seed the run folder was made with")
    p.add_argument("--hparams", default="", help="overrides appended to the demo's expert hparams")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    import color_syncnet_train
    import demo
    from hparams import get_hparams
    from lipsync.render.cpu import cpu_capabilities

    print(f"CPU: {cpu_capabilities().line()}; torch threads {torch.get_num_threads()}", flush=True)
    pre, fl = os.path.join(args.run, "preprocessed"), os.path.join(args.run, "filelists")
    ck = os.path.join(args.out, "checkpoints")
    over = demo.expert_hparams(args.seed, args.steps) + ",keep_last_checkpoints=1000,syncnet_checkpoint_interval=100"
    if args.hparams:
        over += "," + args.hparams
    if not os.path.exists(os.path.join(ck, f"checkpoint_step{args.steps:09d}.pth")):
        rc = color_syncnet_train.main(["--data_root", pre, "--checkpoint_dir", ck, "--filelists_dir", fl,
                                       "--preset", "tiny", "--hparams", over, "--max_steps", str(args.steps),
                                       "--device", "cpu", "--quiet"])
        if rc != 0:
            return rc
    hp = get_hparams("tiny", f"seed={args.seed}")

    def clips(split):
        return [os.path.join(pre, line.strip()) for line in open(os.path.join(fl, split + ".txt")) if line.strip()]

    rows = []
    paths = sorted(glob.glob(os.path.join(ck, "checkpoint_step*.pth")))
    for path in paths:
        step = int(re.search(r"step(\d+)", path).group(1))
        if step % 100:
            continue
        val = demo.expert_scores(path, clips("val"), hp, n=512, seed=7)
        test = demo.expert_scores(path, clips("test"), hp, n=1024)
        rows.append({"step": step, "val_auc": val["auc"], "test_auc": test["auc"], "test_accuracy": test["accuracy"]})
        print(f"step {step:5d}: val AUC {val['auc']:.3f} | test AUC {test['auc']:.3f}, accuracy {test['accuracy']:.3f}",
              flush=True)
    per_clip = {os.path.relpath(c, pre): demo.expert_scores(paths[-1], [c], hp, n=512)["auc"] for c in clips("test")}
    print("last checkpoint, test AUC per clip: " + ", ".join(f"{c} {a:.3f}" for c, a in per_clip.items())
          + f" (mean {np.mean(list(per_clip.values())):.3f})")
    with open(os.path.join(args.out, "curve.json"), "w") as fh:
        json.dump({"rows": rows, "per_clip": per_clip}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
