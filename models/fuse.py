"""Inference-time speedups that keep the model's function: BatchNorm folded into the convolutions."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``conv_block = Sequential(conv, BatchNorm2d)`` into one convolution (eval mode only)."""
    model.eval()
    for module in model.modules():
        block = getattr(module, "conv_block", None)
        if isinstance(block, nn.Sequential) and len(block) == 2 and isinstance(block[1], nn.BatchNorm2d):
            conv = block[0]
            transpose = isinstance(conv, nn.ConvTranspose2d)
            module.conv_block = nn.Sequential(fuse_conv_bn_eval(conv, block[1], transpose=transpose))
    return model
