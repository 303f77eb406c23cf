"""Evaluation and data hygiene: the LSE-D / LSE-C protocol, syncnet_python's SyncNet, AV-offset
measurement with a trained expert, evaluate.py on videos, and sync_correct.py on a corpus."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import audio
import color_syncnet_train
import evaluate
import sync_correct
from lipsync.train import synthetic as S
from lipsync.train.synthetic_faces import random_identity
from lipsync.eval.evaluation import (EvaluationError, ExpertScorer, SyncNetV2Scorer, fill_missing_boxes, longest_run,
                                offset_distances, score_preprocessed_clip, shift_audio, sync_score, syncnet_crop,
                                syncnet_track)
from models.checkpoint import CheckpointError
from models.syncnet_v2 import SyncNetV2, load_syncnet_v2

# the expert the measurement tests use: trained here on generated clips, a few minutes on 2 cores
EXPERT_STEPS = 400
EXPERT_HPARAMS = ("seed=0,syncnet_lr=1e-3,syncnet_batch_size=32,lr_schedule=cosine,lr_decay_steps=%d,"
                  "syncnet_eval_interval=%d,syncnet_checkpoint_interval=%d,eval_steps=2" % ((EXPERT_STEPS,) * 3))


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------
def calc_pdist_loop(feat1, feat2, vshift):
    """syncnet_python's calc_pdist, written as its loop."""
    win = 2 * vshift + 1
    feat2p = torch.nn.functional.pad(feat2, (0, 0, vshift, vshift))
    return torch.stack([torch.nn.functional.pairwise_distance(feat1[[i], :].repeat(win, 1), feat2p[i:i + win, :])
                        for i in range(len(feat1))])


def test_offset_distances_match_the_published_loop():
    g = torch.Generator().manual_seed(0)
    v, a = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    assert torch.allclose(offset_distances(v, a, 15), calc_pdist_loop(v, a, 15), atol=1e-5)


