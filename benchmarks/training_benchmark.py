"""Training throughput of the four trainers (samples/s; peak GPU memory on CUDA).

    python benchmarks/training_benchmark.py                        # CPU, tiny preset, 20 steps each
    python benchmarks/training_benchmark.py --device cuda --presets 96 288 --steps 300 --amp bf16

Data: a generated preprocessed corpus (lipsync.train.synthetic.write_preprocessed), so it runs anywhere.
A sample is one expert pair or one generator window of 5 frames.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    from lipsync.core.cli import DEVICE_HELP, HelpFormatter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--presets", nargs="+", default=["tiny"], help="hparams presets to time (96, 288, tiny)")
    p.add_argument("--steps", type=int, default=20, help="training steps per trainer")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision (CUDA only)")
    p.add_argument("--batch_size", type=int, default=None, help="override the preset's generator batch size")
    args = p.parse_args(argv)

    import torch

    from hparams import get_hparams
    from lipsync.train import synthetic as S
    from lipsync.train.training import Dist, build_parser, seed_everything
    from lipsync.train.trainers import ExpertTrainer, GANTrainer, GeneratorTrainer, WGANTrainer

    work = tempfile.mkdtemp(prefix="train_bench_")
    root = os.path.join(work, "pre")
    clips = S.write_preprocessed(root, groups=4, seconds=2.0)
    fl = os.path.join(work, "filelists")
    os.makedirs(fl)
    for split, items in (("train", clips[:3]), ("val", clips[3:]), ("test", clips[3:])):
        with open(os.path.join(fl, f"{split}.txt"), "w") as fh:
            fh.write("\n".join(items) + "\n")
    print(f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPU cores"
          + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""))
    print(f"{'preset':<7}{'script':<28}{'batch':>6}{'steps':>6}{'samples/s':>11}{'peak GPU MB':>13}")
    expert_ckpt = None
    for preset in args.presets:
        for name, cls in (("color_syncnet_train", ExpertTrainer), ("wav2lip_train", GeneratorTrainer),
                          ("hq_wav2lip_train", GANTrainer), ("wloss_hq_wav2lip_train", WGANTrainer)):
            ck = os.path.join(work, f"ck_{preset}_{name}")
            over = (f"amp={args.amp},eval_interval=100000,syncnet_eval_interval=100000,checkpoint_interval=100000,"
                    f"syncnet_checkpoint_interval=100000,num_workers=2,keep_last_checkpoints=1,syncnet_wt=0.01")
            if args.batch_size:
                over += f",batch_size={args.batch_size}"
            argv_ = ["--data_root", root, "--checkpoint_dir", ck, "--filelists_dir", fl, "--preset", preset,
                     "--hparams", over, "--max_steps", str(args.steps), "--device", args.device, "--quiet"]
            needs_expert = cls is not ExpertTrainer
            if needs_expert:
                argv_ += ["--syncnet_checkpoint_path", expert_ckpt]
            parser = build_parser("bench", needs_expert, cls in (GANTrainer, WGANTrainer))
            a = parser.parse_args(argv_)
            hp = get_hparams(preset, over)
            env = Dist(args.device)
            seed_everything(0)
            if env.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            trainer = cls(a, hp, env)
            t0 = time.perf_counter()
            trainer.run()
            rate = getattr(trainer, "samples_per_second", args.steps / (time.perf_counter() - t0))
            peak = torch.cuda.max_memory_allocated() / 2**20 if env.device.type == "cuda" else float("nan")
            bs = hp.syncnet_batch_size if cls is ExpertTrainer else hp.batch_size
            print(f"{preset:<7}{name:<28}{bs:>6}{args.steps:>6}{rate:>11.1f}{peak:>13.0f}", flush=True)
            if cls is ExpertTrainer:
                expert_ckpt = os.path.join(ck, f"checkpoint_step{args.steps:09d}.pth")


if __name__ == "__main__":
    main()
