"""Lip-sync a face video or photo to any speech with a Wav2Lip checkpoint.

    python inference.py --checkpoint_path checkpoints/wav2lip_gan.pth --face video.mp4 --audio speech.wav
    python inference.py --checkpoint_path G.pth --face video.mp4 --save_avatar avatars/anna   # prepare once
    python inference.py --checkpoint_path G.pth --avatar avatars/anna --audio a.wav b.mp3 --outdir results/

The published flags keep their meaning and defaults. With --blend none --loop repeat (parity mode)
the frames are the published script's: every frame detected at full size, fp32, hard paste.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from face_detection import BACKENDS
from lipsync.core.cli import DEVICE_HELP, PRECISION_HELP, PRECISIONS, QUIET_HELP, THREADS_HELP, HelpFormatter
from lipsync.core.device import DEVICE_CHOICES

# flags that decide an avatar's frames and boxes, as avatar.json names them
AVATAR_FLAGS = {"fps": "fps", "static": "static", "resize_factor": "resize_factor", "rotate": "rotate",
                "crop": "crop", "pads": "pads", "nosmooth": "nosmooth", "box": "box",
                "face_detector": "face_detector", "det_scale": "det_scale", "det_every": "det_every",
                "det_jump_iou": "det_jump_iou"}


def det_scale(text: str) -> float:
    if text == "auto":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = p.add_argument
    add("--checkpoint_path", required=True, help="generator checkpoint (wav2lip.pth, wav2lip_gan.pth, or one trained "
                                                 "here), or a .onnx file from export_onnx.py (run by ONNX Runtime)")
    add("--face", help="video or image with the face (or use --avatar)")
    add("--audio", nargs="+", help="speech: any audio file, or a video whose audio to use; several files give one "
                                   "output each (with --outdir)")
    add("--outfile", default="results/result_voice.mp4", help="output video (one audio)")
    add("--outdir", help="folder for the outputs, each named after its audio (<audio name>.mp4)")
    add("--static", action="store_true", help="use only the first frame of --face")
    add("--fps", type=float, default=25.0, help="frame rate for an image input, frames/s")
    add("--pads", nargs=4, type=int, default=[0, 10, 0, 0], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
        help="pixels added around the detected face")
    add("--face_det_batch_size", type=int, default=16, help="frames per face-detection batch")
    add("--wav2lip_batch_size", type=int, default=128, help="frames per generator batch (the CPU runs them in "
                                                            "tuned micro-batches)")
    add("--resize_factor", type=int, default=1, help="divide the input's width and height by this first (the "
                                                     "output has the reduced size, as published)")
    add("--crop", nargs=4, type=int, default=[0, -1, 0, -1], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
        help="crop the input to this region (-1: to the edge)")
    add("--box", nargs=4, type=int, default=[-1, -1, -1, -1], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
        help="fixed face box for every frame; skips detection (-1 -1 -1 -1: detect)")
    add("--rotate", action="store_true", help="rotate the input 90 degrees clockwise first")
    add("--nosmooth", action="store_true", help="do not smooth face boxes over 5 frames")
    add("--face_detector", choices=BACKENDS, default="sfd", help="sfd (S3FD, needs s3fd.pth) or lbp (no download)")
    add("--s3fd_path", default=None, help="S3FD weights (None: face_detection/detection/sfd/s3fd.pth)")
    add("--det_scale", type=det_scale, default=0.0, metavar="auto|F",
        help="detect on frames scaled by F (0 = auto: full size in parity mode, else shorter side <= 480 px)")
    add("--det_every", type=int, default=None, metavar="K",
        help="detect every K-th frame, interpolate between, re-detect where the box jumps (None = auto: 1 in "
             "parity mode, else 5; 1 = every frame)")
    add("--det_jump_iou", type=float, default=0.7, help="with --det_every > 1: detect every frame between two "
                                                        "keyframes whose boxes overlap less than this (IoU)")
    add("--det_cache_dir", default=None, help="where face detections are cached (None: ~/.cache/wav2lip/detections; "
                                              "'' disables)")
    add("--save_avatar", metavar="DIR", help="prepare the face (detection and crops) and save it to DIR; with "
                                             "--audio, also lip-sync")
    add("--avatar", metavar="DIR", help="use a face saved with --save_avatar instead of --face")
    add("--device", choices=DEVICE_CHOICES, default="auto", help=DEVICE_HELP)
    add("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP + "; fp32 in parity mode")
    add("--threads", type=int, default=None, help=THREADS_HELP)
    add("--half", action="store_true", help="the same as --precision fp16")
    add("--encoder", choices=("auto", "libx264", "h264_nvenc"), default="auto",
        help="H.264 encoder: auto = h264_nvenc on CUDA when ffmpeg has it, else libx264")
    add("--face_cache_mb", type=float, default=512, help="memory for face features reused when the video loops")
    add("--blend", choices=("feather", "none"), default="feather",
        help="feather: soft mouth-and-jaw mask with colour matching; none: hard paste as published")
    add("--loop", choices=("repeat", "pingpong"), default="repeat",
        help="how to extend a video shorter than the audio")
    add("--on_missing_face", choices=("passthrough", "fail"), default="passthrough",
        help="a frame without a face: keep it unchanged, or stop")
    add("--quiet", action="store_true", help=QUIET_HELP)
    from lipsync.media.ffmpeg import add_ffmpeg_arg

    add_ffmpeg_arg(p)
    return p


def explicit_flags(argv) -> dict:
    """The flags given on the command line (not defaults), by destination."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return vars(p.parse_known_args(argv)[0])


