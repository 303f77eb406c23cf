"""What the CPU can do, and the CPU plan of a forward pass (intra-op threads, frames per forward)
chosen from measured speed.

Precision names: ``fp32``; ``bf16`` (weights and activations in bfloat16; fast on CPUs with bf16
matrix units: Intel AMX or AVX512-BF16); ``fp16`` (CUDA); ``int8`` (ONNX Runtime on the CPU, weights
and activations quantized to 8 bits, :mod:`lipsync.render.quantize`; fast on CPUs with VNNI);
``auto`` picks bf16 on a CPU whose torch reports bf16 matrix support, fp16 on CUDA, fp32 elsewhere
(never int8: its speed-up is not measured on a VNNI CPU yet, docs/onnx.md).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from lipsync.core.cli import PRECISIONS
from lipsync.core.errors import Wav2LipError

# Micro-batches tried on the CPU. Small batches keep activations in cache (8 frames ran ~20% faster per
# frame than 128 on 2 idle cores); larger ones cross fewer thread barriers, which matters when another
# process holds a core (32 frames were 1.66x faster than 8 on two busy threads).
CPU_MICRO_BATCHES = (8, 32)

# The one execution plan of ``Generator(..., reproducible=True)``: (intra-op threads, frames per forward).
# oneDNN picks its convolution kernels by thread count and batch shape, and on some CPUs (AMD EPYC with
# AVX-512) those kernels sum in different orders; the output's truncation to uint8 turns such a
# last-bit difference into a grey level here and there. One thread and one frame per forward make a
# frame's pixels a function of its inputs alone, whatever the batching, the tuner or other sessions.
REPRODUCIBLE_PLAN = (1, 1)


class PrecisionError(Wav2LipError, ValueError):
    """A precision the device cannot run."""


# ------------------------------------------------------------------------------------------------
# What the CPU can do
# ------------------------------------------------------------------------------------------------
def _torch_cpu_flag(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


@dataclass(frozen=True)
class CpuCapabilities:
    """What torch (and, for VNNI, /proc/cpuinfo) reports about this CPU at run time."""

    name: str             # model name from /proc/cpuinfo ("unknown" elsewhere)
    cores: int            # logical CPUs this process may use
    isa: str              # torch's dispatch level: "DEFAULT", "AVX2", "AVX512", ...
    amx: bool             # Intel AMX tiles (bf16 matrix multiply)
    avx512_bf16: bool
    mkldnn_bf16: bool     # oneDNN runs bf16 convolutions natively
    vnni: bool = False    # AVX512-VNNI or AVX-VNNI: int8 dot products accumulated in int32 (no 16-bit saturation)

    @property
    def bf16_matrix(self) -> bool:
        """True when bf16 convolutions have hardware support (AMX or AVX512-BF16)."""
        return self.mkldnn_bf16 and (self.amx or self.avx512_bf16)

    def line(self) -> str:
        feats = [f for f, on in (("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16)) if on]
        return (f"{self.name}, {self.cores} cores, torch ISA {self.isa}, bf16 matrix support: "
                f"{'yes (' + ', '.join(feats) + ')' if self.bf16_matrix else 'no'}, int8 VNNI: "
                f"{'yes' if self.vnni else 'no'}")


def cpu_capabilities() -> CpuCapabilities:
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if name != "unknown" and flags:
                    break
    except OSError:
        pass
    # torch's own check sees avx512_vnni only; the kernels of ONNX Runtime use AVX-VNNI too
    vnni = _torch_cpu_flag("_is_vnni_supported") or bool(flags & {"avx512_vnni", "avx_vnni"})
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = "unknown"
    try:
        mkldnn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn_bf16 = False
    return CpuCapabilities(name, cores, isa, _torch_cpu_flag("_is_amx_tile_supported"),
                           _torch_cpu_flag("_is_avx512_bf16_supported"), mkldnn_bf16, vnni)


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CPU with bf16 matrix support, fp16 on CUDA, fp32 elsewhere.

    Raises PrecisionError for fp16 on a CPU without native fp16 convolutions, int8 on another device
    than the CPU, or an unknown name.
    """
    if name not in PRECISIONS:
        raise PrecisionError(f"--precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "fp16"
        if device.type == "cpu" and cpu_capabilities().bf16_matrix:
            return "bf16"
        return "fp32"
    if name == "int8" and device.type != "cpu":
        raise PrecisionError(f"--precision int8 runs on the CPU (ONNX Runtime), not on {device.type}: use "
                             "--device cpu, or fp16 on a GPU")
    if name == "fp16" and device.type == "cpu":
        fp16 = getattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", None)
        if fp16 is None or not fp16():
            raise PrecisionError("--precision fp16 needs a GPU or a CPU with native fp16 support; use bf16 or fp32")
    return name


# ------------------------------------------------------------------------------------------------
# Threads and micro-batch, adapted while running
# ------------------------------------------------------------------------------------------------
class CpuTuner:
    """Chooses (intra-op threads, micro-batch) for each forward call from measured speed.

    Times are seconds per frame, wall clock, so time lost waiting for a core that another process
    holds counts. The thread counts are timed first at the smallest micro-batch (cheap calls), then
    the micro-batches at the fastest thread count; the fastest candidate is used from then on, and
    every ``explore_every``-th call re-times the neighbour of the current best (same threads, other
    micro-batch; or same micro-batch, other threads) measured longest ago, so the choice follows the
    machine when another process starts or stops. The first call of each micro-batch shape builds
    its kernels and is not timed. ``threads`` fixes the thread count (only the micro-batch is tuned).
    """

    def __init__(self, threads: Optional[int] = None, cores: Optional[int] = None,
                 micro_batches: Sequence[int] = CPU_MICRO_BATCHES, explore_every: int = 8, alpha: float = 0.5):
        cores = cores or cpu_capabilities().cores
        if threads is not None:
            self.thread_opts = [threads]
        elif cores <= 4:
            self.thread_opts = list(range(cores, 0, -1))
        else:
            self.thread_opts = sorted({cores, max(1, cores // 2), 1}, reverse=True)
        self.micro_batches = sorted(micro_batches)
        self.candidates: List[Tuple[int, int]] = [(t, mb) for t in self.thread_opts for mb in self.micro_batches]
        self.speed: dict = {}       # candidate -> EMA of seconds per frame
        self.warm: set = set()       # micro-batch shapes run once (the first call of a shape builds kernels)
        self.measured_at: dict = {}  # candidate -> call number of the last measurement
        self.calls = 0
        self.explore_every = explore_every
        self.alpha = alpha
        self.lock = threading.Lock()

    def choose(self) -> Tuple[int, int]:
        with self.lock:
            self.calls += 1
            small = self.micro_batches[0]
            for t in self.thread_opts:                      # 1. thread counts, at the cheapest shape
                if (t, small) not in self.speed:
                    return t, small
            best_t = min(self.thread_opts, key=lambda t: self.speed[(t, small)])
            for mb in self.micro_batches:                   # 2. micro-batches, at the best thread count
                if (best_t, mb) not in self.speed:
                    return best_t, mb
            best = self.best()
            if self.calls % self.explore_every == 0:        # 3. now and then, a neighbour of the best
                near = [c for c in self.candidates if c != best and (c[0] == best[0] or c[1] == best[1])]
                if near:
                    return min(near, key=lambda c: self.measured_at.get(c, -1))
            return best

    def best(self) -> Tuple[int, int]:
        return min(self.speed, key=self.speed.get) if self.speed else self.candidates[0]

    def record(self, candidate: Tuple[int, int], frames: int, seconds: float) -> None:
        per_frame = seconds / max(1, frames)
        with self.lock:
            if candidate[1] not in self.warm:
                self.warm.add(candidate[1])
                return
            old = self.speed.get(candidate)
            if old is None or not 0.7 < per_frame / old < 1.4:  # a new regime (a process came or went)
                self.speed[candidate] = per_frame
            else:                                            # noise: average it out
                self.speed[candidate] = (1 - self.alpha) * old + self.alpha * per_frame
            self.measured_at[candidate] = self.calls

    def summary(self) -> str:
        t, mb = self.best()
        return f"{t} thread(s), micro-batch {mb}"
