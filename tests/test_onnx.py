"""ONNX export (export_onnx.py) against the published reference outputs and torch, and inference.py /
the engine running an exported generator through ONNX Runtime with the frames torch gives."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import export_onnx  # noqa: E402
from conftest import FIXTURES, REFERENCE  # noqa: E402
from fill_rule import fill_state_dict  # noqa: E402
from lipsync.render.generator import Generator  # noqa: E402
from lipsync.render.inference import InferenceConfig, run_inference  # noqa: E402
from lipsync.render.onnx_model import (FP32_TOLERANCE, OPSET, OnnxError, OnnxGenerator, example_inputs,  # noqa: E402
                                max_abs_difference, metadata, open_generator, session)
from media import make_face_video  # noqa: E402
from models import SyncNet_color, Wav2Lip  # noqa: E402

SEED = json.load(open(os.path.join(REFERENCE, "models.json")))["seed"]
TRAINED = os.path.join(FIXTURES, "tiny_generator_trained.pth")
WAV = os.path.join(REFERENCE, "speechlike_16k.wav")


def reference_inputs(npz):
    """The npz's input0, input1, ... as the models take them (uint8 images -> float32 / 255)."""
    out, i = [], 0
    while f"input{i}" in npz:
        x = npz[f"input{i}"]
        out.append(x.astype(np.float32) / 255 if x.dtype == np.uint8 else x)
        i += 1
    return out


@pytest.mark.parametrize("case,cls,size,kind", [("wav2lip96", Wav2Lip, 96, "generator"),
                                                ("syncnet96", SyncNet_color, 96, "expert"),
                                                ("wav2lip288", Wav2Lip, 288, "generator")])
def test_export_matches_the_published_reference(tmp_path, capsys, case, cls, size, kind):
    """Fill-rule weights (the published layout's keys) -> export -> ONNX Runtime on the reference
    inputs gives the reference implementation's outputs, and torch's, within FP32_TOLERANCE."""
    model = cls(img_size=size)
    ckpt = tmp_path / "model.pth"
    torch.save({"state_dict": fill_state_dict(model.state_dict(), SEED)}, ckpt)
    out = tmp_path / "model.onnx"
    assert export_onnx.main(["--checkpoint_path", str(ckpt), "--out", str(out)]) == 0  # --kind auto
    line = capsys.readouterr().out
    assert f"{size}x{size} {kind}" in line and f"opset {OPSET}" in line and "onnx.checker passed" in line
    ref = np.load(os.path.join(REFERENCE, case + ".npz"))
    inputs = reference_inputs(ref)
    sess = session(str(out))
    assert metadata(sess)["kind"] == kind and sess.get_inputs()[0].shape[0] == "batch"
    got = sess.run(None, dict(zip(["mel", "face"], inputs)))
    vs_reference = max(float(np.abs(g - ref[f"output{j}"]).max()) for j, g in enumerate(got))
    vs_torch = max_abs_difference(str(out), str(ckpt), inputs)
    print(f"{case}: max |ONNX Runtime - reference| {vs_reference:.3g}, |ONNX Runtime - torch| {vs_torch:.3g}")
    assert vs_reference <= FP32_TOLERANCE and vs_torch <= FP32_TOLERANCE


@pytest.fixture(scope="module")
def trained_onnx(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert export_onnx.main(["--checkpoint_path", TRAINED, "--out", str(out), "--kind", "generator"]) == 0
    return str(out)


def test_dynamic_batch_and_the_generator_object(trained_onnx):
    diff = max_abs_difference(trained_onnx, TRAINED, example_inputs("generator", 96, batch=5, seed=3))
    assert diff <= FP32_TOLERANCE
    g = open_generator(trained_onnx, device="cpu", precision="auto")
    assert isinstance(g, OnnxGenerator) and (g.img_size, g.width, g.precision, g.bank) == (96, 0.25, "fp32", None)
    t = Generator(TRAINED, device="cpu", precision="fp32", threads=1, micro_batch=8)
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (11, 96, 96, 3), dtype=np.uint8)
    mels = np.clip(1.5 * rng.standard_normal((11, 80, 16)), -4, 4).astype(np.float32)
    a, b = t.generate(mels, faces), g.generate(mels, faces)
    assert a.shape == b.shape == (11, 96, 96, 3)
    # float differences of 1e-6 can move a value across a truncation boundary: at most one level, rarely
    d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 1e-3
    with pytest.raises(Exception, match="fp32"):
        OnnxGenerator(trained_onnx, precision="bf16")


def test_inference_with_an_onnx_file_gives_torchs_frames(trained_onnx, tmp_path):
    video = make_face_video(tmp_path / "face.mp4", 20)
    frames = {}
    for name, path in (("torch", TRAINED), ("onnx", trained_onnx)):
        got = {}
        cfg = InferenceConfig(checkpoint_path=path, face=video, audio=WAV, outfile=str(tmp_path / f"{name}.mp4"),
                              face_detector="lbp", det_cache_dir="", progress=False, device="cpu", precision="fp32",
                              threads=1)
        run_inference(cfg, frame_sink=lambda i, f: got.__setitem__(i, f.copy()))
        assert os.path.getsize(cfg.outfile) > 0
        frames[name] = np.stack([got[i] for i in range(len(got))])
    d = np.abs(frames["torch"].astype(int) - frames["onnx"].astype(int))
    print(f"inference.py frames, torch vs ONNX Runtime: max difference {d.max()}, differing values {(d > 0).mean():.2e}")
    assert frames["torch"].shape == frames["onnx"].shape and d.max() <= 1 and (d > 0).mean() < 1e-3


def test_an_expert_or_garbage_is_refused_as_a_generator(tmp_path):
    model = SyncNet_color(img_size=96, width=0.125)
    ckpt = tmp_path / "e.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    out = tmp_path / "e.onnx"
    assert export_onnx.main(["--checkpoint_path", str(ckpt), "--out", str(out)]) == 0
    with pytest.raises(OnnxError, match="holds a model of kind 'expert', not a generator"):
        OnnxGenerator(str(out))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(OnnxError, match="ONNX Runtime cannot load"):
        OnnxGenerator(str(bad))
