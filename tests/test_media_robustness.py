"""Field robustness of the media layer (issue 13): stream timelines, codec padding, containers and
names, exact rates, image-or-video by content, corpus listing, one error line per entry point.

Every fixture is generated here: a video whose top-left patch encodes its frame number (k % 11) and
audio with 30 ms clicks at known times, muxed the ways users' files come (``-itsoffset``, ``-ss -c
copy`` edit lists, MPEG-TS clocks, AAC / MP3 / Opus / Vorbis priming and padding). The right values
are the clicks' times and the frames' numbers on the file's timeline.
"""
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

import audio
from conftest import ROOT
from lipsync.media import ffmpeg as media
from lipsync.media import probe
from lipsync.media.video import VideoWriter, is_image_file, is_image_path, iter_frames, probe_video
from media import astronaut, av_lag, ffmpeg, make_face_video, mel_loudness, mouth_openness, tone_wav

SR = audio.SAMPLE_RATE
CLICKS = [0.2, 0.7, 1.1, 1.8]   # seconds after the audio's own start
N_FRAMES = 75                   # 3 s at 25 fps
TOL = 0.012                     # s: Matroska rounds timestamps to 1 ms, Opus adds ~6 ms


def write_clicks(path, sr=44100, seconds=2.5):
    from scipy.io import wavfile

    t = np.arange(int(seconds * sr)) / sr
    w = np.zeros_like(t)
    for c in CLICKS:
        m = (t >= c) & (t < c + 0.03)
        w[m] = 0.5 * np.sin(2 * np.pi * 1000 * (t[m] - c))
    wavfile.write(str(path), sr, (w * 32767).astype(np.int16))
    return str(path)


def write_marked(path, n=N_FRAMES, fps=25, size=(64, 48)):
    w, h = size
    with VideoWriter(str(path), w, h, fps) as writer:
        for k in range(n):
            frame = np.zeros((h, w, 3), np.uint8)
            frame[:16, :16] = 20 + 20 * (k % 11)
            writer.write(frame)
    return str(path)


def marks(frames):
    return [int(round((float(f[4:12, 4:12].mean()) - 20) / 20)) for f in frames]


def click_times(wav, sr=SR):
    loud = np.abs(wav) > 0.1
    onsets = np.flatnonzero(loud[1:] & ~loud[:-1]) + 1
    out = []
    for i in onsets:
        if not out or i / sr - out[-1] > 0.1:
            out.append(i / sr)
    return out


def has_encoders(*names):
    return all(media.has_encoder(n) for n in names)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("timeline")
    return {"dir": d, "video": write_marked(d / "marked.mp4"), "clicks": write_clicks(d / "clicks.wav")}


def mux(src, out, video_offset=None, audio_offset=None, vcodec=("-c:v", "copy"), acodec=("-c:a", "aac"), fmt=()):
    args = []
    if video_offset is not None:
        args += ["-itsoffset", str(video_offset)]
    args += ["-i", src["video"]]
    if audio_offset is not None:
        args += ["-itsoffset", str(audio_offset)]
    args += ["-i", src["clicks"], "-map", "0:v", "-map", "1:a", *vcodec, *acodec, *fmt, str(out)]
    ffmpeg(*args)
    return str(out)


# ---------------------------------------------------------------------------------------------
# 1. every stream on the file's timeline
# ---------------------------------------------------------------------------------------------
CONTAINERS = {
    "mp4": ((), ("-c:v", "copy"), ("-c:a", "aac"), ()),
    "MOV": ((), ("-c:v", "copy"), ("-c:a", "aac"), ()),
    "mkv": ((), ("-c:v", "copy"), ("-c:a", "aac"), ()),
    "ts": ((), ("-c:v", "copy"), ("-c:a", "aac"), ("-f", "mpegts")),   # its clock starts at 1.4 s
    "webm": (("libvpx-vp9", "libopus"), ("-c:v", "libvpx-vp9", "-deadline", "realtime"), ("-c:a", "libopus"), ()),
}


