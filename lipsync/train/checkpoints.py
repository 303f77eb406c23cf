"""Training checkpoints and what a run takes from them: the files (atomic writes, step names, the
latest, pruning), loading weights and optimizer state, the sampler that resumes mid-epoch, and the
preset a run trains (the one it was asked for, the one the checkpoint it resumes records, or the
expert's) with the first line a training script prints about it.

A checkpoint is one dict: the published ``state_dict`` / ``optimizer`` / ``global_step`` /
``global_epoch`` plus what resume needs (see :meth:`lipsync.train.training.Trainer.state`).
"""
from __future__ import annotations

import glob
import logging
import os
import re
from typing import List, Optional, Tuple

import torch
from torch.utils.data import Sampler

from hparams import PRESETS, TRAINING_DEFAULT_PRESET, HParams, get_hparams, preset_for_layout
from lipsync.core.fileio import atomic_write

log = logging.getLogger("train")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model a DistributedDataParallel wrapper holds (what a checkpoint saves), else ``model``."""
    return getattr(model, "module", model)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def save_atomic(obj: dict, path: str) -> None:
    """torch.save ``obj`` to ``path`` through a temporary file (:func:`lipsync.core.fileio.atomic_write`)."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def step_path(checkpoint_dir: str, prefix: str, step: int) -> str:
    return os.path.join(checkpoint_dir, f"{prefix}checkpoint_step{step:09d}.pth")


def step_checkpoints(checkpoint_dir: str, prefix: str) -> List[Tuple[int, str]]:
    """(step, path) of the step checkpoints ``<prefix>checkpoint_step<9 digits>.pth``, by step."""
    pattern = re.compile(re.escape(prefix) + r"checkpoint_step(\d{9})\.pth")
    return sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.pth"))
                  if (m := pattern.fullmatch(os.path.basename(p))))


def latest_checkpoint(checkpoint_dir: str, prefix: str = "") -> Optional[str]:
    """The step checkpoint with the highest step (what a resumed run continues from), or None."""
    found = step_checkpoints(checkpoint_dir, prefix)
    return found[-1][1] if found else None


def prune(checkpoint_dir: str, prefix: str, keep: int, current: Optional[str] = None) -> None:
    """Keep the newest ``keep`` step checkpoints with this prefix (the best one is a separate file),
    and always ``current`` (the one just written, even where an earlier run left higher steps)."""
    found = [(step, p) for step, p in step_checkpoints(checkpoint_dir, prefix) if p != current]
    extra = 1 if current is not None else 0
    for _, path in found[:-(keep - extra)] if keep - extra > 0 else (found if keep > 0 else []):
        os.remove(path)


def load_training_checkpoint(path: str, model: torch.nn.Module, optimizer=None) -> dict:
    """Weights (any accepted format) into ``model``; optimizer state when it fits. Returns the dict."""
    from models.checkpoint import CheckpointError, read_checkpoint, strip_wrapper_prefixes

    ckpt = read_checkpoint(path)
    state = strip_wrapper_prefixes(ckpt["state_dict"])
    try:
        unwrap(model).load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path!r} does not fit this model ({first[1].strip() if len(first) > 1 else first[0]})"
                              ) from None
    if optimizer is not None and ckpt.get("optimizer"):
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            log.warning("optimizer state in %s does not fit (%s); starting the optimizer afresh", path, exc)
    return ckpt


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------
class ResumableSampler(Sampler):
    """Another sampler's order, less the indices its first pass must skip: a run resumed in the middle
    of an epoch goes on with the batch after the last one trained, without loading the ones before."""

    def __init__(self, base):
        self.base = base
        self.skip = 0

    def set_epoch(self, epoch: int):
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        it = iter(self.base)
        for _ in range(skip):
            next(it, None)
        return it

    def __len__(self):
        return max(0, len(self.base) - self.skip)


# ------------------------------------------------------------------------------------------------
# The preset a run trains
# ------------------------------------------------------------------------------------------------
def recorded_preset(ckpt: dict, img_size: int, width: float) -> str:
    """The preset a training checkpoint was made with: the one it records (every checkpoint written
    since the layout became the training default does), else the one its weights' layout implies."""
    saved = ckpt.get("preset")
    return saved if saved in PRESETS else preset_for_layout(img_size, width)


def choose_preset(args, needs_expert: bool) -> Tuple[str, str]:
    """(preset, where it came from) for a training run: ``--preset``; else the run ``--checkpoint_path``
    resumes; else (generator trainers) the expert's layout; else :data:`TRAINING_DEFAULT_PRESET`.

    A generator trainer also checks that the generator it would train has the expert's face size: a
    96x96 expert cannot judge 288x288 faces (or the other way round), so that mix is a
    :class:`~models.checkpoint.CheckpointError` naming both."""
    from models.checkpoint import read_layout

    expert = None
    if needs_expert:
        ckpt, _, size, width = read_layout(args.syncnet_checkpoint_path, "expert")
        expert = (size, recorded_preset(ckpt, size, width))
    if args.preset:
        preset, source = args.preset, "--preset"
    elif args.checkpoint_path:
        ckpt, _, size, width = read_layout(args.checkpoint_path, "expert" if not needs_expert else "generator")
        preset, source = recorded_preset(ckpt, size, width), f"the checkpoint it resumes, {args.checkpoint_path}"
    elif expert is not None:
        preset, source = expert[1], f"the expert {args.syncnet_checkpoint_path}"
    else:
        preset, source = TRAINING_DEFAULT_PRESET, "the default"
    if expert is not None:
        img_size = get_hparams(preset, args.hparams).img_size
        if img_size != expert[0]:
            from models.checkpoint import CheckpointError

            raise CheckpointError(
                f"the expert {args.syncnet_checkpoint_path} is a {expert[0]}x{expert[0]} model (preset {expert[1]}), "
                f"but preset {preset} (from {source}) trains a {img_size}x{img_size} generator: pass "
                f"--preset {expert[1]}, or an expert trained with --preset {preset}")
    return preset, source


def layout_banner(script: str, preset: str, source: str, hp: HParams) -> str:
    """The first line a training script prints: the layout it trains, why, and how to pick another."""
    s = hp.img_size
    other = ("--preset 96 trains the paper's 96x96 layout" if s == 288 else
             "--preset 288 trains the 288x288 HQ layout (the default)")
    if source.startswith("the expert"):
        other += " (with an expert of that layout)"
    return (f"{script}: training the {s}x{s} layout (preset {preset}, width {hp.model_width:g}; from {source}); "
            f"{other}, --preset tiny a small 96x96 one for CPUs")
