"""The data stages: enhancing raw clips, cutting face crops + audio, splitting into filelists.

On-disk contracts (see DESIGN.md):
- raw corpus: ``<data_root>/<group>/<clip>.mp4``; enhanced copies ``<clip>_hq.mp4`` beside them;
- preprocessed: ``<root>/<group>/<clip>/<frame>.jpg`` (frame = index in the 25 fps stream; a frame
  without a face leaves a gap), ``audio.wav`` (16 kHz mono), ``mel.npy`` (cached spectrogram) and
  ``done.json`` (written last: a clip without it is unfinished and is redone);
- filelists: ``<out_dir>/{train,val,test}.txt``, one ``<group>/<clip>`` per line.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from lipsync.core.errors import Wav2LipError
from lipsync.core.fileio import atomic_write

log = logging.getLogger(__name__)


class DataPrepError(Wav2LipError, ValueError):
    """A corpus or flag the data stages cannot work with; the message says what to change."""


TRAIN_FPS = 25.0
DONE = "done.json"
HQ_SUFFIX = "_hq"
# Extensions that are video containers whatever their letter case. A file with another extension
# (or none) is asked of ffmpeg; these are known not to be videos and are not asked.
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".wmv", ".asf", ".flv", ".mpg",
                    ".mpeg", ".m2v", ".ts", ".mts", ".m2ts", ".3gp", ".3g2", ".ogv", ".mxf", ".dv", ".vob", ".y4m"}
NOT_MEDIA_EXTENSIONS = {".json", ".txt", ".csv", ".tsv", ".md", ".yaml", ".yml", ".xml", ".srt", ".vtt", ".log",
                        ".npy", ".npz", ".pth", ".pt", ".py", ".sh", ".html", ".pdf", ".zip", ".tar", ".gz"}


# ------------------------------------------------------------------------------------------------
# Writing files so that a crash never leaves half of one
# ------------------------------------------------------------------------------------------------
def write_text_atomic(path: str, text: str) -> None:
    with atomic_write(path) as tmp, open(tmp, "w") as fh:
        fh.write(text)


def write_json_atomic(obj, path: str, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))


def write_audio_and_mel(wav: np.ndarray, wav_path: str, mel_path: str) -> np.ndarray:
    """Save (samples,) audio at ``audio.SAMPLE_RATE`` and its cached (num_mels, T) mel, each
    atomically, and return the mel. The mel is that of the file as stored (16-bit), i.e. what
    training would compute from it, with the default front end (:func:`audio.mel_params`); the
    caller records those parameters in done.json (``mel_params``)."""
    import audio

    with atomic_write(wav_path, ".wav") as tmp_wav, atomic_write(mel_path, ".npy") as tmp_mel:
        audio.save_wav(wav, tmp_wav, audio.SAMPLE_RATE)
        mel = audio.melspectrogram(audio.load_wav(tmp_wav, audio.SAMPLE_RATE))
        np.save(tmp_mel, mel)
    return mel


_stale_mel_warned = False


def load_clip_mel(clip_dir: str, hp) -> np.ndarray:
    """(num_mels, T) mel of a preprocessed clip for hparams ``hp``: the cached ``mel.npy`` when it
    was made with ``hp``'s audio front end (:func:`audio.mel_params`), else recomputed from
    ``audio.wav`` (a warning says so once per process). done.json's ``mel_params`` says how the
    cache was made; a cache without them predates the record, when preprocess.py could only make
    mels with the defaults, so it counts as made with the defaults."""
    import audio

    global _stale_mel_warned
    cached = os.path.join(clip_dir, "mel.npy")
    wanted = audio.mel_params(hp)
    made_with = read_done(clip_dir).get("mel_params", audio.mel_params())
    if os.path.isfile(cached) and made_with == wanted:
        return np.load(cached)
    if os.path.isfile(cached) and not _stale_mel_warned:
        _stale_mel_warned = True
        log.warning("%s: mel.npy was made with other audio parameters than these hparams; recomputing mels "
                    "from audio.wav", clip_dir)
    return audio.melspectrogram(audio.load_wav(os.path.join(clip_dir, "audio.wav"), hp.sample_rate), hp)


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


# ------------------------------------------------------------------------------------------------
# Enhancement (generate_hq_videos.py)
# ------------------------------------------------------------------------------------------------
class BuiltinEnhancer:
    """OpenCV restoration that runs anywhere: edge-preserving denoise, unsharp mask, mild local contrast."""

    name = "builtin"

    def __init__(self):
        self.clahe = cv2.createCLAHE(clipLimit=1.5, tileGridSize=(8, 8))

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        den = cv2.bilateralFilter(frame, 5, 20, 5)
        blur = cv2.GaussianBlur(den, (0, 0), 1.2)
        sharp = cv2.addWeighted(den, 1.6, blur, -0.6, 0)
        lab = cv2.cvtColor(sharp, cv2.COLOR_BGR2LAB)
        lab[..., 0] = self.clahe.apply(lab[..., 0])
        return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)


def hq_path(raw_path: str) -> str:
    """``<clip>_hq.mp4`` beside ``raw_path`` (always mp4: that is what the enhancers write)."""
    return os.path.splitext(raw_path)[0] + HQ_SUFFIX + ".mp4"


def enhance_builtin(src: str, dst: str) -> int:
    from lipsync.media.video import VideoWriter, iter_frames, probe_video

    info = probe_video(src)
    enhancer = BuiltinEnhancer()
    with VideoWriter(dst, info.width, info.height, info.rate, audio_path=src if info.has_audio else None) as w:
        for frame in iter_frames(info):
            w.write(enhancer(frame))
    return w.frames


def codeformer_command(codeformer_dir: str, src: str, out_dir: str) -> List[str]:
    """The published pipeline's CodeFormer call, as an argument list."""
    return [sys.executable, os.path.join(codeformer_dir, "inference_codeformer.py"), "--bg_upsampler", "realesrgan",
            "--face_upsample", "-w", "1.0", "-s", "1", "-i", os.path.abspath(src), "-o", os.path.abspath(out_dir)]


