"""Inference-time speedups that keep the model's function: BatchNorm folded into the convolutions."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``conv_block = Sequential(conv, BatchNorm2d)`` into one convolution (eval mode only)."""
    model.eval()
    for module in model.modules():
        block = getattr(module, "conv_block", None)
        if isinstance(block, nn.Sequential) and len(block) == 2 and isinstance(block[1], nn.BatchNorm2d):
            conv, bn = block[0], block[1]
            # in place (torch's fuse_conv_bn_eval deep-copies every convolution first)
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias,
                                                          transpose=isinstance(conv, nn.ConvTranspose2d))
            module.conv_block = nn.Sequential(conv)
    return model
