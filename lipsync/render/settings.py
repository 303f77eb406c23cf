"""Every setting of ``inference.py``, declared once: its flag, type, default and help, and whether it
decides an avatar's frames. The command line (``inference.py``'s ``build_parser``), the fields of
:class:`lipsync.render.inference.InferenceConfig`, what avatar.json records
(:mod:`lipsync.render.avatar`) and the server's form fields all come from :data:`INFERENCE`.

``--preset published`` (parity mode) is the published script's frames: the same as
``--blend none --loop repeat``, which make fp32, every frame detected at full size and a hard paste.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Mapping

from face_detection import BACKENDS, BACKENDS_HELP
from lipsync.core.cli import DEVICE_HELP, PRECISION_HELP, PRECISIONS, QUIET_HELP, THREADS_HELP
from lipsync.core.device import DEVICE_CHOICES
from lipsync.core.settings import Setting, SettingError, by_name
from lipsync.media.frames import LOOP_MODES
from lipsync.render.blending import BLEND_MODES, MASKS
from lipsync.render.enhance import DEFAULT_FIDELITY, ENHANCERS
from lipsync.render.tracking import LARGEST, TARGET_FACE_HELP, parse_target_face

DEFAULT_DET_EVERY = 5  # --det_every auto outside parity mode: detect every 5th frame, interpolate, re-detect jumps
ENCODERS = ("auto", "libx264", "h264_nvenc")
MISSING_FACE = ("passthrough", "fail")
SIDES = ("TOP", "BOTTOM", "LEFT", "RIGHT")
# a preset is a set of flag values; "published" is parity mode
PRESETS: Dict[str, Dict[str, Any]] = {"published": {"blend": "none", "loop": "repeat"}}


def parse_det_scale(text: str) -> float:
    """``--det_scale``'s text: ``auto`` or 0 (both 0.0, chosen while running) or a factor in (0, 1]."""
    if text == "auto":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number in (0, 1], got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be auto (or 0) or in (0, 1], got {value}")
    return value


CHECKPOINT_HELP = ("generator checkpoint (wav2lip.pth, wav2lip_gan.pth, or one trained here), or a .onnx file from "
                   "export_onnx.py (run by ONNX Runtime)")

