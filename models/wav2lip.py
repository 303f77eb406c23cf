"""The generator (``Wav2Lip``) and the visual-quality discriminator (``Wav2Lip_disc_qual``).

Layer tables are written once per layout; the 96 tables are the published Wav2Lip, the 288 tables
the HQ layout. Rows are ``(out_channels, kernel, stride, padding, residual)``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .conv import Conv2d, Conv2dTranspose, build_stack, nonorm_Conv2d, scaled

R = True   # residual row
N = False  # plain row


def _res(c, n):
    return [(c, 3, 1, 1, R)] * n


# ---- generator: identity (face) encoder, one list of rows per skip level ----
FACE_ENCODER = {
    96: [
        [(16, 7, 1, 3, N)],                                  # 96
        [(32, 3, 2, 1, N)] + _res(32, 2),                    # 48
        [(64, 3, 2, 1, N)] + _res(64, 3),                    # 24
        [(128, 3, 2, 1, N)] + _res(128, 2),                  # 12
        [(256, 3, 2, 1, N)] + _res(256, 2),                  # 6
        [(512, 3, 2, 1, N)] + _res(512, 1),                  # 3
        [(512, 3, 1, 0, N), (512, 1, 1, 0, N)],              # 1
    ],
    288: [
        [(16, 7, 1, 3, N)],                                  # 288
        [(32, 5, 2, 2, N)] + _res(32, 1),                    # 144
        [(32, 3, 2, 1, N)] + _res(32, 2),                    # 72
        [(64, 3, 2, 1, N)] + _res(64, 3),                    # 36
        [(128, 3, 2, 1, N)] + _res(128, 2),                  # 18
        [(256, 3, 2, 1, N)] + _res(256, 2),                  # 9
        [(512, 3, 2, 1, N)] + _res(512, 1),                  # 5
        [(512, 3, 1, 0, N), (512, 1, 1, 0, N)],              # 3
        [(512, 3, 1, 0, N), (512, 1, 1, 0, N)],              # 1
    ],
}

# ---- generator: speech encoder, (1, 80, 16) mel window -> (512, 1, 1); same for both layouts ----
AUDIO_ENCODER = (
    [(32, 3, 1, 1, N)] + _res(32, 2)
    + [(64, 3, (3, 1), 1, N)] + _res(64, 2)
    + [(128, 3, 3, 1, N)] + _res(128, 2)
    + [(256, 3, (3, 2), 1, N)] + _res(256, 1)
    + [(512, 3, 1, 0, N), (512, 1, 1, 0, N)]
)

# ---- generator: decoder, after a 1x1 conv on the audio embedding; rows are
# (out_channels, kernel, stride, padding, output_padding, residual_layers); input channels follow
# from the skip connections ----
FACE_DECODER = {
    96: [(512, 3, 1, 0, 0, 1), (512, 3, 2, 1, 1, 2), (384, 3, 2, 1, 1, 2),
         (256, 3, 2, 1, 1, 2), (128, 3, 2, 1, 1, 2), (64, 3, 2, 1, 1, 2)],
    288: [(512, 3, 1, 0, 0, 1), (512, 3, 2, 1, 0, 2), (512, 3, 2, 1, 0, 2), (384, 3, 2, 1, 1, 2),
          (256, 3, 2, 1, 1, 2), (128, 3, 2, 1, 1, 2), (64, 3, 2, 1, 1, 2), (64, 3, 2, 1, 1, 2)],
}

# ---- visual-quality discriminator on the lower half (H/2 x W); rows without the residual flag ----
DISC_ENCODER = {
    96: [
        [(32, 7, 1, 3)],
        [(64, 5, (1, 2), 2), (64, 5, 1, 2)],
        [(128, 5, 2, 2), (128, 5, 1, 2)],
        [(256, 5, 2, 2), (256, 5, 1, 2)],
        [(512, 3, 2, 1), (512, 3, 1, 1)],
        [(512, 3, 2, 1), (512, 3, 1, 1)],
        [(512, 3, 1, 0), (512, 1, 1, 0)],
    ],
    288: [
        [(32, 7, 1, 3)],
        [(64, 5, (1, 2), 2), (64, 5, 1, 2)],
        [(128, 5, 2, 2), (128, 5, 1, 2)],
        [(128, 5, 2, 2), (128, 5, 1, 2)],
        [(256, 5, 2, 2), (256, 5, 1, 2)],
        [(256, 5, 2, 2), (256, 5, 1, 2)],
        [(512, 3, 2, 1), (512, 3, 1, 1)],
        [(512, 3, 2, 1), (512, 3, 1, 1)],
        [(512, 3, 1, 0), (512, 1, 1, 0)],
    ],
}


def check_img_size(img_size: int) -> int:
    if img_size not in FACE_ENCODER:
        raise ValueError(f"img_size must be one of {sorted(FACE_ENCODER)}, got {img_size!r}")
    return img_size


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (T*B, C, H, W), frame-major as the published code orders it."""
    return torch.cat([x[:, :, i] for i in range(x.size(2))], dim=0)


