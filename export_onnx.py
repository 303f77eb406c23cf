"""Export a generator or expert checkpoint to ONNX (dynamic batch, opset 17) and check it; or an int8
generator calibrated on a face and speech.

    python export_onnx.py --checkpoint_path checkpoints/wav2lip_gan.pth --out wav2lip_gan.onnx
    python export_onnx.py --checkpoint_path savedmodel/checkpoint_step000000001.pth --out expert.onnx --kind expert
    python export_onnx.py --checkpoint_path wav2lip_gan.pth --out wav2lip_gan_int8.onnx --int8 \\
        --calibration_face presenter.mp4 --calibration_audio speech.wav

The file passes onnx.checker and is compared with torch on seeded inputs (the largest absolute
difference is printed; above --tolerance the exit status is 1). With --int8 the fp32 export is
quantized by ONNX Runtime (QDQ, int8 weights per channel, uint8 activations), calibrated on face
crops and mel windows of --calibration_face (a video, a photo or a saved avatar folder) and
--calibration_audio, or of a generated synthetic clip when they are not given, and compared with fp32
on faces of the same inputs that did not calibrate (outside the threshold, the exit status is 1).
Quantize on the CPU that will run the file: without VNNI the weights keep 7 bits (docs/onnx.md).
``inference.py --checkpoint_path G.onnx`` and ``serve.py`` run an exported generator with ONNX
Runtime. Needs ``pip install -r requirements-onnx.txt``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def build_parser() -> argparse.ArgumentParser:
    from face_detection import BACKENDS
    from lipsync.core.cli import HelpFormatter
    from lipsync.render.onnx_model import FP32_TOLERANCE, OPSET

    first_sentence = " ".join(__doc__.strip().split("\n\n")[0].split())  # the docstring's opening, two lines
    p = argparse.ArgumentParser(description=first_sentence, formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_path", required=True, help="generator or expert checkpoint (.pth)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--kind", choices=("auto", "generator", "expert"), default="auto",
                   help="what to export (auto: what the checkpoint holds)")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=FP32_TOLERANCE,
                   help="largest |ONNX Runtime - torch| accepted (default: %(default)g)")
    q = p.add_argument_group("int8 (a generator)")
    q.add_argument("--int8", action="store_true", help="write the generator quantized to int8")
    q.add_argument("--calibration_face", help="video, photo or saved avatar folder to calibrate on (None: a "
                                              "synthetic clip)")
    q.add_argument("--calibration_audio", help="speech to calibrate on, with --calibration_face")
    q.add_argument("--face_detector", choices=BACKENDS, default="sfd",
                   help="how faces are found in --calibration_face (as inference.py's flag)")
    q.add_argument("--s3fd_path", default=None, help="S3FD weights (None: face_detection/detection/sfd/s3fd.pth)")
    q.add_argument("--box", type=int, nargs=4, default=(-1, -1, -1, -1), metavar=("TOP", "BOTTOM", "LEFT", "RIGHT"),
                   help="fixed face box in --calibration_face instead of detection")
    return p


def calibration(args, img_size: int):
    """The Calibration of the flags: the given face and audio, or the synthetic clip."""
    import audio
    from lipsync.render.quantize import calibration_from_avatar

    if args.calibration_face is None:
        from lipsync.train.synthetic import synthetic_calibration

        return synthetic_calibration(img_size)
    if os.path.isdir(args.calibration_face):
        from lipsync.render.avatar import load_avatar

        avatar = load_avatar(args.calibration_face, img_size)
    else:
        from lipsync.render.avatar import prepare_avatar
        from lipsync.render.avatar_settings import settings_from_flags

        settings = settings_from_flags({"face_detector": args.face_detector, "s3fd_path": args.s3fd_path,
                                        "box": tuple(args.box)})
        avatar = prepare_avatar(args.calibration_face, settings, img_size, progress=False)
    wav = audio.load_wav(args.calibration_audio, audio.SAMPLE_RATE)
    return calibration_from_avatar(avatar, wav, audio_name=os.path.basename(args.calibration_audio))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.calibration_face is None) != (args.calibration_audio is None):
        parser.error("give --calibration_face and --calibration_audio together (or neither: a synthetic clip)")
    if args.calibration_face is not None and not args.int8:
        parser.error("--calibration_face and --calibration_audio go with --int8")
    from lipsync.core.errors import run_main

    def run() -> int:
        from lipsync.render.onnx_model import OnnxError, example_inputs, export, max_abs_difference

        given = {"--calibration_face": args.calibration_face, "--calibration_audio": args.calibration_audio}
        for flag, path in given.items():
            if path is not None and not os.path.exists(path):  # before the export, not after it
                raise OnnxError(f"{flag} not found: {path!r}")
        with tempfile.TemporaryDirectory(prefix="wav2lip-export-") as tmp:
            fp32 = os.path.join(tmp, "fp32.onnx") if args.int8 else args.out
            info = export(args.checkpoint_path, fp32, kind=args.kind, opset=args.opset)
            seeded = example_inputs(info["kind"], info["img_size"], batch=3)
            diff = max_abs_difference(fp32, args.checkpoint_path, seeded)
            s = info["img_size"]
            print(f"{'exported' if args.int8 else 'wrote ' + args.out}: {s}x{s} {info['kind']} (width "
                  f"{info['width']:g}), opset {info['opset']}, dynamic batch; onnx.checker passed; max |ONNX Runtime "
                  f"- torch| on 3 seeded inputs: {diff:.3g} ({'within' if diff <= args.tolerance else 'ABOVE'} "
                  f"{args.tolerance:g})")
            if not args.int8:
                return 0 if diff <= args.tolerance else 1
            if info["kind"] != "generator":
                raise OnnxError(f"--int8 quantizes a generator; {args.checkpoint_path!r} holds an {info['kind']}")
            from lipsync.render.quantize import INT8_THRESHOLD, quality_line, quantize_generator

            calib = calibration(args, s)
            q = quantize_generator(fp32, args.out, calib, model=args.checkpoint_path)
        reduce = "7-bit weights: this CPU has no VNNI" if q["quantizer"]["reduce_range"] else "8-bit weights: VNNI"
        print(f"wrote {args.out}: int8 ({reduce}), calibrated on {q['calibration']}; "
              f"{quality_line(q['quality'], of='the calibration inputs')}")
        return 0 if diff <= args.tolerance and INT8_THRESHOLD.met(q["quality"]) else 1

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
