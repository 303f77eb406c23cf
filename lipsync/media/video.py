"""Video I/O through ffmpeg pipes: probe, stream BGR frames in, stream BGR frames + audio out.

Every ffmpeg call is an argument list and names files as ``file:<absolute path>``
(:func:`lipsync.media.ffmpeg.ffmpeg_path`), so any file name is safe. Frames are streamed: memory does not
depend on the video's length. Frames and audio are on the file's timeline (see
:mod:`lipsync.media.probe`): frame ``k`` is the picture shown ``k / rate`` s after the file's start, and
the audio :class:`VideoWriter` muxes from ``audio_path`` is the audio ``audio.load_wav`` returns
for that file, so the sound of a written video is the sound its frames were made for.
"""
from __future__ import annotations

import os
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, Optional

import numpy as np

from lipsync.core.fileio import atomic_write, finish_partial, partial_path
from lipsync.media.ffmpeg import (MediaError, ffmpeg_command, ffmpeg_path, image_signature, require_encoder,
                                  stderr_reason)
from lipsync.media.probe import MediaInfo, Rate, audio_input_args, probe_media, to_rate, video_timeline_filters

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jp2",
                    ".pbm", ".pgm", ".ppm", ".pnm"}


class VideoError(MediaError):
    """A video that cannot be read or written."""


@dataclass
class VideoInfo:
    """What :func:`probe_video` found. Times are seconds on the file's timeline (0 = its start)."""
    path: str
    width: int       # as displayed (rotation metadata applied), pixels
    height: int
    fps: float       # float(rate), for arithmetic; write with ``rate``
    duration: float  # where the video ends on the timeline, seconds; 0 when unknown
    rotation: int    # degrees counter-clockwise from the container's display matrix
    has_audio: bool
    rate: Optional[Fraction] = None   # exact average frame rate (e.g. 24000/1001)
    start: float = 0.0                # where the first picture is shown (> 0: the video starts late)
    stream_index: int = 0             # absolute index of the video stream (not cover art)
    media: Optional[MediaInfo] = None

    def __post_init__(self):
        if self.rate is None:
            self.rate = to_rate(self.fps)

    @property
    def approx_frames(self) -> int:
        """Frames :func:`iter_frames` yields at the video's rate, from the container's duration."""
        return max(1, int(round(self.duration * self.fps))) if self.duration else 0


def is_image_file(path: str) -> bool:
    """Whether ``path`` holds a still image (JPEG, PNG, BMP, TIFF, WebP, JPEG 2000, PNM), decided by
    its first bytes, whatever its name (``face.jfif``, ``photo`` without an extension, a ``.mp4``
    that is really a JPEG). Raises :class:`VideoError` when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError as exc:
        raise VideoError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    return image_signature(head)


def is_image_path(path: str) -> bool:
    """Whether ``path`` is a still image: by its content (:func:`is_image_file`) when the file
    exists, else by its extension."""
    if os.path.isfile(path):
        return is_image_file(path)
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR image; works for any file name (cv2.imread does not on every platform)."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise VideoError(f"cannot read image {path!r}: not an image file, or corrupt")
    return img


class _StderrDrain(threading.Thread):
    """Keeps the last lines of a child's stderr so a full pipe never blocks it."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: deque[str] = deque(maxlen=20)

    def run(self):
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self.lines.append(line)
        self.stream.close()

    def last(self) -> str:
        return self.lines[-1] if self.lines else ""


