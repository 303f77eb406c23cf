"""Lip-sync a face video or photo to any speech with a Wav2Lip checkpoint.

    python inference.py --checkpoint_path checkpoints/wav2lip_gan.pth --face video.mp4 --audio speech.wav

Flags and defaults are those of the published script, plus --face_detector, --device, --blend,
--loop and --on_missing_face (see README.md).
"""
from __future__ import annotations

import argparse
import logging
import sys

from face_detection import BACKENDS
from lipsync.device import DEVICE_CHOICES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Lip-sync a face video or image to an audio file using Wav2Lip")
    p.add_argument("--checkpoint_path", required=True, help="generator checkpoint (wav2lip.pth, wav2lip_gan.pth, "
                                                            "or one trained here)")
    p.add_argument("--face", required=True, help="video or image with the face")
    p.add_argument("--audio", required=True, help="speech: any audio file, or a video whose audio to use")
    p.add_argument("--outfile", default="results/result_voice.mp4", help="output video (default: %(default)s)")
    p.add_argument("--static", action="store_true", help="use only the first frame of --face")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate for an image input (default: %(default)s)")
    p.add_argument("--pads", nargs=4, type=int, default=[0, 10, 0, 0], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="padding around the detected face (default: 0 10 0 0)")
    p.add_argument("--face_det_batch_size", type=int, default=16, help="frames per face-detection batch")
    p.add_argument("--wav2lip_batch_size", type=int, default=128, help="frames per generator batch")
    p.add_argument("--resize_factor", type=int, default=1, help="divide the input resolution by this first")
    p.add_argument("--crop", nargs=4, type=int, default=[0, -1, 0, -1], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="crop the input to this region (-1: to the edge)")
    p.add_argument("--box", nargs=4, type=int, default=[-1, -1, -1, -1], metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="fixed face box for every frame; skips detection")
    p.add_argument("--rotate", action="store_true", help="rotate the input 90 degrees clockwise first")
    p.add_argument("--nosmooth", action="store_true", help="do not smooth face boxes over 5 frames")
    p.add_argument("--face_detector", choices=BACKENDS, default="sfd",
                   help="sfd (S3FD, needs s3fd.pth) or lbp (no download) (default: %(default)s)")
    p.add_argument("--s3fd_path", default=None, help="S3FD weights (default: face_detection/detection/sfd/s3fd.pth)")
    p.add_argument("--det_scale", type=float, default=1.0,
                   help="run detection on frames scaled by this factor (<1 is faster, boxes may differ)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="(default: %(default)s)")
    p.add_argument("--blend", choices=("feather", "none"), default="feather",
                   help="feather: soft mask over the lower face; none: hard paste as published")
    p.add_argument("--loop", choices=("repeat", "pingpong"), default="repeat",
                   help="how to extend a video shorter than the audio (default: %(default)s)")
    p.add_argument("--on_missing_face", choices=("passthrough", "fail"), default="passthrough",
                   help="a frame without a face: keep it unchanged, or stop (default: %(default)s)")
    p.add_argument("--det_cache_dir", default=None,
                   help="where face detections are cached (default: ~/.cache/wav2lip/detections; '' disables)")
    p.add_argument("--half", action="store_true", help="float16 generator on CUDA (faster, not bit-identical)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")

    from audio import AudioError
    from face_detection import DetectorError
    from lipsync.inference import InferenceConfig, InferenceError, run_inference
    from lipsync.video import VideoError
    from models import CheckpointError

    cfg = InferenceConfig(
        checkpoint_path=args.checkpoint_path, face=args.face, audio=args.audio, outfile=args.outfile,
        static=args.static, fps=args.fps, pads=args.pads, face_det_batch_size=args.face_det_batch_size,
        wav2lip_batch_size=args.wav2lip_batch_size, resize_factor=args.resize_factor, crop=args.crop,
        box=args.box, rotate=args.rotate, nosmooth=args.nosmooth, face_detector=args.face_detector,
        s3fd_path=args.s3fd_path, det_scale=args.det_scale, device=args.device, blend=args.blend,
        loop=args.loop, on_missing_face=args.on_missing_face, det_cache_dir=args.det_cache_dir,
        half=args.half, progress=not args.quiet)
    try:
        summary = run_inference(cfg)
    except (AudioError, CheckpointError, DetectorError, InferenceError, VideoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
