"""Export a generator or expert checkpoint to ONNX (dynamic batch, opset 17) and check it.

    python export_onnx.py --checkpoint_path checkpoints/wav2lip_gan.pth --out wav2lip_gan.onnx
    python export_onnx.py --checkpoint_path savedmodel/checkpoint_step000000001.pth --out expert.onnx --kind expert

The file passes onnx.checker and is compared with torch on seeded inputs (the largest absolute
difference is printed; above --tolerance the exit status is 1). ``inference.py --checkpoint_path
G.onnx`` and ``serve.py`` run an exported generator with ONNX Runtime. Needs
``pip install -r requirements-onnx.txt``.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from lipsync.core.cli import HelpFormatter
    from lipsync.render.onnx_model import FP32_TOLERANCE, OPSET

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--checkpoint_path", required=True, help="generator or expert checkpoint (.pth)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--kind", choices=("auto", "generator", "expert"), default="auto",
                   help="what to export (auto: what the checkpoint holds)")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=FP32_TOLERANCE,
                   help="largest |ONNX Runtime - torch| accepted (default: %(default)g)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from lipsync.core.errors import run_main

    def run() -> int:
        from lipsync.render.onnx_model import example_inputs, export, max_abs_difference

        info = export(args.checkpoint_path, args.out, kind=args.kind, opset=args.opset)
        diff = max_abs_difference(args.out, args.checkpoint_path, example_inputs(info["kind"], info["img_size"], batch=3))
        s = info["img_size"]
        print(f"wrote {args.out}: {s}x{s} {info['kind']} (width {info['width']:g}), opset {info['opset']}, dynamic "
              f"batch; onnx.checker passed; max |ONNX Runtime - torch| on 3 seeded inputs: {diff:.3g} "
              f"({'within' if diff <= args.tolerance else 'ABOVE'} {args.tolerance:g})")
        return 0 if diff <= args.tolerance else 1

    return run_main(run)


if __name__ == "__main__":
    sys.exit(main())
