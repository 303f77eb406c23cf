"""The models reproduce the published implementations: same state-dict keys and shapes, and with
the fill rule's weights the same outputs as the reference code (tests/fixtures/reference)."""
import json
import os

import numpy as np
import pytest
import torch

from fill_rule import fill_state_dict
from models import SyncNet_color, Wav2Lip, Wav2Lip_disc_qual

from conftest import REFERENCE, ROOT

META = json.load(open(os.path.join(REFERENCE, "models.json")))
CASES = {
    "wav2lip96": (Wav2Lip, 96), "wav2lip96_seq": (Wav2Lip, 96), "wav2lip288": (Wav2Lip, 288),
    "disc96": (Wav2Lip_disc_qual, 96), "disc288": (Wav2Lip_disc_qual, 288),
    "syncnet96": (SyncNet_color, 96), "syncnet288": (SyncNet_color, 288),
}


def _inputs(npz):
    out, i = [], 0
    while f"input{i}" in npz:
        x = npz[f"input{i}"]
        out.append(torch.from_numpy(x.astype(np.float32) / 255 if x.dtype == np.uint8 else x))
        i += 1
    return out


def test_every_reference_case_is_covered():
    assert set(META["models"]) == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_dict_keys_and_shapes(case):
    cls, size = CASES[case]
    model = cls(img_size=size)
    expected = {k: list(v) for k, v in META["models"][case]["state_dict"].items()}
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)  # same keys in the same order
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == META["models"][case]["params"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_reference(case):
    cls, size = CASES[case]
    model = cls(img_size=size)
    model.load_state_dict(fill_state_dict(model.state_dict(), META["seed"]))
    model.eval()
    ref = np.load(os.path.join(REFERENCE, case + ".npz"))
    with torch.no_grad():
        outs = model(*_inputs(ref))
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert len(outs) == len(META["models"][case]["outputs"])
    for j, out in enumerate(outs):
        np.testing.assert_allclose(out.numpy(), ref[f"output{j}"], rtol=1e-4, atol=1e-5)


def test_fill_rule_is_sensitive_to_wrong_weights():
    # guard against a vacuous comparison: different weights must give a different output
    model = Wav2Lip(img_size=96)
    model.load_state_dict(fill_state_dict(model.state_dict(), META["seed"] + 1))
    model.eval()
    ref = np.load(os.path.join(REFERENCE, "wav2lip96.npz"))
    with torch.no_grad():
        out = model(*_inputs(ref)).numpy()
    assert not np.allclose(out, ref["output0"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [Wav2Lip, Wav2Lip_disc_qual, SyncNet_color])
@pytest.mark.parametrize("size", [96, 288])
def test_reduced_width_runs_and_keeps_shapes(cls, size):
    model = cls(img_size=size, width=0.25).eval()
    full = sum(p.numel() for p in cls(img_size=size).parameters())
    assert sum(p.numel() for p in model.parameters()) < full / 8
    with torch.no_grad():
        if cls is Wav2Lip:
            out = model(torch.zeros(2, 1, 80, 16), torch.rand(2, 6, size, size))
            assert out.shape == (2, 3, size, size)
        elif cls is Wav2Lip_disc_qual:
            out = model(torch.rand(1, 3, 5, size, size))
            assert out.shape == (5, 1)
        else:
            a, f = model(torch.zeros(2, 1, 80, 16), torch.rand(2, 15, size // 2, size))
            assert a.shape == f.shape == (2, model.embedding_dim)


def test_disc_perceptual_forward_follows_input_device_and_is_finite():
    disc = Wav2Lip_disc_qual(img_size=96, width=0.25)
    loss = disc.perceptual_forward(torch.rand(1, 3, 5, 96, 96))
    assert loss.device.type == "cpu" and torch.isfinite(loss)


def test_no_cuda_calls_in_source():
    offenders = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("__pycache__", "fixtures")]
        for name in filenames:
            if name.endswith(".py") and name != os.path.basename(__file__):
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    if ".cuda()" in fh.read():
                        offenders.append(os.path.join(dirpath, name))
    assert offenders == []