@pytest.mark.parametrize("k", [-7, -2, 0, 3, 6])
def test_sync_score_finds_a_known_offset(k):
    """Audio feature of frame i == video feature of frame i + k (the audio leads by k): offset +k."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(80, 8, generator=g)
    video = base[20:60]
    audio_feat = base[20 + k:60 + k]
    s = sync_score(video, audio_feat, vshift=15)
    assert s.offset == k
    assert s.lse_c > 1.0   # (the zero padding past the ends keeps LSE-D above 0 for k != 0)
    assert s.lse_d < 0.01 if k == 0 else s.lse_d < s.lse_c
    assert len(s.curve) == 31 and int(np.argmin(s.curve)) == 15 + k


def test_shift_audio_delays_and_advances_keeping_length():
    wav = np.arange(1, 16001, dtype=np.float32)
    d = shift_audio(wav, 2)          # 2 frames at 25 fps = 1280 samples of silence first
    assert len(d) == len(wav) and np.all(d[:1280] == 0) and d[1280] == 1
    a = shift_audio(wav, -2)
    assert len(a) == len(wav) and a[0] == 1281 and np.all(a[-1280:] == 0)
    assert np.array_equal(shift_audio(wav, 0), wav)


def test_longest_run_and_box_filling():
    assert longest_run([0, 1, 2, 5, 6, 7, 8, 9, 11]) == (5, 5)
    boxes = fill_missing_boxes([None, (0, 0, 10, 10), None, (10, 0, 20, 10), None])
    assert boxes[0].tolist() == [0, 0, 10, 10] and boxes[2].tolist() == [5, 0, 15, 10]
    assert boxes[4].tolist() == [10, 0, 20, 10]
    with pytest.raises(EvaluationError):
        fill_missing_boxes([None, None])


# ------------------------------------------------------------------------------------------------
# syncnet_python's SyncNet
# ------------------------------------------------------------------------------------------------
def test_syncnet_v2_layout_and_loading(tmp_path):
    m = SyncNetV2().eval()
    keys = m.state_dict().keys()
    # the release's module names and layer indices (conv / BN / ReLU / pool positions)
    for k in ("netcnnaud.0.weight", "netcnnaud.18.weight", "netcnnaud.19.running_var", "netfcaud.3.weight",
              "netcnnlip.0.weight", "netcnnlip.18.weight", "netfclip.1.running_mean"):
        assert k in keys
    assert m.state_dict()["netcnnlip.0.weight"].shape == (96, 3, 5, 7, 7)
    assert m.state_dict()["netcnnaud.18.weight"].shape == (512, 256, 5, 4)
    with torch.no_grad():
        assert m.forward_aud(torch.zeros(2, 1, 13, 20)).shape == (2, 1024)
        assert m.forward_lip(torch.zeros(2, 3, 5, 224, 224)).shape == (2, 1024)
    torch.manual_seed(0)
    m2 = SyncNetV2()
    path = tmp_path / "syncnet_v2.model"
    torch.save({"__S__." + k: v for k, v in m2.state_dict().items()}, path)
    loaded = load_syncnet_v2(str(path))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in m2.state_dict().items())
    bad = tmp_path / "bad.model"
    torch.save({"netcnnaud.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match="syncnet_python"):
        load_syncnet_v2(str(bad))


def test_syncnet_scorer_uses_the_release_preprocessing(tmp_path):
    import python_speech_features

    torch.manual_seed(0)
    path = tmp_path / "syncnet_v2.model"
    torch.save(SyncNetV2().state_dict(), path)
    scorer = SyncNetV2Scorer(str(path))
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(audio.SAMPLE_RATE)).astype(np.float32)
    pcm = np.clip(np.round(wav * 32768), -32768, 32767).astype(np.int16)
    assert np.allclose(scorer.mfcc(wav), python_speech_features.mfcc(pcm, audio.SAMPLE_RATE).T, atol=1e-4)
    crops = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(30)]
    v, a = scorer.features(crops, wav)
    # windows 0 .. min(frames, samples // 640) - 6, as the release loops
    assert v.shape == (25 - 5, 1024) and a.shape == (20, 1024)
    with pytest.raises(EvaluationError, match="25 fps"):
        scorer.features(crops, wav, fps=30)


def test_syncnet_crop_is_the_face_track_square():
    frame = np.zeros((200, 300, 3), np.uint8)
    boxes = np.tile([100, 50, 160, 110], (20, 1)).astype(float)   # 60x60 box centred at (130, 80)
    track = syncnet_track(boxes)
    assert track[0].tolist() == [30, 80, 130]
    crop = syncnet_crop(frame, track[0])
    assert crop.shape == (224, 224, 3)
    # a box at the top-left corner pulls in the grey padding
    corner = syncnet_crop(frame, (30, 10, 10))
    assert corner[0, 0].tolist() == [110, 110, 110]


# ------------------------------------------------------------------------------------------------
# A trained expert measures offsets
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync_pre")
    clips = S.write_preprocessed(str(root), groups=12, seconds=3.0, seed=5)
    fl = tmp_path_factory.mktemp("sync_fl")
    (fl / "train.txt").write_text("\n".join(clips[:9]) + "\n")
    (fl / "val.txt").write_text("\n".join(clips[9:10]) + "\n")
    (fl / "test.txt").write_text("\n".join(clips[10:]) + "\n")
    return {"root": str(root), "filelists": str(fl), "clips": clips, "held_out": clips[10:]}


@pytest.fixture(scope="module")
def expert_path(corpus, tmp_path_factory):
    ck = tmp_path_factory.mktemp("sync_expert")
    rc = color_syncnet_train.main(["--data_root", corpus["root"], "--checkpoint_dir", str(ck), "--filelists_dir",
                                   corpus["filelists"], "--preset", "tiny", "--hparams", EXPERT_HPARAMS,
                                   "--max_steps", str(EXPERT_STEPS), "--device", "cpu", "--quiet"])
    assert rc == 0
    return str(ck / f"checkpoint_step{EXPERT_STEPS:09d}.pth")


def test_shifted_clips_are_measured_within_one_frame(corpus, expert_path):
    scorer = ExpertScorer(expert_path)
    errors = []
    for clip in corpus["held_out"]:
        d = os.path.join(corpus["root"], clip)
        wav = audio.load_wav(os.path.join(d, "audio.wav"), audio.SAMPLE_RATE)
        for k in range(-6, 7):
            s = score_preprocessed_clip(scorer, d, wav=shift_audio(wav, -k))  # audio advanced: it leads by k
            errors.append(s.offset - k)
    assert max(abs(e) for e in errors) <= 1, errors


# ------------------------------------------------------------------------------------------------
# evaluate.py on videos
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A video whose mouth follows its audio, and the same frames with the audio 5 frames late."""
    root = tmp_path_factory.mktemp("eval_videos")
    rng = np.random.default_rng(11)
    ident = random_identity(rng, photo="astronaut")
    wav = S.synth_speech(rng, 4.0)
    in_sync = str(root / "in_sync.mp4")
    S.write_clip(in_sync, ident, wav)
    late = str(root / "audio_late.mp4")
    from lipsync.media.video import mux_audio

    shifted = str(root / "late.wav")
    audio.save_wav(shift_audio(wav, 5), shifted, audio.SAMPLE_RATE)
    mux_audio(in_sync, shifted, late)
    return {"in_sync": in_sync, "late": late}