@pytest.mark.parametrize("ext", sorted(CONTAINERS))
def test_audio_that_starts_late_keeps_its_delay(src, tmp_path, ext):
    """Issue 13 item 1 and its kind: audio muxed 0.4 s after the video is read with 0.4 s of silence
    first, frames are unchanged, whatever the container."""
    needs, vcodec, acodec, fmt = CONTAINERS[ext]
    if not has_encoders(*needs):
        pytest.skip(f"this ffmpeg lacks {needs}")
    path = mux(src, tmp_path / f"delayed.{ext}", audio_offset=0.4, vcodec=vcodec, acodec=acodec, fmt=fmt)
    wav = audio.load_wav(path)
    assert click_times(wav) == pytest.approx([c + 0.4 for c in CLICKS], abs=TOL)
    assert len(wav) / SR == pytest.approx(2.9, abs=0.03)
    info = probe_video(path)
    frames = list(iter_frames(info))
    assert len(frames) == N_FRAMES and marks(frames) == [k % 11 for k in range(N_FRAMES)]


def test_video_that_starts_late_holds_its_first_picture(src, tmp_path):
    path = mux(src, tmp_path / "late_video.mp4", video_offset=0.4)
    info = probe_video(path)
    assert info.start == pytest.approx(0.4, abs=1e-3)
    frames = list(iter_frames(info))
    # 0.4 s = 10 frames of the first picture, then the video as it plays
    assert len(frames) == N_FRAMES + 10 == info.approx_frames
    assert marks(frames)[:13] == [0] * 11 + [1, 2]
    assert click_times(audio.load_wav(path)) == pytest.approx(CLICKS, abs=TOL)


def test_audio_that_starts_early_loses_what_is_before_the_file(src, tmp_path):
    path = mux(src, tmp_path / "early_audio.mp4", audio_offset=-0.3)
    assert click_times(audio.load_wav(path)) == pytest.approx([c - 0.3 for c in CLICKS[1:]], abs=TOL)
    assert marks(list(iter_frames(probe_video(path))))[:3] == [0, 1, 2]


def test_edit_list_of_a_stream_copy_cut(src, tmp_path):
    """``-ss 0.5 -c copy``: the frames before the cut stay in the file for decoding but are not
    shown (the edit list), and the audio starts at the cut too."""
    both = mux(src, tmp_path / "both.mp4")
    cut = str(tmp_path / "cut.mp4")
    ffmpeg("-ss", "0.5", "-i", both, "-c", "copy", cut)
    assert click_times(audio.load_wav(cut)) == pytest.approx([c - 0.5 for c in CLICKS[1:]], abs=TOL)
    got = marks(list(iter_frames(probe_video(cut))))
    first = 12 + got[0] - 12 % 11   # 0.5 s is frame 12.5: the cut shows frame 12 or 13 first
    assert first in (12, 13) and got == [k % 11 for k in range(first, first + len(got))]
    assert len(got) == N_FRAMES - first


def test_preprocess_pairs_a_late_audio_clip_in_sync(tmp_path):
    """Item 1, training side: a synthetic talking face whose speech is muxed 0.4 s after its video
    (as ``-itsoffset 0.4`` does) preprocesses into the same pairing as the clip with the speech in
    place: the oracle (the mouth opens when this frame's mel window is loud) measures the same lag
    on both, from the face crops and the clip's own audio.wav. Before, audio.wav started 0.4 s early
    and the lag was 10 frames off."""
    import cv2

    from lipsync.train import synthetic
    from lipsync.train.synthetic_faces import PHOTOS, random_identity

    rng = np.random.default_rng(3)
    ident = random_identity(rng, photo=sorted(PHOTOS)[0])
    speech = synthetic.synth_speech(rng, 2.4)
    spoken_late = np.concatenate([np.zeros(int(0.4 * SR), np.float32), speech])
    raw = tmp_path / "raw" / "g"
    raw.mkdir(parents=True)
    synthetic.write_clip(str(raw / "insync.mp4"), ident, spoken_late)  # the truth: mouth and sound together
    os.remove(raw / "insync.json")
    audio.save_wav(speech, str(tmp_path / "speech.wav"))
    ffmpeg("-i", str(raw / "insync.mp4"), "-itsoffset", "0.4", "-i", str(tmp_path / "speech.wav"), "-map", "0:v",
           "-map", "1:a", "-c:v", "copy", "-c:a", "aac", str(raw / "late.mp4"))
    pre = tmp_path / "pre"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "--data_root", str(tmp_path / "raw"),
                        "--preprocessed_root", str(pre), "--face_detector", "lbp", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lags = {}
    for name in ("insync", "late"):
        clip = pre / "g" / name
        crops = {int(f[:-4]): mouth_openness(cv2.imread(str(clip / f))) for f in os.listdir(clip) if f.endswith(".jpg")}
        assert len(crops) > 60
        wav = audio.load_wav(str(clip / "audio.wav"))
        assert np.abs(wav[:int(0.35 * SR)]).max() < 0.01 < np.abs(wav[int(0.4 * SR):int(0.7 * SR)]).max()
        lags[name] = av_lag(crops, mel_loudness(wav, max(crops) + 1))
    # -2, not 0, by construction: the synthetic mouth follows the audio around (k + 0.5) / 25 s, the
    # mel window of frame k is centred on (k + 2.5) / 25 s
    assert lags == {"insync": -2, "late": -2}


