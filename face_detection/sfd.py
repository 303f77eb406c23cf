"""S3FD backend: the face-alignment package's network, weights from a local file."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from .base import DetectorError, Face, FaceDetector, clip_box

log = logging.getLogger(__name__)

BGR_MEAN = (104.0, 117.0, 123.0)
NMS_THRESHOLD = 0.3
SCORE_THRESHOLD = 0.5


def _missing_weights_message(path: str) -> str:
    from . import S3FD_URL

    return (f"S3FD weights not found at {path!r}. Download them from {S3FD_URL} and save them there "
            f"(or pass another path), or use a download-free detector: --face_detector lbp, or dlib_hog "
            f"(pip install -r requirements-faces.txt)")


def candidates_from_outputs(olist, batch_size: int, score_threshold: float = SCORE_THRESHOLD) -> list[np.ndarray]:
    """Post-process raw S3FD head outputs into every face of each image: one (K, 5) float64 array of
    (x1, y1, x2, y2, score) rows per image, in input pixels, highest score first (K may be 0).

    ``olist`` alternates class scores (softmaxed here) and box regressions for strides 4..128, as the
    network returns them. Candidates are decoded against the anchors, non-maximum suppressed (IoU
    above ``NMS_THRESHOLD``, face-alignment's value) and filtered by score.
    """
    from face_alignment.detection.sfd.bbox import nms
    from face_alignment.detection.sfd.detect import get_predictions

    outs = []
    for i, o in enumerate(olist):
        o = o.float()
        if i % 2 == 0:
            o = F.softmax(o, dim=1)
        outs.append(o.detach().cpu().numpy())
    preds = get_predictions(outs, batch_size)
    results = []
    for b in range(batch_size):
        cand = preds[b] if preds.size else np.zeros((0, 5), np.float32)
        cand = np.asarray(cand, dtype=np.float64).reshape(-1, 5)
        if len(cand):
            cand = cand[nms(cand, NMS_THRESHOLD)]  # nms keeps indices in descending score order
            cand = cand[cand[:, 4] > score_threshold]
        results.append(cand)
    return results


def boxes_from_outputs(olist, batch_size: int, score_threshold: float = SCORE_THRESHOLD):
    """The highest-scoring row of :func:`candidates_from_outputs` per image, (5,) float64, or None."""
    return [cand[0] if len(cand) else None for cand in candidates_from_outputs(olist, batch_size, score_threshold)]


class S3FDDetector(FaceDetector):
    """S3FD (Zhang et al. 2017) as face-alignment builds it, weights from ``weights_path``; every face
    scoring above ``score_threshold``, highest score first."""

    name = "sfd"

    def __init__(self, device="cpu", weights_path: str | None = None, score_threshold: float = SCORE_THRESHOLD,
                 half: bool = False):
        """``half``: run the network in float16 (CUDA only; ignored on the CPU, where it is slower)."""
        from face_alignment.detection.sfd.net_s3fd import s3fd

        from models.checkpoint import CheckpointError, read_checkpoint, strip_wrapper_prefixes

        if not weights_path or not os.path.isfile(weights_path):
            raise DetectorError(_missing_weights_message(weights_path or "<none>"))
        try:
            state = strip_wrapper_prefixes(read_checkpoint(weights_path)["state_dict"])
        except CheckpointError as exc:
            raise DetectorError(f"S3FD weights unusable: {exc}") from None
        net = s3fd()
        try:
            net.load_state_dict(state)
        except RuntimeError:
            raise DetectorError(f"{weights_path!r} is not an S3FD checkpoint (its keys or shapes do not "
                                "match the S3FD network)") from None
        self.device = torch.device(device)
        self.half = bool(half) and self.device.type == "cuda"
        self.net = net.to(self.device).eval()
        if self.half:
            self.net = self.net.half()
        self.score_threshold = score_threshold
        self._mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def _detect_all_batch(self, frames):
        h, w = frames[0].shape[:2]
        if any(f.shape[:2] != (h, w) for f in frames):
            return [d for f in frames for d in self._detect_all_batch([f])]
        x = torch.from_numpy(np.stack(frames)).to(self.device)
        x = x.permute(0, 3, 1, 2).float() - self._mean  # (B, 3, H, W); the network was trained on BGR
        olist = self.net(x.half() if self.half else x)
        results = []
        for cand in candidates_from_outputs(olist, len(frames), self.score_threshold):
            boxes = [(clip_box(*row[:4], w, h), float(row[4])) for row in cand]
            results.append([Face(box, score) for box, score in boxes if box is not None])
        return results
