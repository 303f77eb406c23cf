"""Where each stream of a media file sits on that file's timeline: :func:`probe_media` (with ffprobe,
or with ffmpeg alone: its header and a packet listing), exact frame rates, and the ffmpeg filters
that put a stream on the timeline.

A file's streams may start at different times (audio muxed with ``-itsoffset``, a video cut with
``-ss -c copy`` and an edit list, an MPEG-TS clock starting at 1.4 s, codec priming). Every reader
puts both streams on the file's timeline, whose 0 is the file's start (its earliest stream): video
frame ``k`` is the picture shown at ``k / rate`` s (the first picture is held before a late video
starts), audio sample ``i`` is at ``i / sample_rate`` s (silence before a late audio stream starts),
and the audio ends where the container says it does (not where the codec's padding does). The
decoders run with ``-copyts`` and shift by the probed file start themselves, because ffmpeg's own
shift depends on which streams are mapped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Optional, Tuple, Union

from lipsync.media.ffmpeg import MediaError, ffmpeg_command, ffmpeg_exe, ffmpeg_path, ffprobe_exe, stderr_reason

Rate = Union[Fraction, int, float, str]


# ------------------------------------------------------------------------------------------------
# Rates
# ------------------------------------------------------------------------------------------------
def to_rate(value: Rate) -> Fraction:
    """A frame rate as an exact fraction: a Fraction or int as is, a string as ffmpeg writes one
    (``"24000/1001"``, ``"25"``, ``"29.97"``), a float by its nearest fraction with a denominator up
    to 1e6 (so ``24000 / 1001`` comes back as 24000/1001). Raises :class:`MediaError` unless > 0."""
    try:
        if isinstance(value, Fraction):
            rate = value
        elif isinstance(value, float):
            rate = Fraction(value).limit_denominator(1_000_000) if math.isfinite(value) else Fraction(0)
        else:
            rate = Fraction(str(value).strip()) if isinstance(value, str) else Fraction(value)
    except (ValueError, ZeroDivisionError, TypeError):
        raise MediaError(f"not a frame rate: {value!r}") from None
    if rate <= 0:
        raise MediaError(f"frame rate must be > 0, got {value!r}")
    return rate


def _rate_from_header(text: str) -> Optional[Fraction]:
    """ffmpeg prints rates with two decimals ("23.98 fps"); the NTSC family (k * 1000/1001) is what
    such a number almost always is, so it is snapped to it."""
    try:
        value = float(text.rstrip("k")) * (1000 if text.endswith("k") else 1)
    except ValueError:
        return None
    if not 0 < value < 100000:
        return None
    k = round(value * 1.001)
    if abs(value - round(value)) > 1e-9 and abs(k * 1000 / 1001 - value) < 0.006:
        return Fraction(k * 1000, 1001)
    return Fraction(text.rstrip("k")).limit_denominator(1000) * (1000 if text.endswith("k") else 1)


NOPTS = -0x8000000000000000  # AV_NOPTS_VALUE in a packet listing


def snap_rate(rate: Optional[Fraction]) -> Optional[Fraction]:
    """A measured frame rate (frames/s) within 0.1% of a standard one is that one: the nearest of
    k/2 and the NTSC family k * 1000/1001. Measurements come out slightly off where a container's
    clock cannot hold the exact frame duration (Matroska's milliseconds or nanoseconds give
    19001/317 for 60000/1001; MPEG-TS's 90 kHz packet durations alternate). Others are kept."""
    if rate is None or rate.denominator in (1, 2, 1001):
        return rate
    value = float(rate)
    candidates = [c for c in (Fraction(round(value * 2), 2), Fraction(round(value * 1.001) * 1000, 1001)) if c > 0]
    best = min(candidates, key=lambda c: abs(float(c) - value), default=None)
    return best if best is not None and abs(float(best) - value) <= 1e-3 * value else rate


def _fraction(text: Optional[str]) -> Optional[Fraction]:
    try:
        num, _, den = (text or "").partition("/")
        f = Fraction(int(num), int(den or 1))
    except (ValueError, ZeroDivisionError):
        return None
    return f if f > 0 else None


# ------------------------------------------------------------------------------------------------
# Probing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamInfo:
    """One audio or video stream. Times are seconds on the file's timeline (0 = the file's start)."""
    index: int                       # absolute stream index (``-map 0:<index>``)
    kind: str                        # "video" or "audio"
    codec: str
    start: Optional[float] = None    # where the stream's first frame or sample is; None when unknown
    end: Optional[float] = None      # where the container says the stream ends; None when unknown
    width: int = 0                   # video: coded size, before rotation
    height: int = 0
    rate: Optional[Fraction] = None  # video: average frame rate, exact (e.g. 24000/1001)
    rotation: int = 0                # video: display rotation, degrees counter-clockwise, in (-180, 180]
    sample_rate: int = 0             # audio: Hz
    channels: int = 0


@dataclass(frozen=True)
class MediaInfo:
    """What :func:`probe_media` found in a file."""
    path: str
    start: float                     # the file's start in the container's clock (seconds): timeline 0
    duration: float                  # seconds, 0 when unknown
    streams: Tuple[StreamInfo, ...] = field(default_factory=tuple)
    prober: str = "ffprobe"          # "ffprobe" or "ffmpeg" (header + packet listing)
    format: str = ""                 # ffmpeg's demuxer names, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "hls", "wav"

    def first(self, kind: str) -> Optional[StreamInfo]:
        return next((s for s in self.streams if s.kind == kind), None)

    @property
    def video(self) -> Optional[StreamInfo]:
        """The first video stream that is not an attached picture (cover art), or None."""
        return self.first("video")

    @property
    def audio(self) -> Optional[StreamInfo]:
        """The first audio stream, or None."""
        return self.first("audio")


def _norm_rotation(deg: float) -> int:
    r = int(round(deg)) % 360
    return r - 360 if r > 180 else r


def _probe_ffprobe(exe: str, path: str) -> MediaInfo:
    proc = subprocess.run([exe, "-v", "error", "-show_format", "-show_streams", "-of", "json", ffmpeg_path(path)],
                          stdin=subprocess.DEVNULL, capture_output=True)
    try:
        data = json.loads(proc.stdout.decode("utf-8", "replace") or "{}")
    except ValueError:
        data = {}
    if proc.returncode != 0 or "format" not in data:
        raise MediaError(stderr_reason(proc.stderr, "ffprobe could not read it"))
    fmt = data["format"]
    file_start = float(fmt.get("start_time") or 0.0)
    # Only MP4/MOV declare each track's length (edit lists, sample tables), and there ffmpeg < 7
    # decodes the codec's tail padding past it. Elsewhere a stream's "duration" may be an estimate
    # from the bitrate (MPEG-TS, raw AAC), shorter than the audio, and the demuxer or decoder already
    # ends the stream where the container says (Matroska's DiscardPadding, Ogg's granule, LAME tags).
    declares_length = str(fmt.get("format_name", "")).startswith("mov,")
    streams = []
    for s in data.get("streams", []):
        kind = s.get("codec_type")
        if kind not in ("video", "audio") or (s.get("disposition") or {}).get("attached_pic"):
            continue
        start = float(s["start_time"]) - file_start if s.get("start_time") not in (None, "N/A") else None
        length = float(s["duration"]) if declares_length and s.get("duration") not in (None, "N/A") else None
        end = (start or 0.0) + length if length is not None else None
        common = dict(index=int(s["index"]), kind=kind, codec=s.get("codec_name", "?"), start=start, end=end)
        if kind == "video":
            rotation = 0
            for side in s.get("side_data_list") or []:
                if "rotation" in side:
                    rotation = _norm_rotation(float(side["rotation"]))
            if not rotation and (s.get("tags") or {}).get("rotate"):
                rotation = _norm_rotation(-float(s["tags"]["rotate"]))  # the tag is clockwise
            rate = _fraction(s.get("avg_frame_rate")) or _fraction(s.get("r_frame_rate"))
            if str(fmt.get("format_name")) == "avi" and _fraction(s.get("r_frame_rate")):
                # AVI stores B-frame delays as empty packets, which the average counts (twice the rate)
                rate = _fraction(s.get("r_frame_rate"))
            rate = snap_rate(rate)
            streams.append(StreamInfo(width=int(s.get("width") or 0), height=int(s.get("height") or 0), rate=rate,
                                      rotation=rotation, **common))
        else:
            streams.append(StreamInfo(sample_rate=int(s.get("sample_rate") or 0), channels=int(s.get("channels") or 0),
                                      **common))
    return MediaInfo(path, file_start, float(fmt.get("duration") or 0.0), tuple(streams), "ffprobe",
                     str(fmt.get("format_name", "")))


_STREAM_LINE = re.compile(r"^\s*Stream #\d+:(\d+)\S*: (Video|Audio): (\S+)(.*)$")


def _probe_ffmpeg(path: str) -> MediaInfo:
    """ffmpeg's header (``ffmpeg -i``) for the streams and sizes; its packet listing for the exact
    times and rates the header rounds."""
    proc = subprocess.run(ffmpeg_command("-i", ffmpeg_path(path), loglevel="info"),
                          stdin=subprocess.DEVNULL, capture_output=True)
    header = proc.stderr.decode("utf-8", "replace")
    dur = re.search(r"Duration:\s*(?:(\d+):(\d+):([\d.]+)|N/A)(?:, start: (-?[\d.]+))?", header)
    if not dur:
        raise MediaError(stderr_reason(proc.stderr, "ffmpeg could not read it"))
    duration = int(dur.group(1)) * 3600 + int(dur.group(2)) * 60 + float(dur.group(3)) if dur.group(1) else 0.0
    file_start = float(dur.group(4)) if dur.group(4) else 0.0
    demuxer = re.search(r"^Input #\d+, (.+?), from '", header, re.M)
    # the lines after a stream's line (its metadata and side data) belong to it
    blocks: List[Tuple[re.Match, str]] = []
    for line in header.splitlines():
        m = _STREAM_LINE.match(line)
        if m:
            blocks.append((m, ""))
        elif blocks and not re.match(r"^\s*(Stream|Input|Output|Duration) ", line):
            blocks[-1] = (blocks[-1][0], blocks[-1][1] + line + "\n")
        elif line.lstrip().startswith(("Input #", "Output #")) and blocks:
            break
    streams = []
    for m, extra in blocks:
        index, kind, codec, rest = int(m.group(1)), m.group(2).lower(), m.group(3).rstrip(","), m.group(4)
        if "(attached pic)" in rest:
            continue
        own_start = re.search(r", start (-?[\d.]+)", rest)  # ffmpeg 7+ prints each stream's start
        start = float(own_start.group(1)) - file_start if own_start else None
        if kind == "video":
            size = re.search(r"[ ,](\d{1,5})x(\d{1,5})[ ,\[]", rest + " ")
            fps = re.search(r"([\d.]+k?) fps", rest) or re.search(r"([\d.]+k?) tbr", rest)
            if demuxer and demuxer.group(1) == "avi":  # "fps" counts B-frame delays (empty packets)
                fps = re.search(r"([\d.]+k?) tbr", rest) or fps
            rot = re.search(r"rotation of (-?[\d.]+) degrees", extra)
            tag = re.search(r"^\s*rotate\s*:\s*(-?[\d.]+)", extra, re.M)
            rotation = _norm_rotation(float(rot.group(1))) if rot else _norm_rotation(-float(tag.group(1))) if tag else 0
            streams.append(StreamInfo(index, kind, codec, start, None,
                                      int(size.group(1)) if size else 0, int(size.group(2)) if size else 0,
                                      _rate_from_header(fps.group(1)) if fps else None, rotation))
        else:
            hz = re.search(r"(\d+) Hz", rest)
            layout = re.search(r"Hz, ([^,]+)", rest)
            ch = {"mono": 1, "stereo": 2}.get(layout.group(1).strip(), 0) if layout else 0
            if layout and not ch:
                n = re.match(r"(\d+)", layout.group(1).strip())
                ch = int(n.group(1)) if n else 0
            streams.append(StreamInfo(index, kind, codec, start, None, sample_rate=int(hz.group(1)) if hz else 0,
                                      channels=ch))
    info = MediaInfo(path, file_start, duration, tuple(streams), "ffmpeg", demuxer.group(1) if demuxer else "")
    return _with_packet_times(info)


def _with_packet_times(info: MediaInfo) -> MediaInfo:
    """Fill the first video stream's start and exact rate and the first audio stream's start and
    end from a packet listing (``-c copy -f framecrc``: one line per packet, timestamps in the stream's time
    base), skipping packets the demuxer marks as discarded (before an edit list's start)."""
    chosen = [s for s in (info.video, info.audio) if s is not None]
    if not chosen:
        return info
    args = ["-copyts", "-i", ffmpeg_path(info.path)]
    for s in chosen:
        args += ["-map", f"0:{s.index}"]
    proc = subprocess.run(ffmpeg_command(*args, "-c", "copy", "-f", "framecrc", "pipe:1"),
                          stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        return info
    tbs: Dict[int, Fraction] = {}
    packets: Dict[int, List[Tuple[int, int]]] = {}
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        tb = re.match(r"#tb (\d+): (\d+)/(\d+)", line)
        if tb:
            tbs[int(tb.group(1))] = Fraction(int(tb.group(2)), int(tb.group(3)))
            continue
        if not line or line.startswith("#"):
            continue
        cols = [c.strip() for c in line.split(",")]
        flags = next((int(c[2:], 16) for c in cols[6:] if c.startswith("F=")), 0)
        if flags & 0x4 or len(cols) < 5:  # AV_PKT_FLAG_DISCARD: decoded for reference, never shown
            continue
        try:
            pts = int(cols[2]) if int(cols[2]) != NOPTS else int(cols[1])  # AVI lists no pts: its dts
            if int(cols[4]) > 0:  # empty packets (AVI's B-frame delays) hold no frame
                packets.setdefault(int(cols[0]), []).append((pts, int(cols[3])))
        except ValueError:
            continue
    out = {s.index: s for s in info.streams}
    for k, s in enumerate(chosen):
        rows, tb = packets.get(k), tbs.get(k)
        if not rows or tb is None:
            continue
        first = min(p for p, _ in rows)
        known = sorted(d for _, d in rows if d > 0)
        typical = known[len(known) // 2] if known else 0  # ffmpeg 5.1 lists some last packets with duration 0
        last = max(p + (d if d > 0 else typical) for p, d in rows)
        start = float(first * tb) - info.start
        end = float(last * tb) - info.start
        if s.kind == "video":
            durations = {d for _, d in rows}
            if len(durations) == 1 and min(durations) > 0:
                rate = 1 / (min(durations) * tb)
            elif last > first:
                rate = len(rows) / ((last - first) * tb)
            else:
                rate = None
            # the header's two-decimal rate guards against containers without real durations
            if rate is not None and s.rate is not None and abs(float(rate) - float(s.rate)) > 0.01 * float(s.rate):
                rate = s.rate
            if info.format == "avi":  # packet durations count B-frame delays; the header's tbr does not
                rate = s.rate
            rate = snap_rate(rate)
            out[s.index] = StreamInfo(s.index, s.kind, s.codec, s.start if s.start is not None else start, end,
                                      s.width, s.height, rate or s.rate, s.rotation)
        else:
            out[s.index] = StreamInfo(s.index, s.kind, s.codec, s.start if s.start is not None else start, end,
                                      sample_rate=s.sample_rate, channels=s.channels)
    return dataclasses.replace(info, streams=tuple(out[s.index] for s in info.streams))


def probe_media(path: str) -> MediaInfo:
    """The streams of a media file and where each sits on its timeline (see :class:`MediaInfo`),
    from ffprobe when there is one, else from ffmpeg alone. Cached per file version.

    Raises :class:`MediaError` (message: ffmpeg's reason) when the file cannot be read as media,
    ``FileNotFoundError`` when it does not exist."""
    path = os.path.abspath(os.fspath(path))
    st = os.stat(path)
    return _probe_cached(path, st.st_mtime_ns, st.st_size, ffmpeg_exe(), ffprobe_exe())


@functools.lru_cache(maxsize=64)
def _probe_cached(path: str, mtime_ns: int, size: int, ffmpeg: str, ffprobe: Optional[str]) -> MediaInfo:
    return _probe_ffprobe(ffprobe, path) if ffprobe else _probe_ffmpeg(path)


probe_media.cache_clear = _probe_cached.cache_clear  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# Timeline filters (run under -copyts: the filters see the container's own timestamps)
# ------------------------------------------------------------------------------------------------
def _seconds(x: float) -> str:
    return f"{x:.6f}"


def audio_timeline_filters(info: MediaInfo, stream: StreamInfo) -> List[str]:
    """ffmpeg audio filters that put ``stream`` on ``info``'s timeline: sample 0 at the file's start
    (silence where the stream starts late; priming the container trims is dropped), gaps of more
    than 0.1 s filled with silence, and the stream cut where the container says it ends (AAC and
    other codecs decode to a whole last frame, ffmpeg < 7 keeps that padding). Needs ``-copyts``."""
    chain = []
    if info.start:
        chain.append(f"asetpts=PTS-{_seconds(info.start)}/TB")
    chain.append("aresample=async=1:first_pts=0")
    if stream.end is not None and stream.end > 0:
        chain.append(f"atrim=end={_seconds(stream.end)}")
    return chain


def video_timeline_filters(info: MediaInfo, rate: Rate) -> List[str]:
    """ffmpeg video filters for constant-rate frames on ``info``'s timeline: frame ``k`` is the
    picture shown at ``k / rate`` s after the file's start (the first picture is held where the
    video starts late; variable-rate input is resampled), timestamps from 0. Needs ``-copyts``."""
    return [f"fps=fps={to_rate(rate)}:start_time={_seconds(info.start)}", "setpts=PTS-STARTPTS"]


def audio_input_args(path: str, input_index: int) -> Tuple[List[str], List[str], MediaInfo, StreamInfo]:
    """(input args, output args, its MediaInfo, its audio StreamInfo) that add ``path``'s first
    audio stream, on its timeline, to an ffmpeg command in which this input is number
    ``input_index`` (0 when it is the only input). The command must carry ``-copyts``. Raises
    :class:`MediaError` when the file has no audio stream or cannot be probed."""
    info = probe_media(path)
    stream = info.audio
    if stream is None:
        raise MediaError(f"{path!r} has no audio stream")
    return (["-i", ffmpeg_path(path)],
            ["-map", f"{input_index}:{stream.index}", "-af", ",".join(audio_timeline_filters(info, stream))],
            info, stream)
