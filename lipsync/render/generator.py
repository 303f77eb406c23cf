"""A loaded Wav2Lip generator for inference: device, precision, CPU threads and micro-batches.

Load it once and use it for any number of faces and audios (like whisper's ``transcribe(model, ...)``
takes a loaded model). Besides the whole forward pass it exposes the two halves the engine needs:
:meth:`Generator.encode_faces` (what the generator computes from the face alone, cacheable per
avatar frame) and :meth:`Generator.decode` (speech + face features -> face).

Precision: ``fp32``; ``bf16`` (weights and activations in bfloat16; fast on CPUs with bf16 matrix
units: Intel AMX or AVX512-BF16); ``fp16`` (CUDA); ``auto`` picks bf16 on a CPU whose torch reports
bf16 matrix support, fp16 on CUDA, fp32 elsewhere. ``int8`` is ONNX Runtime's
(:class:`lipsync.render.onnx_model.OnnxGenerator`, :mod:`lipsync.render.quantize`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from lipsync.core.device import resolve_device
from lipsync.render.cpu import CPU_MICRO_BATCHES, REPRODUCIBLE_PLAN, CpuTuner, PrecisionError, resolve_precision
from lipsync.render.forward import ForwardQueue
from lipsync.render.settings import DEFAULTS

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

def face_input(faces, img_size: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """(B, S, S, 3) uint8 BGR crops (numpy, or a tensor on any device) -> (B, 6, S, S) model input in
    [0, 1] on ``device``: the face with its lower half zeroed on channels 0-2, the face itself (the
    reference) on channels 3-5 (published). Raises ValueError for crops of another shape."""
    if faces.ndim != 4 or tuple(faces.shape[1:]) != (img_size, img_size, 3):
        raise ValueError(f"faces must be (B, {img_size}, {img_size}, 3), got {tuple(faces.shape)}")
    x = faces if isinstance(faces, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(faces))
    x = x.to(device).permute(0, 3, 1, 2).to(dtype) / 255.0  # (B, 3, S, S)
    masked = x.clone()
    masked[:, :, img_size // 2:] = 0
    return torch.cat((masked, x), dim=1)  # (B, 6, S, S)


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------
FaceFeatures = List[torch.Tensor]  # one (B, C_l, H_l, W_l) tensor per face-encoder level


class FaceBank:
    """Face-encoder features of crops already seen, by key, least recently used first out.

    Each entry is one tensor per encoder level, (C_l, H_l, W_l), on the generator's device and in
    its precision: about 1.2 MB per frame for the full-width 96 generator in fp32, 9.3 MB at 288.
    Holds at most ``budget_mb`` megabytes.
    """

    def __init__(self, budget_mb: float):
        from collections import OrderedDict

        self.budget = int(budget_mb * 2 ** 20)
        self.entries: "OrderedDict" = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()  # the forward thread reads and fills; a server forgets avatars

    def get(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key, levels: List[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in levels)
        if size > self.budget or key in self.entries:
            return
        copy = [t.clone() for t in levels]  # a row of a batch keeps the whole batch alive: store compact copies
        with self.lock:
            self.entries[key] = copy
            self.bytes += size
            while self.bytes > self.budget:
                _, old = self.entries.popitem(last=False)
                self.bytes -= sum(t.numel() * t.element_size() for t in old)

    def forget(self, prefix) -> None:
        """Drop every entry whose key starts with ``prefix`` (an avatar that was deleted)."""
        with self.lock:
            for key in [k for k in self.entries if isinstance(k, tuple) and k[0] == prefix]:
                old = self.entries.pop(key)
                self.bytes -= sum(t.numel() * t.element_size() for t in old)


class Generator:
    """A Wav2Lip generator ready for inference.

    ``checkpoint_path``: a published or project checkpoint (96 or 288 layout, any width).
    ``device``: ``auto``/``cpu``/``cuda``/``mps`` or a torch.device. ``precision``: see the module
    docstring. ``threads``: CPU intra-op threads (None: adapted while running, see :class:`CpuTuner`).
    ``micro_batch``: frames per forward call on the CPU (None: adapted). ``face_cache_mb``: memory
    for face features of crops seen before (:class:`FaceBank`; 0 disables). BatchNorm is folded into the
    convolutions (same function, fewer operations). ``reproducible``: on the CPU, run the fixed
    :data:`REPRODUCIBLE_PLAN` instead of the tuned one (slower), so that the frames of a crop and a mel
    window are bit-identical however they were batched, on any CPU; it overrides ``threads`` and
    ``micro_batch``. Raises CheckpointError for a file that is not a generator, PrecisionError for a
    precision the device cannot run.
    """

    def __init__(self, checkpoint_path: str, device="auto", precision: str = "auto",
                 threads: Optional[int] = None, micro_batch: Optional[int] = None, face_cache_mb: float = DEFAULTS["face_cache_mb"],
                 reproducible: bool = False):
        from models import load_model
        from models.fuse import fold_batchnorm

        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "int8":
            raise PrecisionError("int8 runs through ONNX Runtime: open the generator with "
                                 "lipsync.render.onnx_model.open_generator (as inference.py and serve.py do)")
        self.dtype = _DTYPES[self.precision]
        if threads is not None and threads < 1:
            raise PrecisionError("--threads must be >= 1")
        self.reproducible = reproducible
        if reproducible:
            threads, micro_batch = REPRODUCIBLE_PLAN
        loaded = load_model(checkpoint_path, kind="generator", device="cpu")
        self.checkpoint_path = os.path.abspath(checkpoint_path)
        self.img_size = loaded.img_size
        self.width = loaded.width
        self.channels_last = self.device.type == "cpu"
        layout = {"memory_format": torch.channels_last} if self.channels_last else {}
        model = fold_batchnorm(loaded.model).to(self.device, self.dtype, **layout)  # one pass over the weights
        self.model = model.eval()
        self.threads = threads
        self.tuner: Optional[CpuTuner] = None
        if self.device.type == "cpu":
            mbs = (micro_batch,) if micro_batch else CPU_MICRO_BATCHES
            self.tuner = CpuTuner(threads=threads, micro_batches=mbs)
        self.bank = FaceBank(face_cache_mb) if face_cache_mb > 0 else None
        self.queue = ForwardQueue(self._generate)

    def close(self) -> None:
        """Stop the forward thread (calls after this raise ForwardQueueClosed)."""
        self.queue.close()

    def describe(self) -> str:
        return f"{self.img_size}x{self.img_size} generator (width {self.width:g}) on {self.device}, {self.precision}"

    # ---- inputs ----------------------------------------------------------------------------------
    def face_tensor(self, faces) -> torch.Tensor:
        """(B, S, S, 3) uint8 BGR crops (numpy, or a tensor on any device) -> (B, 6, S, S) model input
        in [0, 1]: the face with its lower half zeroed on channels 0-2, the face itself (the
        reference) on channels 3-5 (published)."""
        img = face_input(faces, self.img_size, self.device, self.dtype)
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        return img

    def mel_tensor(self, mels: np.ndarray) -> torch.Tensor:
        """(B, 80, 16) float32 mel windows -> (B, 1, 80, 16)."""
        return torch.from_numpy(np.ascontiguousarray(mels, dtype=np.float32))[:, None].to(self.device, self.dtype)

    # ---- the two halves of the forward pass -------------------------------------------------------
    def encode_faces(self, faces: np.ndarray) -> FaceFeatures:
        """What the generator computes from the face alone: the face encoder's skip features, one
        (B, C_l, H_l, W_l) tensor per level, for (B, S, S, 3) uint8 BGR crops."""
        feats = []
        with torch.inference_mode():
            f = self.face_tensor(faces)
            for block in self.model.face_encoder_blocks:
                f = block(f)
                feats.append(f)
        return feats

    def decode(self, mels: np.ndarray, feats: FaceFeatures, as_tensor: bool = False):
        """(B, 80, 16) mel windows + face features -> (B, S, S, 3) uint8 BGR faces
        (the published ``(pred * 255).astype(uint8)``); a uint8 tensor on the device with
        ``as_tensor``."""
        with torch.inference_mode():
            x = self.decoder_output(mels, feats)  # (B, 3, S, S) in [0, 1]
            if as_tensor:
                return (x.float() * 255.0).to(torch.uint8).permute(0, 2, 3, 1)  # truncates, as astype does
            return (x.float().cpu().numpy().transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)

    def decoder_output(self, mels: np.ndarray, feats: FaceFeatures) -> torch.Tensor:
        """(B, 80, 16) mel windows + face features -> (B, 3, S, S) faces in [0, 1], in the generator's
        precision (the network after the face encoder; lipsync.render.onnx_model runs it in ONNX Runtime)."""
        x = self.model.audio_encoder(self.mel_tensor(mels))
        skips = list(feats)
        for block in self.model.face_decoder_blocks:
            x = block(x)
            x = torch.cat((x, skips.pop()), dim=1)
        return self.model.output_block(x)

    # ---- batched calls with the tuned micro-batch ---------------------------------------------------
    def generate(self, mels: np.ndarray, faces, keys: Optional[Sequence] = None, as_tensor: bool = False):
        """(B, 80, 16) mel windows + (B, S, S, 3) uint8 BGR crops -> (B, S, S, 3) uint8 BGR faces
        (numpy; a tensor on the device with ``as_tensor``; crops may be a tensor too).

        ``keys`` (one hashable per crop, e.g. (avatar key, source frame)) lets the face features of a
        crop seen before come from :attr:`bank` instead of the face encoder. On the CPU the batch runs
        in tuned micro-batches. Every call, from any thread, runs on the generator's one forward thread
        (:attr:`queue`, a :class:`~lipsync.render.forward.ForwardQueue`), batched with the calls of
        other callers that are in flight at the same time.
        """
        if len(mels) == 0:
            empty = np.zeros((0, self.img_size, self.img_size, 3), np.uint8)
            return torch.from_numpy(empty).to(self.device) if as_tensor else empty
        return self.queue.generate(mels, faces, keys, as_tensor)

    def _generate(self, mels, faces, keys, as_tensor):
        """The forward pass on the queue's thread, in the planned micro-batches."""
        n = len(mels)
        out = []
        k = 0
        while k < n:
            threads, step = self._plan(n - k)
            t0 = time.perf_counter()
            part = slice(k, k + step)
            feats = self._features(faces[part], None if keys is None else keys[part])
            out.append(self.decode(mels[part], feats, as_tensor))
            if self.tuner is not None and 2 * len(out[-1]) >= step:  # a short tail would read slow
                self.tuner.record((threads, step), len(out[-1]), time.perf_counter() - t0)
            k += step
        return torch.cat(out) if as_tensor else np.concatenate(out)

    def _features(self, faces: np.ndarray, keys: Optional[Sequence]) -> FaceFeatures:
        if keys is None or self.bank is None:
            return self.encode_faces(faces)
        found = [self.bank.get(key) for key in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = self.encode_faces(faces[missing])
            for row, i in enumerate(missing):
                found[i] = [level[row] for level in fresh]
                self.bank.put(keys[i], found[i])
        return [torch.stack([f[level] for f in found]) for level in range(len(found[0]))]

    def _plan(self, remaining: int) -> Tuple[int, int]:
        if self.tuner is None:
            return 0, remaining
        threads, mb = self.tuner.choose()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return threads, mb

    def tuning(self) -> str:
        """The CPU threads / micro-batch in use (or the device) for the summary line."""
        return self.tuner.summary() if self.tuner is not None else f"batch on {self.device}"
