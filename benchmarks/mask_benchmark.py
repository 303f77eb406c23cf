"""The two paste masks (inference.py's ellipse and landmarks masks) on the real-photograph test videos
(lipsync.train.face_videos): how much of the frame changes outside the mouth, how much of the generated
mouth comes through, the seam the paste leaves, and the paste's time per face.

Every face dlib's HOG detector finds (with its 68 landmarks) is cut as inference cuts it (box padded
10 px at the bottom, 96x96), given to a stand-in generator and pasted back through the engine's
compositor (:class:`lipsync.render.blending.CpuComposer`, which finds the landmarks again on the
padded box, as a render does). Generators: ``identity`` (the crop itself: a perfect generator, the
paste's own error) and ``blurry`` (the crop blurred, 20% darker and a dark mouth drawn where the
landmarks put it: the blur and colour error of a 96 px generator, and a new mouth).

Measures, per mask and generator (grey levels, means over faces):

- ``outside``: mean |output - input| over the (padded) face box's pixels outside the mouth region
  (the lips' points 48-59, grown by 15% of the box width; pixels outside the box never change);
- ``changed``: share of those pixels changed by more than 2 grey levels;
- ``mouth``: mean |output - input| inside the mouth region over mean |generated - input| there
  (1: the generated mouth comes through whole);
- ``seam``: mean of the gradient magnitude the output adds to the input's (its positive part) over
  the face box outside the mouth region: edges the paste draws (blur that removes texture is not
  counted here, ``outside`` counts it);
- ``ms``: milliseconds per paste (landmarks included).

    python benchmarks/mask_benchmark.py [--frames 12] [--image docs/masks.png]

``--image`` also draws both masks on the astronaut photograph (docs/faces.md shows it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from face_detection import get_detector  # noqa: E402
from lipsync.render.blending import CpuComposer, cut_crop  # noqa: E402
from lipsync.core.cli import HelpFormatter  # noqa: E402
from lipsync.render.cpu import cpu_capabilities  # noqa: E402
from lipsync.train.face_videos import SCENES, make_video  # noqa: E402

SIZE = 96
PAD_BOTTOM = 10  # inference's default --pads


def blurry(crop: np.ndarray, mouth: np.ndarray) -> np.ndarray:
    """The stand-in generator's face: ``crop`` (S, S, 3) uint8 blurred, darker, with a dark mouth
    ellipse drawn at ``mouth`` ((x, y, half-width, half-height) crop pixels)."""
    out = np.clip(cv2.GaussianBlur(crop, (0, 0), 1.5).astype(np.float32) * 0.8, 0, 255).astype(np.uint8)
    x, y, rx, ry = (int(round(v)) for v in mouth)
    cv2.ellipse(out, (x, y), (max(1, rx), max(1, ry)), 0, 0, 360, (20, 15, 25), -1)
    return out


def gradient(img: np.ndarray) -> np.ndarray:
    g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
    return np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))


def measure(n_frames: int):
    det = get_detector("dlib_hog", landmarks=True)
    composers = {"ellipse": CpuComposer(SIZE, "feather", "ellipse"), "landmarks": CpuComposer(SIZE, "feather", "landmarks")}
    rows = {(m, g): {"outside": [], "changed": [], "mouth": [], "seam": [], "ms": []}
            for m in composers for g in ("identity", "blurry")}
    faces = 0
    for scene in SCENES:
        video = make_video(scene, n_frames)
        for frame, found in zip(video.frames, det.detect_all(video.frames)):
            h, w = frame.shape[:2]
            for face in found:
                x1, y1, x2, y2 = face.box
                coords = (y1, min(h, y2 + PAD_BOTTOM), x1, x2)
                bw = x2 - x1
                lips = np.round(face.landmarks[48:60]).astype(np.int32)
                mouth_region = np.zeros((h, w), np.uint8)
                cv2.fillPoly(mouth_region, [cv2.convexHull(lips)], 1)
                grow = max(1, int(0.15 * bw))
                mouth_region = cv2.dilate(mouth_region, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)
                crop = cut_crop(frame, coords, SIZE)
                sx, sy = SIZE / (coords[3] - coords[2]), SIZE / (coords[1] - coords[0])
                centre = face.landmarks[48:60].mean(axis=0)
                span = face.landmarks[48:60].max(axis=0) - face.landmarks[48:60].min(axis=0)
                mouth = ((centre[0] - x1) * sx, (centre[1] - y1) * sy, 0.4 * span[0] * sx, 0.6 * span[1] * sy)
                gens = {"identity": crop, "blurry": blurry(crop, mouth)}
                faces += 1
                for (mask_name, gen_name), row in rows.items():
                    gen = gens[gen_name]
                    out = frame.copy()
                    t0 = time.perf_counter()
                    composers[mask_name].paste([out], gen[None], [coords])
                    row["ms"].append(1000 * (time.perf_counter() - t0))
                    diff = np.abs(out.astype(np.float32) - frame).mean(axis=2)       # (H, W)
                    box = np.zeros((h, w), bool)
                    box[coords[0]:coords[1], coords[2]:coords[3]] = True
                    away = box & ~mouth_region
                    row["outside"].append(diff[away].mean())
                    row["changed"].append((diff[away] > 2).mean())
                    pasted = np.zeros((h, w, 3), np.uint8)
                    pasted[coords[0]:coords[1], coords[2]:coords[3]] = cv2.resize(gen, (coords[3] - coords[2],
                                                                                        coords[1] - coords[0]))
                    gen_diff = np.abs(pasted.astype(np.float32) - frame).mean(axis=2)[mouth_region].mean()
                    row["mouth"].append(diff[mouth_region].mean() / max(gen_diff, 1e-6))
                    row["seam"].append(np.maximum(gradient(out) - gradient(frame), 0)[away].mean())
    return faces, {k: {name: float(np.mean(v)) for name, v in row.items()} for k, row in rows.items()}


def draw_masks(path: str, side: int = 240) -> None:
    """Save a PNG of the two masks over the astronaut photograph's face, side by side (``side`` px each):
    the weights tint the face (ellipse red, landmarks green); the landmarks are drawn as dots."""
    from lipsync.train.synthetic_faces import load_photo

    photo = load_photo("astronaut")
    face = get_detector("dlib_hog", landmarks=True).detect_all([photo])[0][0]
    x1, y1, x2, y2 = face.box
    coords = (y1, y2 + PAD_BOTTOM, x1, x2)
    panels = []
    for name, colour in (("ellipse", (0, 0, 255)), ("landmarks", (0, 200, 0))):
        composer = CpuComposer(SIZE, "feather", name)
        weights = composer.mask(photo, coords)
        if weights is None:
            weights = cv2.resize(composer.blender.mask, (x2 - x1, coords[1] - y1))
        img = photo.astype(np.float32)
        region = img[y1:coords[1], x1:x2]
        region[:] = region * (1 - 0.6 * weights[..., None]) + np.float32(colour) * 0.6 * weights[..., None]
        img = np.clip(img, 0, 255).astype(np.uint8)
        cv2.rectangle(img, (x1, y1), (x2 - 1, coords[1] - 1), (255, 255, 255), 1)
        if name == "landmarks":
            for x, y in face.landmarks:
                cv2.circle(img, (int(round(x)), int(round(y))), 1, (255, 255, 0), -1)
        m = int(0.25 * (x2 - x1))
        crop = img[max(0, y1 - m):coords[1] + m, max(0, x1 - m):x2 + m]
        crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
        cv2.putText(crop, f"--mask {name}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
        panels.append(crop)
    cv2.imwrite(path, np.hstack(panels), [cv2.IMWRITE_PNG_COMPRESSION, 9])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--frames", type=int, default=12, help="frames per scene video (default: %(default)s)")
    parser.add_argument("--image", help="also save a PNG of the two masks on a photograph here")
    args = parser.parse_args(argv)
    if args.image:
        draw_masks(args.image)
    faces, results = measure(args.frames)
    print(f"CPU: {cpu_capabilities().line()}")
    print(f"{faces} faces ({len(SCENES)} scenes x {args.frames} frames of 320x240, every face dlib_hog finds)")
    print("| mask | generator | outside (grey levels) | changed outside | mouth kept | seam | ms/paste |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (mask, gen), r in results.items():
        print(f"| `{mask}` | {gen} | {r['outside']:.2f} | {100 * r['changed']:.1f}% | {r['mouth']:.2f} | "
              f"{r['seam']:.2f} | {r['ms']:.2f} |")


if __name__ == "__main__":
    main()
