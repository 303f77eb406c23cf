"""The training loop shared by the four trainers: arguments, data, distributed setup, mixed precision,
logging, evaluation, atomic checkpoints and exact resume.

A trainer (see lipsync/train/trainers.py) says only what differs: its models and optimizers, one training
step, one evaluation step, and what it saves. Distributed training switches on from the launcher's
environment (``torchrun``): one process per GPU (NCCL) or per CPU slot (gloo); rank 0 writes
checkpoints and logs.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from collections import defaultdict
from typing import Dict

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from hparams import TRAINING_DEFAULT_PRESET, HParams, HParamsError, add_hparams_args, get_hparams
from lipsync.core.cli import DEVICE_HELP, HelpFormatter
from lipsync.core.device import DEVICE_CHOICES, resolve_device
from lipsync.train.checkpoints import (ResumableSampler, choose_preset, layout_banner, prune, save_atomic,
                                       step_path)

log = logging.getLogger("train")


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------
def build_parser(description: str, needs_expert: bool, needs_disc: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--data_root", required=True, help="preprocessed root (preprocess.py's output)")
    p.add_argument("--checkpoint_dir", required=True, help="where checkpoints and logs are written")
    p.add_argument("--checkpoint_path", default=None, help="resume from (or start from) this checkpoint")
    if needs_expert:
        p.add_argument("--syncnet_checkpoint_path", required=True, help="the trained lip-sync expert (frozen)")
    if needs_disc:
        p.add_argument("--disc_checkpoint_path", default=None, help="resume the discriminator from this")
    p.add_argument("--filelists_dir", default="filelists", help="folder with train.txt / val.txt")
    add_hparams_args(p, default_preset=None, preset_help=(
        "hyperparameter preset: 288 (the HQ layout), 96 (the paper's) or tiny (CPU tests). Default: the "
        "preset of the run --checkpoint_path resumes"
        + (", else the layout of the --syncnet_checkpoint_path expert" if needs_expert else "")
        + f", else {TRAINING_DEFAULT_PRESET}, as the seed notebook's command lines train"))
    p.add_argument("--max_steps", type=int, default=None, help="stop at this global step (and save)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------------

class Dist:
    def __init__(self, device_flag: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        device = resolve_device(device_flag)
        if self.enabled:
            if device.type == "cuda":
                torch.cuda.set_device(self.local_rank)
                device = torch.device("cuda", self.local_rank)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.device = device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return float(t.item() / self.world)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled:
            dist.destroy_process_group()



# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
class Trainer:
    """Subclasses set ``prefix``, build models in ``setup`` and implement ``train_step``/``eval_step``."""

    prefix = ""               # checkpoint file prefix
    script = ""               # the training script that runs this trainer (named in its first line)
    dataset_cls = None        # lipsync.train.data.*Dataset
    batch_size_key = "batch_size"
    lr_key = "initial_learning_rate"
    eval_interval_key = "eval_interval"
    checkpoint_interval_key = "checkpoint_interval"
    best_metric = "loss"      # the validation score that picks checkpoint_best.pth
    best_is_highest = False   # loss: lowest is best

    def __init__(self, args, hp: HParams, env: Dist):
        self.args, self.hp, self.env = args, hp, env
        self.device = env.device
        self.global_step = 0
        self.global_epoch = 0
        self.epoch_step = 0  # batches of the current epoch already trained (resume goes on after them)
        self.best = self.worst_score()
        self.extra_state: dict = {}
        use_amp = hp.amp != "none" and self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hp.amp) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)

    # ---- to implement ----
    def setup(self):
        raise NotImplementedError

    def train_step(self, batch) -> Dict[str, float]:
        raise NotImplementedError

    def eval_step(self, batch) -> Dict[str, float]:
        raise NotImplementedError

    def checkpoint_payload(self) -> Dict[str, dict]:
        """{prefix: {"state_dict", "optimizer"}} for each file to write at a checkpoint."""
        raise NotImplementedError

    def after_eval(self, metrics: Dict[str, float]) -> None:
        pass

    def log_images(self, writer, batch) -> None:
        pass

    # ---- shared ----
    def worst_score(self) -> float:
        return -math.inf if self.best_is_highest else math.inf

    def improves(self, value) -> bool:
        """Whether the validation score ``value`` of :attr:`best_metric` beats the best so far."""
        if value is None:
            return False
        return value > self.best if self.best_is_highest else value < self.best

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def backward(self, loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def to_device(self, batch):
        return [t.to(self.device, non_blocking=True) for t in batch]

    def state(self) -> dict:
        return {"global_step": self.global_step, "global_epoch": self.global_epoch, "epoch_step": self.epoch_step,
                "best_val": self.best, "best_metric": self.best_metric, "preset": self.args.preset,
                "hparams": self.hp.to_dict(), "scaler": self.scaler.state_dict(), **self.extra_state}

    def restore_counters(self, ckpt: dict):
        self.global_step = int(ckpt.get("global_step", 0))
        self.global_epoch = int(ckpt.get("global_epoch", 0))
        self.epoch_step = int(ckpt.get("epoch_step", 0))
        # a checkpoint whose best was scored on another metric (or before the metric was recorded: the
        # loss) does not bound this run's best
        same = ckpt.get("best_metric", "loss") == self.best_metric
        self.best = float(ckpt.get("best_val", self.worst_score())) if same else self.worst_score()
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        for key in self.extra_state:
            if key in ckpt:
                self.extra_state[key] = ckpt[key]

    def save(self, best: bool = False):
        if not self.env.main:
            return
        os.makedirs(self.args.checkpoint_dir, exist_ok=True)
        for prefix, payload in self.checkpoint_payload().items():
            obj = {**payload, **self.state()}
            path = step_path(self.args.checkpoint_dir, prefix, self.global_step)
            save_atomic(obj, path)
            prune(self.args.checkpoint_dir, prefix, self.hp.keep_last_checkpoints, current=path)
            if best:
                save_atomic(obj, os.path.join(self.args.checkpoint_dir, f"{prefix}checkpoint_best.pth"))
        log.info("saved checkpoint at step %d%s", self.global_step, " (best)" if best else "")

    def loaders(self):
        from lipsync.train.data import read_filelist

        train_clips = read_filelist(self.args.filelists_dir, "train", self.args.data_root)
        val_clips = read_filelist(self.args.filelists_dir, "val", self.args.data_root)
        if not val_clips:
            log.warning("val.txt is empty: evaluating on the training clips")
            val_clips = train_clips
        self.train_set = self.dataset_cls(train_clips, self.hp, seed=self.hp.seed, split="train")
        self.val_set = self.dataset_cls(val_clips, self.hp, seed=self.hp.seed + 1, split="val")
        bs = getattr(self.hp, self.batch_size_key)
        base = DistributedSampler(self.train_set, shuffle=False) if self.env.enabled else SequentialSampler(self.train_set)
        self.sampler = ResumableSampler(base)
        self.sampler.skip = self.epoch_step * bs  # per process: each rank has trained epoch_step batches
        workers = self.hp.num_workers
        self.train_loader = DataLoader(self.train_set, batch_size=bs, sampler=self.sampler, shuffle=False,
                                       num_workers=workers, drop_last=len(self.train_set) >= bs,
                                       persistent_workers=False, pin_memory=self.device.type == "cuda")
        self.val_loader = DataLoader(self.val_set, batch_size=bs, shuffle=False, num_workers=workers)

    def evaluate(self, writer=None) -> Dict[str, float]:
        sums, n = defaultdict(float), 0
        models = self.models()
        for m in models:
            m.eval()
        shown = False
        with torch.no_grad():
            for i, batch in enumerate(self.val_loader):
                if i >= self.hp.eval_steps:
                    break
                batch = self.to_device(batch)
                for k, v in self.eval_step(batch).items():
                    sums[k] += v
                n += 1
                if writer is not None and not shown:
                    self.log_images(writer, batch)
                    shown = True
        for m in models:
            m.train()
        metrics = {k: self.env.mean(v / max(n, 1)) for k, v in sums.items()}
        return metrics

    def models(self):
        return []

    def run(self):
        from lipsync.core.progress import progress_bar

        self.setup()
        self.loaders()
        writer = None
        if self.env.main:
            os.makedirs(self.args.checkpoint_dir, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(self.args.checkpoint_dir, "logs"))
        ckpt_every = getattr(self.hp, self.checkpoint_interval_key)
        eval_every = getattr(self.hp, self.eval_interval_key)
        max_steps = self.args.max_steps
        if max_steps is not None and self.global_step >= max_steps:
            log.info("already at step %d >= --max_steps %d", self.global_step, max_steps)
            return
        running, count = defaultdict(float), 0
        bar = progress_bar(total=max_steps, initial=self.global_step, desc=self.__class__.__name__, unit="step",
                           disable=self.args.quiet or not self.env.main, dynamic_ncols=True)
        t0 = time.perf_counter()
        samples = 0
        try:
            while self.global_epoch < self.hp.nepochs:
                self.train_set.set_epoch(self.global_epoch)
                self.sampler.set_epoch(self.global_epoch)
                for batch in self.train_loader:
                    batch = self.to_device(batch)
                    self.apply_lr_schedule()
                    losses = self.train_step(batch)
                    self.global_step += 1
                    self.epoch_step += 1
                    samples += len(batch[0]) * self.env.world
                    count += 1
                    for k, v in losses.items():
                        running[k] += v
                    bar.update(1)
                    bar.set_postfix({k: f"{v / count:.4f}" for k, v in running.items()})
                    if writer is not None:
                        for k, v in losses.items():
                            writer.add_scalar(f"train/{k}", v, self.global_step)
                        for k, v in self.extra_state.items():
                            if isinstance(v, (int, float)):
                                writer.add_scalar(f"train/{k}", v, self.global_step)
                        writer.add_scalar("train/lr", self.lr(), self.global_step)
                    done = max_steps is not None and self.global_step >= max_steps
                    if self.global_step % eval_every == 0 or done:
                        metrics = self.evaluate(writer)
                        if writer is not None:
                            for k, v in metrics.items():
                                writer.add_scalar(f"val/{k}", v, self.global_step)
                        self.after_eval(metrics)
                        if self.env.main:
                            bar.write(f"step {self.global_step}: " + ", ".join(f"val {k} {v:.4f}" for k, v in metrics.items())
                                      + "".join(f", {k} {v}" for k, v in self.extra_state.items()))
                        value = metrics.get(self.best_metric)
                        is_best = self.improves(value)
                        if is_best:
                            self.best = value
                        self.save(best=is_best)
                    elif self.global_step == 1 or self.global_step % ckpt_every == 0:
                        self.save()
                    if done:
                        return
                self.global_epoch += 1
                self.epoch_step = 0
        finally:
            bar.close()
            elapsed = time.perf_counter() - t0
            if self.env.main and samples:
                log.info("%d samples in %.1f s (%.1f samples/s)", samples, elapsed, samples / elapsed)
                self.samples_per_second = samples / elapsed
            if writer is not None:
                writer.close()

    def lr(self) -> float:
        """The generator's / expert's learning rate at the current step."""
        return float(getattr(self.hp, self.lr_key)) * lr_factor(self.global_step, self.hp)

    def optimizers(self) -> list:
        """(optimizer, base learning rate) pairs the schedule drives."""
        return [(self.opt, float(getattr(self.hp, self.lr_key)))]

    def apply_lr_schedule(self):
        factor = lr_factor(self.global_step, self.hp)
        for opt, base in self.optimizers():
            for group in opt.param_groups:
                group["lr"] = base * factor


def lr_factor(step: int, hp: HParams) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based: the step about to be taken)."""
    if hp.lr_schedule == "constant" or hp.lr_decay_steps <= 0:
        return 1.0
    t = min(step / hp.lr_decay_steps, 1.0)
    return hp.lr_min_ratio + (1.0 - hp.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def seed_everything(seed: int, rank: int = 0):
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)




def main_for(trainer_cls, description: str, argv=None, needs_expert=False, needs_disc=False) -> int:
    """The whole ``main()`` of a training script."""
    parser = build_parser(description, needs_expert, needs_disc)
    args = parser.parse_args(argv)
    try:  # unknown keys and unparsable values are usage errors; tiny takes every audio setting
        get_hparams(args.preset or "tiny", args.hparams)
    except HParamsError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from lipsync.core.errors import run_main

    def train() -> int:
        args.preset, source = choose_preset(args, needs_expert)
        hp = get_hparams(args.preset, args.hparams)
        if os.environ.get("RANK", "0") == "0":
            print(layout_banner(trainer_cls.script, args.preset, source, hp), flush=True)
        env = Dist(args.device)
        try:
            seed_everything(hp.seed, env.rank)
            trainer = trainer_cls(args, hp, env)
            trainer.run()
            env.barrier()
        finally:
            env.close()
        return 0

    # a project error (bad data, checkpoint, device, flag) or a missing file: one error line, exit 2
    return run_main(train)
