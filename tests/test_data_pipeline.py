"""The four data stages on a tiny generated corpus."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import audio
import generate_filelists
import generate_hq_videos
import preprocess
import synthetic_corpus
from conftest import ROOT
from lipsync.train import synthetic as S
from lipsync.train.synthetic_faces import Identity, Renderer, measure_opening
from lipsync.media.video import iter_frames, probe_video
from media import ffmpeg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    assert synthetic_corpus.main(["--out", str(root), "--clips", "6", "--clips_per_group", "2",
                                  "--seconds", "1.2", "--seed", "3", "--quiet", "--speech", "synth"]) == 0
    return root


def clips_of(root):
    return sorted(p for p in glob.glob(str(root / "*" / "*.mp4")) if not p.endswith("_hq.mp4"))


def test_corpus_layout_and_truth(corpus):
    clips = clips_of(corpus)
    assert len(clips) == 6 and len({os.path.dirname(c) for c in clips}) == 3
    info = probe_video(clips[0])
    assert info.fps == 25.0 and info.has_audio
    header = subprocess.run([audio.ffmpeg_exe(), "-hide_banner", "-i", clips[0]], capture_output=True, text=True).stderr
    assert "16000 Hz" in header
    truth = json.load(open(clips[0][:-4] + ".json"))
    assert truth["frames"] == 30 == len(truth["opening"]) == len(truth["face_boxes"])
    assert 0.0 <= min(truth["opening"]) and max(truth["opening"]) <= 1.0
    assert np.std(truth["opening"]) > 0.1  # the mouth moves


def test_corpus_is_deterministic_and_resumable(corpus, tmp_path):
    assert synthetic_corpus.main(["--out", str(tmp_path), "--clips", "1", "--clips_per_group", "2",
                                  "--seconds", "1.2", "--seed", "3", "--quiet", "--speech", "synth"]) == 0
    ours = clips_of(tmp_path)[0]
    theirs = os.path.join(str(corpus), os.path.relpath(ours, str(tmp_path)))
    assert json.load(open(ours[:-4] + ".json")) == json.load(open(theirs[:-4] + ".json"))
    before = os.path.getmtime(ours)
    synthetic_corpus.main(["--out", str(tmp_path), "--clips", "1", "--seed", "3", "--clips_per_group", "2",
                           "--seconds", "1.2", "--quiet", "--speech", "synth"])
    assert os.path.getmtime(ours) == before


def test_corpus_refuses_to_mix_speech_sources(tmp_path, monkeypatch, capsys):
    """A rerun that would make other speech than the clips already there stops with one error line
    instead of keeping them (a corpus of mixed sources, as /tmp/demo_out's espeak-ng clips reused by
    a synthesiser run would have been)."""
    args = ["--out", str(tmp_path), "--clips", "1", "--seconds", "1.2", "--seed", "3", "--quiet"]
    assert synthetic_corpus.main(args + ["--speech", "synth"]) == 0
    monkeypatch.setattr(S, "espeak_available", lambda: True)    # no espeak-ng is run: the clip exists
    capsys.readouterr()
    assert synthetic_corpus.main(args + ["--speech", "espeak"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "made with synthesiser speech" in err and "--speech synth" in err
    monkeypatch.setattr(S, "espeak_available", lambda: False)
    assert synthetic_corpus.main(args + ["--speech", "espeak"]) == 2
    assert "espeak-ng is not installed" in capsys.readouterr().err
    assert synthetic_corpus.main(args + ["--speech", "auto"]) == 0   # auto without espeak-ng: the synthesiser


def test_mouth_follows_audio():
    sr = S.SR
    silence = np.zeros(sr)
    t = np.arange(sr) / sr
    vowel = 0.4 * np.sign(np.sin(2 * np.pi * 120 * t))  # buzz: lots of F1-band energy
    o_sil, _ = S.mouth_track(silence, 25)
    o_vow, _ = S.mouth_track(vowel, 25)
    assert o_sil.max() == 0.0 and o_vow[3:-3].min() > 0.5
    both = np.r_[silence[: sr // 2], vowel[: sr // 2]]
    o, _ = S.mouth_track(both, 25)
    assert o[:10].max() < 0.05 and o[15:].min() > 0.5


def test_true_video_renders_for_any_audio_and_measures_back(corpus, tmp_path):
    clip = clips_of(corpus)[0]
    truth = json.load(open(clip[:-4] + ".json"))
    ident = Identity.from_dict(truth["identity"])
    # same audio -> the clip's own frames (up to encoding noise)
    wav = audio.load_wav(clip, audio.SAMPLE_RATE)
    frames = list(iter_frames(probe_video(clip)))
    rendered = list(S.render_frames(ident, wav[: 30 * 640], n_frames=30))
    assert np.abs(rendered[10].astype(int) - frames[10]).mean() < 4
    # the measured opening tracks the truth
    renderer = Renderer(ident)
    measured = [measure_opening(f, ident, k, renderer) for k, f in enumerate(frames)]
    assert np.corrcoef(measured, truth["opening"])[0, 1] > 0.8
    # and the CLI renders the identity saying other audio
    other = str(tmp_path / "other.wav")
    audio.save_wav(S.synth_speech(np.random.default_rng(9), 1.0), other, audio.SAMPLE_RATE)
    out = str(tmp_path / "truth.mp4")
    assert synthetic_corpus.main(["--render_truth", clip[:-4] + ".json", "--audio", other, "--outfile", out]) == 0
    assert probe_video(out).has_audio and len(list(iter_frames(probe_video(out)))) == 25


def test_lbp_finds_synthetic_faces(corpus):
    from face_detection import box_iou as iou, get_detector

    det = get_detector("lbp")
    found, ious, total = 0, [], 0
    for clip in clips_of(corpus):
        truth = json.load(open(clip[:-4] + ".json"))
        frames = list(iter_frames(probe_video(clip)))[::5]
        for k, box in zip(range(0, 30, 5), det.detect(frames)):
            total += 1
            if box is not None:
                found += 1
                ious.append(iou(box, truth["face_boxes"][k]))
    assert found / total >= 0.9 and np.mean(ious) >= 0.6


# ------------------------------------------------------------------------------------------------
def test_generate_hq_videos(corpus, tmp_path, capsys):
    import shutil

    root = tmp_path / "raw"
    shutil.copytree(corpus, root)
    bad = root / "999" / "00001.mp4"
    bad.parent.mkdir()
    bad.write_bytes(os.urandom(5000))
    assert generate_hq_videos.main(["--data_root", str(root), "--workers", "2", "--quiet"]) == 1
    out = capsys.readouterr()
    assert "6 clips enhanced" in out.out and "1 failed" in out.out and "999/00001.mp4" in out.err
    hq = sorted(glob.glob(str(root / "*" / "*_hq.mp4")))
    assert len(hq) == 6 and not glob.glob(str(root / "**" / "*.partial*"), recursive=True)
    info = probe_video(hq[0])
    assert info.has_audio and info.fps == 25.0
    assert len(audio.load_wav(hq[0], audio.SAMPLE_RATE)) == pytest.approx(1.2 * audio.SAMPLE_RATE, abs=1600)
    bad.unlink()
    before = [os.path.getmtime(p) for p in hq]
    assert generate_hq_videos.main(["--data_root", str(root), "--quiet"]) == 0
    assert "0 clips enhanced, 6 already done" in capsys.readouterr().out
    assert before == [os.path.getmtime(p) for p in hq]


def test_generate_hq_videos_codeformer_invocation(corpus, tmp_path):
    """CodeFormer runs from the user's checkout with the published arguments; audio is put back."""
    checkout = tmp_path / "CodeFormer"
    checkout.mkdir()
    (checkout / "inference_codeformer.py").write_text(
        "import argparse, json, os, shutil, sys\n"
        "p = argparse.ArgumentParser()\n"
        "p.add_argument('--bg_upsampler'); p.add_argument('--face_upsample', action='store_true')\n"
        "p.add_argument('-w', type=float); p.add_argument('-s', type=int)\n"
        "p.add_argument('-i'); p.add_argument('-o')\n"
        "a = p.parse_args()\n"
        "json.dump(sys.argv[1:], open(os.path.join(os.path.dirname(__file__), 'argv.json'), 'w'))\n"
        "name = os.path.splitext(os.path.basename(a.i))[0]\n"
        "os.makedirs(a.o, exist_ok=True)\n"
        "import subprocess\n"
        f"subprocess.run([{audio.ffmpeg_exe()!r}, '-loglevel', 'error', '-y', '-i', a.i, '-an', '-c:v', 'copy',"
        " os.path.join(a.o, name + '.mp4')], check=True)\n")
    import shutil

    root = tmp_path / "raw"
    shutil.copytree(corpus, root, ignore=shutil.ignore_patterns("*_hq.mp4"))
    assert generate_hq_videos.main(["--data_root", str(root), "--enhancer", "codeformer", "--codeformer_dir",
                                    str(checkout), "--workers", "1", "--quiet"]) == 0
    argv = json.load(open(checkout / "argv.json"))
    assert argv[:8] == ["--bg_upsampler", "realesrgan", "--face_upsample", "-w", "1.0", "-s", "1", "-i"]
    hq = sorted(glob.glob(str(root / "*" / "*_hq.mp4")))
    assert len(hq) == 6 and probe_video(hq[0]).has_audio


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preprocessed(corpus, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("raw")
    shutil.copytree(corpus, root, dirs_exist_ok=True)
    # a 30 fps clip, a corrupt clip and a faceless clip
    group = sorted(os.listdir(root))[0]
    ffmpeg("-i", str(root / group / "00001.mp4"), "-r", "30", "-c:v", "libx264", "-c:a", "aac",
           str(root / group / "00030.mp4"))
    (root / "777").mkdir()
    (root / "777" / "00001.mp4").write_bytes(os.urandom(4000))
    ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=128x128:r=25:d=1", "-f", "lavfi", "-i", "sine=f=300:d=1",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(root / "777" / "00002.mp4"))
    pre = tmp_path_factory.mktemp("pre")
    rc = preprocess.main(["--data_root", str(root), "--preprocessed_root", str(pre), "--face_detector", "lbp",
                          "--device", "cpu", "--batch_size", "8", "--ngpu", "2", "--quiet"])
    return {"raw": root, "pre": pre, "rc": rc, "group": group}


def test_preprocess_writes_the_contract(preprocessed):
    pre, group = preprocessed["pre"], preprocessed["group"]
    d = pre / group / "00001"
    done = json.load(open(d / "done.json"))
    assert done["frames"] == 30 and done["faces"] >= 27
    jpgs = sorted(int(os.path.splitext(p)[0]) for p in os.listdir(d) if p.endswith(".jpg"))
    assert jpgs[0] == 0 and jpgs[-1] <= 29 and len(jpgs) == done["faces"]
    wav = audio.load_wav(str(d / "audio.wav"), audio.SAMPLE_RATE)
    from scipy.io import wavfile

    sr, raw = wavfile.read(str(d / "audio.wav"))
    assert sr == audio.SAMPLE_RATE and raw.ndim == 1
    np.testing.assert_allclose(np.load(d / "mel.npy"), audio.melspectrogram(wav), atol=1e-4)
    import cv2

    crop = cv2.imread(str(d / "0.jpg"))
    assert 60 < crop.shape[0] < 256 and 60 < crop.shape[1] < 256  # a face crop, not the frame


def test_preprocess_resamples_to_25_fps(preprocessed):
    done = json.load(open(preprocessed["pre"] / preprocessed["group"] / "00030" / "done.json"))
    assert done["source_fps"] == 30.0 and done["frames"] == 30  # 1.2 s at 25 fps


def test_preprocess_failures_are_reported(preprocessed):
    assert preprocessed["rc"] == 1
    report = json.load(open(preprocessed["pre"] / "failures.json"))
    reasons = {f["clip"]: f["reason"] for f in report["failures"]}
    assert set(reasons) == {"777/00001", "777/00002"}
    assert "no face" in reasons["777/00002"] and "cannot read video" in reasons["777/00001"]
    assert report["processed"] == 7
    assert not glob.glob(str(preprocessed["pre"] / "777" / "*"))


def test_preprocess_resumes(preprocessed, tmp_path, capsys):
    raw, group = preprocessed["raw"], preprocessed["group"]
    pre = tmp_path / "pre"
    args = ["--data_root", str(raw), "--preprocessed_root", str(pre), "--face_detector", "lbp", "--device", "cpu",
            "--quiet", "--hq", "ignore"]
    import shutil

    shutil.copytree(preprocessed["pre"], pre)
    # an interrupted clip: crops but no done.json, and a leftover .partial directory
    os.remove(pre / group / "00002" / "done.json")
    os.makedirs(pre / group / "00030.partial")
    preprocess.main(args)
    out = capsys.readouterr().out
    assert "1 clips preprocessed" in out and "6 already done" in out
    assert os.path.isfile(pre / group / "00002" / "done.json")
    assert not os.path.exists(pre / group / "00030.partial")


def test_preprocess_hq_modes_and_shards(corpus, tmp_path, capsys):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(corpus, raw)
    group = sorted(os.listdir(raw))[0]
    shutil.copy(raw / group / "00001.mp4", raw / group / "00001_hq.mp4")
    pre = tmp_path / "pre"
    base = ["--data_root", str(raw), "--face_detector", "lbp", "--device", "cpu", "--quiet"]
    assert preprocess.main(base + ["--preprocessed_root", str(pre), "--hq", "only"]) == 0
    assert "1 clips preprocessed" in capsys.readouterr().out
    assert json.load(open(pre / group / "00001" / "done.json"))["source"].endswith("00001_hq.mp4")
    pre2 = tmp_path / "pre2"
    assert preprocess.main(base + ["--preprocessed_root", str(pre2), "--hq", "ignore", "--shard", "1/3"]) == 0
    assert "2 clips preprocessed" in capsys.readouterr().out


def test_preprocess_missing_s3fd_weights(corpus, tmp_path, capsys):
    rc = preprocess.main(["--data_root", str(corpus), "--preprocessed_root", str(tmp_path / "p"),
                          "--face_detector", "sfd", "--s3fd_path", str(tmp_path / "none.pth"), "--quiet"])
    assert rc == 2 and "--face_detector lbp" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
def test_generate_filelists(preprocessed, tmp_path, capsys):
    out = tmp_path / "filelists"
    assert generate_filelists.main(["--data_root", str(preprocessed["pre"]), "--out_dir", str(out), "--seed", "1"]) == 0
    splits = {k: open(out / f"{k}.txt").read().split() for k in ("train", "val", "test")}
    assert all(splits.values())  # three groups with usable clips: every split non-empty
    groups = {k: {c.split("/")[0] for c in v} for k, v in splits.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"]) \
        and not (groups["val"] & groups["test"])
    assert sum(len(v) for v in splits.values()) == 7
    msg = capsys.readouterr().out
    assert "0 dropped as too short" in msg
    # deterministic for a seed
    generate_filelists.main(["--data_root", str(preprocessed["pre"]), "--out_dir", str(tmp_path / "again"),
                             "--seed", "1"])
    assert open(tmp_path / "again" / "val.txt").read() == open(out / "val.txt").read()


def test_generate_filelists_drops_short_clips(preprocessed, tmp_path, capsys):
    out = tmp_path / "fl"
    assert generate_filelists.main(["--data_root", str(preprocessed["pre"]), "--out_dir", str(out),
                                    "--syncnet_T", "10"]) == 2  # 30 frames <= 3 * 10: nothing usable
    assert "too short" in capsys.readouterr().err


def test_seed_command_lines_parse():
    # the seed notebook's command lines, verbatim flags
    for script, args in [("generate_hq_videos.py", ["--data_root", "../LSR2/demo/"]),
                         ("preprocess.py", ["--data_root", "x", "--preprocessed_root", "y", "--batch_size", "128",
                                            "--ngpu", "4"]),
                         ("generate_filelists.py", ["--data_root", "x"])]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True)
        assert r.returncode == 0
        for flag in args[::2]:
            assert flag in r.stdout
