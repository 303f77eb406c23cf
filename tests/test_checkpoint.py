"""Checkpoint loading: published and wrapped formats, layout inference, clear refusals."""
import os

import pytest
import torch

from models import CheckpointError, SyncNet_color, Wav2Lip, Wav2Lip_disc_qual, load_model


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny_generator():
    torch.manual_seed(0)
    return Wav2Lip(img_size=96, width=0.25).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["published", "bare", "orig_mod", "module_orig_mod"])
def test_accepts_published_and_wrapped_formats(tmp_path, tiny_generator, wrap):
    sd = tiny_generator.state_dict()
    obj = {
        "published": {"state_dict": _prefixed(sd, "module."), "optimizer": None, "global_step": 93000,
                      "global_epoch": 7},
        "bare": sd,
        "orig_mod": _prefixed(sd, "_orig_mod."),
        "module_orig_mod": {"state_dict": _prefixed(sd, "module._orig_mod.")},
    }[wrap]
    loaded = load_model(_save(obj, tmp_path / "g.pth"), kind="generator")
    assert loaded.kind == "generator" and loaded.img_size == 96 and loaded.width == 0.25
    assert _same_weights(loaded.model, tiny_generator)
    if wrap == "published":
        assert loaded.checkpoint["global_step"] == 93000


@pytest.mark.parametrize("cls,kind", [(Wav2Lip, "generator"), (SyncNet_color, "expert"),
                                      (Wav2Lip_disc_qual, "disc")])
@pytest.mark.parametrize("size,width", [(96, 1.0), (288, 0.25), (96, 0.3)])
def test_infers_layout_and_width(tmp_path, cls, kind, size, width):
    model = cls(img_size=size, width=width)
    loaded = load_model(_save({"state_dict": model.state_dict()}, tmp_path / "m.pth"), kind=kind)
    assert (loaded.img_size, loaded.width) == (size, pytest.approx(width, abs=0.01))
    assert _same_weights(loaded.model, model)


def test_refuses_wrong_layout_when_size_is_required(tmp_path, tiny_generator):
    path = _save(tiny_generator.state_dict(), tmp_path / "g.pth")
    with pytest.raises(CheckpointError, match="96x96 generator, but 288x288"):
        load_model(path, kind="generator", img_size=288)


def test_refuses_expert_given_as_generator(tmp_path):
    path = _save({"state_dict": SyncNet_color(width=0.25).state_dict()}, tmp_path / "lipsync_expert.pth")
    with pytest.raises(CheckpointError, match=r"lip-sync expert.*generator.*was expected"):
        load_model(path, kind="generator")


def test_refuses_s3fd_given_as_generator(tmp_path):
    from face_alignment.detection.sfd.net_s3fd import s3fd

    path = _save(s3fd().state_dict(), tmp_path / "s3fd.pth")
    with pytest.raises(CheckpointError, match="S3FD face-detector"):
        load_model(path, kind="generator")


def test_refuses_truncated_file(tmp_path, tiny_generator):
    path = _save({"state_dict": tiny_generator.state_dict()}, tmp_path / "g.pth")
    data = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n" * 10])
def test_refuses_garbage(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_model(str(path))


def test_refuses_torchscript_archive(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = str(tmp_path / "scripted.pt")
    scripted.save(path)
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(str(tmp_path / "nope.pth"))


def test_refuses_mismatched_shapes(tmp_path, tiny_generator):
    sd = dict(tiny_generator.state_dict())
    key = "face_encoder_blocks.1.0.conv_block.0.weight"
    sd[key] = torch.zeros(3, 3, 3, 3)
    path = _save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(path)


def test_saved_width_is_used_exactly(tmp_path):
    model = Wav2Lip(img_size=96, width=0.3)
    path = _save({"state_dict": model.state_dict(), "hparams": {"model_width": 0.3}}, tmp_path / "g.pth")
    assert load_model(path).width == 0.3
    assert os.path.getsize(path) > 0
