"""Lip-sync a face video (or photo) to one or more audio tracks: what ``inference.py`` runs.

A short composition of the engine's pieces: load the generator once (:mod:`lipsync.render.generator`),
prepare the face once or load a saved avatar (:mod:`lipsync.render.avatar`), then for each audio render the
frames (:mod:`lipsync.render.engine`) straight into the encoder (:class:`lipsync.media.video.VideoWriter`).
Memory does not grow with the video's length.

With ``preset="published"``, or ``blend="none"`` and ``loop="repeat"`` (parity mode), the frames are
those of the published script: every frame detected at full size, fp32, hard paste, video cycled from the start; the output
also runs to the end of the audio, where the published script stops a frame or two early.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

import audio
from lipsync.render.avatar import Avatar, check_save_target, load_avatar, prepare_avatar, save_avatar
from lipsync.render.avatar_settings import AvatarSettings, settings_from_flags
from lipsync.render.blending import resolve_mask
from lipsync.render.boxes import DetectionCache
from lipsync.core.device import resolve_device
from lipsync.render.streaming import warm_up_mel
from lipsync.render.engine import count_missing, frame_count, render
from lipsync.core.errors import Wav2LipError
from lipsync.core.settings import settings_dataclass
from lipsync.render.generator import Generator
from lipsync.core.pipeline import Timings
from lipsync.core.progress import progress_bar
from lipsync.render.settings import ENCODERS, INFERENCE, NO_BOX, SETTINGS, is_published, with_preset
from lipsync.media.video import VideoWriter

log = logging.getLogger(__name__)


class InferenceError(Wav2LipError, ValueError):
    """Input that inference cannot use; the message says what to change."""


@settings_dataclass(INFERENCE)
class InferenceConfig:
    """The flags of ``inference.py``: after the fields below, one field per setting of
    :data:`lipsync.render.settings.INFERENCE` (same names and defaults). ``det_scale=0`` and
    ``det_every=None`` mean auto (full size and every frame in parity mode; else a copy with its
    shorter side at most 480 px, every 5th frame); ``precision="auto"`` is fp32 in parity mode.
    ``preset`` fills in its flags (``"published"``: ``blend="none"``, ``loop="repeat"``); raises
    SettingError where another value contradicts it."""

    checkpoint_path: str
    audio: str
    avatar_settings_given: Optional[dict] = None  # with ``avatar``: settings the user set explicitly
    progress: bool = True

    def __post_init__(self):
        for name, value in with_preset(self.flags()).items():
            setattr(self, name, value)

    def flags(self) -> dict:
        """The values of the settings' fields, by name."""
        return {s.name: getattr(self, s.name) for s in INFERENCE if s.field}

    @property
    def parity(self) -> bool:
        """Parity mode: ``preset="published"``, or ``blend="none"`` and ``loop="repeat"``."""
        return is_published(self.flags())

    @property
    def generator_precision(self) -> str:
        """The precision the generator is asked for: fp16 with ``half``, fp32 for auto in parity
        mode, else ``precision`` (auto: chosen for the device)."""
        precision = "fp16" if self.half and self.precision == "auto" else self.precision
        return "fp32" if precision == "auto" and self.parity else precision

    def avatar_settings(self) -> AvatarSettings:
        """What decides the face's frames and boxes (see :func:`settings_from_flags`)."""
        return settings_from_flags(self.flags())


@dataclass
class InferenceSummary:
    """What one output took: frames written, frames without a face (with ``target_face`` other than
    largest: without the chosen face, passed through unchanged), and seconds per phase. ``detector``:
    how the boxes were found (a face detector's name, or ``fixed --box``); ``mask``: the paste's
    region (``ellipse``, ``landmarks``, or ``none`` for the hard paste)."""

    outfile: str
    frames: int
    fps: float
    frames_without_face: int
    detection_cached: bool
    seconds: dict = field(default_factory=dict)
    tuning: str = ""
    target_face: str = "largest"
    detector: str = ""
    mask: str = ""

    def line(self) -> str:
        def rate(phase):
            s = self.seconds.get(phase)
            return f"{self.frames / s:.1f} fps" if s else "-"

        total = self.seconds.get("total", 0.0)
        det = "cached" if self.detection_cached else rate("detect")
        return (f"wrote {self.outfile}: {self.frames} frames ({self.frames / self.fps:.2f} s at {self.fps:g} fps), "
                f"{self.frames_without_face} without {'a' if self.target_face == 'largest' else 'the chosen'} face"
                f"{' (' + self.detector + ', mask ' + self.mask + ')' if self.detector else ''}"
                f" | decode {rate('decode')}, detect {det}, "
                f"generate {rate('generate')}, blend {rate('blend')}, "
                f"{'enhance ' + rate('enhance') + ', ' if self.seconds.get('enhance') else ''}encode {rate('encode')}"
                f"{' | ' + self.tuning if self.tuning else ''} | total {total:.1f} s "
                f"({self.frames / total if total else 0:.1f} fps)")



