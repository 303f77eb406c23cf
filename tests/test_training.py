"""The four training scripts on a tiny generated preprocessed corpus: checkpoints, resume, DDP,
the dataset's rules, and a trained checkpoint driving inference."""
import glob
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import audio
import color_syncnet_train
import hq_wav2lip_train
import wav2lip_train
import wloss_hq_wav2lip_train
from conftest import REFERENCE, ROOT
from hparams import get_hparams
from lipsync.train import synthetic as S
from lipsync.train.data import DatasetError, GeneratorDataset, SyncDataset
from models import cosine_sync_probability, load_model

FAST = "eval_steps=1,eval_interval=2,syncnet_eval_interval=2,checkpoint_interval=100,batch_size=2,syncnet_batch_size=4"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    clips = S.write_preprocessed(str(root))
    fl = tmp_path_factory.mktemp("filelists")
    (fl / "train.txt").write_text("\n".join(clips[:3]) + "\n")
    (fl / "val.txt").write_text(clips[3] + "\n")
    (fl / "test.txt").write_text(clips[3] + "\n")
    return {"root": str(root), "filelists": str(fl), "clips": clips}


def common(data, ckdir, steps, extra=FAST):
    return ["--data_root", data["root"], "--checkpoint_dir", str(ckdir), "--filelists_dir", data["filelists"],
            "--preset", "tiny", "--hparams", extra, "--max_steps", str(steps), "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def expert(data, tmp_path_factory):
    ck = tmp_path_factory.mktemp("expert")
    assert color_syncnet_train.main(common(data, ck, 3)) == 0
    return ck


def test_expert_trains_and_writes_published_checkpoints(expert):
    names = sorted(os.listdir(expert))
    assert "checkpoint_step000000001.pth" in names and "checkpoint_step000000003.pth" in names
    ckpt = torch.load(expert / "checkpoint_step000000003.pth", weights_only=True)
    for key in ("state_dict", "optimizer", "global_step", "global_epoch", "hparams"):
        assert key in ckpt
    assert ckpt["global_step"] == 3
    loaded = load_model(str(expert / "checkpoint_step000000003.pth"), kind="expert")
    assert loaded.width == 0.25 and loaded.img_size == 96
    assert glob.glob(str(expert / "logs" / "events.out.tfevents.*"))


@pytest.mark.parametrize("script,prefixes", [(wav2lip_train, ["wav2lip_"]),
                                             (hq_wav2lip_train, ["wav2lip_", "disc_"]),
                                             (wloss_hq_wav2lip_train, ["wav2lip_", "disc_"])])
def test_generator_scripts_train(data, expert, tmp_path, script, prefixes):
    args = common(data, tmp_path, 2) + ["--syncnet_checkpoint_path", str(expert / "checkpoint_step000000001.pth")]
    assert script.main(args) == 0
    for prefix in prefixes:
        assert os.path.isfile(tmp_path / f"{prefix}checkpoint_step000000002.pth")
    loaded = load_model(str(tmp_path / "wav2lip_checkpoint_step000000002.pth"), kind="generator")
    assert loaded.checkpoint["global_step"] == 2
    if "disc_" in prefixes:
        assert load_model(str(tmp_path / "disc_checkpoint_step000000002.pth"), kind="disc").img_size == 96


def test_resume_continues_step_schedule_and_optimizer(data, expert, tmp_path):
    expert_ckpt = str(expert / "checkpoint_step000000001.pth")
    # a threshold every eval passes: the sync-loss weight switches on at the first evaluation (step 2)
    extra = FAST + ",syncnet_wt_threshold=100"
    assert wav2lip_train.main(common(data, tmp_path, 2, extra) + ["--syncnet_checkpoint_path", expert_ckpt]) == 0
    first = torch.load(tmp_path / "wav2lip_checkpoint_step000000002.pth", weights_only=True)
    assert first["syncnet_wt"] == pytest.approx(0.01)
    resume = ["--checkpoint_path", str(tmp_path / "wav2lip_checkpoint_step000000002.pth")]
    assert wav2lip_train.main(common(data, tmp_path, 4) + ["--syncnet_checkpoint_path", expert_ckpt] + resume) == 0
    second = torch.load(tmp_path / "wav2lip_checkpoint_step000000004.pth", weights_only=True)
    assert second["global_step"] == 4 and second["syncnet_wt"] == pytest.approx(0.01)
    adam_steps = {float(s["step"]) for s in second["optimizer"]["state"].values()}
    assert adam_steps == {4.0}  # the optimizer continued, not restarted
    # asking for a step already reached does nothing and succeeds
    assert wav2lip_train.main(common(data, tmp_path, 4) + ["--syncnet_checkpoint_path", expert_ckpt, "--checkpoint_path",
                                                          str(tmp_path / "wav2lip_checkpoint_step000000004.pth")]) == 0


def test_resume_mid_epoch_trains_what_an_uninterrupted_run_trains(data, tmp_path):
    # 13 training pairs per epoch, batches of 4: 3 batches an epoch; stop after 2, go on to 5 (next epoch)
    extra = "syncnet_eval_interval=100,syncnet_checkpoint_interval=100,syncnet_batch_size=4"
    assert color_syncnet_train.main(common(data, tmp_path / "whole", 5, extra)) == 0
    assert color_syncnet_train.main(common(data, tmp_path / "parts", 2, extra)) == 0
    part = torch.load(tmp_path / "parts" / "checkpoint_step000000002.pth", weights_only=True)
    assert (part["global_epoch"], part["epoch_step"]) == (0, 2)
    resume = ["--checkpoint_path", str(tmp_path / "parts" / "checkpoint_step000000002.pth")]
    assert color_syncnet_train.main(common(data, tmp_path / "parts", 5, extra) + resume) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint_step000000005.pth", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "checkpoint_step000000005.pth", weights_only=True)
    assert (parts["global_epoch"], parts["epoch_step"]) == (whole["global_epoch"], whole["epoch_step"]) == (1, 2)
    for k, v in whole["state_dict"].items():
        assert torch.allclose(v.float(), parts["state_dict"][k].float(), atol=1e-6), k


def test_expert_weight_decay_is_adamw_and_resumes_exactly(data, tmp_path):
    from hparams import HParamsError

    with pytest.raises(HParamsError, match="syncnet_weight_decay"):
        get_hparams("tiny", "syncnet_weight_decay=-0.1")
    extra = "syncnet_eval_interval=100,syncnet_checkpoint_interval=100,syncnet_batch_size=4,syncnet_weight_decay=0.5"
    assert color_syncnet_train.main(common(data, tmp_path / "whole", 4, extra)) == 0
    assert color_syncnet_train.main(common(data, tmp_path / "parts", 2, extra)) == 0
    resume = ["--checkpoint_path", str(tmp_path / "parts" / "checkpoint_step000000002.pth")]
    assert color_syncnet_train.main(common(data, tmp_path / "parts", 4, extra) + resume) == 0
    whole = torch.load(tmp_path / "whole" / "checkpoint_step000000004.pth", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "checkpoint_step000000004.pth", weights_only=True)
    assert whole["optimizer"]["param_groups"][0]["weight_decay"] == 0.5
    for k, v in whole["state_dict"].items():
        assert torch.allclose(v.float(), parts["state_dict"][k].float(), atol=1e-6), k
    # the same steps without decay end elsewhere: the decay reached the weights
    assert color_syncnet_train.main(common(data, tmp_path / "plain", 4, extra.replace("=0.5", "=0"))) == 0
    plain = torch.load(tmp_path / "plain" / "checkpoint_step000000004.pth", weights_only=True)
    assert "weight_decay" not in plain["optimizer"]["param_groups"][0] or \
        plain["optimizer"]["param_groups"][0]["weight_decay"] == 0
    assert any(not torch.allclose(v.float(), plain["state_dict"][k].float()) for k, v in whole["state_dict"].items()
               if v.is_floating_point())


def test_cosine_learning_rate_schedule_resumes(data, tmp_path):
    from hparams import HParamsError
    from lipsync.train.training import lr_factor

    hp = get_hparams("tiny", "lr_schedule=cosine,lr_decay_steps=4,lr_min_ratio=0.1")
    assert [round(lr_factor(s, hp), 4) for s in (0, 2, 4, 9)] == [1.0, 0.55, 0.1, 0.1]
    assert lr_factor(3, get_hparams("tiny")) == 1.0  # constant unless asked for
    with pytest.raises(HParamsError):
        get_hparams("tiny", "lr_schedule=step")
    extra = FAST + ",syncnet_lr=1e-3,lr_schedule=cosine,lr_decay_steps=4,lr_min_ratio=0.1"
    assert color_syncnet_train.main(common(data, tmp_path, 2, extra)) == 0
    ck2 = torch.load(tmp_path / "checkpoint_step000000002.pth", weights_only=True)
    assert ck2["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * lr_factor(1, hp))  # step 2 used factor(1)
    resume = ["--checkpoint_path", str(tmp_path / "checkpoint_step000000002.pth")]
    assert color_syncnet_train.main(common(data, tmp_path, 5, extra) + resume) == 0
    ck5 = torch.load(tmp_path / "checkpoint_step000000005.pth", weights_only=True)
    assert ck5["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)   # reached the floor after resume


def test_keeps_last_n_and_best(data, tmp_path):
    extra = FAST + ",keep_last_checkpoints=2,syncnet_checkpoint_interval=1"
    assert color_syncnet_train.main(common(data, tmp_path, 4, extra)) == 0
    steps = sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint_step"))
    assert steps == ["checkpoint_step000000003.pth", "checkpoint_step000000004.pth"]
    assert os.path.isfile(tmp_path / "checkpoint_best.pth")
    assert not glob.glob(str(tmp_path / "*.tmp*"))


def test_expert_best_checkpoint_by_validation_auc(data, tmp_path, monkeypatch):
    """syncnet_best_metric=auc: every evaluation reports the ROC AUC of its pairs, and checkpoint_best.pth
    is the step with the highest one (not the lowest loss); a resumed run keeps that best, and one
    resumed from a loss-selected checkpoint does not compare AUCs with its loss."""
    from lipsync.train import trainers

    scripted = iter([0.6, 0.9, 0.7, 0.95, 0.5])            # AUCs of the evaluations at steps 2, 4, 6, ...
    real = trainers.ExpertTrainer.evaluate
    seen = {}

    def evaluate(self, writer=None):
        metrics = real(self, writer)
        assert 0.0 <= metrics["auc"] <= 1.0 and "loss" in metrics
        metrics["auc"] = next(scripted)
        seen[self.global_step] = metrics["auc"]
        return metrics

    monkeypatch.setattr(trainers.ExpertTrainer, "evaluate", evaluate)
    extra = FAST + ",syncnet_best_metric=auc,keep_last_checkpoints=10"
    assert color_syncnet_train.main(common(data, tmp_path, 4, extra)) == 0
    best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
    assert seen == {2: 0.6, 4: 0.9} and best["global_step"] == 4
    assert best["best_metric"] == "auc" and best["best_val"] == pytest.approx(0.9)
    # resumed: 0.7 at step 6 does not beat 0.9, 0.95 at step 8 does
    assert color_syncnet_train.main(common(data, tmp_path, 8, extra) + ["--checkpoint_path",
                                    str(tmp_path / "checkpoint_step000000004.pth")]) == 0
    best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
    assert best["global_step"] == 8 and best["best_val"] == pytest.approx(0.95)
    # a checkpoint whose best was a loss (1.5, which read as an AUC no AUC beats): AUC 0.5 is the best
    ck = torch.load(tmp_path / "checkpoint_step000000008.pth", weights_only=True)
    ck.update(best_val=1.5, best_metric="loss")
    torch.save(ck, tmp_path / "loss_selected.pth")
    assert color_syncnet_train.main(common(data, tmp_path, 10, extra) + ["--checkpoint_path",
                                    str(tmp_path / "loss_selected.pth")]) == 0
    best = torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)
    assert best["global_step"] == 10 and best["best_val"] == pytest.approx(0.5)


def test_trained_checkpoint_drives_inference(data, expert, tmp_path):
    import inference

    ck = tmp_path / "ck"
    assert wav2lip_train.main(common(data, ck, 1) + ["--syncnet_checkpoint_path",
                                                      str(expert / "checkpoint_step000000001.pth")]) == 0
    face = os.path.join(data["root"], data["clips"][0], "0.jpg")
    out = tmp_path / "out.mp4"
    assert inference.main(["--checkpoint_path", str(ck / "wav2lip_checkpoint_step000000001.pth"), "--face", face,
                           "--audio", os.path.join(REFERENCE, "speechlike_16k.wav"), "--outfile", str(out),
                           "--box", "0", "100", "0", "100", "--quiet"]) == 0
    assert out.exists()


def test_ddp_two_processes_gloo(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           os.path.join(ROOT, "color_syncnet_train.py")] + common(data, tmp_path, 2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoint_step000000002.pth", weights_only=True)
    assert ckpt["global_step"] == 2
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])  # rank 0 saves the bare model


def test_ddp_wgan_two_processes(data, expert, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           os.path.join(ROOT, "wloss_hq_wav2lip_train.py")] + common(data, tmp_path, 1) + [
        "--syncnet_checkpoint_path", str(expert / "checkpoint_step000000001.pth")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.isfile(tmp_path / "disc_checkpoint_step000000001.pth")


# ------------------------------------------------------------------------------------------------
def test_sync_dataset_balanced_and_offset(data):
    hp = get_hparams("tiny")
    ds = SyncDataset([os.path.join(data["root"], c) for c in data["clips"]], hp, seed=0, samples_per_epoch=20)
    labels = [float(ds[i][2]) for i in range(20)]
    assert labels == [1.0, 0.0] * 10
    x, mel, y = ds[0]
    assert x.shape == (15, 48, 96) and mel.shape == (1, 80, 16)
    assert torch.equal(ds[3][0], ds[3][0])  # deterministic for (seed, epoch, index)
    clip = ds.clips[0]
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = int(clip.starts[rng.integers(len(clip.starts))])
        assert abs(ds.far_start(clip, s, rng, 5) - s) >= 5


def test_frame_cache_gives_the_same_samples_within_its_budget(data):
    clips = [os.path.join(data["root"], c) for c in data["clips"]]
    plain = SyncDataset(clips, get_hparams("tiny", "frame_cache_mb=0"), seed=0, samples_per_epoch=12)
    cached = SyncDataset(clips, get_hparams("tiny", "frame_cache_mb=1"), seed=0, samples_per_epoch=12)
    for i in range(12):
        for a, b in zip(plain[i], cached[i]):
            assert torch.equal(a, b)
    for i in range(12):                                  # second epoch over the same indices: cache hits
        assert torch.equal(plain[i][0], cached[i][0])
    assert plain._cache == {}
    assert 0 < sum(v.nbytes for v in cached._cache.values()) <= 2**20   # never past the budget


def test_expert_augmentation_only_on_training_windows(data):
    clips = [os.path.join(data["root"], c) for c in data["clips"]]
    hp = get_hparams("tiny", "syncnet_augment=true")
    plain = SyncDataset(clips, get_hparams("tiny"), seed=0, samples_per_epoch=8)
    train = SyncDataset(clips, hp, seed=0, samples_per_epoch=8)
    val = SyncDataset(clips, hp, seed=0, samples_per_epoch=8, split="val")
    for i in range(8):
        assert torch.equal(plain[i][0], val[i][0])                  # evaluation sees the data as it is
        assert torch.equal(plain[i][1], train[i][1]) and torch.equal(plain[i][2], train[i][2])
    changed = [not torch.equal(plain[i][0], train[i][0]) for i in range(8)]
    assert all(changed)
    x = train[0][0]
    assert x.shape == (15, 48, 96) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(train[5][0], train[5][0])                    # still deterministic per index


def test_generator_dataset_uses_the_inference_alignment(data):
    hp = get_hparams("tiny")
    ds = GeneratorDataset([os.path.join(data["root"], data["clips"][0])], hp, seed=0)
    x, indiv, mel, y = ds[0]
    assert x.shape == (6, 5, 96, 96) and y.shape == (3, 5, 96, 96) and indiv.shape == (5, 1, 80, 16)
    assert float(x[:3, :, 48:].abs().max()) == 0.0  # lower half of the target masked
    clip = ds.clips[0]
    # recover the window start from the sync mel window, then check every per-frame window
    start = next(int(s) for s in clip.starts
                 if np.array_equal(audio.crop_mel_window(clip.mel, int(s), 25.0), mel[0].numpy()))
    for k in range(5):
        np.testing.assert_array_equal(indiv[k, 0].numpy(), audio.crop_mel_window(clip.mel, start + k, 25.0))


def test_dataset_fails_clearly_and_counts_drops(data, tmp_path):
    hp = get_hparams("tiny")
    short = tmp_path / "short"
    short.mkdir()
    for k in range(3):
        cv2.imwrite(str(short / f"{k}.jpg"), np.zeros((20, 20, 3), np.uint8))
    np.save(short / "mel.npy", np.zeros((80, 40), np.float32))
    with pytest.raises(DatasetError, match="no usable train clips.*too short.*missing directory"):
        SyncDataset([str(short), str(tmp_path / "nope")], hp)
    ds = SyncDataset([str(short), os.path.join(data["root"], data["clips"][0])], hp)
    assert len(ds.clips) == 1 and sum(ds.dropped.values()) == 1


def test_missing_filelist_is_a_clear_error(data, tmp_path, capsys):
    args = common(data, tmp_path, 1)
    args[args.index("--filelists_dir") + 1] = str(tmp_path / "none")
    assert color_syncnet_train.main(args) == 2
    assert "filelist not found" in capsys.readouterr().err


def test_expert_probability_is_safe():
    e = torch.nn.functional.normalize(torch.rand(4, 8), dim=1)
    p = cosine_sync_probability(e, e.clone() * (1 + 1e-7))
    assert (p < 1).all() and (p > 0).all()
    loss = torch.nn.functional.binary_cross_entropy(p.unsqueeze(1), torch.zeros(4, 1))
    assert torch.isfinite(loss)


def test_unknown_hparam_is_rejected(data, tmp_path):
    with pytest.raises(SystemExit):
        color_syncnet_train.main(common(data, tmp_path, 1, "not_a_key=1"))


def test_prune_keeps_the_checkpoint_just_written(tmp_path):
    """A fresh run in a folder where an earlier run left higher steps keeps its own new checkpoint;
    latest_checkpoint names the highest step (what the demo resumes from)."""
    from lipsync.train.checkpoints import latest_checkpoint, prune, step_path

    for step in (700, 750, 800):
        open(step_path(str(tmp_path), "", step), "wb").close()
    open(step_path(str(tmp_path), "wav2lip_", 900), "wb").close()
    assert latest_checkpoint(str(tmp_path), "") == step_path(str(tmp_path), "", 800)
    new = step_path(str(tmp_path), "", 1)
    open(new, "wb").close()
    prune(str(tmp_path), "", 3, current=new)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(step_path(str(tmp_path), p, s))
                                                  for p, s in (("", 1), ("", 750), ("", 800), ("wav2lip_", 900)))
    prune(str(tmp_path), "", 2)
    assert latest_checkpoint(str(tmp_path), "") == step_path(str(tmp_path), "", 800)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("checkpoint_")]) == 2


