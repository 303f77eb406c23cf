"""Convolution blocks with the published module layout (``conv_block.0`` conv, ``conv_block.1`` norm),
so state-dict keys match the published checkpoints."""
from __future__ import annotations

from torch import nn


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky":
        return nn.LeakyReLU(0.2)
    raise ValueError(f"unknown activation {name!r}")


class Conv2d(nn.Module):
    """Conv -> BatchNorm -> activation, with an optional identity shortcut before the activation."""

    def __init__(self, cin, cout, kernel_size, stride, padding, residual=False, act="relu"):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding),
                                        nn.BatchNorm2d(cout))
        self.act = _activation(act)
        self.residual = residual
        if residual and (cin != cout or stride not in (1, (1, 1))):
            raise ValueError("a residual block keeps its shape: cin == cout and stride 1")

    def forward(self, x):
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class nonorm_Conv2d(nn.Module):  # noqa: N801 - the published name
    """Conv -> LeakyReLU(0.01), no normalisation (the visual-quality discriminator)."""

    def __init__(self, cin, cout, kernel_size, stride, padding, residual=False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel_size, stride, padding))
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        return self.act(self.conv_block(x))


class Conv2dTranspose(nn.Module):
    """Transposed conv -> BatchNorm -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride, padding, output_padding=0):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv_block(x))


def scaled(channels: int, width: float) -> int:
    """Channel count for a width multiplier (1.0 keeps the published count)."""
    return max(1, int(round(channels * width)))


def build_stack(cin: int, spec, width: float, block=Conv2d, **block_kwargs):
    """Build layers from ``(cout, kernel, stride, padding, residual)`` rows; returns (layers, cout).

    A row whose residual flag is true keeps the channel count of the previous layer.
    """
    layers = []
    for cout, k, s, p, res in spec:
        cout = scaled(cout, width)
        if block is nonorm_Conv2d:
            layers.append(block(cin, cout, k, s, p))
        else:
            layers.append(block(cin, cout, k, s, p, residual=res, **block_kwargs))
        cin = cout
    return layers, cin