# ---------------------------------------------------------------------------------------------
# 2. the audio's length is the one the container declares
# ---------------------------------------------------------------------------------------------
def test_aac_padding_is_not_audio(tmp_path):
    """Item 2: a 60-frame 30 fps clip with its own 2.000 s AAC track is 60 frames of audio, not 61
    (ffmpeg < 7 decodes AAC's tail padding past the end the MP4 declares)."""
    video = make_face_video(tmp_path / "v30.mp4", 60, size=(64, 64), fps=30)
    tone = str(tmp_path / "tone48k.wav")
    ffmpeg("-f", "lavfi", "-i", "sine=f=220:sample_rate=48000:d=2", tone)
    talk = str(tmp_path / "talk30.mp4")
    ffmpeg("-i", video, "-i", tone, "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest", talk)
    wav = audio.load_wav(talk)
    assert abs(len(wav) - 2 * SR) <= 2
    assert audio.num_frames_for_audio(len(wav), 30) == 60 == len(list(iter_frames(probe_video(talk))))


@pytest.mark.parametrize("ext,codec", [("m4a", "aac"), ("mp3", "libmp3lame"), ("opus", "libopus"),
                                       ("ogg", "libvorbis"), ("flac", "flac")])
def test_priming_and_padding_of_audio_codecs(src, tmp_path, ext, codec):
    """The kind of item 2: every lossy codec's priming is dropped and its padding cut, so the clicks
    are where they were and the length is the source's (2.5 s)."""
    if not has_encoders(codec):
        pytest.skip(f"this ffmpeg lacks {codec}")
    path = str(tmp_path / f"clicks.{ext}")
    ffmpeg("-i", src["clicks"], "-c:a", codec, path)
    wav = audio.load_wav(path)
    assert click_times(wav) == pytest.approx(CLICKS, abs=0.002)
    assert len(wav) / SR == pytest.approx(2.5, abs=0.03 if ext == "mp3" else 0.002)


def test_writer_muxes_the_audio_load_wav_reads(src, tmp_path):
    """What is lip-synced is what is heard: VideoWriter(audio_path=a late-audio file) writes that
    audio on the same timeline load_wav gives (silence first, padding cut)."""
    late = mux(src, tmp_path / "delayed.mp4", audio_offset=0.4)
    out = str(tmp_path / "out.mp4")
    with VideoWriter(out, 64, 48, 25, audio_path=late) as w:
        for k in range(73):
            w.write(np.full((48, 64, 3), k, np.uint8))
    mine, theirs = audio.load_wav(out), audio.load_wav(late)
    assert click_times(mine) == pytest.approx(click_times(theirs), abs=0.002)
    assert abs(len(mine) - len(theirs)) <= 0.005 * SR
    assert probe_video(out).media.audio.start == pytest.approx(0.0, abs=1e-3)


