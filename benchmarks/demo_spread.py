"""The demo's metrics across seeds and thread counts: how far its verdict depends on the machine.

    python benchmarks/demo_spread.py --out spread                      # seeds 0 1 2 x 1 and 2 threads
    python benchmarks/demo_spread.py --out spread --seeds 0 --threads 1 2 --jobs 1

Each (seed, threads) pair is one ``demo.py --out OUT/seed{S}_threads{T} --seed S`` run with
``OMP_NUM_THREADS=T``: another thread count sums the trainings' floats in another order, as another CPU
does. ``--jobs`` runs that many demos at once (2 one-thread runs fill two cores; their wall times
then say little). A rerun skips the runs that already wrote metrics.json. Prints the CPU, one row per
run, then each target's metric as min / median / max and how many runs met it; exits 1 when any run
missed a target.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_one(out: str, seed: int, threads: int, extra) -> dict:
    """One demo run (or its earlier metrics.json); returns the metrics with ``seed``, ``threads`` and
    ``exit_status`` added."""
    folder = os.path.join(out, f"seed{seed}_threads{threads}")
    metrics_path = os.path.join(folder, "metrics.json")
    if not os.path.exists(metrics_path):
        os.makedirs(folder, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with open(os.path.join(folder, "demo.log"), "w") as log:
            rc = subprocess.call([sys.executable, os.path.join(ROOT, "demo.py"), "--out", folder, "--seed", str(seed),
                                  "--quiet", *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
        if not os.path.exists(metrics_path):
            raise SystemExit(f"demo.py --seed {seed} with {threads} thread(s) ended with status {rc} before "
                             f"writing metrics.json: see {folder}/demo.log")
    metrics = json.load(open(metrics_path))
    metrics.update(seed=seed, threads=threads, exit_status=0 if all(r["met"] for r in metrics["targets"]) else 1)
    return metrics


def main(argv=None) -> int:
    from lipsync.core.cli import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo_spread", help="folder of the runs (one subfolder each)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the runs' demo.py --seed values")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS of the runs")
    p.add_argument("--jobs", type=int, default=1, help="demo runs at once")
    p.add_argument("demo_args", nargs="*", help="more demo.py arguments, after --")
    args = p.parse_args(argv)

    import demo
    from lipsync.render.cpu import cpu_capabilities

    print(f"CPU: {cpu_capabilities().line()}", flush=True)
    pairs = [(s, t) for t in args.threads for s in args.seeds]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = list(pool.map(lambda st: run_one(os.path.abspath(args.out), st[0], st[1], args.demo_args), pairs))
    keys = [t.key for t in demo.TARGETS]
    print(f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s")
    print("seed threads exit wall_s " + " ".join(keys))
    for r in runs:
        print(f"{r['seed']:4d} {r['threads']:7d} {r['exit_status']:4d} {r['wall_seconds']:6.0f} "
              + " ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    print("target: min / median / max, runs that met it")
    for t in demo.TARGETS:
        values = np.array([r[t.key] for r in runs], float)
        met = sum(t.met(r[t.key]) for r in runs)
        print(f"  {t.key} ({t.describe()}): {values.min():.3f} / {np.median(values):.3f} / {values.max():.3f}, "
              f"{met} of {len(runs)}")
    return 0 if all(r["exit_status"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
