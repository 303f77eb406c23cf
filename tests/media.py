"""Small generated media for tests: face videos from a bundled photograph, audio clips."""
import subprocess

import cv2
import numpy as np

from audio import SAMPLE_RATE, ffmpeg_exe
from lipsync.media.video import VideoWriter


def astronaut(size=(256, 256)):
    from skimage import data

    img = cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR)
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def make_face_video(path, n_frames, size=(256, 256), fps=25, blank=(), marker=False, audio=None):
    """Astronaut with a little sway; frames in ``blank`` are flat grey (no face). With ``marker``,
    a 16x16 top-left patch encodes the frame number (value 20 + 20 * (k % 11))."""
    base = astronaut(size)
    w, h = size
    with VideoWriter(str(path), w, h, fps, audio_path=audio) as writer:
        for k in range(n_frames):
            if k in blank:
                frame = np.full((h, w, 3), 128, np.uint8)
            else:
                M = np.float32([[1, 0, 2 * np.sin(k / 5)], [0, 1, np.cos(k / 7)]])
                frame = cv2.warpAffine(base, M, (w, h), borderMode=cv2.BORDER_REFLECT)
            if marker:
                frame[:16, :16] = 20 + 20 * (k % 11)
            writer.write(frame)
    return str(path)


def marker_index(frame):
    return int(round((float(frame[4:12, 4:12].mean()) - 20) / 20))


def ffmpeg(*args):
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def set_rotation(src, dst, degrees):
    """Copy ``src`` to ``dst`` with display rotation metadata of ``degrees`` counter-clockwise, with
    whichever way this ffmpeg has: ``-display_rotation`` (ffmpeg 6+) or the ``rotate`` tag (older)."""
    from lipsync.media.ffmpeg import has_option

    if has_option("display_rotation"):
        ffmpeg("-display_rotation", str(degrees), "-i", str(src), "-c", "copy", str(dst))
    else:
        ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", f"rotate={degrees % 360}", str(dst))
    return str(dst)


def tone_wav(path, seconds, sr=SAMPLE_RATE, silent=False):
    from audio import save_wav

    t = np.arange(int(seconds * sr)) / sr
    wav = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    save_wav(wav.astype(np.float32), str(path), sr)
    return str(path)


# ---------------------------------------------------------------------------------------------
# The sync oracle: "the mouth opens when this frame's mel window is loud"
# ---------------------------------------------------------------------------------------------
def mouth_openness(face_crop):
    """How open the mouth of a face crop (BGR, any size) is: the darkness of the mouth region of
    the crop resized to 96x96 (the synthetic corpus draws an open mouth dark)."""
    import cv2

    return -float(cv2.resize(face_crop, (96, 96))[58:84, 30:66].mean())


def mel_loudness(wav, n_frames, fps=25.0):
    """(n_frames,) mean of the mel window each frame pairs with (``audio.mel_chunk_starts``)."""
    import audio

    mel = audio.melspectrogram(wav)
    return np.array([mel[:, s:s + audio.MEL_STEP_SIZE].mean() for s in audio.mel_chunk_starts(mel.shape[1], fps,
                                                                                            n_frames)])


def av_lag(openness, loudness, max_lag=12):
    """The lag L (frames) for which frame k's mouth opening best follows frame k + L's loudness
    (Pearson correlation over the frames in ``openness``, a {frame: value} dict); 0 when the mouth
    moves with its own mel window, > 0 when the audio is late."""
    best_lag, best_corr = 0, -2.0
    frames = sorted(openness)
    for lag in range(-max_lag, max_lag + 1):
        pairs = [(openness[k], loudness[k + lag]) for k in frames if 0 <= k + lag < len(loudness)]
        a, b = np.array(pairs, np.float64).T
        corr = float(np.corrcoef(a, b)[0, 1])
        if corr > best_corr:
            best_lag, best_corr = lag, corr
    return best_lag


def photo_and_speech(folder, photo_name, clips):
    """The astronaut photo saved as ``folder/photo_name`` and excerpts of the reference speech
    (tests/fixtures/reference/speechlike_16k.wav): ``clips`` maps a name to (file name, start s, end s).
    Returns {"photo": path, name: wav path, ...}."""
    import os

    from audio import load_wav, save_wav

    reference = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reference")
    out = {"photo": str(folder / photo_name)}
    cv2.imwrite(out["photo"], astronaut())
    speech = load_wav(os.path.join(reference, "speechlike_16k.wav"))
    for name, (file_name, start, end) in clips.items():
        out[name] = str(folder / file_name)
        save_wav(speech[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)], out[name], SAMPLE_RATE)
    return out
