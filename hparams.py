"""Typed hyperparameters, presets and `--hparams key=value,...` overrides.

The field defaults are the published 96x96 settings. Presets change a few of them:

- ``96``:   the published Wav2Lip settings (same as the defaults): the paper's layout.
- ``288``:  the HQ layout (288x288 faces, 1024-wide expert), batch sizes that fit a 24 GB GPU. The
  training scripts train it when no ``--preset`` is given (:data:`TRAINING_DEFAULT_PRESET`), as the
  repository of the seed notebook does with the same command lines.
- ``tiny``: 96x96 faces with a quarter of the channels and small batches, for CPU tests and the demo.

Every script calls :func:`add_hparams_args` and :func:`hparams_from_args`; a key that does not exist
or a value that does not parse as the field's type is an error that names the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, fields
from lipsync.core.errors import Wav2LipError

# ---- the audio front end every published checkpoint was trained on, defined once ----
# audio.py re-exports these (``audio.SAMPLE_RATE``); the HParams defaults below are these values.
SAMPLE_RATE = 16000     # Hz: every waveform is resampled to this before the mel
HOP_SIZE = 200          # samples between mel columns: 16000 / 200 = 80 columns per second
WIN_SIZE = 800          # samples per STFT window (50 ms)
N_FFT = 800
NUM_MELS = 80           # mel bands: the height of every audio window the models take
MEL_STEP_SIZE = 16      # mel columns per audio window (0.2 s): the width the models take
FMIN = 55.0             # Hz, lowest mel band edge
FMAX = 7600.0           # Hz, highest mel band edge
PREEMPHASIS = 0.97      # pre-emphasis filter coefficient (applied when preemphasize)
MIN_LEVEL_DB = -100.0   # dB floor before normalisation
REF_LEVEL_DB = 20.0     # dB subtracted before normalisation
MAX_ABS_VALUE = 4.0     # normalised mels lie in [-4, 4] (symmetric_mels)


@dataclass
class HParams:
    # ---- audio (must match the published checkpoints: see AUDIO_KEYS) ----
    num_mels: int = NUM_MELS
    rescale: bool = True
    rescaling_max: float = 0.9
    n_fft: int = N_FFT
    hop_size: int = HOP_SIZE
    win_size: int = WIN_SIZE
    sample_rate: int = SAMPLE_RATE
    signal_normalization: bool = True
    allow_clipping_in_normalization: bool = True
    symmetric_mels: bool = True
    max_abs_value: float = MAX_ABS_VALUE
    preemphasize: bool = True
    preemphasis: float = PREEMPHASIS
    min_level_db: float = MIN_LEVEL_DB
    ref_level_db: float = REF_LEVEL_DB
    fmin: float = FMIN
    fmax: float = FMAX

    # ---- video / windows ----
    img_size: int = 96
    fps: float = 25.0
    syncnet_T: int = 5
    syncnet_mel_step_size: int = MEL_STEP_SIZE

    # ---- models ----
    model_width: float = 1.0  # channel multiplier; 1.0 is the published layout

    # ---- generator training ----
    batch_size: int = 16
    initial_learning_rate: float = 1e-4
    nepochs: int = 200000000000000000
    num_workers: int = 16
    # decoded, resized face crops kept in memory per data-loading process (0: read every time); a
    # small corpus fits and then costs no JPEG decoding after the first epoch
    frame_cache_mb: int = 0
    checkpoint_interval: int = 3000
    eval_interval: int = 3000
    eval_steps: int = 700
    save_optimizer_state: bool = True
    keep_last_checkpoints: int = 3
    seed: int = 0
    # learning-rate schedule of every optimizer, a function of the global step (so resume continues
    # it): "constant", or "cosine" from the base rate down to lr_min_ratio x base at lr_decay_steps
    lr_schedule: str = "constant"
    lr_decay_steps: int = 0
    lr_min_ratio: float = 0.05

    # sync-loss weight schedule: 0 until the eval sync loss falls under the threshold, then
    # syncnet_wt_gan (GAN trainers) or syncnet_wt_l1 (plain trainer)
    syncnet_wt: float = 0.0
    syncnet_wt_threshold: float = 0.75
    syncnet_wt_l1: float = 0.01
    syncnet_wt_gan: float = 0.03

    # ---- expert training ----
    syncnet_batch_size: int = 64
    syncnet_lr: float = 1e-4
    # decoupled weight decay of the expert's optimiser (AdamW, Loshchilov & Hutter 2019, "Decoupled Weight
    # Decay Regularization"); 0 keeps the published plain Adam
    syncnet_weight_decay: float = 0.0
    syncnet_eval_interval: int = 10000
    syncnet_checkpoint_interval: int = 10000
    # random flip, colour gain / offset and a small zoom of each training window (the same for its
    # 5 frames): the expert then generalises to faces it has not seen instead of memorising them
    syncnet_augment: bool = False
    # which validation score picks checkpoint_best.pth: "loss" (BCE, lowest) or "auc" (ROC AUC of in-sync
    # against off-sync pairs, highest: how well the expert ranks, what sync correction and LSE rely on)
    syncnet_best_metric: str = "loss"

    # ---- visual-quality discriminator ----
    disc_wt: float = 0.07
    disc_initial_learning_rate: float = 1e-4
    wgan_gp_weight: float = 10.0

    # ---- numerics ----
    amp: str = "none"  # none | bf16 | fp16 (CUDA only; the CPU always trains in float32)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "HParams":
        return apply_overrides(self, changes)


PRESETS: dict[str, dict] = {
    "96": {},
    "288": {
        "img_size": 288,
        "batch_size": 8,
        "syncnet_batch_size": 32,
        "syncnet_wt_gan": 0.03,
    },
    "tiny": {
        "img_size": 96,
        "model_width": 0.25,
        "batch_size": 4,
        "syncnet_batch_size": 16,
        "num_workers": 0,
        "frame_cache_mb": 1024,
        "checkpoint_interval": 50,
        "eval_interval": 50,
        "eval_steps": 8,
        "syncnet_eval_interval": 50,
        "syncnet_checkpoint_interval": 50,
        "initial_learning_rate": 5e-4,
        "syncnet_lr": 5e-4,
    },
}

# The fields that define the mel spectrogram (what mel.npy caches record). The published 96 and 288
# layouts were trained on the defaults: their presets refuse overrides of these. num_mels and the
# window width are the shape of the models' audio input, so no preset takes other values.
AUDIO_KEYS = ("num_mels", "n_fft", "hop_size", "win_size", "sample_rate", "signal_normalization",
              "allow_clipping_in_normalization", "symmetric_mels", "max_abs_value", "preemphasize", "preemphasis",
              "min_level_db", "ref_level_db", "fmin", "fmax", "syncnet_mel_step_size")
MODEL_SHAPE_KEYS = ("num_mels", "syncnet_mel_step_size")
PUBLISHED_PRESETS = ("96", "288")
# what color_syncnet_train.py trains without --preset (and a generator trainer without --preset or an
# expert that says otherwise): the seed notebook's lines, typed as written, train the HQ layout
TRAINING_DEFAULT_PRESET = "288"

_ALLOWED_CHOICES = {"amp": ("none", "bf16", "fp16"), "img_size": (96, 288), "lr_schedule": ("constant", "cosine"),
                    "syncnet_best_metric": ("loss", "auc")}


class HParamsError(Wav2LipError, ValueError):
    """A preset or override that does not name a known setting or does not parse."""


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(HParams)
    return {f.name: hints[f.name] for f in fields(HParams)}


def _coerce(key: str, value, typ: type):
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise HParamsError(f"hparam {key!r} is a bool; got {value!r} (use true/false)")
    if typ is int:
        if isinstance(value, bool):
            raise HParamsError(f"hparam {key!r} is an int; got {value!r}")
        if isinstance(value, int):
            return value
        text = str(value).strip()
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
            raise HParamsError(f"hparam {key!r} is an int; got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise HParamsError(f"hparam {key!r} is a float; got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HParamsError(f"hparam {key!r} is a float; got {value!r}") from None
    return str(value).strip()


def apply_overrides(hp: HParams, overrides: dict) -> HParams:
    types = _field_types()
    values = hp.to_dict()
    for key, raw in overrides.items():
        if key not in types:
            known = ", ".join(sorted(types))
            raise HParamsError(f"unknown hparam {key!r}; known keys: {known}")
        value = _coerce(key, raw, types[key])
        allowed = _ALLOWED_CHOICES.get(key)
        if allowed is not None and value not in allowed:
            raise HParamsError(f"hparam {key!r} must be one of {allowed}; got {value!r}")
        values[key] = value
    if values["model_width"] <= 0:
        raise HParamsError(f"hparam 'model_width' must be > 0; got {values['model_width']}")
    if values["syncnet_weight_decay"] < 0:
        raise HParamsError(f"hparam 'syncnet_weight_decay' must be >= 0; got {values['syncnet_weight_decay']}")
    return HParams(**values)


def parse_overrides(text: str | None) -> dict:
    """Parse ``"key=value,key2=value2"`` into a dict of strings (types are checked later)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise HParamsError(f"--hparams entry {item!r} is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def check_audio_overrides(preset: str, hp: HParams) -> None:
    """Raise :class:`HParamsError` when ``hp`` changes the audio front end where it cannot work: any
    of :data:`AUDIO_KEYS` in a published layout (``96``, ``288``), whose checkpoints only understand
    mels made the published way; the window shape (80 mels x 16 columns) and the frame rate (25 fps,
    what preprocess.py writes) in any preset."""
    default = HParams()
    changed = [k for k in AUDIO_KEYS if getattr(hp, k) != getattr(default, k)]
    fixed = [k for k in changed if k in MODEL_SHAPE_KEYS]
    if fixed:
        raise HParamsError(f"hparam {fixed[0]!r} cannot change: the models' audio encoder takes {NUM_MELS}-band, "
                           f"{MEL_STEP_SIZE}-column mel windows")
    if hp.fps != default.fps:
        raise HParamsError(f"hparam 'fps' cannot change: preprocess.py writes frames at {default.fps:g} fps, and "
                           "training pairs frame k with the mel window at column int(80 k / fps), so another "
                           "value would pair every frame with the wrong audio")
    if changed and preset in PUBLISHED_PRESETS:
        raise HParamsError(f"hparam {changed[0]!r} is part of the audio front end ({SAMPLE_RATE} Hz, hop {HOP_SIZE}, "
                           f"window {WIN_SIZE}, {NUM_MELS} mels, {FMIN:g}-{FMAX:g} Hz, normalised to "
                           f"+-{MAX_ABS_VALUE:g}) the published {preset} layout was trained with; its checkpoints "
                           f"read other mels as noise. Experiment with it under --preset tiny")


def get_hparams(preset: str = "96", overrides: str | dict | None = None) -> HParams:
    """The preset's hparams with ``overrides`` (``"k=v,..."`` or a dict) applied. Raises
    :class:`HParamsError` for an unknown preset, key or value, or an audio override the preset
    cannot take (:func:`check_audio_overrides`)."""
    if preset not in PRESETS:
        raise HParamsError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    hp = apply_overrides(HParams(), PRESETS[preset])
    if isinstance(overrides, str):
        overrides = parse_overrides(overrides)
    hp = apply_overrides(hp, overrides or {})
    check_audio_overrides(preset, hp)
    return hp


def from_dict(values: dict) -> HParams:
    """Rebuild hparams saved in a checkpoint; keys this version does not know are ignored."""
    known = {f.name for f in fields(HParams)}
    return apply_overrides(HParams(), {k: v for k, v in values.items() if k in known})


def preset_for_layout(img_size: int, width: float) -> str:
    """The preset that trains models of this layout: 288 -> ``288``; 96 at the published width ->
    ``96``; a narrower 96 model -> ``tiny``. For checkpoints that did not record their preset."""
    if img_size == 288:
        return "288"
    return "96" if width >= 1.0 else "tiny"


def add_hparams_args(parser: argparse.ArgumentParser, default_preset: str | None = "96",
                     preset_help: str = "hyperparameter preset (default: %(default)s)") -> None:
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS), help=preset_help)
    parser.add_argument("--hparams", default="",
                        help='comma-separated overrides, e.g. "batch_size=8,syncnet_wt=0.03"')


def hparams_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> HParams:
    try:
        return get_hparams(args.preset, args.hparams)
    except HParamsError as exc:
        if parser is not None:
            parser.error(str(exc))
        raise


# Module-level defaults, for code that only needs the audio constants.
hparams = HParams()
