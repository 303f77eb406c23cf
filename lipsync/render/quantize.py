"""int8 generators: ONNX Runtime's static quantization of an exported generator, calibrated on the
face crops and mel windows of a job (the user's own face and audio), and its quality against fp32.

The quantizer is ``onnxruntime.quantization.quantize_static`` (maintained with the runtime whose CPU
kernels run its output) in the QDQ format: QuantizeLinear / DequantizeLinear pairs around each
operator, which ONNX Runtime fuses into QLinearConv, QLinearAdd, ... (other runtimes read the same
file). Activations are uint8 with ranges from MinMax calibration; weights int8, symmetric, one scale
per output channel. The audio path stays fp32 (:func:`audio_only_nodes`: about 2.3% of the 96
generator's multiply-adds, 0.5% of the 288's): it decides how far the mouth opens, and quantized it
made the demo's generator draw a mouth wide open in one frame of 150 where fp32 keeps it nearly
closed (128 levels off). On a CPU without VNNI the weights keep 7 bits (``reduce_range``, as ONNX
Runtime advises): the AVX2 and AVX-512 u8 x s8 kernels add pairs of products in 16 bits, which
saturate with 8-bit weights; VNNI adds in 32 bits, so there the weights keep all 8 bits.
docs/onnx.md has the measurements.

A :class:`Calibration` is N face crops and N mel windows of the job; two thirds calibrate the
activation ranges, the other third (spread over the same job) checks the int8 graph against the fp32
one on this CPU's kernels (:func:`compare_faces`), and :data:`INT8_THRESHOLD` judges it. The int8
file records ``precision=int8``, the calibration's source and digest, the quantizer's settings and
that check in its metadata.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from lipsync.core.fileio import atomic_write, file_sha256
from lipsync.render.cpu import PrecisionError, cpu_capabilities
from lipsync.render.generator import face_input
from lipsync.render.onnx_model import OPSET, OnnxError, _require, export, metadata, session

log = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 96  # face crops and mel windows taken from a job: 64 calibrate, 32 check
QUANTIZER_VERSION = 1     # part of the cache key: a change of the settings below makes new files
BATCH = 8                 # frames per calibration and check forward (bounds the calibrator's memory)
INT8_CACHE_KEEP = 16      # int8 files kept in --int8_cache_dir (the most recently used): one per job otherwise


@dataclass(frozen=True)
class Threshold:
    """When int8 faces are close enough to fp32's, on (B, S, S, 3) uint8 faces (0-255 levels).

    The reference is what ``inference.py`` does to every frame anyway: its H.264 encode (libx264,
    CRF 18, yuv420p). Measured on the demo's held-out clip (fp32 frames against the decoded output,
    inside the face boxes): PSNR 37.3 dB, 99.9th percentile 15 levels, worst pixel 39. int8 passes when its
    error is below the encoder's: PSNR >= 40 dB (under half the encoder's error power) and a 99.9th
    percentile <= 16 levels; and no pixel is off by more than a quarter of the range (64), which the
    scattered errors of both the encoder and int8 stay under, while a mouth the int8 graph draws
    open where fp32 draws it closed (measured: 128 levels, one frame of 150) does not.
    """

    psnr_db: float = 40.0
    p999_abs: float = 16.0
    max_abs: int = 64

    def met(self, quality: dict) -> bool:
        return (quality["psnr_db"] >= self.psnr_db and quality["p999_abs"] <= self.p999_abs
                and quality["max_abs"] <= self.max_abs)

    def line(self) -> str:
        return f"PSNR >= {self.psnr_db:g} dB, 99.9th percentile <= {self.p999_abs:g}, worst <= {self.max_abs}"


INT8_THRESHOLD = Threshold()


def compare_faces(a: np.ndarray, b: np.ndarray) -> dict:
    """PSNR (dB) and absolute differences (0-255 levels) between two uint8 arrays of frames or faces
    of the same shape (first axis: frames): ``psnr_db``, ``p999_abs`` (99.9th percentile),
    ``max_abs`` (worst pixel), ``within_4`` (share within 4 levels), ``frames``."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"psnr_db": float(10 * np.log10(255 ** 2 / mse)) if mse > 0 else float("inf"),
            "p999_abs": float(np.percentile(diff, 99.9)), "max_abs": int(diff.max()),
            "within_4": float(np.mean(diff <= 4)), "frames": int(len(a))}


def quality_line(quality: dict, threshold: Threshold = INT8_THRESHOLD, of: str = "this job") -> str:
    """One line of :func:`compare_faces`'s ``quality`` against ``threshold``; ``of``: whose faces they were."""
    return (f"int8 vs fp32 on {quality['frames']} faces of {of}: PSNR {quality['psnr_db']:.1f} dB, 99.9th "
            f"percentile {quality['p999_abs']:g}, worst {quality['max_abs']} "
            f"({'within' if threshold.met(quality) else 'OUTSIDE'} {threshold.line()})")