def probe_video(path: str) -> VideoInfo:
    """Size (as displayed), exact frame rate, timeline position and rotation of a video.

    Raises :class:`VideoError` when the file is missing, is not media ffmpeg reads, has no video
    stream (only cover art, or only audio) or no known frame rate."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"video file not found: {path!r}")
    try:
        info = probe_media(path)
    except MediaError as exc:
        raise VideoError(f"cannot read video {path!r}: {exc}") from None
    video = info.video
    if video is None:
        reason = "it has no video stream" if info.audio is not None else "no video stream found"
        raise VideoError(f"cannot read video {path!r}: {reason}")
    if not video.width or not video.height:
        raise VideoError(f"cannot read video {path!r}: no frame size in its header")
    if video.rate is None or not 0 < video.rate < 1000:
        rate = "none" if video.rate is None else f"{float(video.rate):g} frames/s"
        raise VideoError(f"cannot read video {path!r}: its frame rate is unknown or implausible ({rate}); "
                         "re-encode it at a constant rate, e.g. ffmpeg -i IN -r 25 OUT.mp4")
    width, height = video.width, video.height
    if abs(video.rotation) % 180 == 90:
        width, height = height, width  # ffmpeg rotates the frames it decodes
    end = video.end if video.end is not None else info.duration
    return VideoInfo(path, width, height, float(video.rate), end or 0.0, video.rotation, info.audio is not None,
                     rate=video.rate, start=max(0.0, video.start or 0.0), stream_index=video.index, media=info)


def _media_of(info: VideoInfo) -> MediaInfo:
    return info.media if info.media is not None else probe_media(info.path)


def iter_frames(info: VideoInfo, fps: Optional[Rate] = None, start_frame: int = 0,
                end_frame: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yield (H, W, 3) uint8 BGR frames at a constant rate ``fps`` (default: the video's exact
    rate), optionally only frames [start_frame, end_frame).

    Frame ``k`` is the picture shown at ``k / fps`` s on the file's timeline: variable-rate input is
    resampled by ffmpeg's fps filter, and a video stream that starts after the file's start (its
    audio starts first) has its first picture held until then, so frames and ``audio.load_wav``'s
    samples of the same file line up. Raises :class:`VideoError` when no frame can be decoded."""
    rate = to_rate(fps) if fps else info.rate
    media = _media_of(info)
    filters = video_timeline_filters(media, rate)
    if start_frame or end_frame is not None:
        trim = f"trim=start_frame={int(start_frame)}"
        if end_frame is not None:
            trim += f":end_frame={int(end_frame)}"
        filters.append(trim)
    cmd = ffmpeg_command("-copyts", "-i", ffmpeg_path(info.path), "-map", f"0:{info.stream_index}",
                         "-vf", ",".join(filters), "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1")
    frame_bytes = info.width * info.height * 3
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    drain = _StderrDrain(proc.stderr)
    drain.start()
    count = 0
    try:
        while True:
            buf = proc.stdout.read(frame_bytes)
            if len(buf) < frame_bytes:
                break
            count += 1
            yield np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3).copy()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.wait()
        drain.join(timeout=5)
    if count == 0 and start_frame == 0:
        raise VideoError(f"cannot decode any frame of {info.path!r}: {drain.last() or 'corrupt or empty video'}")


def count_frames(info: VideoInfo, fps: Optional[Rate] = None) -> int:
    """How many frames :func:`iter_frames` yields (decodes the whole video)."""
    return sum(1 for _ in iter_frames(info, fps))


def _aac_from(audio_path: str):
    """(input args, output args) muxing ``audio_path``'s audio, on its timeline, as 192 kb/s AAC of
    an output whose first input (0) is the video; raises :class:`VideoError` without audio."""
    try:
        a_in, a_out, _, _ = audio_input_args(audio_path, 1)
    except (MediaError, OSError) as exc:
        raise VideoError(f"cannot use the audio of {audio_path!r}: {exc}") from None
    return a_in, a_out + ["-c:a", "aac", "-b:a", "192k"]


