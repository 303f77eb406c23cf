"""The corpora on disk, as lists: which files under a raw corpus are clips (and why the others are
not), which clips a shard takes, the finished clips under a preprocessed root, and their split into
filelists.

On-disk contracts (see DESIGN.md):
- raw corpus: ``<data_root>/<group>/<clip>.mp4``; enhanced copies ``<clip>_hq.mp4`` beside them;
- preprocessed: ``<root>/<group>/<clip>/`` with its face crops and ``audio.wav``
  (:mod:`lipsync.train.dataprep` writes them);
- filelists: ``<out_dir>/{train,val,test}.txt``, one ``<group>/<clip>`` per line.
"""
from __future__ import annotations

import glob
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from lipsync.core.errors import Wav2LipError


class DataPrepError(Wav2LipError, ValueError):
    """A corpus or flag the data stages cannot work with; the message says what to change."""


HQ_SUFFIX = "_hq"
# Extensions that are video containers whatever their letter case. A file with another extension
# (or none) is asked of ffmpeg; these are known not to be videos and are not asked.
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".wmv", ".asf", ".flv", ".mpg",
                    ".mpeg", ".m2v", ".ts", ".mts", ".m2ts", ".3gp", ".3g2", ".ogv", ".mxf", ".dv", ".vob", ".y4m"}
NOT_MEDIA_EXTENSIONS = {".json", ".txt", ".csv", ".tsv", ".md", ".yaml", ".yml", ".xml", ".srt", ".vtt", ".log",
                        ".npy", ".npz", ".pth", ".pt", ".py", ".sh", ".html", ".pdf", ".zip", ".tar", ".gz"}


# ------------------------------------------------------------------------------------------------
# Listing the raw corpus
# ------------------------------------------------------------------------------------------------
@dataclass
class RawClip:
    group: str
    name: str            # clip name without _hq
    raw: Optional[str]   # <clip>.mp4, if present
    hq: Optional[str]    # <clip>_hq.mp4, if present

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"


@dataclass
class CorpusScan:
    """What is under a raw corpus root: the clips, and every other file with the reason it is not
    one (``(path, reason)``), so that nothing is skipped in silence."""
    clips: List[RawClip]
    not_clips: List[Tuple[str, str]]


def _video_or_reason(path: str) -> Optional[str]:
    """None when ``path`` is a video clip; else why not. Names with a video extension (any letter
    case) are clips without asking ffmpeg (a corrupt one fails later, with the reason); other
    names are decided by content."""
    from lipsync.media.ffmpeg import MediaError
    from lipsync.media.probe import probe_media
    from lipsync.media.video import is_image_file

    ext = os.path.splitext(path)[1].lower()
    if ext in VIDEO_EXTENSIONS:
        return None
    if ext in NOT_MEDIA_EXTENSIONS:
        return f"not a video ({ext} file)"
    if is_image_file(path):
        return "a still image, not a video"
    try:
        info = probe_media(path)
    except (MediaError, OSError) as exc:
        return f"not a video ffmpeg reads: {exc}"
    return None if info.video is not None else "no video stream (audio only)" if info.audio else "no video stream"


def scan_raw_corpus(data_root: str) -> CorpusScan:
    """Clips ``<data_root>/<group>/<clip>.<ext>`` in any container ffmpeg reads and any letter
    case (``a.mp4``, ``b.MP4``, ``c.mov``, ``d.mkv``), with their ``<clip>_hq.mp4`` copies; every
    other file under the root or a group is listed in ``not_clips`` with the reason (hidden files,
    images, audio, sidecars such as the synthetic corpus's ``<clip>.json``, two files with one clip
    name). Raises ``FileNotFoundError`` when ``data_root`` is not a directory."""
    if not os.path.isdir(data_root):
        raise FileNotFoundError(f"--data_root is not a directory: {data_root!r}")
    clips: Dict[Tuple[str, str], RawClip] = {}
    not_clips: List[Tuple[str, str]] = []
    for entry in sorted(os.listdir(data_root)):
        top = os.path.join(data_root, entry)
        if os.path.isfile(top):
            not_clips.append((top, _video_or_reason(top) or "a video, but not inside a <group>/ folder"))
            continue
        if not os.path.isdir(top):
            continue
        for name in sorted(os.listdir(top)):
            path = os.path.join(top, name)
            if os.path.isdir(path):
                not_clips.append((path, "a folder inside a group: clips are <group>/<clip>.<ext>"))
                continue
            if not os.path.isfile(path):
                not_clips.append((path, "not a regular file (a broken link?)"))
                continue
            if name.startswith("."):  # hidden: our own .partial files, macOS ._ companions, .DS_Store
                not_clips.append((path, "hidden file"))
                continue
            why = _video_or_reason(path)
            if why is not None:
                not_clips.append((path, why))
                continue
            stem = os.path.splitext(name)[0]
            is_hq = stem.endswith(HQ_SUFFIX)
            clip_name = stem[: -len(HQ_SUFFIX)] if is_hq else stem
            clip = clips.setdefault((entry, clip_name), RawClip(entry, clip_name, None, None))
            taken = clip.hq if is_hq else clip.raw
            if taken is not None:
                not_clips.append((path, f"same clip name as {os.path.basename(taken)}"))
            elif is_hq:
                clip.hq = path
            else:
                clip.raw = path
    return CorpusScan(list(clips.values()), not_clips)


