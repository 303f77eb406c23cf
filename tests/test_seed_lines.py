"""The seed notebook's command lines, typed as written, train the 288x288 layout (issue 21).

The lines are copied verbatim from the notebook the project was created from
(``shared/seed/000_dc23ff519831a18b.txt``, the ``!python`` lines; when that file is beside the
checkout the test also checks they are still its lines) and run in a working folder laid out as the
notebook's (``../LSR2/...`` beside it, ``./savedmodel`` and ``filelists/`` inside it), each through its
script's ``main(argv)`` with ``argv`` exactly the line's words.

What the test changes, and why it is not the lines: the notebook's training lines run until the
user stops them (``nepochs`` is 2e17, as published), and a full-width 288 model does not fit two CPU
cores in seconds. Rather than add ``--max_steps`` / ``--hparams`` to the lines, or a hidden knob
(an environment variable) to the scripts, the test shrinks the ``288`` preset itself for its
duration: one epoch of one step (one 0.8 s training clip: two windows in one batch; batch norm
needs two), 1/16 of the channels. Everything that decides the layout (``img_size`` 288, the 288 block structure, the preset
recorded in the checkpoint, the expert -> generator hand-over) is the preset's own.

Not run here: ``generate_hq_videos.py`` and ``preprocess.py`` (their output does not depend on the
layout: crops are written at the detected size and resized by training; preprocess's default S3FD
detector needs the weights the notebook downloads with wget, which the tests do not have) and
``inference.py`` (same detector; it reads the layout from the checkpoint, as tested in
test_inference.py).
"""
import os
import shlex

import pytest

import color_syncnet_train
import generate_filelists
import hparams
import hq_wav2lip_train
import wav2lip_train
import wloss_hq_wav2lip_train
from conftest import ROOT
from lipsync.train import synthetic as S
from models.checkpoint import read_layout

SEED_FILE = os.path.join(os.path.dirname(ROOT), "shared", "seed", "000_dc23ff519831a18b.txt")
SEED_LINES = [
    "python generate_filelists.py --data_root ../LSR2/lrs2_preprocessed_288x288-demo",
    "python color_syncnet_train.py --data_root ../LSR2/lrs2_preprocessed_288x288-demo/ --checkpoint_dir ./savedmodel",
    "python wav2lip_train.py --data_root ../LSR2/lrs2_preprocessed_288x288-demo --checkpoint_dir ./savedmodel "
    "--syncnet_checkpoint_path ./savedmodel/checkpoint_step000000001.pth",
    "python hq_wav2lip_train.py --data_root ../LSR2/lrs2_preprocessed_288x288-demo --checkpoint_dir ./savedmodel "
    "--syncnet_checkpoint_path ./savedmodel/checkpoint_step000000001.pth",
    "python wloss_hq_wav2lip_train.py --data_root ../LSR2/lrs2_preprocessed_288x288-demo/ --checkpoint_dir ./savedmodel "
    "--syncnet_checkpoint_path ./savedmodel/checkpoint_step000000001.pth",
]
SCRIPTS = {"generate_filelists.py": generate_filelists, "color_syncnet_train.py": color_syncnet_train,
           "wav2lip_train.py": wav2lip_train, "hq_wav2lip_train.py": hq_wav2lip_train,
           "wloss_hq_wav2lip_train.py": wloss_hq_wav2lip_train}
KIND_OF_PREFIX = {"": "expert", "wav2lip_": "generator", "disc_": "disc"}
# one epoch of one step (one training clip of two windows, one batch of two), 1/16 of the channels
SMALL_288 = {"nepochs": 1, "model_width": 0.0625, "batch_size": 2, "syncnet_batch_size": 2, "num_workers": 0,
             "eval_steps": 1}


@pytest.mark.skipif(not os.path.isfile(SEED_FILE), reason="the seed notebook is not beside this checkout")
def test_the_lines_are_the_notebooks():
    with open(SEED_FILE, encoding="utf-8") as fh:
        typed = {line.strip()[1:].strip() for line in fh if line.strip().startswith("!python")}
    for line in SEED_LINES:
        assert line in typed, line


def written_checkpoints(folder):
    """{file name: read_layout(...)} of every checkpoint in ``folder`` (none before it exists)."""
    out = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".pth"):
            prefix = next(p for p in ("wav2lip_", "disc_", "") if name.startswith(p))
            out[name] = read_layout(os.path.join(folder, name), KIND_OF_PREFIX[prefix])
    return out


def test_seed_lines_as_typed_train_the_288_layout(tmp_path, monkeypatch, capsys):
    S.write_preprocessed(str(tmp_path / "LSR2" / "lrs2_preprocessed_288x288-demo"), groups=3, seconds=0.8)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setitem(hparams.PRESETS, "288", {**hparams.PRESETS["288"], **SMALL_288})
    seen = set()
    for line in SEED_LINES:
        words = shlex.split(line)
        assert words[0] == "python"
        assert SCRIPTS[words[1]].main(words[2:]) == 0, line
        out = capsys.readouterr().out
        if words[1].endswith("_train.py"):
            first = out.splitlines()[0]
            assert first.startswith(f"{words[1]}: training the 288x288 layout (preset 288")
            assert "--preset 96 trains the paper's 96x96 layout" in first
        for name, (ckpt, _, size, _) in written_checkpoints(work / "savedmodel").items():
            assert (size, ckpt["preset"], ckpt["hparams"]["img_size"]) == (288, "288", 288), name
            seen.add(name)
    assert seen == {"checkpoint_step000000001.pth", "wav2lip_checkpoint_step000000001.pth",
                    "disc_checkpoint_step000000001.pth"}
