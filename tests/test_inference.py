"""inference.py: published parity, every flag, bad input, streaming."""
import glob
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch

import audio
import inference
from conftest import REFERENCE, ROOT, reproducible_generator
from lipsync.render.boxes import coords_from_detections
from lipsync.media.frames import source_index
from lipsync.render.inference import InferenceConfig, run_inference
from lipsync.media.video import count_frames, iter_frames, probe_video
from media import make_face_video, marker_index, set_rotation, tone_wav, ffmpeg
from models import SyncNet_color, Wav2Lip
from published_reference import published_face_boxes, published_frames, published_mel_chunks

WAV = os.path.join(REFERENCE, "speechlike_16k.wav")  # 3.3 s -> 83 frames at 25 fps
BOX = ["40", "200", "60", "196"]  # top bottom left right, around the astronaut's face at 256x256


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    torch.manual_seed(0)
    gen = Wav2Lip(img_size=96, width=0.25).eval()
    ckpt = str(d / "wav2lip_tiny.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in gen.state_dict().items()}, "global_step": 1}, ckpt)
    expert = str(d / "lipsync_expert.pth")
    torch.save({"state_dict": SyncNet_color(width=0.25).state_dict()}, expert)
    return {
        "dir": d, "ckpt": ckpt, "gen": gen, "expert": expert,
        "video": make_face_video(d / "face.mp4", 50),                       # 2 s, shorter than the audio
        "marked": make_face_video(d / "marked.mp4", 10, marker=True),
        "gaps": make_face_video(d / "gaps.mp4", 30, blank=set(range(10, 15))),
        "noface": make_face_video(d / "noface.mp4", 10, blank=set(range(10))),
    }


def run(media, tmp_path, generator=None, **kw):
    cfg = dict(checkpoint_path=media["ckpt"], face=media["video"], audio=WAV,
               outfile=str(tmp_path / "out.mp4"), face_detector="lbp", det_cache_dir="", progress=False)
    cfg.update(kw)
    frames = {}
    summary = run_inference(InferenceConfig(**cfg), frame_sink=lambda i, f: frames.__setitem__(i, f.copy()),
                            generator=generator)
    return summary, [frames[i] for i in range(len(frames))]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--quiet", *args],
                          capture_output=True, text=True, cwd=cwd)


# ---------------------------------------------------------------------------------------------
def test_parity_with_published_algorithm(media, tmp_path):
    """--blend none --loop repeat: the published frames (detect, pad, smooth, cycle, hard paste),
    up to float rounding of the folded BatchNorm; ours continues to the end of the audio."""
    summary, ours = run(media, tmp_path, blend="none", loop="repeat", wav2lip_batch_size=32)
    info = probe_video(media["video"])
    frames = list(iter_frames(info))
    from face_detection import get_detector

    det = get_detector("lbp")
    detections = [d for i in range(0, len(frames), 16) for d in det.detect(frames[i:i + 16])]
    coords = published_face_boxes(frames, detections, pads=(0, 10, 0, 0))
    mel = audio.melspectrogram(audio.load_wav(WAV, 16000))
    chunks = published_mel_chunks(mel, 25.0)
    ref = published_frames(media["gen"], frames, chunks, coords, img_size=96, batch_size=128)

    assert len(ref) == 80 and len(ours) == summary.frames == 83
    for a, b in zip(ours, ref):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.01
    # the extra frames continue the cycle: frame 80..82 show source frames 30..32
    assert not np.array_equal(ours[80], frames[30])  # a face was generated into it
    assert np.array_equal(ours[80][:30], frames[30][:30])  # and the rest of the frame is the source


def test_batch_size_does_not_change_output(media, tmp_path):
    """--wav2lip_batch_size changes how frames are grouped, not which window or crop each one gets
    (on the generator's fixed plan, so the comparison is bit for bit on any CPU)."""
    gen = reproducible_generator(media["ckpt"])
    _, a = run(media, tmp_path, gen, blend="none", box=[int(v) for v in BOX], wav2lip_batch_size=7)
    _, b = run(media, tmp_path, gen, blend="none", box=[int(v) for v in BOX], wav2lip_batch_size=128)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_output_file_streams_duration_and_size(media, tmp_path):
    out = tmp_path / "o u t.mp4"
    r = cli("--checkpoint_path", media["ckpt"], "--face", media["video"], "--audio", WAV, "--outfile", str(out),
            "--face_detector", "lbp", "--det_cache_dir", "")
    assert r.returncode == 0, r.stderr
    assert "83 frames" in r.stdout and "without a face" in r.stdout and "fps" in r.stdout
    info = probe_video(str(out))
    assert (info.width, info.height, info.fps, info.has_audio) == (256, 256, 25.0, True)
    assert count_frames(info) == 83
    assert abs(info.duration - 3.3) <= 1 / 25 + 0.03
    header = subprocess.run([audio.ffmpeg_exe(), "-hide_banner", "-i", str(out)], capture_output=True, text=True).stderr
    assert "h264" in header and "aac" in header
    assert len(audio.load_wav(str(out), 16000)) == pytest.approx(3.3 * 16000, abs=0.05 * 16000)
    assert os.stat(out).st_mode & 0o044  # readable by others, like any file the user writes