def test_in_sync_video_scores_better_than_shifted(videos, expert_path, tmp_path, capsys):
    out = tmp_path / "scores.json"
    rc = evaluate.main(["--videos", videos["in_sync"], videos["late"], "--checkpoint_path", expert_path,
                        "--face_detector", "lbp", "--references", videos["in_sync"], videos["in_sync"],
                        "--device", "cpu", "--out", str(out), "--quiet"])
    assert rc == 0
    rep = json.loads(out.read_text())
    good, bad = (r["expert"] for r in rep["videos"])
    assert abs(good["offset"]) <= 1 and abs(bad["offset"] + 5) <= 1   # audio 5 frames late: offset -5
    # as the video stands: the in-sync one is closer and more confident at offset 0
    assert good["dist_at_0"] < bad["dist_at_0"] - 0.1 and good["conf_at_0"] > bad["conf_at_0"] + 0.1
    # LSE-D / LSE-C take the best offset, so the shift moves them only through the 5 edge windows
    assert abs(good["lse_d"] - bad["lse_d"]) < 0.05 and abs(good["lse_c"] - bad["lse_c"]) < 0.05
    same, other = rep["videos"]
    assert same["psnr"] == float("inf") or same["psnr"] > 60
    assert same["ssim"] > 0.999 and other["ssim"] > 0.999   # the frames are the same; only the audio moved
    assert rep["mean"]["scored"] == 2


