"""Split preprocessed clips into filelists/{train,val,test}.txt, whole groups per split.

    python generate_filelists.py --data_root ../LSR2/lrs2_preprocessed_288x288-demo

One <group>/<clip> per line, relative to --data_root. Clips too short to sample a training window are
dropped (and counted). With at least three groups every split gets one.
"""
from __future__ import annotations

import argparse
import os
import sys


def build_parser():
    from lipsync.core.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_root", required=True, help="preprocessed root")
    p.add_argument("--out_dir", default="filelists", help="where train.txt, val.txt and test.txt are written")
    p.add_argument("--val_fraction", type=float, default=0.1, help="share of the groups in val.txt")
    p.add_argument("--test_fraction", type=float, default=0.1, help="share of the groups in test.txt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random assignment of groups to splits")
    p.add_argument("--syncnet_T", type=int, default=5, help="frames per training window")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lipsync.core.errors import run_main

    return run_main(write_filelists, args)


def write_filelists(args) -> int:
    from lipsync.train.corpus import DataPrepError, list_preprocessed, split_by_group
    from lipsync.train.dataprep import write_text_atomic

    found = list_preprocessed(args.data_root)
    # the training dataset needs more than 3 windows' worth of face frames in a clip
    usable = [c for c, n in found if n > 3 * args.syncnet_T]
    dropped = len(found) - len(usable)
    if not usable:
        raise DataPrepError(f"no usable clips under {args.data_root!r} ({len(found)} found, {dropped} too short; "
                            f"a clip needs more than {3 * args.syncnet_T} face frames)")
    splits = split_by_group(usable, args.val_fraction, args.test_fraction, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    for name, items in splits.items():
        write_text_atomic(os.path.join(args.out_dir, f"{name}.txt"), "".join(f"{c}\n" for c in items))
    groups = {k: len({c.split('/')[0] for c in v}) for k, v in splits.items()}
    print(", ".join(f"{k}: {len(v)} clips / {groups[k]} groups" for k, v in splits.items())
          + f"; {dropped} dropped as too short -> {args.out_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
