"""What the server tests share: a tiny generator checkpoint."""
import torch

from models import Wav2Lip


def tiny_checkpoint(path, seed=0):
    """Save a 96x96 generator at a quarter of the published width (random weights, fixed seed) as
    ``{"state_dict": ...}``; returns the path as a string."""
    torch.manual_seed(seed)
    torch.save({"state_dict": Wav2Lip(img_size=96, width=0.25).eval().state_dict()}, str(path))
    return str(path)
