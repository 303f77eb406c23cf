"""Reading model checkpoints: the published format, bare state dicts and wrapped (DDP / compiled) keys.

Everything that goes wrong raises :class:`CheckpointError` with a message meant for the user; the
command-line scripts print it as a one-line error.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass

import torch

from .syncnet import SyncNet_color
from .wav2lip import Wav2Lip, Wav2Lip_disc_qual
from lipsync.core.errors import Wav2LipError

KINDS = {
    "generator": ("Wav2Lip generator (e.g. wav2lip.pth, wav2lip_gan.pth)", Wav2Lip),
    "expert": ("lip-sync expert (e.g. lipsync_expert.pth)", SyncNet_color),
    "disc": ("visual-quality discriminator (e.g. disc_checkpoint_step*.pth)", Wav2Lip_disc_qual),
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(Wav2LipError, ValueError):
    """A checkpoint that cannot be used for what was asked."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    kind: str
    img_size: int
    width: float
    checkpoint: dict  # the whole file as read (counters, optimizer state, hparams, ...)


def read_checkpoint(path, map_location="cpu") -> dict:
    """torch.load with clear errors; always returns a dict (a bare state dict is wrapped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(
                f"{path!r} is a TorchScript archive, not a checkpoint; load it with torch.jit.load "
                "and save its state_dict() with torch.save, then pass that file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile,
            AttributeError, ImportError, IndexError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path!r}: the file is truncated, corrupt or not a "
                              f"PyTorch checkpoint ({first[:200]})") from None
    if isinstance(obj, torch.nn.Module) or type(obj).__name__.startswith("Recursive"):
        raise CheckpointError(f"{path!r} holds a whole module, not a state dict; save model.state_dict()")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r} does not hold a state dict (found {type(obj).__name__})")
    if "state_dict" not in obj:
        if not obj or not all(torch.is_tensor(v) for v in obj.values()):
            raise CheckpointError(f"{path!r} has neither a 'state_dict' entry nor tensors at the top level")
        obj = {"state_dict": obj}
    if not isinstance(obj["state_dict"], dict):
        raise CheckpointError(f"{path!r}: 'state_dict' is not a dict")
    return obj


def strip_wrapper_prefixes(state_dict: dict, extra: tuple = ()) -> dict:
    """Drop the ``module.`` (DataParallel / DDP) and ``_orig_mod.`` (torch.compile) prefixes, and any
    ``extra`` ones."""
    prefixes = tuple(_WRAPPER_PREFIXES) + tuple(extra)
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def detect_kind(state_dict: dict) -> str:
    keys = state_dict.keys()
    if any(k.startswith("face_decoder_blocks.") for k in keys) and any(k.startswith("audio_encoder.") for k in keys):
        return "generator"
    if any(k.startswith("binary_pred.") for k in keys):
        return "disc"
    if any(k.startswith("face_encoder.") for k in keys) and any(k.startswith("audio_encoder.") for k in keys):
        return "expert"
    if any(k.startswith(("conv1_1.", "conv3_3_norm", "fc7.")) for k in keys):
        return "s3fd"
    return "unknown"


def _count_blocks(state_dict, prefix):
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def _infer_width(state_dict: dict, cls, img_size: int) -> float:
    """The width multiplier that reproduces every channel count in ``state_dict``.

    Each scaled layer with published count p and found count c admits widths w with
    round(p * w) == c; the intersection of those intervals is non-empty for a checkpoint made by
    these models, and its midpoint rebuilds the same shapes.
    """
    with torch.device("meta"):  # shapes only, no memory or init cost
        published = cls(img_size=img_size, width=1.0).state_dict()
    lo, hi = 0.0, float("inf")
    for key, ref in published.items():
        if not key.endswith(".bias") or key not in state_dict or ref.numel() <= 3:
            continue  # output heads (3 or 1 channels) are never scaled
        p, c = ref.numel(), state_dict[key].numel()
        lo, hi = max(lo, (c - 0.5) / p), min(hi, (c + 0.5) / p)
    if not lo < hi:
        raise CheckpointError(f"the {cls.__name__} weights have channel counts that no width multiplier gives")
    width = (lo + hi) / 2
    for nice in (1.0, 0.5, 0.25, 0.125):  # report the round value when it fits
        if lo <= nice < hi:
            return nice
    return width


def detect_layout(state_dict: dict, kind: str) -> tuple[int, float]:
    """(img_size, width) from the weights alone."""
    if kind in ("generator", "disc"):
        img_size = {7: 96, 9: 288}.get(_count_blocks(state_dict, "face_encoder_blocks."))
    elif kind == "expert":
        img_size = {17: 96, 22: 288}.get(_count_blocks(state_dict, "face_encoder."))
    else:
        raise CheckpointError(f"cannot infer a layout for a {kind} checkpoint")
    if img_size is None:
        raise CheckpointError(f"the {kind} weights match neither the 96 nor the 288 layout")
    return img_size, _infer_width(state_dict, KINDS[kind][1], img_size)


def _describe(kind):
    return KINDS[kind][0] if kind in KINDS else {"s3fd": "S3FD face-detector checkpoint (s3fd.pth)"}.get(
        kind, "checkpoint of an unknown model")


def read_layout(path, kind: str) -> tuple[dict, dict, int, float]:
    """(the file as read, its state dict without wrapper prefixes, img_size, width) of a checkpoint
    that must hold a model of ``kind``; :class:`CheckpointError` when it holds something else."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}")
    ckpt = read_checkpoint(path)
    state = strip_wrapper_prefixes(ckpt["state_dict"])
    found = detect_kind(state)
    if found != kind:
        raise CheckpointError(f"{os.fspath(path)!r} looks like a {_describe(found)}, but a "
                              f"{_describe(kind)} was expected")
    size, width = detect_layout(state, kind)
    saved = ckpt.get("hparams") if isinstance(ckpt.get("hparams"), dict) else {}
    if "model_width" in saved and abs(float(saved["model_width"]) - width) < 0.01:
        width = float(saved["model_width"])  # exact value when the checkpoint recorded it
    return ckpt, state, size, width


def load_model(path, kind: str = "generator", device="cpu", img_size: int | None = None) -> LoadedModel:
    """Build the right model for a checkpoint file and load its weights.

    ``img_size`` (optional) is what the caller needs; a checkpoint of the other layout is refused.
    """
    ckpt, state, size, width = read_layout(path, kind)
    if img_size is not None and size != img_size:
        raise CheckpointError(f"{os.fspath(path)!r} is a {size}x{size} {kind}, but {img_size}x{img_size} "
                              "was asked for (check --preset / img_size)")
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        model = KINDS[kind][1](img_size=size, width=width)
    # the models compute in float32 whatever a file stores (a half-precision checkpoint is upcast)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(f"{os.fspath(path)!r} does not fit the {size}x{size} {kind} layout "
                              f"(width {width:g}): {' '.join(lines)[:300]}") from None
    model.to(device)
    return LoadedModel(model=model, kind=kind, img_size=size, width=width, checkpoint=ckpt)