def without_preset(args):
    i = args.index("--preset")
    return args[:i] + args[i + 2:]


def test_generator_takes_the_experts_layout_and_refuses_another(data, expert, tmp_path, capsys):
    """No --preset: the generator trainer trains the expert's preset (recorded in both checkpoints)
    and says so first; an explicit preset of another face size is one error line naming both."""
    expert_ckpt = str(expert / "checkpoint_step000000001.pth")
    assert torch.load(expert_ckpt, weights_only=True)["preset"] == "tiny"
    args = without_preset(common(data, tmp_path, 1)) + ["--syncnet_checkpoint_path", expert_ckpt]
    capsys.readouterr()
    assert wav2lip_train.main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("wav2lip_train.py: training the 96x96 layout (preset tiny, width 0.25; from the expert")
    assert "--preset 288 trains the 288x288 HQ layout" in first
    ckpt = torch.load(tmp_path / "wav2lip_checkpoint_step000000001.pth", weights_only=True)
    assert (ckpt["preset"], ckpt["hparams"]["img_size"], ckpt["hparams"]["model_width"]) == ("tiny", 96, 0.25)
    for script in (wav2lip_train, hq_wav2lip_train):
        assert script.main(without_preset(common(data, tmp_path / "x", 1)) + [
            "--preset", "288", "--syncnet_checkpoint_path", expert_ckpt]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: the expert {expert_ckpt} is a 96x96 model (preset tiny), but preset 288 (from "
                       "--preset) trains a 288x288 generator: pass --preset tiny, or an expert trained with --preset 288"]
    assert not os.path.exists(tmp_path / "x")