class VideoWriter:
    """H.264 mp4 from (H, W, 3) uint8 BGR frames at exactly ``fps`` frames/s (a Fraction such as
    24000/1001 is written as that, not rounded), plus AAC from ``audio_path``: that file's audio on
    its timeline, as ``audio.load_wav`` reads it (a late start kept as silence, codec padding cut).

    Written to a hidden temporary file beside ``path`` and moved into place by :meth:`close`;
    :meth:`abort` (or an exception inside ``with``) removes it. Raises :class:`VideoError` when
    ``audio_path`` has no audio, ffmpeg lacks libx264, or encoding fails.
    """

    def __init__(self, path: str, width: int, height: int, fps: Rate, audio_path: Optional[str] = None,
                 crf: int = 18, preset: str = "veryfast", codec: str = "libx264"):
        """``codec``: ``libx264`` (CRF ``crf``, x264 ``preset``) or ``h264_nvenc`` (NVIDIA's encoder,
        constant quality ``crf``); see :func:`encoder_for`."""
        require_encoder(codec, "writing H.264 video")
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.rate = to_rate(fps)
        self.width, self.height = width, height
        args = ["-copyts", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}",
                "-framerate", str(self.rate), "-i", "pipe:0"]
        out = ["-map", "0:v:0"]
        if width % 2 or height % 2:  # yuv420p needs even sizes: pad one black pixel where needed
            out += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"]
        if audio_path is not None:
            a_in, a_out = _aac_from(audio_path)
            args += a_in
            out += a_out
        self.tmp_path = partial_path(self.path, ".mp4")
        if codec == "h264_nvenc":
            out += ["-c:v", codec, "-preset", "p4", "-rc", "vbr", "-cq", str(crf)]
        else:
            out += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf)]
        cmd = ffmpeg_command("-y", *args, *out, "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-f", "mp4",
                             ffmpeg_path(self.tmp_path))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.drain = _StderrDrain(self.proc.stderr)
        self.drain.start()
        self.frames = 0
        self.closed = False

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise VideoError(f"frame of shape {frame.shape} {frame.dtype} does not fit a "
                             f"{self.width}x{self.height} BGR uint8 video")
        try:
            self.proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            self.proc.wait()
            self.drain.join(timeout=5)
            raise VideoError(f"ffmpeg stopped while encoding: {self.drain.last()}") from None
        self.frames += 1

    def close(self) -> str:
        if self.closed:
            return self.path
        self.closed = True
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self.proc.wait()
        self.drain.join(timeout=5)
        if rc != 0 or self.frames == 0:
            self._remove_tmp()
            reason = self.drain.last() or ("no frames were written" if self.frames == 0 else f"exit {rc}")
            raise VideoError(f"ffmpeg failed to write {self.path!r}: {reason}")
        try:
            finish_partial(self.tmp_path, self.path)
        except OSError as exc:
            self._remove_tmp()
            raise VideoError(f"cannot write {self.path!r}: {exc.strerror or exc}") from None
        return self.path

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.kill()
        self.proc.wait()
        self.drain.join(timeout=5)
        self._remove_tmp()

    def _remove_tmp(self):
        try:
            os.remove(self.tmp_path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def mux_audio(video_path: str, audio_src: Optional[str], out_path: str) -> None:
    """Copy the video stream of ``video_path`` with the audio of ``audio_src`` (AAC, on its timeline
    as :class:`VideoWriter` muxes it; None: no audio) into ``out_path`` (mp4), atomically.
    Raises :class:`VideoError` when ffmpeg fails."""
    out_path = os.path.abspath(out_path)
    video = probe_video(video_path)
    args = ["-copyts", "-i", ffmpeg_path(video_path)]
    out = ["-map", f"0:{video.stream_index}", "-c:v", "copy"]
    if audio_src is not None:
        a_in, a_out = _aac_from(audio_src)
        args += a_in
        out += a_out
    with atomic_write(out_path, ".mp4") as tmp:
        cmd = ffmpeg_command("-y", *args, *out, "-movflags", "+faststart", "-f", "mp4", ffmpeg_path(tmp))
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
        if proc.returncode != 0:
            raise VideoError(f"ffmpeg could not mux {video_path!r}: {stderr_reason(proc.stderr, str(proc.returncode))}")