def test_blend_feather_keeps_upper_face_and_outside(media, tmp_path):
    _, hard = run(media, tmp_path, blend="none", box=[int(v) for v in BOX])
    _, soft = run(media, tmp_path, blend="feather", box=[int(v) for v in BOX])
    src = list(iter_frames(probe_video(media["video"])))
    top, bottom, left, right = (int(v) for v in BOX)
    for k in (0, 10, 40):
        # outside the box: untouched either way; upper face: source in feather mode, generated when hard
        assert np.array_equal(soft[k][:top], src[k][:top])
        upper = slice(top + 5, top + 40)
        assert np.abs(soft[k][upper, left:right].astype(int) - src[k][upper, left:right]).mean() < 1.0
        assert np.abs(hard[k][upper, left:right].astype(int) - src[k][upper, left:right]).mean() > 5.0
        # the box edge shows no seam in feather mode: left border column equals the source
        assert np.abs(soft[k][top:bottom, left].astype(int) - src[k][top:bottom, left]).max() <= 2


@pytest.mark.parametrize("loop", ["repeat", "pingpong"])
def test_loop_modes(media, tmp_path, loop):
    _, frames = run(media, tmp_path, face=media["marked"], loop=loop, box=[100, 200, 100, 200])
    seen = [marker_index(f) for f in frames]
    assert seen == [source_index(i, 10, loop) for i in range(83)]
    if loop == "pingpong":
        assert seen[8:13] == [8, 9, 8, 7, 6]


def test_photo_input_uses_fps_flag(media, tmp_path):
    photo = str(tmp_path / "face photo é.png")
    import cv2

    cv2.imwrite(str(tmp_path / "p.png"), next(iter_frames(probe_video(media["video"]))))
    os.replace(str(tmp_path / "p.png"), photo)
    summary, frames = run(media, tmp_path, face=photo, fps=30.0)
    assert summary.frames == 99 and summary.fps == 30.0
    assert probe_video(summary.outfile).fps == 30.0


def test_static_video_uses_first_frame(media, tmp_path):
    _, frames = run(media, tmp_path, face=media["marked"], static=True, box=[100, 200, 100, 200])
    assert {marker_index(f) for f in frames} == {0}


def test_resize_crop_rotate(media, tmp_path):
    s, _ = run(media, tmp_path, resize_factor=2, box=[20, 100, 30, 98])
    assert (probe_video(s.outfile).width, probe_video(s.outfile).height) == (128, 128)
    s, _ = run(media, tmp_path, crop=[0, 240, 8, -1])
    assert (probe_video(s.outfile).width, probe_video(s.outfile).height) == (248, 240)
    s, frames = run(media, tmp_path, face=media["marked"], rotate=True, box=[100, 200, 100, 200])
    # rotated clockwise: the top-left marker is now top-right
    assert frames[3][4:12, -12:-4].mean() == pytest.approx(20 + 20 * 3, abs=4)


def test_rotation_metadata_is_honoured(media, tmp_path):
    wide = make_face_video(tmp_path / "wide.mp4", 10, size=(320, 256))
    rotated = str(tmp_path / "rotated.mp4")
    set_rotation(wide, rotated, 90)  # -display_rotation on ffmpeg 6+, the rotate tag before
    info = probe_video(rotated)
    assert (info.width, info.height, info.rotation) == (256, 320, 90)
    s, frames = run(media, tmp_path, face=rotated)
    assert frames[0].shape == (320, 256, 3)
    assert (probe_video(s.outfile).width, probe_video(s.outfile).height) == (256, 320)


def test_variable_frame_rate_input(media, tmp_path):
    vfr = str(tmp_path / "vfr.mp4")
    # timestamps jitter: frame k shown at k/25 + (k % 3) * 8 ms
    ffmpeg("-i", media["video"], "-vf", "setpts='(N/25+mod(N,3)*0.008)/TB'", "-fps_mode", "vfr",
           "-c:v", "libx264", vfr)
    s, frames = run(media, tmp_path, face=vfr)
    assert s.frames == 83 and probe_video(s.outfile).fps == pytest.approx(probe_video(vfr).fps, abs=0.5)