def avatar_wanted(given: dict) -> dict:
    """Avatar settings the user set explicitly, in avatar.json's terms."""
    return {AVATAR_FLAGS[k]: (list(v) if isinstance(v, list) else v) for k, v in given.items() if k in AVATAR_FLAGS}


def output_names(audios, outdir):
    """``outdir/<audio stem>.mp4`` per audio; stems seen twice keep their extension (``a_mp3.mp4``)."""
    stems = [os.path.splitext(os.path.basename(a))[0] for a in audios]
    names = []
    for a, stem in zip(audios, stems):
        name = stem if stems.count(stem) == 1 else stem + "_" + os.path.splitext(a)[1].lstrip(".")
        while name + ".mp4" in names:
            name += "_"
        names.append(name + ".mp4")
    return [os.path.join(outdir, n) for n in names]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.face and args.avatar:
        parser.error("give --face or --avatar, not both")
    if not args.face and not args.avatar:
        parser.error("the face is missing: give --face FILE (or a saved --avatar DIR)")
    if not args.audio and not args.save_avatar:
        parser.error("give --audio (or --save_avatar DIR to only prepare the face)")
    if args.avatar and args.save_avatar:
        parser.error("--save_avatar prepares from --face; it cannot be combined with --avatar")
    audios = args.audio or []
    if len(audios) > 1 and not args.outdir:
        parser.error("several --audio files need --outdir (each output is named after its audio)")
    if args.outdir and "outfile" in explicit_flags(argv if argv is not None else sys.argv[1:]):
        parser.error("give --outfile (one output) or --outdir (outputs named after their audio), not both")

    from lipsync.core.errors import run_main

    return run_main(_run, args, audios, argv)


def _run(args, audios, argv) -> int:
    from lipsync.render.inference import InferenceConfig, run_many
    from lipsync.media.ffmpeg import use_ffmpeg

    use_ffmpeg(args.ffmpeg)
    given = explicit_flags(argv if argv is not None else sys.argv[1:]) if args.avatar else {}
    cfg = InferenceConfig(
        checkpoint_path=args.checkpoint_path, face=args.face, audio=audios[0] if audios else "",
        outfile=args.outfile, static=args.static, fps=args.fps, pads=args.pads,
        face_det_batch_size=args.face_det_batch_size, wav2lip_batch_size=args.wav2lip_batch_size,
        resize_factor=args.resize_factor, crop=args.crop, box=args.box, rotate=args.rotate, nosmooth=args.nosmooth,
        face_detector=args.face_detector, s3fd_path=args.s3fd_path, det_scale=args.det_scale,
        det_every=args.det_every, det_jump_iou=args.det_jump_iou, device=args.device, blend=args.blend,
        loop=args.loop, on_missing_face=args.on_missing_face, det_cache_dir=args.det_cache_dir,
        precision=args.precision, threads=args.threads, half=args.half, avatar=args.avatar,
        save_avatar=args.save_avatar, avatar_settings_given=avatar_wanted(given), encoder=args.encoder,
        face_cache_mb=args.face_cache_mb, progress=not args.quiet)
    outs = output_names(audios, args.outdir) if args.outdir else [args.outfile] * len(audios)
    results = run_many(cfg, list(zip(audios, outs)), keep_going=len(audios) > 1)
    if not audios:
        print(f"saved avatar to {os.path.abspath(args.save_avatar)}")
    failed = 0
    for path, result in zip(audios, results):
        if isinstance(result, Exception):
            from lipsync.core.errors import error_line

            print(f"{error_line(result)} (audio {path!r}: no output written)", file=sys.stderr)
            failed += 1
        else:
            print(result.line())
    if failed:
        print(f"{failed} of {len(audios)} audio file(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
