"""Which ffmpeg every stage runs, what it can do, how to name files to it, and what a file is by its
content.

Binary: ``use_ffmpeg(path)`` (a ``--ffmpeg`` flag), else ``$WAV2LIP_FFMPEG``, else ``ffmpeg`` on the
PATH, else the one the ``imageio-ffmpeg`` package ships. Any ffmpeg from 4.4 on works: what differs
between versions is feature-detected (:func:`has_option`, :func:`has_encoder`), never assumed from
the version number. ffprobe is optional: the one beside the chosen ffmpeg (or ``$WAV2LIP_FFPROBE``;
``none`` switches it off) gives the container's facts from its header; without one they come from
ffmpeg's own header and a packet listing (:mod:`lipsync.media.probe`), so a pip-only install needs
no ffprobe.

Names: every path is handed to ffmpeg as ``file:<absolute path>``, so a name with ``:`` is not
read as a protocol (``12:30 take.mp4``), one starting with ``-`` is not read as an option, and
``-`` is not stdin.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from lipsync.core.errors import Wav2LipError

ENV_FFMPEG = "WAV2LIP_FFMPEG"
ENV_FFPROBE = "WAV2LIP_FFPROBE"


class MediaError(Wav2LipError, ValueError):
    """A media file ffmpeg cannot read or write, or an ffmpeg that cannot do what is asked."""


# ------------------------------------------------------------------------------------------------
# Which ffmpeg
# ------------------------------------------------------------------------------------------------
_chosen: Optional[str] = None  # set by use_ffmpeg (a --ffmpeg flag); wins over the environment


def _check_executable(path: str, what: str) -> str:
    found = shutil.which(path) if os.sep not in path and "/" not in path else path
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise MediaError(f"{what} {path!r} is not an executable file")
    return os.path.abspath(found)


def use_ffmpeg(path: Optional[str]) -> None:
    """Use the ffmpeg at ``path`` (a file or a name on the PATH) from now on; ``None`` goes back to
    the default order. Raises :class:`MediaError` when it (or, with ``None``, ``$WAV2LIP_FFMPEG``)
    is not an executable ffmpeg."""
    from lipsync.media.probe import probe_media  # it caches per binary and imports this module

    global _chosen
    _chosen = _runs_as_ffmpeg(path, "--ffmpeg") if path else None
    ffmpeg_exe.cache_clear()
    ffprobe_exe.cache_clear()
    probe_media.cache_clear()
    env = os.environ.get(ENV_FFMPEG)
    if not path and env:  # checked now, not by the first file it fails on
        _runs_as_ffmpeg(env, f"${ENV_FFMPEG}")


def _runs_as_ffmpeg(path: str, what: str) -> str:
    exe = _check_executable(path, what)
    proc = subprocess.run([exe, "-hide_banner", "-version"], stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0 or b"ffmpeg version" not in proc.stdout:
        raise MediaError(f"{what} {path!r} does not run as ffmpeg (`{exe} -version` failed)")
    return exe


def add_ffmpeg_arg(parser) -> None:
    """The ``--ffmpeg PATH`` flag every script that runs ffmpeg takes; pass its value to
    :func:`use_ffmpeg`."""
    parser.add_argument("--ffmpeg", default=None, metavar="PATH",
                        help=f"the ffmpeg binary to use (None: ${ENV_FFMPEG}, else ffmpeg on the PATH, "
                             "else the one imageio-ffmpeg installs)")


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary every stage runs (see the module docstring for the order).

    Raises :class:`MediaError` when none is found or ``$WAV2LIP_FFMPEG`` is not executable."""
    if _chosen:
        return _chosen
    env = os.environ.get(ENV_FFMPEG)
    if env:
        return _check_executable(env, f"${ENV_FFMPEG}")
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg
    except ImportError:
        imageio_ffmpeg = None
    if imageio_ffmpeg is not None:
        return imageio_ffmpeg.get_ffmpeg_exe()
    raise MediaError("ffmpeg not found: install it (apt-get install ffmpeg), `pip install imageio-ffmpeg`, "
                     f"or point ${ENV_FFMPEG} at one")