def test_probing_without_ffprobe_agrees(src, tmp_path, monkeypatch):
    """The pip-only path (ffmpeg's header + packet listing) finds what ffprobe finds, and the
    samples read with either are the same."""
    files = [mux(src, tmp_path / "delayed.mp4", audio_offset=0.4), mux(src, tmp_path / "late.mkv", video_offset=0.4),
             mux(src, tmp_path / "d.ts", audio_offset=0.4, fmt=("-f", "mpegts"))]
    ntsc = str(tmp_path / "ntsc.mp4")
    ffmpeg("-i", src["video"], "-r", "30000/1001", "-c:v", "libx264", ntsc)
    files.append(ntsc)
    with_probe = None
    if media.ffprobe_exe():
        with_probe = [(probe.probe_media(f), click_times(audio.load_wav(f)) if "ntsc" not in f else []) for f in files]
    monkeypatch.setenv(media.ENV_FFPROBE, "none")
    media.use_ffmpeg(None)
    try:
        alone = [(probe.probe_media(f), click_times(audio.load_wav(f)) if "ntsc" not in f else []) for f in files]
        assert all(info.prober == "ffmpeg" for info, _ in alone)
        assert alone[3][0].video.rate == Fraction(30000, 1001)
        assert [round(info.start, 3) for info, _ in alone] == [0.0, 0.0, pytest.approx(1.4, abs=0.1), 0.0]
        for k in (0, 2):  # the audio muxed 0.4 s late, in MP4 and in MPEG-TS
            assert alone[k][1] == pytest.approx([c + 0.4 for c in CLICKS], abs=TOL)
        # a video 0.4 s late: the clicks are 0.4 s before its first picture (Matroska shifts both
        # streams by the AAC priming it cannot store as a negative time)
        late_info, late_clicks = alone[1]
        assert [c - late_info.video.start for c in late_clicks] == pytest.approx([c - 0.4 for c in CLICKS], abs=TOL)
        if with_probe:
            for (a, a_clicks), (b, b_clicks) in zip(alone, with_probe):
                assert a.start == pytest.approx(b.start, abs=1e-4)
                assert a.video.rate == b.video.rate and a.video.start == pytest.approx(b.video.start, abs=0.02)
                assert a_clicks == pytest.approx(b_clicks, abs=1e-3)
    finally:
        monkeypatch.delenv(media.ENV_FFPROBE)
        media.use_ffmpeg(None)


# ---------------------------------------------------------------------------------------------
# 6. exact rates
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [Fraction(24000, 1001), Fraction(30000, 1001), Fraction(25, 2)])
def test_rational_rates_are_written_exactly(tmp_path, rate):
    """Item 6: 24000/1001 in is 24000/1001 out (it was written as 1199/50), through the writer and
    through generate_hq_videos' enhancer, which rewrites a clip at its own rate."""
    from lipsync.train.dataprep import enhance_builtin

    src = str(tmp_path / "in.mp4")
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate={rate}:duration=1", "-c:v", "libx264", "-pix_fmt",
           "yuv420p", src)
    info = probe_video(src)
    assert info.rate == rate and info.fps == pytest.approx(float(rate))
    out = str(tmp_path / "out.mp4")
    enhance_builtin(src, out)
    assert probe_video(out).rate == rate
    if media.ffprobe_exe():
        got = subprocess.run([media.ffprobe_exe(), "-v", "error", "-select_streams", "v:0", "-show_entries",
                              "stream=r_frame_rate,avg_frame_rate", "-of", "json", out], capture_output=True, text=True)
        stream = json.loads(got.stdout)["streams"][0]
        assert Fraction(stream["avg_frame_rate"]) == rate == Fraction(stream["r_frame_rate"])


