"""Video I/O through ffmpeg pipes: probe, stream BGR frames in, stream BGR frames + audio out.

Every ffmpeg call is an argument list built with ffmpeg-python (never a shell string), so any file
name is safe. Frames are streamed: memory does not depend on the video's length.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from audio import ffmpeg_exe
from lipsync.errors import Wav2LipError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class VideoError(Wav2LipError, ValueError):
    """A video that cannot be read or written."""


@dataclass
class VideoInfo:
    path: str
    width: int   # as displayed (rotation metadata applied)
    height: int
    fps: float
    duration: float  # seconds, 0 when unknown
    rotation: int    # degrees from the container's metadata
    has_audio: bool

    @property
    def approx_frames(self) -> int:
        return max(1, int(round(self.duration * self.fps))) if self.duration else 0


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def read_image(path: str) -> np.ndarray:
    """BGR image; works for any file name (cv2.imread does not on every platform)."""
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


def _run_ffmpeg_header(path: str) -> str:
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc.stderr.decode("utf-8", "replace")


def probe_video(path: str) -> VideoInfo:
    """Size, frame rate, duration and rotation of a video, from ffmpeg's stream header."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoError(f"video file not found: {path!r}")
    header = _run_ffmpeg_header(path)
    video_line = next((ln for ln in header.splitlines() if re.search(r"Stream #\S+.*: Video:", ln)), None)
    if video_line is None:
        last = [ln.strip() for ln in header.strip().splitlines() if ln.strip()]
        reason = last[-1] if last else "no video stream"
        if "Audio:" in header:
            reason = "it has no video stream"
        raise VideoError(f"cannot read video {path!r}: {reason}")
    size = re.search(r"[ ,](\d{2,5})x(\d{2,5})[ ,\[]", video_line)
    if not size:
        raise VideoError(f"cannot read video {path!r}: no frame size in its header")
    width, height = int(size.group(1)), int(size.group(2))
    fps_match = re.search(r"([\d.]+)\s*fps", video_line) or re.search(r"([\d.]+)k?\s*tbr", video_line)
    fps = float(fps_match.group(1)) if fps_match else 0.0
    if not 0 < fps < 1000:
        raise VideoError(f"cannot read video {path!r}: unknown frame rate (pass --fps)")
    dur = re.search(r"Duration:\s*(\d+):(\d+):([\d.]+)", header)
    duration = int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur else 0.0
    rot = re.search(r"rotation of (-?[\d.]+) degrees", header) or re.search(r"rotate\s*:\s*(-?\d+)", header)
    rotation = int(round(float(rot.group(1)))) if rot else 0
    if abs(rotation) % 180 == 90:
        width, height = height, width  # ffmpeg rotates the frames it decodes
    has_audio = any(re.search(r"Stream #\S+.*: Audio:", ln) for ln in header.splitlines())
    return VideoInfo(path, width, height, fps, duration, rotation, has_audio)


def iter_frames(info: VideoInfo, fps: Optional[float] = None, start_frame: int = 0,
                end_frame: Optional[int] = None) -> Iterator[np.ndarray]:
    """Yield BGR frames at a constant ``fps`` (default: the video's), optionally a [start, end) range.

    Variable-frame-rate input is resampled to constant rate by ffmpeg's fps filter, so frame ``k``
    is always the picture shown at time ``k / fps``.
    """
    import ffmpeg

    fps = fps or info.fps
    stream = ffmpeg.input(info.path).video.filter("fps", fps=fps)
    if start_frame or end_frame is not None:
        kwargs = {"start_frame": start_frame}
        if end_frame is not None:
            kwargs["end_frame"] = end_frame
        stream = stream.filter("trim", **kwargs)
    out = stream.output("pipe:", format="rawvideo", pix_fmt="bgr24")
    cmd = ffmpeg.compile(out, cmd=[ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error"])
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


def count_frames(info: VideoInfo, fps: Optional[float] = None) -> int:
    return sum(1 for _ in iter_frames(info, fps))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class VideoWriter:
    """H.264 (+ AAC from ``audio_path``) mp4, written to a hidden temporary file beside ``path`` and
    moved into place by :meth:`close`; :meth:`abort` (or an exception inside ``with``) removes it.
    """

    def __init__(self, path: str, width: int, height: int, fps: float, audio_path: Optional[str] = None,
                 crf: int = 18, preset: str = "veryfast"):
        import ffmpeg

        self.path = os.path.abspath(path)
        out_dir = os.path.dirname(self.path)
        os.makedirs(out_dir, exist_ok=True)
        fd, self.tmp_path = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".", suffix=".partial.mp4",
                                             dir=out_dir)
        os.close(fd)
        self.width, self.height = width, height
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="bgr24", s=f"{width}x{height}", framerate=fps).video
        if width % 2 or height % 2:  # yuv420p needs even sizes: pad one black pixel where needed
            video = video.filter("pad", "ceil(iw/2)*2", "ceil(ih/2)*2")
        streams = [video]
        opts = dict(vcodec="libx264", preset=preset, crf=crf, pix_fmt="yuv420p", movflags="+faststart",
                    format="mp4")
        if audio_path is not None:
            streams.append(ffmpeg.input(audio_path).audio)
            opts.update(acodec="aac", audio_bitrate="192k")
        out = ffmpeg.output(*streams, self.tmp_path, **opts)
        cmd = ffmpeg.compile(out, cmd=[ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error"],
                             overwrite_output=True)
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
        os.chmod(self.tmp_path, 0o666 & ~_umask())  # mkstemp made it private
        os.replace(self.tmp_path, self.path)
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
    """Copy the video stream of ``video_path`` with the audio of ``audio_src`` (AAC) into ``out_path``,
    atomically."""
    import ffmpeg

    out_path = os.path.abspath(out_path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out_path) + ".", suffix=".partial.mp4",
                               dir=os.path.dirname(out_path))
    os.close(fd)
    streams = [ffmpeg.input(video_path).video]
    opts = dict(vcodec="copy", format="mp4", movflags="+faststart")
    if audio_src is not None:
        streams.append(ffmpeg.input(audio_src).audio)
        opts.update(acodec="aac", audio_bitrate="192k")
    cmd = ffmpeg.compile(ffmpeg.output(*streams, tmp, **opts),
                         cmd=[ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error"], overwrite_output=True)
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        os.remove(tmp)
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise VideoError(f"ffmpeg could not mux {video_path!r}: {err[-1] if err else proc.returncode}")
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out_path)
