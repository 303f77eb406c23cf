"""The incremental mel (lipsync.render.streaming): columns and frame windows computed from audio arriving in
pieces equal the offline ones (the published ``audio.melspectrogram`` + ``audio.mel_chunk_starts``),
exactly (bit for bit), for any piece sizes; frames come out as soon as their window is final; the
end completes the offline frame count. The engine's offline render takes its windows from the same
source (``lipsync.render.engine.window_groups``)."""
import os

import numpy as np
import pytest

import audio
from conftest import REFERENCE
from lipsync.render.engine import window_groups, windows_of as engine_windows
from lipsync.render.streaming import FrameWindows, StreamError, StreamingMel, pcm16_to_float

WAV = os.path.join(REFERENCE, "speechlike_16k.wav")  # 3.3 s of speech-like sound


@pytest.fixture(scope="module")
def wav():
    # what a PCM16 stream can carry: the samples rounded to 16 bits
    return np.round(np.clip(audio.load_wav(WAV), -1, 1) * 32767).astype(np.float32) / 32768


def windows_of(wav, fps):
    """(frame count, (n, 80, 16) windows) as the published inference makes them: the whole audio's
    mel, one window per frame from ``audio.mel_chunk_starts`` (the last ones clamped to the end)."""
    n_out = audio.num_frames_for_audio(len(wav), fps)
    mel = audio.melspectrogram(wav)
    starts = audio.mel_chunk_starts(mel.shape[1], fps, n_frames=n_out)
    return n_out, np.stack([mel[:, s:s + audio.MEL_STEP_SIZE] for s in starts])


def pieces(n, ms=None, rng=None):
    """Cut n samples into pieces of ``ms`` milliseconds, or of random sizes 1..8000 samples."""
    k = 0
    while k < n:
        step = int(rng.integers(1, 8000)) if ms is None else max(1, int(round(16 * ms)))
        yield k, min(n, k + step)
        k += step


@pytest.mark.parametrize("ms", [10, 20, 33.3, 100, 137.5, 250, 500, None])
def test_incremental_mel_equals_offline_mel(wav, ms):
    """Every column, streamed in pieces of 10-500 ms (odd sizes, and random sizes) equals the offline
    mel of the same samples exactly: the same samples go through the same functions."""
    mel = StreamingMel()
    cols = [mel.push(wav[a:b]) for a, b in pieces(len(wav), ms, np.random.default_rng(1))]
    cols.append(mel.finish())
    streamed = np.concatenate(cols, axis=1)
    offline = audio.melspectrogram(wav)
    assert streamed.shape == offline.shape == (80, len(wav) // 200 + 1)
    assert np.array_equal(streamed, offline)


def test_columns_come_out_when_final(wav):
    """Column t is returned once sample 200 t + 399 has arrived (and the first ones need sample 400,
    which the reflect padding at the start reads), never later, never earlier."""
    mel = StreamingMel()
    counts = []
    for n in range(1, 2001):
        mel.push(wav[n - 1:n])
        counts.append(mel.columns)
    counts = np.array(counts)
    n = np.arange(1, 2001)
    expected = np.where(n >= 401, (n - 400) // 200 + 1, 0)
    assert np.array_equal(counts, expected)


@pytest.mark.parametrize("fps", [25.0, 30.0, 24000 / 1001, 12.5, 60.0])
def test_frame_windows_equal_offline_windows(wav, fps):
    """Frames and windows of a stream in pieces of any size are exactly what render() feeds for the
    whole audio: the same count (audio.num_frames_for_audio) and the same (80, 16) windows."""
    rng = np.random.default_rng(int(fps))
    offline_n, offline = windows_of(wav, fps)
    for ms in (10, 77, 500, None):
        fw = FrameWindows(fps)
        got = [fw.push(wav[a:b]) for a, b in pieces(len(wav), ms, rng)]
        before_end = fw.frames
        got.append(fw.finish())
        got = np.concatenate(got)
        assert fw.total == offline_n == len(got) == audio.num_frames_for_audio(len(wav), fps)
        assert np.array_equal(got, offline)
        # only the last ~0.2 s of frames wait for the end of the audio
        assert offline_n - before_end <= int(np.ceil(0.25 * fps)) + 1


def test_a_frame_leaves_as_soon_as_its_window_is_complete(wav):
    """Frame k's window needs columns int(80 k / fps) .. +15, i.e. samples up to
    200 * (int(80 k / fps) + 15) + 399: one sample fewer holds it back, that sample releases it."""
    fps = 25.0
    for k in (0, 1, 7, 40):
        need = 200 * (audio.frame_to_mel_start(k, fps) + 15) + 400
        fw = FrameWindows(fps)
        fw.push(wav[:need - 1])
        assert fw.frames == k
        fw.push(wav[need - 1:need])
        assert fw.frames == k + 1


@pytest.mark.parametrize("fps", [25.0, 24000 / 1001])
def test_the_engine_takes_the_published_windows_in_groups(wav, fps):
    """Offline render's windows (the streaming source fed in 2 s chunks, cut in groups) are the
    published windows, in order, whatever the group size."""
    n_out, published = windows_of(wav, fps)
    assert engine_windows(wav, fps)[0] == n_out
    assert np.array_equal(engine_windows(wav, fps)[1], published)
    for size in (1, 7, 32):
        groups = list(window_groups(wav, fps, size, chunk_seconds=0.3))
        assert all(len(g) == size for g in groups[:-1]) and 0 < len(groups[-1]) <= size
        assert np.array_equal(np.concatenate(groups), published)


@pytest.mark.parametrize("n", [3000, 3001, 3199, 3200, 3201, 4567])
def test_short_streams_match_offline(wav, n):
    fw = FrameWindows(25.0)
    got = np.concatenate([fw.push(wav[:n // 3]), fw.push(wav[n // 3:n]), fw.finish()])
    n_out, offline = windows_of(wav[:n], 25.0)
    assert len(got) == n_out and np.array_equal(got, offline)


def test_too_short_and_empty_streams_are_refused(wav):
    fw = FrameWindows(25.0)
    fw.push(wav[:2999])
    with pytest.raises(StreamError, match="too short"):
        fw.finish()
    with pytest.raises(StreamError, match="before any audio"):
        FrameWindows(25.0).finish()
    with pytest.raises(StreamError, match="after the end"):
        mel = StreamingMel()
        mel.push(wav[:5000])
        mel.finish()
        mel.push(wav[:10])


def test_pcm16_decoding():
    pcm = np.array([0, 1, -1, 32767, -32768], "<i2")
    assert np.array_equal(pcm16_to_float(pcm.tobytes()), pcm.astype(np.float32) / 32768)
    with pytest.raises(StreamError, match="odd number"):
        pcm16_to_float(b"\x00\x01\x02")