def test_measured_rates_snap_to_standard_ones(tmp_path, monkeypatch):
    """Matroska's clock holds 60000/1001 as 19001/317 (ffprobe says so), MPEG-TS packet durations
    alternate, AVI counts B-frame delays as empty packets (twice the rate): each is read as the
    rate it was made with, by ffprobe and by ffmpeg alone. Rates that are not near a standard one
    (70/3) are kept."""
    assert probe.snap_rate(Fraction(19001, 317)) == Fraction(60000, 1001)
    assert probe.snap_rate(Fraction(10000, 417)) == Fraction(24000, 1001)
    assert probe.snap_rate(Fraction(90000, 1501)) == Fraction(60000, 1001)
    assert probe.snap_rate(Fraction(22500, 469)) == Fraction(48000, 1001)
    assert probe.snap_rate(Fraction(70, 3)) == Fraction(70, 3) and probe.snap_rate(Fraction(25)) == 25
    files = {}
    for rate in ("60000/1001", "24000/1001"):
        mp4 = str(tmp_path / f"r{rate.replace('/', '_')}.mp4")
        ffmpeg("-f", "lavfi", "-i", f"testsrc=size=64x48:rate={rate}:duration=1", "-c:v", "libx264", "-pix_fmt",
               "yuv420p", mp4)
        for ext in ("mkv", "ts"):
            files[mp4[:-3] + ext] = Fraction(rate)
            ffmpeg("-i", mp4, "-c", "copy", mp4[:-3] + ext)
    bframes = str(tmp_path / "b.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=30:duration=1", "-c:v", "libx264", "-bf", "2", "-pix_fmt",
           "yuv420p", bframes)
    files[str(tmp_path / "b.avi")] = Fraction(30)
    ffmpeg("-i", bframes, "-c", "copy", str(tmp_path / "b.avi"))
    probers = (["ffprobe"] if media.ffprobe_exe() else []) + ["none"]
    try:
        for prober in probers:
            if prober == "none":
                monkeypatch.setenv(media.ENV_FFPROBE, "none")
            media.use_ffmpeg(None)
            assert {f: probe.probe_media(f).video.rate for f in files} == files, prober
        # 30 pictures (not 60); AVI stores no presentation times, and the end its decode times give
        # after B-frames differs between ffmpeg versions by a frame or two
        assert abs(len(list(iter_frames(probe_video(str(tmp_path / "b.avi"))))) - 30) <= 2
    finally:
        monkeypatch.delenv(media.ENV_FFPROBE, raising=False)
        media.use_ffmpeg(None)


def test_to_rate():
    assert probe.to_rate(24000 / 1001) == Fraction(24000, 1001)
    assert probe.to_rate("30000/1001") == Fraction(30000, 1001) and probe.to_rate(25) == 25
    assert probe.to_rate(29.97) == Fraction(2997, 100)
    for bad in (0, -1, "x", float("nan")):
        with pytest.raises(media.MediaError):
            probe.to_rate(bad)


# ---------------------------------------------------------------------------------------------
# 4. image or video by content; 5. names ffmpeg would misread
# ---------------------------------------------------------------------------------------------
def test_image_or_video_by_content(tmp_path):
    import cv2

    jpeg = cv2.imencode(".jpg", astronaut((64, 64)))[1].tobytes()
    png = cv2.imencode(".png", astronaut((64, 64)))[1].tobytes()
    bmp = cv2.imencode(".bmp", astronaut((64, 64)))[1].tobytes()
    for name, data in [("face.jfif", jpeg), ("face", jpeg), ("photo.mp4", png), ("x.dat", bmp)]:
        (tmp_path / name).write_bytes(data)
        assert is_image_file(str(tmp_path / name)) and is_image_path(str(tmp_path / name)), name
    video = make_face_video(tmp_path / "clip.jpg", 3, size=(64, 64))  # a video named as a photo
    (tmp_path / "notes").write_text("BM is not enough to be a bitmap\n")
    assert not is_image_file(video) and not is_image_path(video)
    assert not is_image_file(str(tmp_path / "notes"))
    assert is_image_path(str(tmp_path / "missing.png")) and not is_image_path(str(tmp_path / "missing.mov"))
    if media.opencv_reads_avif() and has_encoders("libaom-av1"):  # a still AVIF is a photo
        avif = str(tmp_path / "face.avif")
        ffmpeg("-i", str(tmp_path / "face.jfif"), "-frames:v", "1", "-c:v", "libaom-av1", "-still-picture", "1", avif)
        assert is_image_file(avif)


