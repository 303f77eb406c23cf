"""Milliseconds per face of each face restorer of inference.py --enhancer on this machine, with stand-in weights.

Each network is built with spandrel's classes and given weights filled from a seeded generator in the
published layout (:func:`lipsync.render.enhance.save_filled_weights`; the real GFPGANv1.4.pth and
codeformer.pth are not downloaded by this project), loaded through the project's loader, and timed on
``--faces`` faces of the astronaut photograph:

- ``network``: :meth:`FaceEnhancer.restore` alone, all faces in one call (MAX_BATCH faces per forward);
- ``enhance``: the compositor's whole step (:meth:`CpuComposer.enhance`: crop and resize to 512, the
  network, resize back, mix through the paste's weights), as a render runs it.

Speed is what stand-in weights measure honestly: the arithmetic is that of the real networks. What the
faces look like needs the real weights and is not measured here.

    python benchmarks/enhancer_benchmark.py [--faces 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lipsync.core.cli import HelpFormatter  # noqa: E402
from lipsync.core.device import resolve_device  # noqa: E402
from lipsync.render.blending import CpuComposer, cut_crop  # noqa: E402
from lipsync.render.cpu import cpu_capabilities  # noqa: E402
from lipsync.render.enhance import ENHANCE_SIZE, WEIGHTS, load_enhancer, save_filled_weights  # noqa: E402

BOX = (40, 200, 60, 196)  # (y1, y2, x1, x2): the astronaut's face at 256x256, 136x160 pixels


def astronaut() -> np.ndarray:
    from skimage import data

    return cv2.resize(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR), (256, 256), interpolation=cv2.INTER_AREA)


def measure(name: str, n_faces: int, device, folder: str) -> dict:
    """{"network": ms per face, "enhance": ms per face, "load": s} of enhancer ``name``."""
    path = save_filled_weights(name, os.path.join(folder, WEIGHTS[name].file))
    t0 = time.perf_counter()
    enhancer = load_enhancer(name, path, device)
    load = time.perf_counter() - t0
    frame = astronaut()
    crops = torch.from_numpy(cv2.resize(frame[BOX[0]:BOX[1], BOX[2]:BOX[3]], (ENHANCE_SIZE, ENHANCE_SIZE)))
    crops = crops.permute(2, 0, 1)[None].float().repeat(n_faces, 1, 1, 1)            # (N, 3, 512, 512)
    enhancer.restore(crops[:1])                                                        # warm-up
    sync = torch.cuda.synchronize if enhancer.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    enhancer.restore(crops)
    sync()
    network = (time.perf_counter() - t0) / n_faces
    composer = CpuComposer(96, "feather", enhancer=enhancer)
    frames = [frame.copy() for _ in range(n_faces)]
    boxes = [BOX] * n_faces
    masks = composer.masks(frames, boxes)
    composer.paste(frames, np.stack([cut_crop(frame, BOX, 96)] * n_faces), boxes, masks)
    t0 = time.perf_counter()
    composer.enhance(frames, boxes, masks)
    return {"network": 1000 * network, "enhance": 1000 * (time.perf_counter() - t0) / n_faces, "load": load}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--faces", type=int, default=4, help="faces timed per enhancer (one call)")
    parser.add_argument("--device", default="cpu", help="where the networks run (auto: cuda when there is one)")
    parser.add_argument("--enhancers", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS),
                        help="which enhancers to time")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    print(f"CPU: {cpu_capabilities().line()}; torch threads {torch.get_num_threads()}; device {device}")
    print(f"{args.faces} faces of {BOX[3] - BOX[2]}x{BOX[1] - BOX[0]} px, each restored at "
          f"{ENHANCE_SIZE}x{ENHANCE_SIZE}, stand-in weights (speed only)")
    print("| enhancer | network ms/face | enhance step ms/face | load s |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.enhancers:
            r = measure(name, args.faces, device, folder)
            print(f"| `{name}` | {r['network']:.0f} | {r['enhance']:.0f} | {r['load']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
