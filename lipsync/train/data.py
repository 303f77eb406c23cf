"""Training data: windows of face crops with their mel windows, for the expert and the generator.

Every clip's usable 5-frame windows are found once, when the dataset is built (all frames present,
every mel window inside the audio); clips without one are dropped and counted by reason, and the
dataset refuses to start when nothing usable is left. Sampling is seeded by (seed, epoch, index), so
a run is reproducible and resumes where it was.
"""
from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Callable, List, Optional

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

import audio
from hparams import HParams
from lipsync.core.errors import Wav2LipError

log = logging.getLogger(__name__)


class DatasetError(Wav2LipError, RuntimeError):
    """No usable training data (the message says why)."""


def filelist_clip(line: str, is_clip: Callable[[str], bool]) -> Optional[str]:
    """The clip a filelist line names ("group/clip", relative to the data root): the whole line
    when ``is_clip`` says it is one or it has no blank (names may contain spaces), else its first
    word (LRS2's lists add a second column such as "NF"). None for a blank line."""
    text = line.strip()
    if not text:
        return None
    return text if is_clip(text) or len(text.split()) == 1 else text.split()[0]


def read_filelist(filelists_dir: str, split: str, data_root: str) -> List[str]:
    """Clip folders (paths under ``data_root``) listed in ``filelists_dir/<split>.txt``; DatasetError
    when the list is missing."""
    path = os.path.join(filelists_dir, f"{split}.txt")
    if not os.path.isfile(path):
        raise DatasetError(f"filelist not found: {path!r} (run generate_filelists.py --data_root {data_root})")

    def folder(name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(data_root, name)

    clips = []
    with open(path) as fh:
        for line in fh:
            clip = filelist_clip(line, lambda text: os.path.isdir(folder(text)))
            if clip:
                clips.append(folder(clip))
    return clips


@dataclass
class Clip:
    path: str
    frames: set
    starts: np.ndarray  # usable window starts
    mel: Optional[np.ndarray] = None


def _load_mel(clip_dir: str, hp: HParams) -> np.ndarray:
    from lipsync.train.dataprep import load_clip_mel

    return load_clip_mel(clip_dir, hp)  # the cache only when it was made with hp's audio front end


class WindowDataset(Dataset):
    """Base: clips, their usable windows, image loading. ``__getitem__`` is the subclass's."""

    def __init__(self, clip_dirs: List[str], hp: HParams, seed: int = 0, samples_per_epoch: Optional[int] = None,
                 split: str = "train"):
        self.hp = hp
        self.seed = seed
        self.epoch = 0
        self.split = split
        self.T = hp.syncnet_T
        self.skipped: Counter = Counter()
        self.dropped: Counter = Counter()
        self._cache: dict = {}
        self._cache_left = int(hp.frame_cache_mb) * 2**20
        self.clips: List[Clip] = []
        for d in clip_dirs:
            clip = self._index_clip(d)
            if clip is not None:
                self.clips.append(clip)
        if self.dropped:
            log.warning("%s: dropped %d clip(s): %s", split, sum(self.dropped.values()),
                        ", ".join(f"{n} {why}" for why, n in self.dropped.items()))
        if not self.clips:
            reasons = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "the filelist is empty"
            raise DatasetError(f"no usable {split} clips ({len(clip_dirs)} listed: {reasons})")
        self.samples_per_epoch = samples_per_epoch or max(len(self.clips), sum(len(c.starts) for c in self.clips) // self.T)

    def _index_clip(self, d: str) -> Optional[Clip]:
        if not os.path.isdir(d):
            self.dropped["missing directory"] += 1
            return None
        frames = set()
        for p in glob.glob(os.path.join(glob.escape(d), "*.jpg")):
            stem = os.path.splitext(os.path.basename(p))[0]
            if stem.isdigit():
                frames.add(int(stem))
        if not frames:
            self.dropped["no face frames"] += 1
            return None
        try:
            mel = _load_mel(d, self.hp)
        except (OSError, ValueError) as exc:
            self.dropped[f"unreadable audio ({type(exc).__name__})"] += 1
            return None
        n_cols = mel.shape[1]
        step = self.hp.syncnet_mel_step_size
        starts = []
        for f in sorted(frames):
            if not all(f + k in frames for k in range(self.T)):
                continue
            last = audio.frame_to_mel_start(f + self.T - 1, self.hp.fps, self.hp)
            if last + step > n_cols:
                continue
            starts.append(f)
        if len(starts) < 2:
            self.dropped["too short (fewer than 2 complete windows)"] += 1
            return None
        return Clip(d, frames, np.array(starts), mel)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.samples_per_epoch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def pick(self, rng) -> Clip:
        return self.clips[int(rng.integers(len(self.clips)))]

    def read_window(self, clip: Clip, start: int) -> Optional[np.ndarray]:
        """(T, S, S, 3) float32 in [0, 1], BGR as OpenCV reads; None if an image is unreadable."""
        out = []
        for k in range(start, start + self.T):
            img = self.read_frame(clip, k)
            if img is None:
                self.skipped["unreadable image"] += 1
                return None
            out.append(img)
        return np.stack(out).astype(np.float32) / 255.0

    def read_frame(self, clip: Clip, k: int) -> Optional[np.ndarray]:
        """One face crop resized to img_size (uint8 BGR), from the frame cache when it is there."""
        key = (clip.path, k)
        img = self._cache.get(key)
        if img is None:
            img = cv2.imread(os.path.join(clip.path, f"{k}.jpg"))
            if img is None:
                return None
            img = cv2.resize(img, (self.hp.img_size, self.hp.img_size))
            if img.nbytes <= self._cache_left:
                self._cache[key] = img
                self._cache_left -= img.nbytes
        return img

    def mel_window(self, clip: Clip, frame: int) -> np.ndarray:
        m = audio.crop_mel_window(clip.mel, frame, self.hp.fps, self.hp.syncnet_mel_step_size, self.hp)
        return m[None].astype(np.float32)  # (1, 80, 16)

    def far_start(self, clip: Clip, start: int, rng, min_offset: int) -> int:
        """Another window start at least ``min_offset`` frames away (any other one if none is)."""
        far = clip.starts[np.abs(clip.starts - start) >= min_offset]
        pool = far if len(far) else clip.starts[clip.starts != start]
        return int(pool[int(rng.integers(len(pool)))])

    def draw(self, index: int, make):
        """Call ``make(rng)`` until it returns a sample (unreadable images are skipped and counted)."""
        rng = self.rng(index)
        for _ in range(20):
            sample = make(rng)
            if sample is not None:
                return sample
        raise DatasetError(f"{self.split}: 20 draws in a row hit unreadable images ({dict(self.skipped)})")


def augment_window(window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random look for a whole (T, S, S, 3) window in [0, 1]: mirror, per-channel gain, offset,
    and a zoom of up to 10% about a random point (mouth motion across the frames is untouched)."""
    if rng.random() < 0.5:
        window = window[:, :, ::-1]
    s = window.shape[1]
    crop = int(round(s * rng.uniform(0.9, 1.0)))
    y0, x0 = (int(rng.integers(0, s - crop + 1)) for _ in range(2))
    if crop < s:
        window = np.stack([cv2.resize(f[y0:y0 + crop, x0:x0 + crop], (s, s)) for f in window])
    window = window * rng.uniform(0.8, 1.2, 3).astype(np.float32) + np.float32(rng.uniform(-0.08, 0.08))
    return np.clip(window, 0.0, 1.0, dtype=np.float32)


class SyncDataset(WindowDataset):
    """Expert pairs: 5 lower halves + a mel window; y = 1 in sync, 0 at least ``min_offset`` frames off.
    Even indices are in sync and odd ones off, so every batch is balanced."""

    min_offset = 5

    def __getitem__(self, index):
        def make(rng):
            clip = self.pick(rng)
            start = int(clip.starts[int(rng.integers(len(clip.starts)))])
            in_sync = index % 2 == 0
            frames_at = start if in_sync else self.far_start(clip, start, rng, self.min_offset)
            window = self.read_window(clip, frames_at)
            if window is None:
                return None
            if self.hp.syncnet_augment and self.split == "train":
                window = augment_window(window, rng)
            half = window[:, self.hp.img_size // 2:]                 # (T, S/2, S, 3)
            x = np.concatenate(list(half), axis=2).transpose(2, 0, 1)  # (3T, S/2, S)
            mel = self.mel_window(clip, start)
            return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(mel), torch.tensor([float(in_sync)])

        return self.draw(index, make)


class GeneratorDataset(WindowDataset):
    """Generator samples: masked target window + a reference window from elsewhere in the clip,
    per-frame mel windows (the alignment inference uses), the sync mel window and the target."""

    def __getitem__(self, index):
        def make(rng):
            clip = self.pick(rng)
            start = int(clip.starts[int(rng.integers(len(clip.starts)))])
            ref_start = self.far_start(clip, start, rng, self.T)
            window = self.read_window(clip, start)
            ref = self.read_window(clip, ref_start)
            if window is None or ref is None:
                return None
            masked = window.copy()
            masked[:, self.hp.img_size // 2:] = 0.0
            x = np.concatenate([masked, ref], axis=3).transpose(3, 0, 1, 2)  # (6, T, S, S)
            y = window.transpose(3, 0, 1, 2)                                # (3, T, S, S)
            mel = self.mel_window(clip, start)                               # (1, 80, 16) for the expert
            indiv = np.stack([self.mel_window(clip, start + k) for k in range(self.T)])  # (T, 1, 80, 16)
            return (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(indiv), torch.from_numpy(mel),
                    torch.from_numpy(np.ascontiguousarray(y)))

        return self.draw(index, make)
