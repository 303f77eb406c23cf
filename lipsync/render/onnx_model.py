"""ONNX export of the generator and the expert, and the generator run by ONNX Runtime.

Export (``export_onnx.py``): the model of a checkpoint, batch norm folded into the convolutions as
the torch :class:`~lipsync.render.generator.Generator` runs it, traced with the TorchScript exporter at
opset :data:`OPSET` with a dynamic batch axis; the file records what it holds (``kind``,
``img_size``, ``width``) in its metadata, passes ``onnx.checker`` and is compared with torch.

Inputs and outputs (float32, NCHW, batch ``B`` dynamic):

- generator: ``mel`` (B, 1, 80, 16) mel windows; ``face`` (B, 6, S, S) in [0, 1] (the face with its
  lower half zeroed on channels 0-2, the whole face on 3-5, BGR as published) -> ``out``
  (B, 3, S, S) in [0, 1].
- expert: ``mel`` (B, 1, 80, 16); ``face`` (B, 15, S/2, S) (lower halves of 5 frames) -> ``audio_emb``
  and ``face_emb`` (B, 512 or 1024 for 288), L2-normalised.

:class:`OnnxGenerator` has the public methods of the torch generator, so the engine, ``inference.py``
and ``serve.py`` take either; :func:`open_generator` picks by the file's extension. onnx and
onnxruntime are optional (``requirements-onnx.txt``) and imported only when used.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch

from lipsync.core.errors import Wav2LipError
from lipsync.core.fileio import atomic_write
from lipsync.render.cpu import CPU_MICRO_BATCHES, CpuTuner, PrecisionError, resolve_precision
from lipsync.render.forward import ForwardQueue
from lipsync.render.generator import FaceFeatures, Generator

log = logging.getLogger(__name__)

OPSET = 17  # ONNX Runtime >= 1.14, TensorRT >= 8.6 and OpenVINO >= 2023.0 run it
# onnx Runtime and torch agree to about 1e-6 on these models in fp32; 1e-4 leaves room for the
# summation orders of other CPUs' kernels and stays far below one 8-bit level (1/255 = 3.9e-3)
FP32_TOLERANCE = 1e-4
IO_NAMES = {"generator": (["mel", "face"], ["out"]), "expert": (["mel", "face"], ["audio_emb", "face_emb"])}


class OnnxError(Wav2LipError, ValueError):
    """An ONNX file that cannot be used as asked, or onnx / onnxruntime missing."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxError(f"{module} is not installed: pip install -r requirements-onnx.txt") from None


def example_inputs(kind: str, img_size: int, batch: int = 2, seed: int = 0) -> list:
    """Seeded inputs of the shapes a ``kind`` model takes (mel ~ N(0, 1.5) in [-4, 4], faces in [0, 1])."""
    rng = np.random.default_rng(seed)
    mel = np.clip(1.5 * rng.standard_normal((batch, 1, 80, 16)), -4, 4).astype(np.float32)
    shape = (batch, 6, img_size, img_size) if kind == "generator" else (batch, 15, img_size // 2, img_size)
    return [mel, rng.random(shape, dtype=np.float32)]


def export(checkpoint_path: str, out_path: str, kind: str = "auto", opset: int = OPSET) -> dict:
    """Write the ``kind`` ("generator", "expert" or "auto": what the checkpoint holds) model of a
    checkpoint to ``out_path`` as ONNX; returns {"kind", "img_size", "width", "opset"}. The file is
    written whole or not at all."""
    from models.checkpoint import detect_kind, load_model, read_checkpoint, strip_wrapper_prefixes
    from models.fuse import fold_batchnorm

    onnx = _require("onnx")
    if kind == "auto":
        kind = detect_kind(strip_wrapper_prefixes(read_checkpoint(checkpoint_path)["state_dict"]))
        if kind not in IO_NAMES:
            raise OnnxError(f"{checkpoint_path!r} holds neither a generator nor an expert (found: {kind})")
    loaded = load_model(checkpoint_path, kind=kind)
    model = fold_batchnorm(loaded.model).eval()
    inputs, outputs = IO_NAMES[kind]
    example = tuple(torch.from_numpy(x) for x in example_inputs(kind, loaded.img_size, batch=1))
    axes = {name: {0: "batch"} for name in inputs + outputs}
    with atomic_write(out_path, ".onnx") as tmp:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch announces that the TorchScript exporter will go; it is the one that needs no onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, example, tmp, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes)
        proto = onnx.load(tmp)
        info = {"kind": kind, "img_size": loaded.img_size, "width": loaded.width, "opset": opset}
        for key, value in info.items():
            proto.metadata_props.add(key=key, value=str(value))
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
    return info


