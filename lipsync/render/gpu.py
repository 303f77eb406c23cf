"""Cropping, resizing and pasting on the generator's device (a GPU), batched, in torch.

On CUDA the per-frame OpenCV work (crop the face box, resize it to the model's size, resize the
generated face back, the feather blend with its colour fit) would keep the GPU waiting on two or
three CPU cores. :class:`TorchComposer` does it on the device for a whole group of frames: frames go
up through pinned host buffers on a copy stream, results come down the same way, so copies overlap
the next group's compute. The same code runs on the CPU (tests compare it with the OpenCV path);
there, the per-frame OpenCV path is faster and is what the engine uses.

Frames are (H, W, 3) uint8 BGR; boxes are (y1, y2, x1, x2) pixels; faces (S, S, 3) uint8.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from lipsync.render.blending import COLOUR_FIT_SIZE, Blender, apply_colour

Coords = Tuple[int, int, int, int]


def resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(C, H, W) float -> (C, h, w), bilinear with pixel-centre alignment (as cv2.INTER_LINEAR)."""
    return F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def area(img: torch.Tensor, n: int) -> torch.Tensor:
    """(C, H, W) float -> (C, n, n) by averaging (as cv2.INTER_AREA when shrinking)."""
    return F.adaptive_avg_pool2d(img[None], (n, n))[0]


