"""Wav2Lip models under the published names, factories from hparams, and checkpoint loading."""
from .checkpoint import (CheckpointError, LoadedModel, detect_kind, detect_layout, load_model,
                         read_checkpoint, strip_wrapper_prefixes)
from .conv import Conv2d, Conv2dTranspose, nonorm_Conv2d
from .syncnet import SyncNet_color, cosine_sync_probability
from .wav2lip import Wav2Lip, Wav2Lip_disc_qual


def build_generator(hp):
    return Wav2Lip(img_size=hp.img_size, width=hp.model_width)


def build_expert(hp):
    return SyncNet_color(img_size=hp.img_size, width=hp.model_width)


def build_disc(hp):
    return Wav2Lip_disc_qual(img_size=hp.img_size, width=hp.model_width)


__all__ = [
    "CheckpointError", "Conv2d", "Conv2dTranspose", "LoadedModel", "SyncNet_color", "Wav2Lip",
    "Wav2Lip_disc_qual", "build_disc", "build_expert", "build_generator", "cosine_sync_probability",
    "detect_kind", "detect_layout", "load_model", "nonorm_Conv2d", "read_checkpoint",
    "strip_wrapper_prefixes",
]
