"""The render path: an avatar and speech in, lip-synced frames out, in order, as a stream.

:func:`render` takes a whole audio; :func:`render_windows` takes mel windows in groups as they
become available (a live stream) and is what :func:`render` and the server both run. Generation
goes through a ``generate`` function, so frames of several sessions can share one forward pass.

Frame ``k`` of the output shows source frame ``source_index(k, n, loop)`` with the mouth generated
from the mel window starting at column ``audio.frame_to_mel_start(k, fps)`` (the published pairing).
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import numpy as np

import audio
from lipsync.render.avatar import Avatar
from lipsync.render.blending import MASKS, CpuComposer, resolve_mask
from lipsync.core.errors import Wav2LipError
from lipsync.render.generator import Generator
from lipsync.render.settings import DEFAULTS
from lipsync.render.streaming import FrameWindows
from lipsync.core.pipeline import Timings, prefetch

# generate(mels (B, 80, 16) float32, faces (B, S, S, 3) uint8, keys) -> (B, S, S, 3) uint8
GenerateFn = Callable[[np.ndarray, np.ndarray, Optional[list]], np.ndarray]


class RenderError(Wav2LipError, ValueError):
    """Speech the engine cannot render from; the message says why."""


def frame_count(wav: np.ndarray, fps: float) -> int:
    """Output frames for ``wav`` (16 kHz samples) at ``fps``: as long as the audio, rounded up."""
    return audio.num_frames_for_audio(len(wav), fps)


def generate_with(generator: Generator, as_tensor: bool = False) -> GenerateFn:
    """The plain ``generate`` function: each call goes to the generator's forward queue (faces stay on
    the device as a tensor with ``as_tensor``)."""
    return lambda mels, faces, keys: generator.generate(mels, faces, keys, as_tensor=as_tensor)


def window_groups(wav: np.ndarray, fps: float, size: int, chunk_seconds: float = 2.0) -> Iterator[np.ndarray]:
    """(G, 80, 16) float32 mel windows of every output frame of ``wav`` (16 kHz mono float32), ``size``
    frames at a time (G <= ``size``): the audio goes through :class:`~lipsync.render.streaming.
    FrameWindows`, the window source of live streams, ``chunk_seconds`` at a time, so offline and
    live frames get their windows from one place and memory does not grow with the audio's length.
    The windows are the published ones (``audio.melspectrogram`` + ``audio.mel_chunk_starts``; the
    tests compare them). Raises StreamError (an AudioError) for audio shorter than one window."""
    windows = FrameWindows(fps)
    step = max(1, int(chunk_seconds * windows.hp.sample_rate))
    pending: List[np.ndarray] = []
    held = 0

    def cut(final: bool) -> Iterator[np.ndarray]:
        nonlocal pending, held
        while held >= size or (final and held):
            joined = np.concatenate(pending)                  # (held, 80, 16)
            yield joined[:size]
            rest = joined[size:]
            pending, held = ([rest] if len(rest) else []), len(rest)

    for k in range(0, len(wav), step):
        got = windows.push(wav[k:k + step])
        if len(got):
            pending.append(got)
            held += len(got)
            yield from cut(final=False)
    got = windows.finish()
    if len(got):
        pending.append(got)
        held += len(got)
    yield from cut(final=True)


def composer_for(img_size: int, blend: str, device, on_device: Optional[bool] = None, mask: str = MASKS[0],
                 enhancer=None):
    """The compositor of a render: :class:`lipsync.render.gpu.TorchComposer` on ``device`` when
    ``on_device`` (None: when ``device`` is CUDA), else :class:`CpuComposer` (OpenCV), which is also
    the one for ``mask="landmarks"`` (dlib finds them on the host; ``"auto"``: see
    :func:`lipsync.render.blending.resolve_mask`). ``enhancer``: a
    :class:`lipsync.render.enhance.FaceEnhancer` that restores the pasted faces, or None."""
    import torch

    device = torch.device(device)
    if resolve_mask(mask, blend) == "landmarks":
        return CpuComposer(img_size, blend, mask, enhancer=enhancer)
    if on_device if on_device is not None else device.type == "cuda":
        from lipsync.render.gpu import TorchComposer

        return TorchComposer(img_size, blend, device, enhancer=enhancer)
    return CpuComposer(img_size, blend, enhancer=enhancer)


def render(generator: Generator, avatar: Avatar, wav: np.ndarray, loop: str = DEFAULTS["loop"],
           blend: str = DEFAULTS["blend"], batch_size: int = DEFAULTS["wav2lip_batch_size"], timings: Optional[Timings] = None, cache_faces: Optional[bool] = None,
           on_device: Optional[bool] = None, mask: str = MASKS[0], enhancer=None) -> Iterator[np.ndarray]:
    """Lip-sync ``avatar`` to ``wav`` (16 kHz mono float32): (H, W, 3) uint8 BGR frames in order,
    ``frame_count(wav, avatar.fps)`` of them.

    ``batch_size``: frames handed to the generator at once (on the CPU it runs them in tuned
    micro-batches; frames in flight are bounded by about twice this). ``cache_faces``: keep the
    face features of source frames for reuse (default: when the audio outlasts the avatar's video,
    so frames repeat). ``on_device``: crop, resize and paste on the generator's device
    (:class:`lipsync.render.gpu.TorchComposer`; default: on CUDA). ``mask``: the paste's region
    (``"ellipse"``, the default here and in the server's sessions; ``"landmarks"``
    (:class:`CpuComposer`); or ``"auto"``, the default of ``inference.py --mask``). ``enhancer``: a
    :class:`lipsync.render.enhance.FaceEnhancer` that restores each pasted face through the paste's
    weights (timed as ``enhance``), or None. An int8 generator that waits for
    calibration (``--precision int8``) is calibrated on ``avatar`` and ``wav`` first.
    """
    n_out = frame_count(wav, avatar.fps)
    if getattr(generator, "awaiting_calibration", False):  # an int8 generator: calibrated on this face and audio
        from lipsync.render.quantize import calibration_from_avatar

        generator.calibrate(calibration_from_avatar(avatar, wav))
    if cache_faces is None:
        cache_faces = avatar.n_frames is not None and avatar.n_frames < n_out
    if generator.device.type == "cpu":
        batch_size = min(batch_size, 32)  # the CPU runs micro-batches anyway; keep 720p frames in flight few
    groups = window_groups(wav, avatar.fps, batch_size)
    first = next(groups)  # audio too short for one window fails here, before any frame is made
    groups = itertools.chain([first], groups)
    composer = composer_for(avatar.img_size, blend, generator.device, on_device, mask, enhancer)
    return render_windows(generate_with(generator, as_tensor=composer.on_device), avatar,
                          groups, n_out=n_out, loop=loop, blend=blend, timings=timings,
                          cache_faces=cache_faces, composer=composer)


def render_windows(generate: GenerateFn, avatar: Avatar, groups: Iterable[np.ndarray], n_out: Optional[int] = None,
                   loop: str = DEFAULTS["loop"], blend: str = DEFAULTS["blend"], timings: Optional[Timings] = None,
                   cache_faces: bool = False, ahead: int = 1, composer=None) -> Iterator[np.ndarray]:
    """Frames for mel windows arriving in groups ((G, 80, 16) arrays; one output frame per window).

    Source frames are decoded in a thread; cropping and generation run ``ahead`` groups in front of
    the paste in another, so decoding, the generator and the caller (an encoder, a socket) overlap.
    ``n_out``: the total when known (None: as many as the groups bring). ``composer``: where crops
    and pastes happen, :class:`lipsync.render.blending.CpuComposer` (the default: OpenCV, frame by
    frame) or :class:`lipsync.render.gpu.TorchComposer` (whole groups on the device; ``generate``
    then returns faces as a device tensor); its ``enhancer``, when set, restores the pasted faces.
    """
    timings = timings or Timings()
    composer = composer if composer is not None else CpuComposer(avatar.img_size, blend)
    frames = avatar.output_frames(n_out, loop)
    with prefetch(frames, 4, "decode", timer=lambda s: timings.add("decode", s)) as decoded:
        produced = _generated_groups(generate, avatar, groups, decoded, timings, cache_faces, composer)
        with prefetch(produced, ahead, "generate") as ready:
            for group, idx, boxes, faces in ready:
                if idx:
                    pasted, at = [group[k] for k in idx], [boxes[k] for k in idx]
                    with timings.measure("blend"):
                        masks = composer.masks(pasted, at)  # of the unpasted frames; the enhancer uses them too
                        composer.paste(pasted, faces, at, masks)
                    if composer.enhancer is not None:
                        with timings.measure("enhance"):
                            composer.enhance(pasted, at, masks)
                with timings.measure("blend"):
                    out = composer.download(group)
                yield from out


def _generated_groups(generate: GenerateFn, avatar: Avatar, groups: Iterable[np.ndarray],
                      decoded: Iterator[Tuple[int, np.ndarray]], timings: Timings, cache_faces: bool, composer
                      ) -> Iterator[Tuple[list, List[int], list, object]]:
    """For each group of windows: its frames in the composer's form, the positions of those with a
    face, every frame's box (None: no face) and the generated faces of the positions (B, S, S, 3)."""
    for windows in groups:
        items = list(itertools.islice(decoded, len(windows)))
        if len(items) < len(windows):
            raise RenderError("internal error: the face video ended before the audio")
        boxes = [avatar.box(j) for j, _ in items]
        idx = [k for k, b in enumerate(boxes) if b is not None]
        with timings.measure("decode"):
            group = composer.upload([f for _, f in items])
        faces = None
        if idx:
            with timings.measure("crop" if avatar.crops is None else "decode"):  # prepared crops: just a read
                if avatar.crops is None:
                    crops = composer.crops([group[k] for k in idx], [boxes[k] for k in idx])
                else:
                    crops = composer.prepared(np.stack([avatar.crops[items[k][0]] for k in idx]))
            keys = [(avatar.key, items[k][0]) for k in idx] if cache_faces else None
            with timings.measure("generate"):
                faces = generate(np.asarray(windows)[idx], crops, keys)
        yield group, idx, boxes, faces


def count_missing(avatar: Avatar, n_out: int, loop: str) -> int:
    """Output frames that show a source frame without a face (passed through unchanged)."""
    missing = set(avatar.missing())
    if not missing:
        return 0
    from lipsync.media.frames import source_index

    n = avatar.n_frames
    return sum(1 for i in range(n_out) if source_index(i, n, loop) in missing)


def windows_of(wav: np.ndarray, fps: float) -> Tuple[int, np.ndarray]:
    """(frame count, (n, 80, 16) windows) of a whole audio: what :func:`render` feeds."""
    return frame_count(wav, fps), np.concatenate(list(window_groups(wav, fps, 1 << 30)))


__all__ = ["GenerateFn", "RenderError", "composer_for", "count_missing", "frame_count", "generate_with", "render", "render_windows",
           "window_groups", "windows_of"]