def test_missing_faces_pass_through(media, tmp_path):
    s, frames = run(media, tmp_path, face=media["gaps"], loop="repeat", blend="none")
    src = list(iter_frames(probe_video(media["gaps"])))
    blank_out = [i for i in range(83) if source_index(i, 30, "repeat") in range(10, 15)]
    assert s.frames_without_face == len(blank_out) == 15  # source frames 10-14, three times
    for i in blank_out:
        assert np.array_equal(frames[i], src[source_index(i, 30, "repeat")])


def test_missing_face_fail_flag_and_faceless_video(media, tmp_path):
    out = tmp_path / "x.mp4"
    r = cli("--checkpoint_path", media["ckpt"], "--face", media["gaps"], "--audio", WAV, "--outfile", str(out),
            "--face_detector", "lbp", "--on_missing_face", "fail", "--det_cache_dir", "")
    assert r.returncode == 2 and "no face in 5 frame(s)" in r.stderr and "first: frame 10" in r.stderr
    r = cli("--checkpoint_path", media["ckpt"], "--face", media["noface"], "--audio", WAV, "--outfile", str(out),
            "--face_detector", "lbp", "--det_cache_dir", "")
    assert r.returncode == 2 and "--box" in r.stderr and "--face_detector" in r.stderr
    assert not out.exists()


def test_nosmooth_and_pads_change_boxes():
    dets = [(10, 10, 50, 50), (20, 10, 60, 50), (10, 10, 50, 50), (30, 10, 70, 50), (10, 10, 50, 50),
            (12, 10, 52, 50)]
    smooth = coords_from_detections(dets, (100, 100), (0, 10, 0, 0), smooth=True)
    raw = coords_from_detections(dets, (100, 100), (0, 10, 0, 0), smooth=False)
    assert raw[1] == (10, 60, 20, 60)  # (y1, y2, x1, x2) with 10 px bottom pad
    assert smooth[0] == (10, 60, 16, 56)  # mean of the first five x1 = 16
    padded = coords_from_detections(dets, (100, 100), (5, 0, 3, 3), smooth=False)
    assert padded[0] == (5, 50, 7, 53)


