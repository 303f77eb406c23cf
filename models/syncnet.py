"""The lip-sync expert (``SyncNet_color``): 5 frames' lower halves vs. a 16-column mel window.

96 layout: the published ``lipsync_expert.pth`` (512-d embeddings, 48x96 lower halves).
288 layout: 1024-d embeddings on 144x288 lower halves, LeakyReLU inside and ReLU at the ends.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .conv import build_stack

R = True
N = False


def _res(c, n):
    return [(c, 3, 1, 1, R)] * n


FACE_ENCODER = {
    96: ([(32, 7, 1, 3, N), (64, 5, (1, 2), 1, N)] + _res(64, 2)
         + [(128, 3, 2, 1, N)] + _res(128, 3)
         + [(256, 3, 2, 1, N)] + _res(256, 2)
         + [(512, 3, 2, 1, N)] + _res(512, 2)
         + [(512, 3, 2, 1, N), (512, 3, 1, 0, N), (512, 1, 1, 0, N)]),
    288: ([(16, 7, 1, 3, N), (32, 5, (1, 2), 1, N)] + _res(32, 2)
          + [(64, 3, 2, 1, N)] + _res(64, 2)
          + [(128, 3, 2, 1, N)] + _res(128, 2)
          + [(256, 3, 2, 1, N)] + _res(256, 2)
          + [(512, 3, 2, 1, N)] + _res(512, 2)
          + [(1024, 3, 2, 1, N)] + _res(1024, 2)
          + [(1024, 3, 2, 1, N), (1024, 3, 1, 0, N), (1024, 1, 1, 0, N)]),
}

AUDIO_ENCODER = {
    96: ([(32, 3, 1, 1, N)] + _res(32, 2)
         + [(64, 3, (3, 1), 1, N)] + _res(64, 2)
         + [(128, 3, 3, 1, N)] + _res(128, 2)
         + [(256, 3, (3, 2), 1, N)] + _res(256, 2)
         + [(512, 3, 1, 0, N), (512, 1, 1, 0, N)]),
    288: ([(32, 3, 1, 1, N)] + _res(32, 2)
          + [(64, 3, (3, 1), 1, N)] + _res(64, 2)
          + [(128, 3, 3, 1, N)] + _res(128, 2)
          + [(256, 3, (3, 2), 1, N)] + _res(256, 2)
          + [(512, 3, 1, 1, N)] + _res(512, 2)
          + [(1024, 3, 1, 0, N), (1024, 1, 1, 0, N)]),
}

# how many trailing layers use ReLU in a layout whose inner activation is LeakyReLU
_ACTIVATION = {96: ("relu", 0, 0), 288: ("leaky", 1, 2)}  # (inner, relu tail face, relu tail audio)


def _encoder(cin, rows, width, inner, relu_tail):
    layers = []
    for i, row in enumerate(rows):
        act = "relu" if i >= len(rows) - relu_tail else inner
        built, cin = build_stack(cin, [row], width, act=act)
        layers += built
    return nn.Sequential(*layers), cin


class SyncNet_color(nn.Module):  # noqa: N801 - the published name
    """``forward(audio (B,1,80,16), faces (B,15,S/2,S))`` -> L2-normalised (audio_emb, face_emb)."""

    def __init__(self, img_size: int = 96, width: float = 1.0):
        super().__init__()
        if img_size not in FACE_ENCODER:
            raise ValueError(f"img_size must be one of {sorted(FACE_ENCODER)}, got {img_size!r}")
        self.img_size = img_size
        self.width = width
        inner, face_tail, audio_tail = _ACTIVATION[img_size]
        self.face_encoder, self.embedding_dim = _encoder(15, FACE_ENCODER[img_size], width, inner, face_tail)
        self.audio_encoder, audio_dim = _encoder(1, AUDIO_ENCODER[img_size], width, inner, audio_tail)
        assert audio_dim == self.embedding_dim

    def forward(self, audio_sequences, face_sequences):
        face_embedding = self.face_encoder(face_sequences)
        audio_embedding = self.audio_encoder(audio_sequences)
        audio_embedding = F.normalize(audio_embedding.view(audio_embedding.size(0), -1), p=2, dim=1)
        face_embedding = F.normalize(face_embedding.view(face_embedding.size(0), -1), p=2, dim=1)
        return audio_embedding, face_embedding


def cosine_sync_probability(audio_emb: torch.Tensor, face_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two L2-normalised embeddings, clamped into [0, 1] so BCE is always defined.

    The embeddings come out of ReLUs, so the cosine is in [0, 1] up to rounding; rounding alone can
    push it just past 1 (NaN in BCE on the CPU, a device assert on CUDA).
    """
    eps = 1e-7
    return F.cosine_similarity(audio_emb, face_emb).clamp(eps, 1 - eps)