# ------------------------------------------------------------------------------------------------
# Calibration data
# ------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """What an int8 generator is calibrated and checked on: ``mels`` (N, 80, 16) float32 mel windows
    (``audio.melspectrogram`` columns, one window per output frame) and ``faces`` (N, S, S, 3) uint8
    BGR face crops at the generator's size S, paired by row; ``source`` says where they came from
    (recorded in the int8 file)."""

    mels: np.ndarray
    faces: np.ndarray
    source: str

    def __post_init__(self):
        n = len(self.mels)
        if self.mels.shape[1:] != (80, 16) or self.faces.ndim != 4 or len(self.faces) != n or n < 3:
            raise ValueError(f"calibration needs N >= 3 mel windows (N, 80, 16) and face crops (N, S, S, 3); got "
                             f"{self.mels.shape} and {self.faces.shape}")

    def digest(self) -> str:
        """sha256 of the windows and crops (hex): the same job gives the same digest."""
        h = hashlib.sha256()
        for a in (np.ascontiguousarray(self.mels, np.float32), np.ascontiguousarray(self.faces, np.uint8)):
            h.update(repr(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def split(self) -> Tuple[np.ndarray, np.ndarray]:
        """(calibration rows, check rows): every third row checks, so both span the whole job."""
        rows = np.arange(len(self.mels))
        return rows[rows % 3 != 2], rows[rows % 3 == 2]

    def batches(self, rows: np.ndarray):
        """Model inputs for ``rows``, BATCH at a time: {"mel": (B, 1, 80, 16), "face": (B, 6, S, S)} float32."""
        for k in range(0, len(rows), BATCH):
            part = rows[k:k + BATCH]
            yield {"mel": np.ascontiguousarray(self.mels[part], np.float32)[:, None],
                   "face": face_input(self.faces[part], self.faces.shape[1]).numpy()}


def calibration_from_avatar(avatar, wav: np.ndarray, samples: int = CALIBRATION_SAMPLES,
                            audio_name: str = "the job's audio") -> Calibration:
    """The calibration of a job: ``samples`` mel windows spread evenly over ``wav`` (16 kHz mono
    float32) and ``samples`` face crops of ``avatar``, spread over its saved crops, or (an avatar
    without saved crops) the first ``samples`` frames with a face, so that at most that many frames
    are decoded again (a talking head's face does not change much within seconds). Raises
    PrecisionError when the avatar has no frame with a face."""
    from lipsync.render.blending import cut_crop
    from lipsync.render.engine import windows_of

    n_out, windows = windows_of(wav, avatar.fps)  # (n_out, 80, 16)
    mels = windows[np.linspace(0, n_out - 1, samples).round().astype(int)]
    if avatar.crops is not None:
        with_face = [j for j in range(len(avatar.crops)) if avatar.box(j) is not None]
        crops = avatar.crops[[with_face[k] for k in np.linspace(0, len(with_face) - 1, samples).round().astype(int)]] \
            if with_face else np.zeros((0,))
    else:
        found = []
        for j, frame in enumerate(avatar.source.frames()):
            box = avatar.box(j) if (avatar.coords is None or j < len(avatar.coords)) else None
            if box is not None:
                found.append(cut_crop(frame, box, avatar.img_size))
            if len(found) == samples:
                break
        crops = np.stack(found) if found else np.zeros((0,))
    if len(crops) == 0:
        raise PrecisionError(f"int8 calibration needs faces: no frame of {avatar.source.path!r} has one")
    faces = crops[np.arange(samples) % len(crops)]  # a photo: its one face with every window
    name = os.path.basename(avatar.source.path)
    return Calibration(mels, faces, f"{name} ({len(crops)} face crops) + {audio_name} ({samples} mel windows)")


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a Calibration's rows."""

    def __init__(self, calibration: Calibration, rows: np.ndarray):
        self.items = iter(list(calibration.batches(rows)))

    def get_next(self):
        return next(self.items, None)


@contextlib.contextmanager
def _quiet_quantizer():
    """Hide quantize_static's advice to pre-process the model (it logs on the root logger): the export
    is shape-inferred already, and ONNX Runtime's pre-processing changed neither the quality nor
    the speed of the int8 generator (measured on the demo's generator)."""
    class Drop(logging.Filter):
        def filter(self, record):
            return "pre-processing" not in record.getMessage()

    drop = Drop()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


# ------------------------------------------------------------------------------------------------
# Quantizing
# ------------------------------------------------------------------------------------------------
def audio_only_nodes(proto) -> list:
    """Names of the nodes of a generator graph whose inputs come from ``mel`` alone (and constants):
    the audio encoder and the first decoder layer on its output, however the exporter named them."""
    constants = {t.name for t in proto.graph.initializer}
    from_mel, names = {"mel"}, []
    for node in proto.graph.node:  # ONNX keeps nodes in topological order
        inputs = [i for i in node.input if i and i not in constants]
        if inputs and all(i in from_mel for i in inputs):
            from_mel.update(node.output)
            names.append(node.name)
    return names


def quantizer_settings(reduce_range: Optional[bool] = None) -> dict:
    """What :func:`quantize_generator` passes to quantize_static (``reduce_range`` None: 7-bit
    weights unless this CPU has VNNI)."""
    if reduce_range is None:
        reduce_range = not cpu_capabilities().vnni
    return {"quantizer": "onnxruntime.quantization.quantize_static", "format": "QDQ", "activations": "uint8",
            "weights": "int8", "per_channel": True, "reduce_range": bool(reduce_range), "calibration": "MinMax",
            "fp32": "the nodes that see only the mel input", "version": QUANTIZER_VERSION}


def unfused_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime session of an int8 file with no graph optimisation: every QDQ pair runs as
    written (DequantizeLinear, the float operator, QuantizeLinear), never a fused integer kernel. Its
    numbers are those of int8 kernels that accumulate in 32 bits (VNNI), to a rounding, on any CPU
    (slowly): how a file made for VNNI is judged on a CPU without it."""
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def run_faces(sess, calibration: Calibration, rows: np.ndarray) -> np.ndarray:
    """The faces a generator session makes for ``rows``: (R, S, S, 3) uint8 BGR, truncated as
    :meth:`~lipsync.render.generator.Generator.decode` does."""
    out = [sess.run(None, feed)[0] for feed in calibration.batches(rows)]  # (B, 3, S, S) in [0, 1]
    return (np.concatenate(out).transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)


def quantize_generator(fp32_path: str, out_path: str, calibration: Calibration,
                       reduce_range: Optional[bool] = None, model: Optional[str] = None) -> dict:
    """Write the int8 generator of the fp32 ONNX generator ``fp32_path`` (``export_onnx.py``'s) to
    ``out_path``, calibrated on ``calibration``, and check it against fp32 on the rows that did not
    calibrate. Returns the metadata it recorded ("precision", "quantizer", "calibration",
    "calibration_sha256", "quality", "model", ...; "quality" and "quantizer" as dicts). ``model``: the
    file the user gave (a .pth), for the record. The file is written whole or not at all."""
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32 = session(fp32_path)
    meta = metadata(fp32)
    if meta.get("kind", "generator") != "generator" or meta.get("precision", "fp32") != "fp32":
        raise OnnxError(f"{fp32_path!r} is not an fp32 generator (metadata {meta})")
    size = fp32.get_inputs()[1].shape[2]
    if calibration.faces.shape[1:] != (size, size, 3):
        raise OnnxError(f"calibration faces are {calibration.faces.shape[1:]}, the generator takes {size}x{size}")
    settings = quantizer_settings(reduce_range)
    calib, check = calibration.split()
    audio_encoder = audio_only_nodes(onnx.load(fp32_path))
    with atomic_write(out_path, ".onnx") as tmp:
        with _quiet_quantizer():
            quantize_static(fp32_path, tmp, _Reader(calibration, calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=settings["reduce_range"], nodes_to_exclude=audio_encoder,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        quality = compare_faces(run_faces(fp32, calibration, check), run_faces(session(tmp), calibration, check))
        proto = onnx.load(tmp)
        info = {**meta, "precision": "int8", "quantizer": settings, "calibration": calibration.source,
                "calibration_sha256": calibration.digest(), "calibration_frames": len(calib), "quality": quality,
                "model": os.path.basename(model or fp32_path), "onnxruntime": ort.__version__,
                "quantized_on": cpu_capabilities().line()}
        del proto.metadata_props[:]
        for key, value in info.items():
            proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
        onnx.save(proto, tmp)
    return info


def warn_about(info: dict, path: str, of: str = "this job") -> None:
    """Log a warning where the int8 file ``path`` (its metadata ``info``, see :func:`int8_info`) is
    outside the threshold (checked on the faces of ``of``), or does not suit this CPU."""
    quality = info.get("quality")
    if quality and not INT8_THRESHOLD.met(quality):
        log.warning("%s: %s; fp32 keeps the frames closer to the model's", path, quality_line(quality, of=of))
    if cpu_capabilities().vnni:
        return
    if not info.get("quantizer", {}).get("reduce_range", True):
        log.warning("%s has 8-bit weights, made for a CPU with VNNI; this one has none, and its int8 kernels "
                    "saturate with them (faces far from fp32's): quantize it here (export_onnx.py --int8, or "
                    "--precision int8 with the checkpoint)", path)
    else:
        log.warning("this CPU has no VNNI: int8 runs about as fast as fp32 here (docs/onnx.md)")


def int8_info(meta: dict) -> dict:
    """The metadata of an int8 file with "quantizer" and "quality" read back as dicts."""
    return {k: (json.loads(v) if k in ("quantizer", "quality") else v) for k, v in meta.items()}


# ------------------------------------------------------------------------------------------------
# The cache of int8 files (inference.py --precision int8)
# ------------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "wav2lip", "int8")


class Int8Files:
    """Where the fp32 export of a checkpoint and its int8 files go: ``directory`` (None:
    :func:`default_cache_dir`; ``''``: a temporary folder that lives as long as this object, so
    every run quantizes again). Files are named by what they depend on (the model file's sha256,
    the calibration's digest, the quantizer's settings, the ONNX Runtime and torch versions), so a
    rerun of the same job finds its int8 file and a changed one makes a new file. Every job makes
    one (a third of the fp32 export's size): only the ``keep`` most recently used int8 files stay."""

    keep = INT8_CACHE_KEEP

    def __init__(self, directory: Optional[str] = None):
        self._tmp = None
        if directory == "":
            self._tmp = tempfile.TemporaryDirectory(prefix="wav2lip-int8-")
            directory = self._tmp.name
        self.directory = directory if directory is not None else default_cache_dir()

    def _path(self, model: str, parts: list, suffix: str) -> str:
        key = hashlib.sha256(json.dumps([file_sha256(model)] + parts).encode()).hexdigest()[:16]
        stem = os.path.splitext(os.path.basename(model))[0]
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise OnnxError(f"--int8_cache_dir {self.directory!r} cannot be used ({exc.strerror}): give a folder "
                            "that can be written, or '' to keep no files") from None
        return os.path.join(self.directory, f"{stem}-{key}-{suffix}.onnx")

    @staticmethod
    def _export_parts() -> list:
        """What an fp32 export of a checkpoint depends on besides the checkpoint: the opset and torch."""
        import torch

        return [OPSET, torch.__version__]

    def fp32(self, checkpoint_path: str) -> str:
        """The fp32 ONNX export of a generator checkpoint (exported once)."""
        path = self._path(checkpoint_path, ["fp32"] + self._export_parts(), "fp32")
        if not os.path.isfile(path):
            export(checkpoint_path, path, kind="generator")
        return path

    def int8_path(self, model: str, calibration: Calibration) -> str:
        """Where the int8 generator of ``model`` calibrated on ``calibration`` is kept: named by the
        model file, the fp32 export it is quantized from (opset, torch), the calibration's digest,
        the quantizer's settings and ONNX Runtime's version."""
        ort = _require("onnxruntime")
        return self._path(model, ["int8", calibration.digest(), quantizer_settings(), ort.__version__]
                          + self._export_parts(), "int8")

    def int8(self, model: str, fp32_path: str, calibration: Calibration) -> Tuple[str, dict, bool]:
        """(path, metadata, found in the cache) of the int8 generator of ``model`` (a checkpoint or an
        fp32 .onnx; ``fp32_path`` its fp32 export) calibrated on ``calibration``."""
        settings = quantizer_settings()
        path = self.int8_path(model, calibration)
        if os.path.isfile(path):
            try:
                info = int8_info(metadata(session(path)))
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: the last to be pruned
                return path, info, True
            except OnnxError:
                log.warning("the cached int8 generator %s cannot be read: quantizing again", path)
        info = quantize_generator(fp32_path, path, calibration, settings["reduce_range"], model)
        self.prune(keep=path)
        return path, info, False

    def prune(self, keep: Optional[str] = None) -> None:
        """Remove all but the :attr:`keep` most recently used int8 files of the folder (never ``keep``).
        A file another process has open stays usable: ONNX Runtime reads it whole into its session."""
        names = [n for n in os.listdir(self.directory) if n.endswith("-int8.onnx")]
        paths = [os.path.join(self.directory, n) for n in names]
        with_times = []
        for p in paths:
            with contextlib.suppress(OSError):
                with_times.append((os.stat(p).st_mtime, p))
        old = [p for _, p in sorted(with_times, reverse=True)[self.keep:]]
        for p in old:
            if keep is None or os.path.abspath(p) != os.path.abspath(keep):
                with contextlib.suppress(OSError):
                    os.remove(p)
                    log.info("removed the least recently used int8 generator %s", p)
