"""The render path: an avatar and speech in, lip-synced frames out, in order, as a stream.

:func:`render` takes a whole audio; :func:`render_windows` takes mel windows in groups as they
become available (a live stream) and is what :func:`render` and the server both run. Generation
goes through a ``generate`` function, so frames of several sessions can share one forward pass.

Frame ``k`` of the output shows source frame ``source_index(k, n, loop)`` with the mouth generated
from the mel window starting at column ``audio.frame_to_mel_start(k, fps)`` (the published pairing).
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

import audio
from lipsync.render.avatar import Avatar
from lipsync.core.errors import Wav2LipError
from lipsync.render.generator import Generator
from lipsync.core.pipeline import Timings, prefetch

# generate(mels (B, 80, 16) float32, faces (B, S, S, 3) uint8, keys) -> (B, S, S, 3) uint8
GenerateFn = Callable[[np.ndarray, np.ndarray, Optional[list]], np.ndarray]


class RenderError(Wav2LipError, ValueError):
    """Speech the engine cannot render from; the message says why."""


def mel_for(wav: np.ndarray) -> np.ndarray:
    """(80, T) mel spectrogram of 16 kHz mono float32 samples; raises RenderError when not finite."""
    mel = audio.melspectrogram(wav)
    if not np.isfinite(mel).all():
        raise RenderError("the audio produced a non-finite spectrogram")
    return mel


def mel_windows(mel: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    """(n_frames, 80, 16) float32: the window of each output frame (the published sequence, then
    the last window repeated to the end of the audio)."""
    starts = audio.mel_chunk_starts(mel.shape[1], fps, n_frames=n_frames)
    return next(_groups(mel, starts, len(starts)))


def frame_count(wav: np.ndarray, fps: float) -> int:
    """Output frames for ``wav`` (16 kHz samples) at ``fps``: as long as the audio, rounded up."""
    return audio.num_frames_for_audio(len(wav), fps)


def generate_with(generator: Generator, as_tensor: bool = False) -> GenerateFn:
    """The plain ``generate`` function: one forward pass per call, in this thread (faces stay on the
    device as a tensor with ``as_tensor``)."""
    return lambda mels, faces, keys: generator.generate(mels, faces, keys, as_tensor=as_tensor)


def _groups(mel: np.ndarray, starts: Sequence[int], size: int) -> Iterator[np.ndarray]:
    """(G, 80, 16) windows, ``size`` frames at a time (cut as needed: memory does not grow with length)."""
    for k in range(0, len(starts), size):
        yield np.stack([mel[:, s:s + audio.MEL_STEP_SIZE] for s in starts[k:k + size]])


def render(generator: Generator, avatar: Avatar, wav: np.ndarray, loop: str = "repeat", blend: str = "feather",
           batch_size: int = 128, timings: Optional[Timings] = None, cache_faces: Optional[bool] = None,
           on_device: Optional[bool] = None) -> Iterator[np.ndarray]:
    """Lip-sync ``avatar`` to ``wav`` (16 kHz mono float32): (H, W, 3) uint8 BGR frames in order,
    ``frame_count(wav, avatar.fps)`` of them.

    ``batch_size``: frames handed to the generator at once (on the CPU it runs them in tuned
    micro-batches; frames in flight are bounded by about twice this). ``cache_faces``: keep the
    face features of source frames for reuse (default: when the audio outlasts the avatar's video,
    so frames repeat). ``on_device``: crop, resize and paste on the generator's device
    (:class:`lipsync.render.gpu.TorchComposer`; default: on CUDA).
    """
    n_out = frame_count(wav, avatar.fps)
    mel = mel_for(wav)
    starts = audio.mel_chunk_starts(mel.shape[1], avatar.fps, n_frames=n_out)
    if cache_faces is None:
        cache_faces = avatar.n_frames is not None and avatar.n_frames < n_out
    if generator.device.type == "cpu":
        batch_size = min(batch_size, 32)  # the CPU runs micro-batches anyway; keep 720p frames in flight few
    composer = None
    if on_device if on_device is not None else generator.device.type == "cuda":
        from lipsync.render.gpu import TorchComposer

        composer = TorchComposer(avatar.img_size, blend, generator.device)
    return render_windows(generate_with(generator, as_tensor=composer is not None), avatar,
                          _groups(mel, starts, batch_size), n_out=n_out, loop=loop, blend=blend, timings=timings,
                          cache_faces=cache_faces, composer=composer)


def render_windows(generate: GenerateFn, avatar: Avatar, groups: Iterable[np.ndarray], n_out: Optional[int] = None,
                   loop: str = "repeat", blend: str = "feather", timings: Optional[Timings] = None,
                   cache_faces: bool = False, ahead: int = 1, composer=None) -> Iterator[np.ndarray]:
    """Frames for mel windows arriving in groups ((G, 80, 16) arrays; one output frame per window).

    Source frames are decoded in a thread; generation runs ``ahead`` groups in front of the paste in
    another, so decoding, the generator and the caller (an encoder, a socket) overlap. ``n_out``:
    the total when known (None: as many as the groups bring). ``composer``: a
    :class:`lipsync.render.gpu.TorchComposer` crops and pastes whole groups on the device (then
    ``generate`` must return faces as a device tensor); without it OpenCV does it per frame.
    """
    timings = timings or Timings()
    frames = avatar.output_frames(n_out, loop)
    with prefetch(frames, 4, "decode", timer=lambda s: timings.add("decode", s)) as decoded:
        if composer is not None:
            produced = _device_groups(generate, avatar, groups, decoded, timings, cache_faces, composer)
            with prefetch(produced, ahead, "generate") as ready:
                for out in ready:
                    yield from out
            return
        produced = _generated_groups(generate, avatar, groups, decoded, timings, cache_faces)
        with prefetch(produced, ahead, "generate") as ready:
            for items, faces in ready:
                with timings.measure("blend"):
                    out = [avatar.compose(frame, j, face, blend) for (j, frame), face in zip(items, faces)]
                yield from out


def _generated_groups(generate: GenerateFn, avatar: Avatar, groups: Iterable[np.ndarray],
                      decoded: Iterator[Tuple[int, np.ndarray]], timings: Timings, cache_faces: bool
                      ) -> Iterator[Tuple[List[Tuple[int, np.ndarray]], List[Optional[np.ndarray]]]]:
    """For each group of windows: the (source index, frame) pairs it covers and their generated faces
    (None for a frame without a face)."""
    for group in groups:
        items = list(itertools.islice(decoded, len(group)))
        if len(items) < len(group):
            raise RenderError("internal error: the face video ended before the audio")
        idx = [k for k, (j, _) in enumerate(items) if avatar.box(j) is not None]
        with timings.measure("crop" if avatar.crops is None else "decode"):  # prepared crops: just a read
            crops = np.stack([avatar.crop(items[k][0], items[k][1]) for k in idx]) if idx else None
        faces: List[Optional[np.ndarray]] = [None] * len(items)
        if idx:
            keys = [(avatar.key, items[k][0]) for k in idx] if cache_faces else None
            with timings.measure("generate"):
                made = generate(np.asarray(group)[idx], crops, keys)
            for k, face in zip(idx, made):
                faces[k] = face
        yield items, faces


def _device_groups(generate: GenerateFn, avatar: Avatar, groups: Iterable[np.ndarray],
                   decoded: Iterator[Tuple[int, np.ndarray]], timings: Timings, cache_faces: bool, composer
                   ) -> Iterator[List[np.ndarray]]:
    """For each group: its finished frames, cropped, generated and pasted on the composer's device."""
    import torch

    for group in groups:
        items = list(itertools.islice(decoded, len(group)))
        if len(items) < len(group):
            raise RenderError("internal error: the face video ended before the audio")
        boxes = [avatar.box(j) for j, _ in items]
        idx = [k for k, b in enumerate(boxes) if b is not None]
        with timings.measure("decode"):
            frames = composer.upload([f for _, f in items])
        if idx:
            with timings.measure("crop" if avatar.crops is None else "decode"):
                if avatar.crops is None:
                    crops = composer.crops([frames[k] for k in idx], [boxes[k] for k in idx])
                else:
                    crops = torch.from_numpy(np.stack([avatar.crops[items[k][0]] for k in idx])).to(composer.device)
            keys = [(avatar.key, items[k][0]) for k in idx] if cache_faces else None
            with timings.measure("generate"):
                made = generate(np.asarray(group)[idx], crops, keys)
            with timings.measure("blend"):
                composer.paste([frames[k] for k in idx], made, [boxes[k] for k in idx])
        with timings.measure("blend"):
            yield composer.download(frames)


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
    n_out = frame_count(wav, fps)
    return n_out, mel_windows(mel_for(wav), fps, n_out)


__all__ = ["GenerateFn", "RenderError", "count_missing", "frame_count", "generate_with", "mel_for", "mel_windows",
           "render", "render_windows", "windows_of"]