def test_evaluate_with_syncnet_weights_file(videos, tmp_path):
    """The syncnet scorer runs end to end from a weights file (random weights here: shapes only)."""
    torch.manual_seed(0)
    path = tmp_path / "syncnet_v2.model"
    torch.save(SyncNetV2().state_dict(), path)
    out = tmp_path / "s.json"
    assert evaluate.main(["--videos", videos["in_sync"], "--syncnet_model", str(path), "--box", "60", "50", "200", "200",
                          "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    row = json.loads(out.read_text())["videos"][0]
    assert row["syncnet"]["windows"] == 100 - 5 and len(row["syncnet"]["curve"]) == 31


def test_evaluate_errors(videos, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--videos", videos["in_sync"]])              # no scorer given
    assert evaluate.main(["--videos", str(tmp_path / "nope.mp4"), "--checkpoint_path", "x.pth"]) == 2
    assert "not found" in capsys.readouterr().err
    assert evaluate.main(["--videos", videos["in_sync"], "--syncnet_model", str(tmp_path / "missing.model")]) == 2
    # S3FD without its weights file: one clear error before any video is read
    torch.save(SyncNetV2().state_dict(), tmp_path / "s.model")
    assert evaluate.main(["--videos", videos["in_sync"], "--syncnet_model", str(tmp_path / "s.model"),
                          "--s3fd_path", str(tmp_path / "no_s3fd.pth")]) == 2
    assert "s3fd" in capsys.readouterr().err.lower()


# ------------------------------------------------------------------------------------------------
# sync_correct.py on a corpus
# ------------------------------------------------------------------------------------------------
def test_sync_correct_fixes_shifted_clips_and_drops_corrupted(corpus, expert_path, tmp_path, capsys):
    root = tmp_path / "pre"
    shutil.copytree(corpus["root"], root)
    fl = tmp_path / "fl"
    shutil.copytree(corpus["filelists"], fl)
    a, b, c = corpus["held_out"][0], corpus["held_out"][1], corpus["clips"][9]
    originals = {}
    for clip, k in ((a, 4), (b, -3)):              # the audio leads by k frames
        d = root / clip
        originals[clip] = audio.load_wav(str(d / "audio.wav"), audio.SAMPLE_RATE)
        audio.save_wav(shift_audio(originals[clip], -k), str(d / "audio.wav"), audio.SAMPLE_RATE)
    # corrupted: another clip's audio
    shutil.copy(root / corpus["clips"][0] / "audio.wav", root / c / "audio.wav")
    before = {p: p.read_text() for p in fl.iterdir()}

    report_path = tmp_path / "report.json"
    args = ["--data_root", str(root), "--checkpoint_path", expert_path, "--filelists_dir", str(fl),
            "--report", str(report_path), "--device", "cpu", "--quiet"]
    assert sync_correct.main(args) == 0
    rep = json.loads(report_path.read_text())
    rows = {r["clip"]: r for r in rep["clips"]}
    assert abs(rows[a]["offset"] - 4) <= 1 and rows[a]["action"] == "shift"
    assert abs(rows[b]["offset"] + 3) <= 1 and rows[b]["action"] == "shift"
    assert rows[c]["action"] == "exclude" and "confidence" in rows[c]["reason"]
    assert {p: p.read_text() for p in fl.iterdir()} == before          # report only: nothing changed
    assert not (root / a / "audio.orig.wav").exists()

    assert sync_correct.main(args + ["--fix"]) == 0
    rep = json.loads(report_path.read_text())
    rows = {r["clip"]: r for r in rep["clips"]}
    assert rep["counts"]["shifted"] >= 2 and rep["counts"]["excluded"] >= 1
    for clip in (a, b):
        assert abs(rows[clip]["offset_after"]) <= 1
        assert (root / clip / "audio.orig.wav").exists()
        done = json.loads((root / clip / "done.json").read_text())
        assert done["audio_shift_frames"] == rows[clip]["total_shift"]
        fixed = audio.load_wav(str(root / clip / "audio.wav"), audio.SAMPLE_RATE)
        mel = np.load(root / clip / "mel.npy")
        assert np.allclose(mel, audio.melspectrogram(fixed), atol=1e-5)   # the cached mel follows the audio
        if rows[clip]["offset"] == (4 if clip == a else -3):                # measured exactly: audio restored
            n = 1280 * 5
            assert np.abs(fixed[n:-n] - originals[clip][n:-n]).max() < 1e-3
    listed = "".join(p.read_text() for p in fl.iterdir())
    assert c not in listed and a in listed and b in listed
    assert rep["counts"]["removed_from_filelists"]["val"] == 1

    # running again measures from the original audio and does not shift twice
    assert sync_correct.main(args + ["--fix"]) == 0
    rep2 = json.loads(report_path.read_text())
    rows2 = {r["clip"]: r for r in rep2["clips"]}
    for clip in (a, b):
        assert rows2[clip]["prior_shift"] == rows[clip]["total_shift"]
        assert abs(rows2[clip]["offset"]) <= 1


def test_sync_correct_errors(corpus, expert_path, tmp_path, capsys):
    assert sync_correct.main(["--data_root", str(tmp_path / "none"), "--checkpoint_path", expert_path]) == 2
    assert sync_correct.main(["--data_root", corpus["root"], "--checkpoint_path", str(tmp_path / "x.pth")]) == 2
    assert sync_correct.main(["--data_root", corpus["root"], "--checkpoint_path", expert_path, "--fix",
                              "--filelists_dir", str(tmp_path / "nofl")]) == 2
    with pytest.raises(SystemExit):
        sync_correct.main(["--data_root", corpus["root"], "--checkpoint_path", expert_path, "--min_confidence", "x"])
