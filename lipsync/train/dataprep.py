"""The data stages' writing: enhancing raw clips (``<clip>_hq.mp4``), cutting a clip's face crops,
audio and mel into its preprocessed folder, and the atomic writes and cached mels they rely on.
Which clips there are, and the filelists, come from :mod:`lipsync.train.corpus`.

On-disk contracts (see DESIGN.md):
- preprocessed: ``<root>/<group>/<clip>/<frame>.jpg`` (frame = index in the 25 fps stream; a frame
  without a face leaves a gap), ``audio.wav`` (16 kHz mono), ``mel.npy`` (cached spectrogram) and
  ``done.json`` (written last: a clip without it is unfinished and is redone).
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
from typing import List, Optional, Tuple

import cv2
import numpy as np

from lipsync.core.fileio import atomic_write
from lipsync.train.corpus import RawClip, hq_path

log = logging.getLogger(__name__)


TRAIN_FPS = 25.0
DONE = "done.json"


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