def test_detection_cache(media, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    s1, f1 = run(media, tmp_path, det_cache_dir=cache)
    assert not s1.detection_cached and len(glob.glob(cache + "/*.npy")) == 1
    import face_detection

    def no_detector(*a, **k):
        raise AssertionError("detector must not run on a cached video")

    monkeypatch.setattr(face_detection, "get_detector", no_detector)
    silence = tone_wav(tmp_path / "silence.wav", 2.0, silent=True)
    s2, f2 = run(media, tmp_path, det_cache_dir=cache, audio=silence)
    assert s2.detection_cached and s2.frames == 50
    # other detection settings are another cache entry
    monkeypatch.undo()
    s3, _ = run(media, tmp_path, det_cache_dir=cache, resize_factor=2)
    assert not s3.detection_cached and len(glob.glob(cache + "/*.npy")) == 2


def test_audio_inputs(media, tmp_path):
    mp3 = str(tmp_path / "speech.mp3")
    ffmpeg("-i", WAV, "-ar", "44100", "-ac", "2", mp3)
    s, _ = run(media, tmp_path, audio=mp3, box=[int(v) for v in BOX])
    assert s.frames == 83
    with_audio = make_face_video(tmp_path / "talk.mp4", 25, audio=WAV)
    s, _ = run(media, tmp_path, audio=with_audio, box=[int(v) for v in BOX])
    assert s.frames == 83


def test_unsafe_file_names(media, tmp_path):
    weird = tmp_path / "dir with 'quotes'; $(touch pwned) ü"
    weird.mkdir()
    face = weird / "fa ce;$(x).mp4"
    voice = weird / 'vo"ice ü.wav'
    out = weird / "out $(y) ;é.mp4"
    face.write_bytes(open(media["video"], "rb").read())
    voice.write_bytes(open(WAV, "rb").read())
    r = cli("--checkpoint_path", media["ckpt"], "--face", str(face), "--audio", str(voice), "--outfile", str(out),
            "--box", *BOX, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert out.exists() and not (tmp_path / "pwned").exists()


def _bad_input_cases(media, d):
    corrupt = d / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(20000))
    text = d / "notes.wav"
    text.write_text("not audio\n" * 100)
    trunc = d / "trunc.pth"
    trunc.write_bytes(open(media["ckpt"], "rb").read()[:5000])
    return {
        "missing face": (["--face", str(d / "nope.mp4")], "not found"),
        "corrupt video": (["--face", str(corrupt)], "cannot read video"),
        "not audio": (["--audio", str(text)], "cannot read audio"),
        "missing audio": (["--audio", str(d / "nope.wav")], "not found"),
        "expert as generator": (["--checkpoint_path", media["expert"]], "lip-sync expert"),
        "truncated checkpoint": (["--checkpoint_path", str(trunc)], "truncated"),
        "missing s3fd": (["--face_detector", "sfd", "--s3fd_path", str(d / "s3fd.pth")], "--face_detector lbp"),
        "box outside": (["--box", "0", "900", "0", "50"], "outside"),
    }


@pytest.mark.parametrize("case", ["missing face", "corrupt video", "not audio", "missing audio",
                                  "expert as generator", "truncated checkpoint", "missing s3fd", "box outside"])
def test_bad_input_is_one_clear_line(media, tmp_path, case):
    args, expected = _bad_input_cases(media, tmp_path)[case]
    out = tmp_path / "out" / "result.mp4"
    opts = {"--checkpoint_path": media["ckpt"], "--face": media["video"], "--audio": WAV, "--face_detector": "lbp"}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in opts:
            opts[flag] = value
        else:
            extra += [flag, value]
    if args[0] == "--box":
        extra = args
    argv = [x for kv in opts.items() for x in kv] + extra
    r = cli(*argv, "--outfile", str(out), "--det_cache_dir", "")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not out.parent.exists() or os.listdir(out.parent) == []  # no partial or temporary files


def test_interrupted_encode_leaves_nothing(media, tmp_path):
    out = tmp_path / "out.mp4"

    def boom(i, frame):
        if i == 40:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_inference(InferenceConfig(checkpoint_path=media["ckpt"], face=media["video"], audio=WAV,
                                      outfile=str(out), box=[int(v) for v in BOX], progress=False),
                      frame_sink=boom)
    assert os.listdir(tmp_path) == []


def test_streaming_memory_does_not_grow_with_length(media, tmp_path):
    """Peak Python/numpy memory for a 4x longer video stays flat (frames are never all held)."""
    peaks = {}
    for seconds in (2, 8):
        n = 25 * seconds
        video = make_face_video(tmp_path / f"v{seconds}.mp4", n, size=(480, 360))
        wav = tone_wav(tmp_path / f"a{seconds}.wav", seconds)
        tracemalloc.start()
        run_inference(InferenceConfig(checkpoint_path=media["ckpt"], face=video, audio=wav,
                                      outfile=str(tmp_path / "o.mp4"), box=[60, 300, 100, 380],
                                      wav2lip_batch_size=16, progress=False))
        peaks[seconds] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    frame_bytes = 480 * 360 * 3
    assert peaks[8] < 1.3 * peaks[2], peaks
    assert peaks[8] < 100 * frame_bytes  # far below the 200 frames of the long video


def test_main_returns_exit_codes(media, tmp_path):
    assert inference.main(["--checkpoint_path", media["ckpt"], "--face", media["video"], "--audio", WAV,
                           "--outfile", str(tmp_path / "ok.mp4"), "--box", *BOX, "--quiet",
                           "--device", "cpu"]) == 0
    assert inference.main(["--checkpoint_path", media["ckpt"], "--face", str(tmp_path / "missing.mp4"),
                           "--audio", WAV, "--quiet"]) == 2


def test_detection_flags_run(media, tmp_path):
    """--det_scale, --face_det_batch_size and --nosmooth change only how boxes are found."""
    base, _ = run(media, tmp_path, face=media["marked"])
    for kw in ({"det_scale": 0.5}, {"face_det_batch_size": 3}, {"nosmooth": True}):
        s, frames = run(media, tmp_path, face=media["marked"], **kw)
        assert s.frames == base.frames == 83 and s.frames_without_face == 0
    with pytest.raises(Exception, match="det_scale"):
        run(media, tmp_path, det_scale=1.5)


# ---------------------------------------------------------------------------------------------
def _loudness_generator(monkeypatch):
    """Make every generator draw the mouth region of its face darker the louder the frame's mel
    window is (the oracle: the mouth opens when this frame's window is loud)."""
    from lipsync.render.generator import Generator

    def generate(self, mels, faces, keys=None, as_tensor=False):
        out = np.array(faces, copy=True)
        level = np.clip(170 - 30 * (np.asarray(mels).mean(axis=(1, 2)) + 4), 0, 255)  # mel in [-4, 4]
        out[:, 58:84, 30:66] = level[:, None, None, None].astype(np.uint8)
        return out

    monkeypatch.setattr(Generator, "generate", generate)


@pytest.mark.parametrize("container,codec", [("mp4", "aac"), ("mkv", "libmp3lame")])
def test_audio_starting_late_stays_in_sync(media, tmp_path, monkeypatch, container, codec):
    """Speech muxed 0.4 s after the video starts (ffmpeg -itsoffset): the output's mouth follows
    the output's own audio (lag 0 by the loudness oracle) and the picture lasts as long as the sound."""
    from lipsync.media.ffmpeg import has_encoder
    from media import av_lag, mel_loudness, mouth_openness

    if not has_encoder(codec):
        pytest.skip(f"this ffmpeg has no {codec}")
    delayed = str(tmp_path / f"delayed.{container}")
    ffmpeg("-i", media["video"], "-itsoffset", "0.4", "-i", WAV, "-map", "0:v", "-map", "1:a", "-c:v", "copy",
           "-c:a", codec, delayed)
    _loudness_generator(monkeypatch)
    out = str(tmp_path / "out.mp4")
    assert inference.main(["--checkpoint_path", media["ckpt"], "--face", media["video"], "--audio", delayed,
                           "--outfile", out, "--box", *BOX, "--blend", "none", "--quiet", "--device", "cpu"]) == 0
    frames = list(iter_frames(probe_video(out)))
    sound = audio.load_wav(out, 16000)
    assert len(frames) == audio.num_frames_for_audio(len(sound), 25)  # picture as long as the sound
    assert abs(len(sound) / 16000 - (0.4 + 3.3)) < 0.06  # the late start is kept, as silence
    top, bottom, left, right = (int(v) for v in BOX)
    openness = {k: mouth_openness(f[top:bottom, left:right]) for k, f in enumerate(frames)}
    assert av_lag(openness, mel_loudness(sound, len(frames))) == 0


def test_field_inputs_through_the_cli(media, tmp_path, monkeypatch):
    """Issue 13's inputs as a user gives them to inference.py: a clip with its own same-length AAC
    track (60 frames, not 61), a JPEG named .jfif or with no extension (a photo at --fps), names
    with ':' (files, not protocols), a 24000/1001 clip (written at exactly that rate)."""
    import cv2
    from fractions import Fraction

    monkeypatch.chdir(tmp_path)
    small = ["--box", "8", "56", "8", "56", "--quiet", "--device", "cpu", "--checkpoint_path", media["ckpt"]]
    clip = make_face_video(tmp_path / "v30.mp4", 60, size=(64, 64), fps=30)
    ffmpeg("-f", "lavfi", "-i", "sine=f=220:sample_rate=48000:d=2", "tone.wav")
    ffmpeg("-i", clip, "-i", "tone.wav", "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac", "-shortest",
           "talk30.mp4")
    assert inference.main(["--face", "talk30.mp4", "--audio", "talk30.mp4", "--outfile", "o1.mp4", *small]) == 0
    out = list(iter_frames(probe_video("o1.mp4")))
    assert len(out) == 60 and not np.array_equal(out[-1], out[0])  # no extra frame jumping back to the start

    jpeg = cv2.imencode(".jpg", next(iter_frames(probe_video(clip))))[1].tobytes()
    for name in ("face.jfif", "face"):
        (tmp_path / name).write_bytes(jpeg)
        assert inference.main(["--face", name, "--audio", "tone.wav", "--fps", "30", "--outfile", "o2.mp4",
                               *small]) == 0
        info = probe_video("o2.mp4")
        assert info.rate == 30 and len(list(iter_frames(info))) == 60, name

    os.rename(clip, tmp_path / "12:30 take.mp4")
    os.rename("tone.wav", "voice:take2.wav")
    assert inference.main(["--face", "12:30 take.mp4", "--audio", "voice:take2.wav", "--outfile", "o:3.mp4",
                           *small]) == 0
    assert len(list(iter_frames(probe_video("o:3.mp4")))) == 60

    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=24000/1001:duration=1", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", "ntsc.mp4")
    assert inference.main(["--face", "ntsc.mp4", "--audio", "voice:take2.wav", "--outfile", "o4.mp4", *small]) == 0
    assert probe_video("o4.mp4").rate == Fraction(24000, 1001)