def session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU session of ``path`` (all graph optimisations; ``threads`` intra-op threads)."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
        if not os.path.isfile(path):
            raise OnnxError(f"ONNX file not found: {path!r}") from None
        raise OnnxError(f"ONNX Runtime cannot load {path!r}: {str(exc).splitlines()[0][:200]}") from None


def metadata(sess) -> dict:
    return dict(sess.get_modelmeta().custom_metadata_map)


def max_abs_difference(onnx_path: str, checkpoint_path: str, inputs: Sequence[np.ndarray]) -> float:
    """Largest |ONNX Runtime - torch| over every output of the model on ``inputs`` (the unfolded
    torch model of the checkpoint, float32)."""
    from models.checkpoint import load_model

    sess = session(onnx_path)
    kind = metadata(sess).get("kind", "generator")
    model = load_model(checkpoint_path, kind=kind).model.eval()
    with torch.no_grad():
        want = model(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
    want = [want] if torch.is_tensor(want) else list(want)
    got = sess.run(None, {name: np.ascontiguousarray(x) for name, x in zip(IO_NAMES[kind][0], inputs)})
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


class OnnxGenerator(Generator):
    """An exported generator (``export_onnx.py``) run by ONNX Runtime on the CPU, with the public
    methods of :class:`~lipsync.render.generator.Generator`.

    The whole network is one ONNX graph, so :meth:`encode_faces` only prepares the (B, 6, S, S)
    input and :meth:`decode` runs the graph: there is no face-feature cache (``bank`` is None).
    ``precision``: ``auto`` (what the file holds: fp32, or int8 for a file from
    :mod:`lipsync.render.quantize`), that precision, or ``int8`` for an fp32 file: the generator then
    waits for :meth:`calibrate` (which :func:`lipsync.render.engine.render` calls with its face and
    audio) and runs the int8 graph calibrated on them. Another precision is a PrecisionError.
    ``model``: the file the user gave (a checkpoint exported to ``onnx_path``), for the int8 cache;
    ``int8_files``: a :class:`lipsync.render.quantize.Int8Files` (None: the default cache).
    """

    def __init__(self, onnx_path: str, device="auto", precision: str = "auto", threads: Optional[int] = None,
                 micro_batch: Optional[int] = None, face_cache_mb: float = 0, model: Optional[str] = None,
                 int8_files=None):
        if isinstance(device, torch.device):
            device = device.type
        if device not in ("auto", "cpu"):
            raise PrecisionError(f"an ONNX generator runs on the CPU (ONNX Runtime); got --device {device}")
        if threads is not None and threads < 1:
            raise PrecisionError("--threads must be >= 1")
        self.sess = session(onnx_path, threads)
        meta = metadata(self.sess)
        if meta.get("kind", "generator") != "generator":
            raise OnnxError(f"{onnx_path!r} holds a model of kind {meta.get('kind')!r}, not a generator: give a "
                            "generator's .onnx (export_onnx.py --kind generator)")
        stored = meta.get("precision", "fp32")
        if precision not in ("auto", stored) and (precision, stored) != ("int8", "fp32"):
            raise PrecisionError(f"{onnx_path!r} holds an {stored} generator (ONNX Runtime); got --precision "
                                 f"{precision}: use auto or {stored}" + (", or export the checkpoint again"
                                                                          if stored == "int8" else ""))
        face = self.sess.get_inputs()[1].shape  # ['batch', 6, S, S]
        if len(face) != 4 or not isinstance(face[2], int):
            raise OnnxError(f"{onnx_path!r} is not a generator exported by export_onnx.py (face input {face})")
        self.checkpoint_path = os.path.abspath(onnx_path)
        self.model = model or onnx_path
        self.device = torch.device("cpu")
        self.precision = stored if precision == "auto" else precision
        self.awaiting_calibration = stored == "fp32" and self.precision == "int8"
        self.int8 = None  # the int8 file's metadata (quantizer, calibration, quality against fp32)
        self.calibrated_here = False  # calibrate() made or found the int8 file for a job of this process
        self.int8_files = int8_files
        if stored == "int8":
            from lipsync.render.quantize import int8_info, warn_about

            self.int8 = int8_info(meta)
            warn_about(self.int8, onnx_path, of="the int8 file's calibration inputs")
        self.dtype = torch.float32
        self.img_size = int(face[2])
        self.width = float(meta.get("width", "nan"))
        self.channels_last = False
        self.threads = threads
        # ONNX Runtime keeps its own thread pool: only the micro-batch is tuned
        mbs = (micro_batch,) if micro_batch else CPU_MICRO_BATCHES
        self.tuner = CpuTuner(threads=threads or torch.get_num_threads(), micro_batches=mbs)
        self.bank = None
        self.queue = ForwardQueue(self._generate)

    def describe(self) -> str:
        return (f"{self.img_size}x{self.img_size} generator (width {self.width:g}) on the CPU, ONNX Runtime "
                f"{self.precision}" + (" (calibrated on the first job)" if self.awaiting_calibration else ""))

    def tuning(self) -> str:
        if self.int8 is None:
            return super().tuning()
        from lipsync.render.quantize import quality_line

        # a file quantized elsewhere (export_onnx.py --int8) was checked on its own calibration inputs
        of = "this job" if self.calibrated_here else "the int8 file's calibration inputs"
        return f"{super().tuning()} | {quality_line(self.int8['quality'], of=of)}"

    def calibrate(self, calibration) -> None:
        """Quantize this fp32 graph to int8 calibrated on ``calibration`` (a
        :class:`lipsync.render.quantize.Calibration`), or find that int8 file in the cache, and run it
        from now on. Logs a warning where the check against fp32 is outside the threshold."""
        from lipsync.render.quantize import Int8Files, warn_about

        if not self.awaiting_calibration:
            raise PrecisionError(f"this generator is {'already calibrated' if self.int8 else 'not int8'}")
        self.int8_files = self.int8_files or Int8Files()
        path, self.int8, cached = self.int8_files.int8(self.model, self.checkpoint_path, calibration)
        self.sess = session(path, self.threads)
        self.checkpoint_path = os.path.abspath(path)
        self.awaiting_calibration = False
        self.calibrated_here = True
        log.info("int8 generator %s (%s): %s", path, "from the cache" if cached else "quantized now",
                 self.int8["calibration"])
        warn_about(self.int8, path)

    def encode_faces(self, faces) -> FaceFeatures:
        with torch.inference_mode():
            return [self.face_tensor(faces)]

    def decoder_output(self, mels: np.ndarray, feats: FaceFeatures) -> torch.Tensor:
        if self.awaiting_calibration:
            raise PrecisionError("an int8 generator is calibrated on its first job before it runs: call calibrate() "
                                 "(lipsync.render.engine.render does), or export one with export_onnx.py --int8")
        mel = np.ascontiguousarray(mels, dtype=np.float32)[:, None]  # (B, 1, 80, 16)
        out, = self.sess.run(None, {"mel": mel, "face": feats[0].numpy()})
        return torch.from_numpy(out)  # (B, 3, S, S) in [0, 1]


def open_generator(path: str, int8_cache_dir: Optional[str] = None, **kwargs) -> Generator:
    """:class:`OnnxGenerator` for a ``.onnx`` file or ``precision="int8"``, the torch
    :class:`Generator` for a checkpoint. With int8, a checkpoint is exported to ONNX first, and
    ``int8_cache_dir`` keeps the exports and int8 files (None: ~/.cache/wav2lip/int8; '': none kept)."""
    onnx_file = os.fspath(path).lower().endswith(".onnx")
    if kwargs.get("precision") != "int8":
        return OnnxGenerator(path, **kwargs) if onnx_file else Generator(path, **kwargs)
    from lipsync.render.quantize import Int8Files

    device = kwargs.get("device", "auto")
    if torch.device(device if device != "auto" else "cpu").type != "cpu":
        resolve_precision("int8", torch.device(device))  # the PrecisionError that says what to do
    files = Int8Files(int8_cache_dir)
    kwargs.pop("reproducible", None)
    fp32 = path if onnx_file else files.fp32(path)
    return OnnxGenerator(fp32, model=path, int8_files=files, **kwargs)
