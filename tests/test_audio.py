"""audio.py: the published mel recipe, any-format loading, and the frame<->mel alignment."""
import json
import os
import subprocess

import numpy as np
import pytest

import audio
from conftest import REFERENCE

WAV = os.path.join(REFERENCE, "speechlike_16k.wav")


def test_melspectrogram_reproduces_reference():
    wav = audio.load_wav(WAV, audio.SAMPLE_RATE)
    mel = audio.melspectrogram(wav)
    ref = np.load(os.path.join(REFERENCE, "speechlike_16k_mel.npy"))
    assert mel.shape == ref.shape and mel.dtype == np.float32
    np.testing.assert_allclose(mel, ref, rtol=1e-4, atol=1e-4)


def test_reflect_padding_matters_at_the_edges():
    # zero padding (the librosa >= 0.10 default) changes the first and last columns
    import librosa

    wav = audio.load_wav(WAV, audio.SAMPLE_RATE)
    ref = np.load(os.path.join(REFERENCE, "speechlike_16k_mel.npy"))
    hp = audio.default_hparams
    D = librosa.stft(y=audio.preemphasis(wav.astype(np.float64), hp.preemphasis), n_fft=hp.n_fft,
                     hop_length=hp.hop_size, win_length=hp.win_size, center=True, pad_mode="constant")
    S = audio._amp_to_db(np.dot(audio._mel_basis(hp.sample_rate, hp.n_fft, hp.num_mels, hp.fmin, hp.fmax),
                                np.abs(D)), hp) - hp.ref_level_db
    zero_padded = audio._normalize(S, hp)
    assert np.abs(zero_padded[:, 0] - ref[:, 0]).max() > 1e-3
    np.testing.assert_allclose(zero_padded[:, 5:-5], ref[:, 5:-5], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("signal", ["silence", "tiny", "nan"])
def test_mel_is_finite_for_degenerate_input(signal):
    wav = {"silence": np.zeros(8000), "tiny": np.full(8000, 1e-12),
           "nan": np.r_[np.zeros(100), np.nan, np.zeros(7899)]}[signal]
    mel = audio.melspectrogram(wav)
    assert np.isfinite(mel).all()
    assert mel.shape == (80, 8000 // 200 + 1)
    if signal == "silence":
        assert (mel == -4.0).all()  # the floor of the normalised range


def _ffmpeg(*args):
    subprocess.run([audio.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """The reference signal in several containers, rates and channel counts."""
    d = tmp_path_factory.mktemp("formats")
    out = {}
    specs = {
        "wav44k_stereo": ("a.wav", ["-ar", "44100", "-ac", "2"]),
        "mp3": ("a.mp3", ["-ar", "22050", "-b:a", "128k"]),
        "m4a": ("a m4a; $(x) é.m4a", ["-c:a", "aac", "-b:a", "128k", "-ar", "48000"]),
        "flac": ("a.flac", ["-ar", "32000"]),
        "ogg": ("a.ogg", ["-c:a", "libvorbis", "-ar", "44100", "-ac", "2"]),
        "video": ("v.mp4", None),
    }
    for name, (fname, opts) in specs.items():
        path = str(d / fname)
        if opts is None:
            _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x64:r=25:d=3.3", "-i", WAV, "-shortest",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", path)
        else:
            _ffmpeg("-i", WAV, *opts, path)
        out[name] = path
    return out


@pytest.mark.parametrize("fmt", ["wav44k_stereo", "mp3", "m4a", "flac", "ogg", "video"])
def test_load_wav_any_format(encoded, fmt):
    ref = audio.load_wav(WAV, audio.SAMPLE_RATE)
    got = audio.load_wav(encoded[fmt], audio.SAMPLE_RATE)
    assert got.ndim == 1 and got.dtype == np.float32
    assert abs(len(got) - len(ref)) < 0.1 * audio.SAMPLE_RATE  # codec padding only
    # compare mels after aligning for codec delay: the content must be the same speech
    n = min(len(got), len(ref))
    best = max(np.corrcoef(audio.melspectrogram(got[s:s + n - 2000]).ravel(),
                           audio.melspectrogram(ref[:n - 2000]).ravel())[0, 1] for s in range(0, 1700, 100))
    assert best > 0.9


def test_load_wav_rejects_non_audio(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n" * 50)
    with pytest.raises(audio.AudioError, match="cannot read audio"):
        audio.load_wav(str(bad), audio.SAMPLE_RATE)
    with pytest.raises(audio.AudioError, match="not found"):
        audio.load_wav(str(tmp_path / "missing.wav"), audio.SAMPLE_RATE)


def test_mel_chunk_starts_match_published_inference():
    ref = json.load(open(os.path.join(REFERENCE, "mel_chunk_starts.json")))
    T = np.load(os.path.join(REFERENCE, "speechlike_16k_mel.npy")).shape[1]
    for fps, starts in ref.items():
        assert audio.mel_chunk_starts(T, float(fps)) == starts


def test_mel_chunk_starts_extend_to_the_end_of_audio():
    ref = json.load(open(os.path.join(REFERENCE, "mel_chunk_starts.json")))
    wav = audio.load_wav(WAV, audio.SAMPLE_RATE)
    T = audio.melspectrogram(wav).shape[1]
    for fps, starts in ref.items():
        n = audio.num_frames_for_audio(len(wav), float(fps))
        assert n == int(np.ceil(len(wav) / audio.SAMPLE_RATE * float(fps)))
        full = audio.mel_chunk_starts(T, float(fps), n_frames=n)
        assert len(full) == n > len(starts)
        assert full[: len(starts)] == starts
        assert set(full[len(starts):]) == {T - 16}


def test_alignment_is_one_function():
    # training windows (crop_mel_window) and inference windows (mel_chunk_starts) agree
    mel = np.random.default_rng(0).standard_normal((80, 200)).astype(np.float32)
    starts = audio.mel_chunk_starts(200, 25.0)
    for k, s in enumerate(starts[:-1]):
        np.testing.assert_array_equal(audio.crop_mel_window(mel, k, 25.0), mel[:, s:s + 16])
    assert audio.crop_mel_window(mel, 1000, 25.0) is None


def test_too_short_audio_is_a_clear_error():
    with pytest.raises(audio.AudioError, match="too short"):
        audio.mel_chunk_starts(10, 25.0)