def test_a_wav_whose_header_says_no_data_is_read_to_its_end(tmp_path):
    """A recorder stopped before it wrote the WAV header's sizes: the samples are still there."""
    wav = tone_wav(tmp_path / "t.wav", 0.5)
    data = bytearray(open(wav, "rb").read())
    at = data.index(b"data")
    data[at + 4:at + 8] = (0).to_bytes(4, "little")
    crashed = tmp_path / "crashed.wav"
    crashed.write_bytes(bytes(data))
    assert len(audio.load_wav(str(crashed))) == pytest.approx(SR // 2, abs=SR // 100)


def test_filelists_name_clips_with_spaces(tmp_path):
    """A clip named "12:30 take" is one clip in the filelists (trainers read it, sync_correct.py
    removes it); LRS2's second column ("NF") is still read as a flag."""
    import sync_correct
    from lipsync.train.data import read_filelist

    for clip in ("g1/12:30 take", "g 2/a", "g1/b"):
        (tmp_path / "pre" / clip).mkdir(parents=True)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("g1/12:30 take\ng 2/a\ng1/b NF\n\n")
    assert read_filelist(str(lists), "train", str(tmp_path / "pre")) == [
        str(tmp_path / "pre" / c) for c in ("g1/12:30 take", "g 2/a", "g1/b")]
    assert sync_correct.clean_filelists(str(lists), {"g1/12:30 take", "g1/b"}) == {"train": 2}
    assert (lists / "train.txt").read_text() == "g 2/a\n\n"


@pytest.mark.parametrize("face,voice", [("12:30 take.mp4", "voice:take2.wav"), ("-dash.mp4", "-"),
                                        ("file:x.mp4", "pipe:0")])
def test_names_ffmpeg_would_misread(tmp_path, monkeypatch, face, voice):
    """Item 5: relative names with ':' (read as protocols), starting with '-' (read as options) or
    equal to '-' (stdin) are files, for probing, decoding, reading audio and muxing it."""
    monkeypatch.chdir(tmp_path)
    make_face_video(tmp_path / "v.mp4", 10, size=(64, 64))
    os.rename(tmp_path / "v.mp4", tmp_path / face)
    tone_wav(tmp_path / "t.wav", 0.5)
    os.rename(tmp_path / "t.wav", tmp_path / voice)
    info = probe_video(face)
    assert len(list(iter_frames(info))) == 10
    assert len(audio.load_wav(voice)) == SR // 2
    with VideoWriter("out:1.mp4", 64, 64, info.rate, audio_path=voice) as w:
        for frame in iter_frames(info):
            w.write(frame)
    assert os.path.isfile(tmp_path / "out:1.mp4") and len(audio.load_wav("out:1.mp4")) == pytest.approx(SR // 2, abs=80)


# ---------------------------------------------------------------------------------------------
# 3. every container is a clip; other files are counted and listed
# ---------------------------------------------------------------------------------------------
def test_corpus_lists_every_container_and_letter_case(tmp_path):
    import cv2

    from lipsync.train.corpus import hq_path, scan_raw_corpus

    root = tmp_path / "grouped"
    spk = root / "spk1"
    spk.mkdir(parents=True)
    clip = make_face_video(tmp_path / "clip.mp4", 5, size=(64, 64), audio=tone_wav(tmp_path / "t.wav", 0.2))
    for name in ("a.mp4", "b.MP4", "c.mov", "d", "e.MKV", "a.mov"):
        (spk / name).write_bytes(open(clip, "rb").read())
    (spk / "notes.txt").write_text("hi")
    (spk / ".DS_Store").write_bytes(b"\0")
    cv2.imwrite(str(spk / "photo.jpg"), astronaut((64, 64)))
    tone_wav(spk / "voice.wav", 0.2)
    (root / "loose.mp4").write_bytes(open(clip, "rb").read())
    (spk / "session2").mkdir()
    (spk / "session2" / "nested.mp4").write_bytes(open(clip, "rb").read())
    os.symlink(tmp_path / "nowhere.mp4", spk / "broken.mp4")
    scan = scan_raw_corpus(str(root))
    assert sorted(c.name for c in scan.clips) == ["a", "b", "c", "d", "e"]
    why = {os.path.basename(p): r for p, r in scan.not_clips}
    assert set(why) == {"a.mp4", "notes.txt", ".DS_Store", "photo.jpg", "voice.wav", "loose.mp4", "session2",
                        "broken.mp4"}
    assert "folder inside a group" in why["session2"] and "broken link" in why["broken.mp4"]
    assert "same clip name as a.mov" in why["a.mp4"] and "still image" in why["photo.jpg"] and "audio" in why["voice.wav"]
    assert "<group>" in why["loose.mp4"]
    assert hq_path(str(spk / "c.mov")) == str(spk / "c_hq.mp4")


def test_preprocess_counts_clips_in_every_container(tmp_path):
    """Item 3: grouped/spk1/{a.mp4, b.MP4, c.mov} (one clip three times) is three clips; the file
    that is not a video is counted and listed in failures.json."""
    spk = tmp_path / "grouped" / "spk1"
    spk.mkdir(parents=True)
    clip = make_face_video(tmp_path / "clip.mp4", 30, audio=tone_wav(tmp_path / "t.wav", 1.2))
    for name in ("a.mp4", "b.MP4", "c.mov"):
        (spk / name).write_bytes(open(clip, "rb").read())
    (spk / "readme.txt").write_text("not a clip")
    pre = tmp_path / "pre"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "--data_root", str(tmp_path / "grouped"),
                        "--preprocessed_root", str(pre), "--face_detector", "lbp", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "3 clips preprocessed" in r.stdout and "1 other file(s) not clips" in r.stdout
    assert "readme.txt" in r.stderr
    assert sorted(os.listdir(pre / "spk1")) == ["a", "b", "c"]
    report = json.load(open(pre / "failures.json"))
    assert [os.path.basename(n["path"]) for n in report["not_clips"]] == ["readme.txt"]


# ---------------------------------------------------------------------------------------------
# 8. the ffmpeg users have: chosen, feature-detected
# ---------------------------------------------------------------------------------------------
def test_ffmpeg_choice(tmp_path, monkeypatch):
    exe = media.ffmpeg_exe()
    monkeypatch.setenv(media.ENV_FFMPEG, str(tmp_path / "nope"))
    try:
        with pytest.raises(media.MediaError, match="WAV2LIP_FFMPEG"):
            media.use_ffmpeg(None)  # said at once, not by the first file it fails on
        with pytest.raises(media.MediaError, match="WAV2LIP_FFMPEG"):
            media.ffmpeg_exe()
        media.use_ffmpeg(exe)  # a flag wins over the environment
        assert media.ffmpeg_exe() == os.path.abspath(exe)
        with pytest.raises(media.MediaError, match="--ffmpeg"):
            media.use_ffmpeg(str(tmp_path))
    finally:
        monkeypatch.delenv(media.ENV_FFMPEG)
        media.use_ffmpeg(None)
    caps = media.capabilities()
    assert caps.version.startswith("ffmpeg version") and "libx264" in caps.encoders and "copyts" in caps.options
    assert media.has_option("copyts") and not media.has_option("no_such_option") and not media.has_encoder("nope")


# ---------------------------------------------------------------------------------------------
# one family of errors: one line, exit 2, no traceback
# ---------------------------------------------------------------------------------------------
def _script(name, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})


def test_entry_points_report_one_error_line(tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(3000))
    (tmp_path / "empty").mkdir()
    photo = tmp_path / "face.png"
    import cv2

    cv2.imwrite(str(photo), astronaut((64, 64)))
    voice = tone_wav(tmp_path / "t.wav", 0.5)
    ckpt = os.path.join(ROOT, "tests", "fixtures", "tiny_generator_trained.pth")
    infer = ["--checkpoint_path", ckpt, "--face", str(photo), "--audio", voice, "--box", "0", "64", "0", "64"]
    cases = [
        ("preprocess.py", ["--data_root", str(tmp_path / "missing"), "--preprocessed_root", str(tmp_path / "p")],
         "not a directory"),
        ("preprocess.py", ["--data_root", str(tmp_path / "empty"), "--preprocessed_root", str(tmp_path / "p"),
                           "--shard", "3/2"], "--shard"),
        ("preprocess.py", ["--data_root", str(tmp_path / "empty"), "--preprocessed_root", str(tmp_path / "p"),
                           "--ffmpeg", str(tmp_path / "no-ffmpeg")], "--ffmpeg"),
        ("generate_hq_videos.py", ["--data_root", str(tmp_path / "empty")], "no <group>/<clip> videos"),
        ("generate_filelists.py", ["--data_root", str(tmp_path / "missing")], "not a directory"),
        ("evaluate.py", ["--videos", str(corrupt), str(tmp_path / "gone.mp4"), "--checkpoint_path", "x.pth"],
         "file not found"),
        ("sync_correct.py", ["--data_root", str(tmp_path / "missing"), "--checkpoint_path", "x.pth"], "--data_root"),
        ("color_syncnet_train.py", ["--data_root", str(tmp_path / "empty"), "--checkpoint_dir", str(tmp_path / "c"),
                                    "--preset", "tiny", "--device", "cpu"], "error"),
        ("wav2lip_train.py", ["--data_root", str(tmp_path / "empty"), "--checkpoint_dir", str(tmp_path / "c"),
                              "--syncnet_checkpoint_path", "x.pth", "--preset", "96", "--hparams", "hop_size=160"],
         "audio front end"),
        ("wav2lip_train.py", ["--data_root", str(tmp_path / "empty"), "--checkpoint_dir", str(tmp_path / "c"),
                              "--syncnet_checkpoint_path", "x.pth", "--preset", "tiny", "--hparams", "fps=30"],
         "'fps' cannot change"),
        ("inference.py", infer + ["--fps", "0"], "--fps"),
        ("inference.py", infer + ["--fps", "nan"], "--fps"),
        ("inference.py", infer + ["--fps", "-5"], "--fps"),
        ("inference.py", infer + ["--outfile", str(tmp_path / "empty")], "is a folder"),
    ]
    for script, args, needle in cases:
        r = _script(script, *args)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (script, r.stderr)
        assert "Traceback" not in r.stderr and lines[-1].startswith(("error:", f"{script}: error:")), (script, r.stderr)
        assert needle in r.stderr, (script, r.stderr)
    # a bad $WAV2LIP_FFMPEG is said once, up front (not as every clip failing)
    r = _script("preprocess.py", "--data_root", str(tmp_path / "empty"), "--preprocessed_root", str(tmp_path / "p"),
                env={media.ENV_FFMPEG: str(tmp_path / "no-ffmpeg")})
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:") and "WAV2LIP_FFMPEG" in r.stderr
    assert os.listdir(tmp_path / "empty") == []  # --outfile's folder: no temporary file left in it


# ---------------------------------------------------------------------------------------------
# one source of truth: cached mels say what they were made with
# ---------------------------------------------------------------------------------------------
def test_cached_mel_is_used_only_with_its_parameters(tmp_path):
    import hparams
    from lipsync.train.dataprep import load_clip_mel, read_done, write_json_atomic
    from lipsync.train.synthetic import write_preprocessed

    clip = str(tmp_path / write_preprocessed(str(tmp_path), groups=1)[0])
    assert read_done(clip)["mel_params"] == audio.mel_params()
    real = np.load(os.path.join(clip, "mel.npy"))
    np.save(os.path.join(clip, "mel.npy"), np.zeros_like(real))  # a marker: is the cache read?
    assert not load_clip_mel(clip, hparams.get_hparams("tiny")).any()
    other = load_clip_mel(clip, hparams.get_hparams("tiny", "hop_size=160"))   # recomputed, 100 columns/s
    assert other.shape == (80, int(len(audio.load_wav(os.path.join(clip, "audio.wav"))) // 160 + 1))
    done = read_done(clip)
    done["mel_params"] = dict(done["mel_params"], fmax=8000.0)  # made some other way: recomputed
    write_json_atomic(done, os.path.join(clip, "done.json"))
    assert np.allclose(load_clip_mel(clip, hparams.get_hparams("tiny")), real, atol=1e-5)
    del done["mel_params"]  # from before the record: preprocess.py could only make the defaults
    write_json_atomic(done, os.path.join(clip, "done.json"))
    assert not load_clip_mel(clip, hparams.get_hparams("tiny")).any()
    assert load_clip_mel(clip, hparams.get_hparams("tiny", "fmax=8000")).any()


def test_evaluation_reads_a_late_audio_video_on_its_timeline(src, tmp_path):
    """The kind of item 1 in evaluation: the scorer's audio of a video whose audio starts 0.4 s late
    begins with that silence, and its frames are the video's."""
    from lipsync.eval.evaluation import read_video_for_scoring

    late = mux(src, tmp_path / "delayed.mp4", audio_offset=0.4)
    scored = read_video_for_scoring(late, box=(0, 0, 32, 32), with_syncnet=True)
    assert scored.frames == N_FRAMES and len(scored.syncnet_crops) == N_FRAMES
    assert click_times(scored.wav) == pytest.approx([c + 0.4 for c in CLICKS], abs=TOL)