@functools.lru_cache(maxsize=1)
def ffprobe_exe() -> Optional[str]:
    """The ffprobe that comes with the chosen ffmpeg (same folder), ``$WAV2LIP_FFPROBE`` if set
    (``none`` or empty: do without), or None: then probing uses ffmpeg alone."""
    env = os.environ.get(ENV_FFPROBE)
    if env is not None:
        if env.strip().lower() in ("", "none", "0", "off"):
            return None
        return _check_executable(env, f"${ENV_FFPROBE}")
    ffmpeg = ffmpeg_exe()
    folder, name = os.path.split(ffmpeg)
    probe_name = name.replace("ffmpeg", "ffprobe", 1) if name.startswith("ffmpeg") else None
    if probe_name and probe_name == "ffprobe" + os.path.splitext(name)[1]:
        candidate = os.path.join(folder, probe_name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


# ------------------------------------------------------------------------------------------------
# What it can do (feature detection, never the version number)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Capabilities:
    """What one ffmpeg binary offers, from its own listings."""
    exe: str
    version: str                 # first line of ``-version``, for messages only
    options: frozenset           # option names from ``-h long`` (without the dash)
    encoders: frozenset          # encoder names from ``-encoders``


def _listing(exe: str, *args: str) -> str:
    proc = subprocess.run([exe, "-hide_banner", *args], stdin=subprocess.DEVNULL, capture_output=True)
    return (proc.stdout + proc.stderr).decode("utf-8", "replace")


@functools.lru_cache(maxsize=4)
def _capabilities(exe: str) -> Capabilities:
    version = _listing(exe, "-version").strip().splitlines()
    options = frozenset(m.group(1) for m in re.finditer(r"^-([A-Za-z0-9_]+)", _listing(exe, "-h", "long"), re.M))
    encoders = frozenset(m.group(1) for m in re.finditer(r"^ [VAS][A-Z.]{5} (\S+)", _listing(exe, "-encoders"), re.M))
    return Capabilities(exe, version[0] if version else "ffmpeg (unknown version)", options, encoders)


def capabilities() -> Capabilities:
    """:class:`Capabilities` of the chosen ffmpeg (cached per binary)."""
    return _capabilities(ffmpeg_exe())


def has_option(name: str) -> bool:
    """Whether the chosen ffmpeg knows the command-line option ``-name`` (e.g. ``display_rotation``,
    ffmpeg 6+; ``fps_mode``, 5.1+)."""
    return name.lstrip("-") in capabilities().options


def has_encoder(name: str) -> bool:
    """Whether the chosen ffmpeg was built with the encoder ``name`` (e.g. ``libx264``)."""
    return name in capabilities().encoders


def require_encoder(name: str, purpose: str) -> None:
    """Raise :class:`MediaError` saying what to do when the chosen ffmpeg lacks encoder ``name``."""
    if not has_encoder(name):
        caps = capabilities()
        raise MediaError(f"{caps.exe} ({caps.version}) has no {name} encoder, needed for {purpose}; use an ffmpeg "
                         f"built with it (--ffmpeg or ${ENV_FFMPEG}; pip's imageio-ffmpeg ships one)")


# ------------------------------------------------------------------------------------------------
# Names and runs
# ------------------------------------------------------------------------------------------------
def ffmpeg_path(path: str) -> str:
    """``path`` as ffmpeg must be given it: ``file:`` + the absolute path, so that no name is read
    as a protocol (``a:b.mp4``), an option (``-x.mp4``) or stdin (``-``)."""
    return "file:" + os.path.abspath(os.fspath(path))


def ffmpeg_command(*args: str, loglevel: str = "error") -> List[str]:
    """``[ffmpeg, -hide_banner, -nostdin, -loglevel L, *args]``: an argument list, never a shell
    string."""
    return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", loglevel, *args]


def stderr_reason(stderr: bytes, default: str) -> str:
    """The last non-empty line ffmpeg wrote (its error), or ``default``."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1] if lines else default


# ------------------------------------------------------------------------------------------------
# What a file is, by its content
# ------------------------------------------------------------------------------------------------
_IMAGE_SIGNATURES: Sequence[Tuple[int, bytes]] = (
    (0, b"\xff\xd8\xff"),                    # JPEG / JFIF / EXIF (.jpg .jpeg .jfif .jpe)
    (0, b"\x89PNG\r\n\x1a\n"),               # PNG
    (0, b"II*\x00"), (0, b"MM\x00*"),          # TIFF
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n"),   # JPEG 2000
)


@functools.lru_cache(maxsize=1)
def opencv_reads_avif() -> bool:
    """Whether the installed OpenCV was built with an AVIF decoder (its build information says so)."""
    import cv2

    return any(line.strip().startswith("AVIF:") and "NO" not in line.split(":", 1)[1]
               for line in cv2.getBuildInformation().splitlines())


def image_signature(head: bytes) -> bool:
    """Whether ``head`` (a file's first 32 bytes) starts like a still image OpenCV decodes: JPEG,
    PNG, BMP, TIFF, WebP, JPEG 2000, binary PNM (P4-P6), or AVIF where this OpenCV reads it.
    Animated formats (GIF, animated AVIF) count as videos."""
    if any(head[off:off + len(sig)] == sig for off, sig in _IMAGE_SIGNATURES):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:12] == b"ftypavif":  # a still AVIF (an animated one's brand is avis)
        return opencv_reads_avif()
    if head[:2] == b"BM" and len(head) >= 18:  # BMP: a 2-byte magic, so check the DIB header size too
        return int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    return len(head) > 2 and head[:1] == b"P" and head[1:2] in (b"4", b"5", b"6") and head[2:3].isspace()