def to_size(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(C, H, W) float -> (C, h, w): bilinear when growing, antialiased (as cv2.INTER_AREA) when shrinking."""
    shrink = h < img.shape[-2] or w < img.shape[-1]
    return F.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)[0]


class TorchComposer:
    """Batched crop / paste for the engine on ``device``, equivalent to :class:`Blender` and the
    published crop up to rounding (within a few grey levels; tests bound it). The compositor
    interface of :class:`lipsync.render.blending.CpuComposer`, on the device. ``enhancer``: a
    :class:`lipsync.render.enhance.FaceEnhancer` (best on the same device) or None."""

    on_device = True

    def __init__(self, img_size: int, blend: str, device: torch.device, enhancer=None):
        self.size = img_size
        self.blend = blend
        self.enhancer = enhancer
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blender = Blender(blend, img_size)  # validates the mode; its mask and colour fit are reused
        self.fit = blend != "none" and self.blender._fit
        if blend != "none":
            self.mask = torch.from_numpy(self.blender.mask).to(self.device)             # (S, S)

    # ---- transfers ----
    def upload(self, frames: Sequence[np.ndarray]) -> List[torch.Tensor]:
        """Host frames -> (3, H, W) float32 tensors on the device (via pinned memory on CUDA)."""
        out = []
        stream = torch.cuda.stream(self.copy_stream) if self.cuda else contextlib.nullcontext()
        with stream:
            for f in frames:
                t = torch.from_numpy(np.ascontiguousarray(f))
                if self.cuda:
                    t = t.pin_memory().to(self.device, non_blocking=True)
                out.append(t.permute(2, 0, 1).float())
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        return out

    def download(self, frames: List[torch.Tensor]) -> List[np.ndarray]:
        """(3, H, W) float tensors -> host (H, W, 3) uint8 (rounded, clipped)."""
        host = []
        for t in frames:
            u8 = t.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
            if self.cuda:
                buf = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
                buf.copy_(u8, non_blocking=True)
                host.append(buf)
            else:
                host.append(u8.contiguous())
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return [h.numpy() for h in host]

    # ---- the two steps ----
    def crops(self, frames: List[torch.Tensor], boxes: Sequence[Coords]) -> torch.Tensor:
        """(B, S, S, 3) uint8 faces cut from device frames at ``boxes`` and resized to S x S."""
        s = self.size
        out = [resize(f[:, y1:y2, x1:x2], s, s) for f, (y1, y2, x1, x2) in zip(frames, boxes)]
        return torch.stack(out).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

    def prepared(self, crops: np.ndarray) -> torch.Tensor:
        """An avatar's saved (B, S, S, 3) uint8 crops, on the device."""
        return torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)

    def masks(self, frames: List[torch.Tensor], boxes: Sequence[Optional[Coords]]) -> List[None]:
        """No paste has its own weights here (the Blender's ellipse for all): one None per box."""
        return [None] * len(boxes)

    def paste(self, frames: List[torch.Tensor], faces: torch.Tensor, boxes: Sequence[Optional[Coords]],
              masks=None) -> List[torch.Tensor]:
        """Paste (B, S, S, 3) uint8 faces into device frames at ``boxes`` (None: frame unchanged).
        ``masks``: :meth:`masks`' Nones (the interface's; the ellipse is used)."""
        faces = faces.to(self.device).permute(0, 3, 1, 2).float()                      # (B, 3, S, S)
        todo = [(frame, face, box) for frame, face, box in zip(frames, faces, boxes) if box is not None]
        coefs = self._colour_fits(todo) if self.fit else [None] * len(todo)
        for (frame, face, box), coef in zip(todo, coefs):
            self._paste_one(frame, face, box, coef)
        return frames

    def _colour_fits(self, todo) -> List[torch.Tensor]:
        """Blender.colour_fit per paste, from COLOUR_FIT_SIZE reductions made on the device and
        brought to the host together (one transfer for the group; the fit itself is a few small
        solves, and keeping it in one place keeps the CPU and GPU pastes the same)."""
        n = COLOUR_FIT_SIZE
        small = torch.stack([torch.stack([area(frame[:, y1:y2, x1:x2], n), area(face, n)])
                             for frame, face, (y1, y2, x1, x2) in todo])                 # (P, 2, 3, n, n)
        small = small.permute(0, 1, 3, 4, 2).cpu().numpy()                               # (P, 2, n, n, 3)
        return [torch.from_numpy(self.blender.colour_fit(o, f)).to(self.device) for o, f in small]

    def _paste_one(self, frame: torch.Tensor, face: torch.Tensor, box: Coords, coef) -> None:
        y1, y2, x1, x2 = box
        h, w = y2 - y1, x2 - x1
        gen = resize(face, h, w).round_()                                              # (3, h, w)
        if self.blend == "none":
            frame[:, y1:y2, x1:x2] = gen
            return
        region = frame[:, y1:y2, x1:x2]
        if coef is not None:
            xs = (torch.arange(w, device=self.device) + 0.5) / w - 0.5
            ys = (torch.arange(h, device=self.device) + 0.5) / h - 0.5
            gen = apply_colour(gen.permute(1, 2, 0), coef, xs, ys).permute(2, 0, 1)   # (3, h, w)
        gen = gen.round_().clamp_(0, 255)
        m = resize(self.mask[None], h, w)                                               # (1, h, w)
        frame[:, y1:y2, x1:x2] = m * gen + (1 - m) * region

    def enhance(self, frames: List[torch.Tensor], boxes: Sequence[Optional[Coords]], masks=None
                ) -> List[torch.Tensor]:
        """Restore the pasted faces of device frames in place, as
        :meth:`lipsync.render.blending.CpuComposer.enhance` does on the host: each box resized to
        512 x 512, restored in one call (MAX_BATCH faces per forward, on the enhancer's device),
        resized back and mixed in through the paste's weights (the ellipse; the whole box with
        ``blend="none"``), so where those are 0 the frame is unchanged."""
        todo = [(frame, box) for frame, box in zip(frames, boxes) if box is not None]
        if self.enhancer is None or not todo:
            return frames
        from lipsync.render.enhance import ENHANCE_SIZE

        e = ENHANCE_SIZE
        crops = torch.stack([to_size(frame[:, y1:y2, x1:x2], e, e) for frame, (y1, y2, x1, x2) in todo])
        restored = self.enhancer.restore(crops.round_().clamp_(0, 255))               # (P, 3, 512, 512)
        for (frame, (y1, y2, x1, x2)), face in zip(todo, restored):
            h, w = y2 - y1, x2 - x1
            back = to_size(face.to(self.device), h, w).round_().clamp_(0, 255)          # (3, h, w)
            if self.blend == "none":
                frame[:, y1:y2, x1:x2] = back
                continue
            m = resize(self.mask[None], h, w)                                            # (1, h, w)
            frame[:, y1:y2, x1:x2] = m * back + (1 - m) * frame[:, y1:y2, x1:x2]
        return frames