INFERENCE = [
    Setting("checkpoint_path", CHECKPOINT_HELP, required=True, field=False),
    Setting("face", "video or image with the face (or use --avatar)"),
    Setting("audio", "speech: any audio file, or a video whose audio to use; several files give one output each "
                     "(with --outdir)", nargs="+", field=False),
    Setting("outfile", "output video (one audio)", "results/result_voice.mp4"),
    Setting("outdir", "folder for the outputs, each named after its audio (<audio name>.mp4)", field=False),
    Setting("static", "use only the first frame of --face", False, bool, avatar="static"),
    Setting("fps", "frame rate for an image input, frames/s", 25.0, float, avatar="fps"),
    Setting("pads", "pixels added around the detected face", (0, 10, 0, 0), int, nargs=4, metavar=SIDES,
            avatar="pads"),
    Setting("face_det_batch_size", "frames per face-detection batch", 16, int),
    Setting("wav2lip_batch_size", "frames per generator batch (the CPU runs them in tuned micro-batches)", 128, int),
    Setting("resize_factor", "divide the input's width and height by this first (the output has the reduced size, "
                             "as published)", 1, int, avatar="transform.resize_factor"),
    Setting("crop", "crop the input to this region (-1: to the edge)", (0, -1, 0, -1), int, nargs=4, metavar=SIDES,
            avatar="transform.crop"),
    Setting("box", "fixed face box for every frame; skips detection (-1 -1 -1 -1: detect)", (-1, -1, -1, -1), int,
            nargs=4, metavar=SIDES, avatar="box"),
    Setting("rotate", "rotate the input 90 degrees clockwise first", False, bool, avatar="transform.rotate"),
    Setting("nosmooth", "do not smooth face boxes over 5 frames", False, bool, avatar="nosmooth"),
    Setting("face_detector", BACKENDS_HELP, "sfd", choices=BACKENDS,
            avatar="detection.detector"),
    Setting("target_face", TARGET_FACE_HELP, LARGEST, parse=parse_target_face, metavar="largest|N|X,Y",
            avatar="detection.target"),
    Setting("s3fd_path", "S3FD weights (None: face_detection/detection/sfd/s3fd.pth)"),
    Setting("det_scale", "detect on frames scaled by F (0 = auto: full size in parity mode, else shorter side <= "
                         "480 px)", 0.0, float, parse=parse_det_scale, metavar="auto|F", avatar="detection.scale"),
    Setting("det_every", "detect every K-th frame, interpolate between, re-detect where the box jumps (None = auto: 1 "
                         f"in parity mode, else {DEFAULT_DET_EVERY}; 1 = every frame)", None, int, metavar="K",
            avatar="detection.every"),
    Setting("det_jump_iou", "with --det_every > 1: detect every frame between two keyframes whose boxes overlap less "
                            "than this (IoU)", 0.7, float, avatar="detection.jump_iou"),
    Setting("det_cache_dir", "where face detections are cached (None: ~/.cache/wav2lip/detections; '' disables)"),
    Setting("save_avatar", "prepare the face (detection and crops) and save it to DIR; with --audio, also lip-sync",
            metavar="DIR"),
    Setting("avatar", "use a face saved with --save_avatar instead of --face", metavar="DIR"),
    Setting("device", DEVICE_HELP, "auto", choices=DEVICE_CHOICES),
    Setting("precision", PRECISION_HELP + "; fp32 in parity mode", "auto", choices=PRECISIONS),
    Setting("threads", THREADS_HELP, None, int),
    Setting("int8_cache_dir", "with --precision int8: where the ONNX exports and the int8 generators calibrated on a "
                              "job are kept, for a rerun to reuse (None: ~/.cache/wav2lip/int8; '' keeps none)"),
    Setting("half", "the same as --precision fp16", False, bool),
    Setting("encoder", "H.264 encoder: auto = h264_nvenc on CUDA when ffmpeg has it, else libx264", "auto",
            choices=ENCODERS),
    Setting("face_cache_mb", "memory for face features reused when the video loops", 512, float),
    Setting("blend", "feather: soft mouth-and-jaw mask with colour matching; none: hard paste as published",
            "feather", choices=BLEND_MODES),
    Setting("mask", "with --blend feather, the region pasted: ellipse (a fixed soft ellipse over mouth and jaw), "
                    "landmarks (the mouth, chin and jaw below the nose as dlib's 68 landmarks draw them on each frame; "
                    "pip install -r requirements-faces.txt), or auto: landmarks when they are installed, else ellipse",
            "auto", choices=("auto",) + MASKS),
    Setting("enhancer", "restore the pasted face: the padded box at 512x512 through GFPGAN v1.4 or CodeFormer, mixed "
                        "in through the paste's mask (--enhancer_path: your GFPGANv1.4.pth or codeformer.pth; "
                        "pip install -r requirements-faces.txt; docs/faces.md)", "none", choices=ENHANCERS),
    Setting("enhancer_path", "with --enhancer: the published weights file (GFPGANv1.4.pth or codeformer.pth; never "
                             "downloaded)", metavar="FILE"),
    Setting("enhancer_weight", "with --enhancer codeformer: its fidelity w, 0 (most restoration) to 1 (closest to the "
                               "input, the generated mouth kept best)", DEFAULT_FIDELITY, float, metavar="W"),
    Setting("loop", "how to extend a video shorter than the audio", "repeat", choices=LOOP_MODES),
    Setting("on_missing_face", "a frame without a face: keep it unchanged, or stop", "passthrough",
            choices=MISSING_FACE),
    Setting("preset", "published: the published script's frames (parity mode: fp32, every frame detected at full "
                      "size, hard paste), the same as --blend none --loop repeat", None, choices=tuple(PRESETS)),
    Setting("quiet", QUIET_HELP, False, bool, field=False),
]
SETTINGS = by_name(INFERENCE)
DEFAULTS = {s.name: s.default for s in INFERENCE}
AVATAR = [s for s in INFERENCE if s.avatar]  # the settings that decide an avatar's frames, as avatar.json records them
NO_BOX = DEFAULTS["box"]  # no fixed box: detect


def check_preset(preset, given: Mapping[str, Any]) -> None:
    """Raise SettingError where ``given`` (values by setting name) sets a flag of ``preset`` otherwise."""
    for name, value in PRESETS.get(preset, {}).items():
        if given.get(name, value) != value:
            raise SettingError(f"--preset {preset} means --{name} {value}; leave out --{name} {given[name]}")


def with_preset(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``values`` (by setting name) with those of their ``preset`` filled in; raises SettingError where
    a value other than the default contradicts the preset (``--preset published --blend feather``
    can only be told from the default on the command line: ``inference.py`` checks that)."""
    preset = values.get("preset")
    check_preset(preset, {name: v for name, v in values.items() if v != DEFAULTS.get(name)})
    return {**values, **PRESETS.get(preset, {})}


def is_published(values: Mapping[str, Any]) -> bool:
    """Parity mode: ``values`` (by setting name, preset applied) are those of ``--preset published``."""
    return all(values.get(name) == value for name, value in PRESETS["published"].items())