def enhance_codeformer(src: str, dst: str, codeformer_dir: str) -> int:
    """Run CodeFormer from the user's checkout on ``src``, then put the clip's audio back."""
    from lipsync.media.video import VideoError, count_frames, mux_audio, probe_video

    script = os.path.join(codeformer_dir, "inference_codeformer.py")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"--codeformer_dir {codeformer_dir!r} has no inference_codeformer.py")
    with tempfile.TemporaryDirectory(prefix="codeformer_") as tmp:
        proc = subprocess.run(codeformer_command(codeformer_dir, src, tmp), cwd=codeformer_dir,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"CodeFormer failed (exit {proc.returncode}): {tail[-1] if tail else ''}")
        stem = os.path.splitext(os.path.basename(src))[0]
        produced = glob.glob(os.path.join(glob.escape(tmp), "**", stem + ".mp4"), recursive=True)
        if not produced:
            raise RuntimeError(f"CodeFormer wrote no {stem}.mp4 under its output folder")
        info = probe_video(src)
        mux_audio(produced[0], src if info.has_audio else None, dst)
        try:
            return count_frames(probe_video(dst))
        except VideoError:
            os.remove(dst)
            raise


def run_parallel(fn, jobs: list, workers: int):
    """Yield ``fn(job)`` for each job, in this process or in a pool of ``workers`` processes."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers) as pool:
        for fut in as_completed([pool.submit(fn, j) for j in jobs]):
            yield fut.result()


def enhance_job(args: Tuple[str, str, Optional[str], Optional[str]]) -> Tuple[str, Optional[str], int]:
    """(raw path, error or None, frames) of one clip ``(src, enhancer, codeformer_dir, ffmpeg)``,
    for a process pool."""
    from lipsync.media.ffmpeg import use_ffmpeg

    src, enhancer, codeformer_dir, ffmpeg = args
    dst = hq_path(src)
    try:
        use_ffmpeg(ffmpeg)  # a pool worker may not share the parent's choice
        if enhancer == "codeformer":
            n = enhance_codeformer(src, dst, codeformer_dir)
        else:
            n = enhance_builtin(src, dst)
        return src, None, n
    except Exception as exc:  # noqa: BLE001 - reported per clip in the failure summary
        return src, f"{type(exc).__name__}: {exc}", 0


# ------------------------------------------------------------------------------------------------
# Preprocessing (preprocess.py)
# ------------------------------------------------------------------------------------------------
def clip_out_dir(preprocessed_root: str, clip: RawClip) -> str:
    return os.path.join(preprocessed_root, clip.group, clip.name)


def is_done(out_dir: str) -> bool:
    return os.path.isfile(os.path.join(out_dir, DONE))


def read_done(clip_dir: str) -> dict:
    """A preprocessed clip's done.json ({} when missing or unreadable)."""
    try:
        with open(os.path.join(clip_dir, DONE)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def preprocess_clip(src: str, out_dir: str, detector, batch_size: int) -> dict:
    """Face crops, audio and mel of one clip, written to ``out_dir`` atomically (via a .partial dir)."""
    import audio
    from lipsync.media.video import iter_frames, probe_video

    partial = out_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)  # an unfinished earlier attempt
    os.makedirs(partial)
    try:
        info = probe_video(src)
        if not info.has_audio:
            raise ValueError("the video has no audio track")
        # the audio and the frames below are both on the file's timeline: frame k pairs with the
        # audio at k / 25 s even when one stream starts later than the other (lipsync.media.probe)
        mel = write_audio_and_mel(audio.load_wav(src, audio.SAMPLE_RATE), os.path.join(partial, "audio.wav"),
                                  os.path.join(partial, "mel.npy"))
        frames = faces = 0
        t0 = time.perf_counter()
        batch: list = []
        start = 0

        def flush():
            nonlocal faces
            for j, box in enumerate(detector.detect(batch)):
                if box is None:
                    continue
                x1, y1, x2, y2 = box
                cv2.imwrite(os.path.join(partial, f"{start + j}.jpg"), batch[j][y1:y2, x1:x2])
                faces += 1

        for frame in iter_frames(info, TRAIN_FPS):
            batch.append(frame)
            frames += 1
            if len(batch) >= batch_size:
                flush()
                start += len(batch)
                batch = []
        if batch:
            flush()
        if faces == 0:
            raise ValueError(f"no face found in any of its {frames} frames")
        record = {"source": os.path.abspath(src), "fps": TRAIN_FPS, "frames": frames, "faces": faces,
                  "source_fps": info.fps, "source_rate": str(info.rate), "mel_columns": int(mel.shape[1]),
                  "mel_params": audio.mel_params(audio.default_hparams),
                  "seconds": round(time.perf_counter() - t0, 3)}
        write_json_atomic(record, os.path.join(partial, DONE), indent=None)
        os.replace(partial, out_dir)
        return record
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


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