def report_not_clips(scan: CorpusScan, stream=None, limit: int = 10) -> str:
    """One line counting the files that are not clips, plus the first ``limit`` of them with the
    reason, written to ``stream`` (default stderr); returns the count line ('' when none)."""
    if not scan.not_clips:
        return ""
    stream = stream or sys.stderr
    line = f"{len(scan.not_clips)} file(s) under the corpus are not clips and were left out:"
    print(line, file=stream)
    for path, why in scan.not_clips[:limit]:
        print(f"  {path}: {why}", file=stream)
    if len(scan.not_clips) > limit:
        print(f"  ... and {len(scan.not_clips) - limit} more", file=stream)
    return line


def pick_source(clip: RawClip, hq_mode: str) -> Optional[str]:
    """The video to preprocess: ``prefer`` the _hq copy when present, ``only`` _hq, ``ignore`` _hq."""
    if hq_mode == "prefer":
        return clip.hq or clip.raw
    if hq_mode == "only":
        return clip.hq
    if hq_mode == "ignore":
        return clip.raw
    raise ValueError(f"unknown --hq mode {hq_mode!r}")


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    """``"i/n"`` -> (i, n); None -> (0, 1). Raises :class:`DataPrepError` unless 0 <= i < n."""
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise DataPrepError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise DataPrepError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def take_shard(items: list, shard: Tuple[int, int]) -> list:
    i, n = shard
    return [x for k, x in enumerate(items) if k % n == i]



def hq_path(raw_path: str) -> str:
    """``<clip>_hq.mp4`` beside ``raw_path`` (always mp4: that is what the enhancers write)."""
    return os.path.splitext(raw_path)[0] + HQ_SUFFIX + ".mp4"



# ------------------------------------------------------------------------------------------------
# Filelists (generate_filelists.py)
# ------------------------------------------------------------------------------------------------
def list_preprocessed(root: str) -> List[Tuple[str, int]]:
    """(``group/clip``, number of face frames) of every finished clip under ``root``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data_root is not a directory: {root!r}")
    out = []
    for d in sorted(glob.glob(os.path.join(glob.escape(root), "*", "*"))):
        if not os.path.isdir(d) or d.endswith(".partial"):
            continue
        if not os.path.isfile(os.path.join(d, "audio.wav")):
            continue
        n = len(glob.glob(os.path.join(glob.escape(d), "*.jpg")))
        rel = os.path.relpath(d, root).replace(os.sep, "/")
        out.append((rel, n))
    return out


def split_by_group(clips: List[str], val_fraction: float, test_fraction: float, seed: int) -> Dict[str, List[str]]:
    """Whole groups go to one split; with >= 3 groups every split gets at least one."""
    groups = sorted({c.split("/")[0] for c in clips})
    rng = np.random.default_rng(seed)
    rng.shuffle(groups)
    g = len(groups)
    if g >= 3:
        n_test = min(g - 2, max(1, int(round(test_fraction * g))))
        n_val = min(g - 1 - n_test, max(1, int(round(val_fraction * g))))
    elif g == 2:
        n_test, n_val = 0, 1
    else:
        n_test = n_val = 0
    test_groups = set(groups[:n_test])
    val_groups = set(groups[n_test:n_test + n_val])
    splits: Dict[str, List[str]] = {"train": [], "val": [], "test": []}
    for c in sorted(clips):
        grp = c.split("/")[0]
        splits["test" if grp in test_groups else "val" if grp in val_groups else "train"].append(c)
    return splits
