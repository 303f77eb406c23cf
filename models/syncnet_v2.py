"""The SyncNet of the public syncnet_python release (``syncnet_v2.model``), used to score lip sync
the way papers do (LSE-D / LSE-C).

Inputs, as that release prepares them:
- lips: (B, 3, 5, 224, 224) float, five consecutive 224x224 face-track crops, BGR, raw 0-255 values;
- audio: (B, 1, 13, 20) float, 13 MFCCs (python_speech_features defaults, 100 frames/s) over the
  0.2 s that starts at the first of those five video frames.
Both towers end in 1024-d features that are compared with the Euclidean distance, unnormalised.

The module and sub-module names are the release's (``netcnnaud``, ``netfcaud``, ``netcnnlip``,
``netfclip`` with the same layer indices), so its state dict loads without renaming.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# ("conv", cin, cout, kernel, stride, padding) is conv + BN + ReLU; ("pool", kernel, stride, padding)
AUDIO_LAYERS = [
    ("conv", 1, 64, (3, 3), (1, 1), (1, 1)), ("pool", (1, 1), (1, 1), 0),
    ("conv", 64, 192, (3, 3), (1, 1), (1, 1)), ("pool", (3, 3), (1, 2), 0),
    ("conv", 192, 384, (3, 3), (1, 1), (1, 1)),
    ("conv", 384, 256, (3, 3), (1, 1), (1, 1)),
    ("conv", 256, 256, (3, 3), (1, 1), (1, 1)), ("pool", (3, 3), (2, 2), 0),
    ("conv", 256, 512, (5, 4), (1, 1), (0, 0)),
]
LIP_LAYERS = [
    ("conv", 3, 96, (5, 7, 7), (1, 2, 2), 0), ("pool", (1, 3, 3), (1, 2, 2), 0),
    ("conv", 96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), ("pool", (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("pool", (1, 3, 3), (1, 2, 2), 0),
    ("conv", 256, 512, (1, 6, 6), (1, 1, 1), 0),
]
EMBEDDING_DIM = 1024


def _tower(spec, dims: int) -> nn.Sequential:
    conv, bn, pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)
    layers = []
    for row in spec:
        if row[0] == "conv":
            _, cin, cout, k, s, p = row
            layers += [conv(cin, cout, kernel_size=k, stride=s, padding=p), bn(cout), nn.ReLU(inplace=True)]
        else:
            _, k, s, p = row
            layers.append(pool(kernel_size=k, stride=s, padding=p))
    return nn.Sequential(*layers)


def _head(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


class SyncNetV2(nn.Module):
    """``forward_aud(mfcc (B,1,13,20))`` and ``forward_lip(lips (B,3,5,224,224))`` -> (B, 1024)."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        self.netcnnaud = _tower(AUDIO_LAYERS, 2)
        self.netfcaud = _head(embedding_dim)
        self.netfclip = _head(embedding_dim)
        self.netcnnlip = _tower(LIP_LAYERS, 3)

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))


def load_syncnet_v2(path: str, device="cpu") -> SyncNetV2:
    """The release's ``syncnet_v2.model`` (a state dict; wrapper prefixes are stripped), in eval mode."""
    from models.checkpoint import CheckpointError, read_checkpoint, strip_wrapper_prefixes

    state = strip_wrapper_prefixes(read_checkpoint(path)["state_dict"], extra=("__S__.",))
    model = SyncNetV2()
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    if missing:
        raise CheckpointError(f"{path}: not a syncnet_python SyncNet state dict (missing {len(missing)} tensors, "
                              f"e.g. {missing[:3]})")
    bad = [k for k in ours if tuple(state[k].shape) != tuple(ours[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: tensor shapes differ from syncnet_python's SyncNet for {bad[:3]}")
    model.load_state_dict({k: state[k] for k in ours})
    return model.to(device).eval()