def encoder_for(name: str, device=None) -> str:
    """The H.264 encoder: ``auto`` is ``h264_nvenc`` on a CUDA device when this ffmpeg has it, else
    ``libx264``. Raises InferenceError when a named encoder is missing from this ffmpeg."""
    from lipsync.media.ffmpeg import has_encoder

    if name not in ENCODERS:
        raise InferenceError(f"--encoder must be one of {ENCODERS}, got {name!r}")
    if name == "auto":
        cuda = getattr(device, "type", device) == "cuda"
        return "h264_nvenc" if cuda and has_encoder("h264_nvenc") else "libx264"
    if not has_encoder(name):
        raise InferenceError(f"this ffmpeg has no {name} encoder; use --encoder libx264")
    return name


# ------------------------------------------------------------------------------------------------
def validate(cfg: InferenceConfig) -> None:
    """Flag values that cannot work; raises InferenceError naming the flag."""
    # the other choices are checked where they are used (a --device such as cuda:1 is not a choice)
    for name in ("blend", "mask", "enhancer", "loop", "on_missing_face", "preset"):
        value, choices = getattr(cfg, name), SETTINGS[name].choices
        if value not in choices and value != SETTINGS[name].default:
            raise InferenceError(f"--{name} must be {' or '.join(choices)}, got {value!r}")
    if cfg.resize_factor < 1:
        raise InferenceError("--resize_factor must be >= 1")
    if cfg.wav2lip_batch_size < 1 or cfg.face_det_batch_size < 1:
        raise InferenceError("batch sizes must be >= 1")
    if not 0 <= cfg.det_scale <= 1:
        raise InferenceError("--det_scale must be in (0, 1], or auto")
    if cfg.det_every is not None and cfg.det_every < 1:
        raise InferenceError("--det_every must be >= 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise InferenceError("--threads must be >= 1")
    if not 0 <= cfg.det_jump_iou <= 1:
        raise InferenceError(f"--det_jump_iou is an IoU, in [0, 1]; got {cfg.det_jump_iou:g}")
    if cfg.face_cache_mb is not None and cfg.face_cache_mb < 0:
        raise InferenceError("--face_cache_mb must be >= 0")
    if cfg.mask == "landmarks" and cfg.blend == "none":
        raise InferenceError("--mask landmarks shapes the feathered paste: use it with --blend feather")
    if cfg.mask == "landmarks":
        from face_detection.dlib_faces import LANDMARKS_FILE, import_dlib, model_path

        import_dlib(), model_path(LANDMARKS_FILE)  # DetectorError naming requirements-faces.txt, before any work
    if cfg.enhancer != "none" and cfg.preset == "published":
        raise InferenceError("--preset published makes the published script's frames; --enhancer changes them: "
                             "leave out one of the two")
    fidelity_given = cfg.enhancer_weight != SETTINGS["enhancer_weight"].default
    if cfg.enhancer == "none" and (cfg.enhancer_path or fidelity_given):
        raise InferenceError(f"--{'enhancer_path' if cfg.enhancer_path else 'enhancer_weight'} is for an enhancer: "
                             "give --enhancer gfpgan or codeformer too (or leave it out)")
    if cfg.enhancer == "gfpgan" and fidelity_given:
        raise InferenceError("--enhancer_weight is CodeFormer's fidelity; GFPGAN has none: leave it out, or use "
                             "--enhancer codeformer")
    if cfg.enhancer != "none":  # also with --save_avatar alone, which restores nothing: a mistake is said at once
        from lipsync.render.enhance import check_enhancer

        check_enhancer(cfg.enhancer, cfg.enhancer_path, cfg.enhancer_weight)  # package, weights: before any work
    if cfg.save_avatar:
        check_save_target(cfg.save_avatar)
    if not (math.isfinite(cfg.fps) and 0 < cfg.fps <= 1000):
        raise InferenceError(f"--fps must be a frame rate in (0, 1000] frames/s, got {cfg.fps:g}")
    if cfg.outfile and os.path.isdir(cfg.outfile):
        raise InferenceError(f"--outfile {cfg.outfile!r} is a folder: give a file name (e.g. "
                             f"{os.path.join(cfg.outfile, 'result.mp4')})")
    if not os.path.isfile(cfg.checkpoint_path):
        raise InferenceError(f"--checkpoint_path not found: {cfg.checkpoint_path!r}")
    if (cfg.face is None) == (cfg.avatar is None):
        raise InferenceError("give the face as --face FILE or a saved --avatar DIR (one of them)")


def check_outputs(cfg: InferenceConfig, jobs: Sequence[tuple]) -> None:
    """Refuse (InferenceError) an output file that is one of the inputs (the face video, an audio,
    a saved avatar's source): writing it would destroy that input."""
    inputs = [cfg.face] + [a for a, _ in jobs]
    if cfg.avatar:
        inputs += [os.path.join(cfg.avatar, n) for n in os.listdir(cfg.avatar)] if os.path.isdir(cfg.avatar) else []
    taken = {os.path.realpath(p) for p in inputs if p}
    for _, outfile in jobs:
        if outfile and os.path.realpath(outfile) in taken:
            raise InferenceError(f"the output {outfile!r} is one of the inputs; writing it would destroy that "
                                 "input: give another --outfile or --outdir")


def detector_used(avatar: Avatar) -> str:
    """How the boxes of ``avatar`` were found: ``"fixed --box"``, or ``"<name> face detector"``."""
    if tuple(avatar.settings.box) != NO_BOX:
        return "fixed --box"
    return f"{avatar.settings.detection.detector} face detector"


def load_generator(cfg: InferenceConfig) -> Generator:
    """The generator of ``cfg`` (fp32 in parity mode unless a precision is asked for)."""
    from lipsync.render.onnx_model import open_generator

    precision = cfg.generator_precision
    # int8 and .onnx files run in ONNX Runtime on the CPU: --device auto means the CPU there, even beside a GPU
    onnx_file = os.fspath(cfg.checkpoint_path).lower().endswith(".onnx")
    device = cfg.device if precision == "int8" or onnx_file else resolve_device(cfg.device)
    return open_generator(cfg.checkpoint_path, device=device, precision=precision, threads=cfg.threads,
                          face_cache_mb=cfg.face_cache_mb, int8_cache_dir=cfg.int8_cache_dir)


def get_avatar(cfg: InferenceConfig, generator: Generator, timings: Timings) -> Avatar:
    """The face: a saved avatar (``cfg.avatar``), or ``cfg.face`` prepared now (and saved with
    ``cfg.save_avatar``). Applies ``on_missing_face``."""
    if cfg.avatar is not None:
        wanted = dict(cfg.avatar_settings_given or {})
        if cfg.parity:  # the published frames need boxes found as published: every frame, full size
            implied = cfg.avatar_settings().record()
            wanted.update({k: implied[k] for k in ("det_every", "det_scale") if k in implied})
        avatar = load_avatar(cfg.avatar, generator.img_size, wanted=wanted)
    else:
        cache = DetectionCache(cfg.det_cache_dir)
        avatar = prepare_avatar(cfg.face, cfg.avatar_settings(), generator.img_size, device=generator.device,
                                cache=cache, with_crops=cfg.save_avatar is not None, timings=timings,
                                progress=cfg.progress)
        if cfg.save_avatar is not None:
            save_avatar(avatar, cfg.save_avatar)
    missing = avatar.missing()
    if missing and cfg.on_missing_face == "fail":
        raise InferenceError(f"no face in {len(missing)} frame(s) of {avatar.source.path!r} (first: frame "
                             f"{missing[0]}); use --on_missing_face passthrough to keep them unchanged")
    return avatar


def load_face_enhancer(cfg: InferenceConfig, generator: Generator):
    """The ``--enhancer`` of ``cfg`` (None for ``none``) on the device the render uses: the generator's,
    or, for a generator that runs in ONNX Runtime on the CPU, ``--device`` resolved (a GPU when there is
    one). Raises EnhancerError (missing package, weights missing or of another network)."""
    from lipsync.render.enhance import load_enhancer

    if cfg.enhancer == "none":
        return None
    device = generator.device if generator.device.type != "cpu" else resolve_device(cfg.device)
    return load_enhancer(cfg.enhancer, cfg.enhancer_path, device, cfg.enhancer_weight)


def write_video(generator: Generator, avatar: Avatar, audio_path: str, outfile: str, cfg: InferenceConfig,
                timings: Timings, frame_sink: Optional[Callable[[int, np.ndarray], None]] = None,
                enhancer=None) -> int:
    """Render ``avatar`` speaking ``audio_path`` into ``outfile`` (atomic); returns the frame count.
    ``enhancer``: :func:`load_face_enhancer`'s, or None."""
    if not os.path.isfile(audio_path):
        raise InferenceError(f"--audio file not found: {audio_path!r}")
    t0 = time.perf_counter()
    wav = audio.load_wav(audio_path, audio.SAMPLE_RATE)
    timings.add("decode", time.perf_counter() - t0)
    n_out = frame_count(wav, avatar.fps)
    if getattr(generator, "awaiting_calibration", False):  # --precision int8: calibrated on this job
        from lipsync.render.quantize import calibration_from_avatar

        generator.calibrate(calibration_from_avatar(avatar, wav, audio_name=os.path.basename(audio_path)))
    frames = render(generator, avatar, wav, loop=cfg.loop, blend=cfg.blend, batch_size=cfg.wav2lip_batch_size,
                    timings=timings, mask=cfg.mask, enhancer=enhancer)
    w, h = avatar.size
    codec = encoder_for(cfg.encoder, generator.device)
    writer = VideoWriter(outfile, w, h, avatar.rate, audio_path=audio_path,
                         **({} if codec == "libx264" else {"codec": codec}))
    try:
        with progress_bar(total=n_out, desc="lip-sync", unit="frame", disable=not cfg.progress, leave=False) as bar:
            for index, frame in enumerate(frames):
                if frame_sink is not None:
                    frame_sink(index, frame)
                with timings.measure("encode"):
                    writer.write(frame)
                bar.update(1)
        if writer.frames != n_out:
            raise InferenceError(f"internal error: wrote {writer.frames} frames, expected {n_out}")
        with timings.measure("encode"):
            writer.close()
    except BaseException:
        frames.close()
        writer.abort()
        raise
    return n_out


def run_inference(cfg: InferenceConfig, frame_sink: Optional[Callable[[int, np.ndarray], None]] = None,
                  generator: Optional[Generator] = None) -> InferenceSummary:
    """Lip-sync the face of ``cfg`` to ``cfg.audio`` into ``cfg.outfile``.

    ``frame_sink(i, frame)``, when given, also receives every output frame before encoding (tests).
    ``generator``: one already loaded (else loaded from ``cfg``).
    """
    return run_many(cfg, [(cfg.audio, cfg.outfile)], frame_sink=frame_sink, generator=generator,
                    keep_going=False)[0]


def run_many(cfg: InferenceConfig, jobs: Sequence[tuple], frame_sink=None, generator: Optional[Generator] = None,
             keep_going: bool = True) -> List:
    """Render the face of ``cfg`` for each ``(audio_path, outfile)`` in ``jobs``, loading the model and
    preparing the face once. Returns one InferenceSummary per job, or, with ``keep_going``, the
    Wav2LipError / OSError of a job that failed in its place (the other jobs still run)."""
    t_start = time.perf_counter()
    validate(cfg)
    check_outputs(cfg, jobs)
    # the first mel imports librosa's STFT (numba: seconds); let that happen while the model loads
    import threading

    warm = threading.Thread(target=warm_up_mel, daemon=True)
    warm.start()
    generator = generator or load_generator(cfg)
    enhancer = load_face_enhancer(cfg, generator) if jobs else None  # weights of another network: before detection
    prep = Timings()
    avatar = get_avatar(cfg, generator, prep)
    results: List = []
    for audio_path, outfile in jobs:
        timings = Timings(**{k: v for k, v in prep.as_dict().items() if k != "total"}) if not results else Timings()
        t0 = time.perf_counter() if results else t_start
        try:
            n = write_video(generator, avatar, audio_path, outfile, cfg, timings, frame_sink, enhancer)
        except (Wav2LipError, OSError) as exc:
            if not keep_going:
                raise
            results.append(exc)
            continue
        timings.total = time.perf_counter() - t0
        results.append(InferenceSummary(outfile=outfile, frames=n, fps=avatar.fps,
                                        frames_without_face=count_missing(avatar, n, cfg.loop),
                                        detection_cached=avatar.detection_cached or cfg.avatar is not None,
                                        seconds=timings.as_dict(), tuning=generator.tuning(),
                                        target_face=avatar.settings.detection.target,
                                        detector=detector_used(avatar), mask=resolve_mask(cfg.mask, cfg.blend)))
    return results