class Wav2Lip(nn.Module):
    """Generator: (mel window, masked target + reference face) -> lower-face-completed face.

    ``audio``: (B, 1, 80, 16) or (B, T, 1, 80, 16); ``face``: (B, 6, S, S) or (B, 6, T, S, S),
    values in [0, 1]; channels 0-2 are the target with its lower half zeroed, 3-5 the reference.
    """

    def __init__(self, img_size: int = 96, width: float = 1.0):
        super().__init__()
        self.img_size = check_img_size(img_size)
        self.width = width
        cin = 6
        skip_channels = []
        blocks = []
        for rows in FACE_ENCODER[img_size]:
            layers, cin = build_stack(cin, rows, width)
            blocks.append(nn.Sequential(*layers))
            skip_channels.append(cin)
        self.face_encoder_blocks = nn.ModuleList(blocks)

        layers, audio_channels = build_stack(1, AUDIO_ENCODER, width)
        self.audio_encoder = nn.Sequential(*layers)

        c = scaled(512, width)
        decoder = [nn.Sequential(Conv2d(audio_channels, c, 1, 1, 0))]
        skips = list(skip_channels)
        for cout, k, s, p, op, n_res in FACE_DECODER[img_size]:
            cin = c + skips.pop()
            c = scaled(cout, width)
            layers = [Conv2dTranspose(cin, c, k, s, p, op)]
            layers += [Conv2d(c, c, 3, 1, 1, residual=True) for _ in range(n_res)]
            decoder.append(nn.Sequential(*layers))
        self.face_decoder_blocks = nn.ModuleList(decoder)

        cin = c + skips.pop()
        head = scaled(32, width)
        self.output_block = nn.Sequential(Conv2d(cin, head, 3, 1, 1), nn.Conv2d(head, 3, 1, 1, 0),
                                          nn.Sigmoid())

    def forward(self, audio_sequences, face_sequences):
        B = audio_sequences.size(0)
        sequence = face_sequences.dim() > 4
        if sequence:
            audio_sequences = torch.cat([audio_sequences[:, i] for i in range(audio_sequences.size(1))], dim=0)
            face_sequences = frames_to_batch(face_sequences)

        x = self.audio_encoder(audio_sequences)
        feats = []
        f = face_sequences
        for block in self.face_encoder_blocks:
            f = block(f)
            feats.append(f)
        for block in self.face_decoder_blocks:
            x = block(x)
            x = torch.cat((x, feats.pop()), dim=1)
        x = self.output_block(x)

        if sequence:
            x = torch.stack(torch.split(x, B, dim=0), dim=2)  # (B, C, T, H, W)
        return x


class Wav2Lip_disc_qual(nn.Module):  # noqa: N801 - the published name
    """Visual-quality discriminator: probability that each frame's lower half is real."""

    def __init__(self, img_size: int = 96, width: float = 1.0):
        super().__init__()
        self.img_size = check_img_size(img_size)
        self.width = width
        cin = 3
        blocks = []
        for rows in DISC_ENCODER[img_size]:
            layers, cin = build_stack(cin, [r + (N,) for r in rows], width, block=nonorm_Conv2d)
            blocks.append(nn.Sequential(*layers))
        self.face_encoder_blocks = nn.ModuleList(blocks)
        self.binary_pred = nn.Sequential(nn.Conv2d(cin, 1, kernel_size=1, stride=1, padding=0), nn.Sigmoid())

    @staticmethod
    def get_lower_half(face_sequences):
        return face_sequences[:, :, face_sequences.size(2) // 2:]

    def to_2d(self, face_sequences):
        return frames_to_batch(face_sequences)

    def logits(self, face_sequences):
        """Pre-sigmoid scores, (T*B, 1); the Wasserstein critic uses these."""
        x = self.get_lower_half(self.to_2d(face_sequences))
        for block in self.face_encoder_blocks:
            x = block(x)
        return self.binary_pred[0](x).view(len(x), -1)

    def forward(self, face_sequences, logits: bool = False):
        """Per-frame probability of 'real'; with ``logits=True`` the pre-sigmoid score (a Wasserstein
        critic's output). Both through ``forward`` so DistributedDataParallel sees every call."""
        scores = self.logits(face_sequences)
        return scores if logits else torch.sigmoid(scores)

    def perceptual_forward(self, false_face_sequences):
        """Generator-side loss: BCE of the discriminator's verdict on generated faces against 'real'."""
        pred = self.forward(false_face_sequences)
        return F.binary_cross_entropy(pred, torch.ones_like(pred))
