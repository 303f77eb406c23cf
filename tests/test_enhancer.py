"""--enhancer {gfpgan,codeformer}: the published weights' layout loads through lipsync.render.enhance, the
restored face is mixed in only where the paste's weights are above 0, one forward per batch of faces,
and every way it can be refused says what to do.

No published weights here: each network is built with spandrel's classes, its state dict filled from a
seeded generator and saved as the releases ship it (``{"params_ema": state_dict}``; ``save_filled_weights``),
once per session.
Each test runs at most two 512 x 512 forwards (about 6 s for GFPGAN, 12 s for CodeFormer on one core).
"""
import importlib.util
import os
import re
import sys

import numpy as np
import pytest
import torch

from lipsync.render.blending import CpuComposer
from lipsync.render.enhance import (ENHANCE_SIZE, WEIGHTS, EnhancerError, FaceEnhancer, load_enhancer, read_state_dict,
                                    save_filled_weights)

pytest.importorskip("spandrel", reason="pip install -r requirements-faces.txt")
pytest.importorskip("spandrel_extra_arches", reason="pip install -r requirements-faces.txt")
HAVE_MODELS = (importlib.util.find_spec("dlib") is not None
               and importlib.util.find_spec("face_recognition_models") is not None)
BOX = (40, 200, 60, 196)  # (y1, y2, x1, x2) around the astronaut's face at 256x256 (tests/test_inference.py)


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """Paths of filled GFPGANv1.4.pth and codeformer.pth in the published layout."""
    d = tmp_path_factory.mktemp("enhancer_weights")
    return {name: save_filled_weights(name, str(d / WEIGHTS[name].file), seed=k) for k, name in enumerate(WEIGHTS)}


@pytest.fixture(scope="session")
def enhancers(weights):
    """The two enhancers, loaded once through the project's loader."""
    return {name: load_enhancer(name, path, "cpu") for name, path in weights.items()}


def astronaut_frame():
    from media import astronaut

    return astronaut()


def weights_over_frame(composer, frame_shape, box, mask=None):
    """The paste's weights over the whole frame, (H, W) float32: 0 outside the box and outside its rows."""
    y1, y2, x1, x2 = box
    r1, r2, m = composer.blender.weights(y2 - y1, x2 - x1, mask)
    full = np.zeros(frame_shape[:2], np.float32)
    full[y1 + r1:y1 + r2, x1:x2] = m
    return full


def darker(frame, box, size=96):
    """A stand-in generated face: the box's crop at the model's size, 40 grey levels darker."""
    from lipsync.render.blending import cut_crop

    return np.clip(cut_crop(frame, box, size).astype(int) - 40, 0, 255).astype(np.uint8)


def check_only_masked_pixels_change(plain, restored, weights):
    """Where the paste's weights are 0 the frames are equal bit for bit; where they are 1 the enhancer changed them."""
    assert np.array_equal(restored[weights == 0], plain[weights == 0])
    inside = np.abs(restored.astype(int) - plain)[weights >= 0.99]
    assert inside.size > 1000 and inside.mean() > 10, inside.mean()


# ---- loading ----------------------------------------------------------------------------------------
def test_published_layout_loads(weights, enhancers, tmp_path):
    from spandrel.architectures.GFPGAN import GFPGAN
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    assert isinstance(enhancers["gfpgan"].model, GFPGAN) and isinstance(enhancers["codeformer"].model, CodeFormer)
    for name, path in weights.items():
        saved = torch.load(path, weights_only=True)
        assert list(saved) == ["params_ema"]
        loaded = enhancers[name].model.state_dict()
        assert loaded.keys() == saved["params_ema"].keys()
        assert all(torch.equal(loaded[k], v) for k, v in saved["params_ema"].items())
    # a bare state dict with DataParallel's prefix is read as well
    bare = str(tmp_path / "bare.pth")
    state = read_state_dict(weights["gfpgan"])
    torch.save({"module." + k: v for k, v in list(state.items())}, bare)
    assert read_state_dict(bare).keys() == state.keys()


def test_wrong_or_missing_weights_are_clear_errors(weights, tmp_path):
    with pytest.raises(EnhancerError, match="not a CodeFormer state dict.*codeformer.pth"):
        load_enhancer("codeformer", weights["gfpgan"])
    with pytest.raises(EnhancerError, match="not a GFPGAN state dict.*GFPGANv1.4.pth"):
        load_enhancer("gfpgan", weights["codeformer"])
    wav2lip = str(tmp_path / "wav2lip.pth")
    torch.save({"state_dict": {"conv.weight": torch.zeros(3)}}, wav2lip)
    with pytest.raises(EnhancerError, match="not a GFPGAN state dict"):
        load_enhancer("gfpgan", wav2lip)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(EnhancerError, match="not a PyTorch weights file"):
        load_enhancer("gfpgan", str(text))
    with pytest.raises(EnhancerError, match="get GFPGANv1.4.pth from the GFPGAN releases.*--enhancer_path"):
        load_enhancer("gfpgan", None)
    with pytest.raises(EnhancerError, match="--enhancer_path not found.*codeformer.pth from the CodeFormer releases"):
        load_enhancer("codeformer", str(tmp_path / "codeformer.pth"))
    with pytest.raises(EnhancerError, match="fidelity, in \\[0, 1\\]"):
        load_enhancer("codeformer", weights["codeformer"], fidelity=1.5)
    assert load_enhancer("none", None) is None


@pytest.mark.parametrize("name,module", [("gfpgan", "spandrel.architectures.GFPGAN"),
                                         ("codeformer", "spandrel_extra_arches.architectures.CodeFormer")])
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, name, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(EnhancerError, match="pip install -r requirements-faces.txt"):
        load_enhancer(name, str(tmp_path / "w.pth"))


# ---- restoring ----------------------------------------------------------------------------------------
def test_gfpgan_restores_only_inside_the_ellipse_in_one_forward(enhancers):
    """Two faces of a group: one forward of both, and the frames change only where the paste's weights do."""
    enhancer = enhancers["gfpgan"]
    frame = astronaut_frame()
    boxes = [BOX, (30, 180, 80, 210)]
    plain_comp, comp = CpuComposer(96, "feather"), CpuComposer(96, "feather", enhancer=enhancer)
    faces = np.stack([darker(frame, b) for b in boxes])
    plain = plain_comp.paste([frame.copy(), frame.copy()], faces, boxes)
    restored = [frame.copy(), frame.copy()]
    masks = comp.masks(restored, boxes)
    comp.paste(restored, faces, boxes, masks)
    assert all(np.array_equal(a, b) for a, b in zip(plain, restored))   # the paste alone is unchanged
    before = enhancer.forwards
    comp.enhance(restored, boxes, masks)
    assert enhancer.forwards == before + 1                              # both faces in one forward
    for p, r, box in zip(plain, restored, boxes):
        check_only_masked_pixels_change(p, r, weights_over_frame(comp, frame.shape, box))


def test_gfpgan_on_the_device_compositor(enhancers):
    """TorchComposer (the CUDA path, run here on the CPU): the same rule through its own mask."""
    from lipsync.render.gpu import TorchComposer, resize

    comp = TorchComposer(96, "feather", torch.device("cpu"), enhancer=enhancers["gfpgan"])
    frame = astronaut_frame()
    face = torch.from_numpy(darker(frame, BOX)[None])
    plain = comp.paste(comp.upload([frame]), face, [BOX])
    restored = comp.paste(comp.upload([frame]), face, [BOX])
    comp.enhance(restored, [BOX], comp.masks(restored, [BOX]))
    plain, restored = comp.download(plain)[0], comp.download(restored)[0]
    y1, y2, x1, x2 = BOX
    full = np.zeros(frame.shape[:2], np.float32)
    full[y1:y2, x1:x2] = resize(comp.mask[None], y2 - y1, x2 - x1)[0].numpy()
    check_only_masked_pixels_change(plain, restored, full)


@pytest.mark.skipif(not HAVE_MODELS, reason="dlib or face-recognition-models not installed "
                    "(pip install -r requirements-faces.txt)")
def test_codeformer_restores_only_inside_the_landmark_mask(enhancers):
    from lipsync.train.face_videos import make_video

    video = make_video("moving", 1)
    frame = video.frames[0]
    x1, y1, x2, y2 = video.faces[0][0].box
    box = (y1, min(frame.shape[0], y2 + 10), x1, x2)
    plain_comp = CpuComposer(96, "feather", "landmarks")
    comp = CpuComposer(96, "feather", "landmarks", enhancer=enhancers["codeformer"])
    masks = comp.masks([frame], [box])
    assert masks[0] is not None                                         # the landmarks were found
    face = darker(frame, box)[None]
    plain = plain_comp.paste([frame.copy()], face, [box], masks)[0]
    restored = comp.paste([frame.copy()], face, [box], masks)
    comp.enhance(restored, [box], masks)
    check_only_masked_pixels_change(plain, restored[0], weights_over_frame(comp, frame.shape, box, masks[0]))


def test_restore_shapes_and_batches(enhancers):
    enhancer = enhancers["gfpgan"]
    assert enhancer.restore(torch.zeros(0, 3, ENHANCE_SIZE, ENHANCE_SIZE)).shape == (0, 3, ENHANCE_SIZE, ENHANCE_SIZE)
    with pytest.raises(EnhancerError, match="faces must be"):
        enhancer.restore(torch.zeros(1, 3, 256, 256))
    assert isinstance(enhancer, FaceEnhancer) and enhancer.device.type == "cpu"
    # with --blend none the paste's region, and so the restored one, is the whole box
    r1, r2, m = CpuComposer(96, "none").blender.weights(10, 12)
    assert (r1, r2) == (0, 10) and m.shape == (10, 12) and (m == 1).all()


# ---- the command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 256x256 astronaut photo, 0.4 s of speech (two frames at --fps 5) and a tiny generator checkpoint."""
    import cv2

    from media import tone_wav
    from models import Wav2Lip

    d = tmp_path_factory.mktemp("enhancer_job")
    cv2.imwrite(str(d / "face.png"), astronaut_frame())
    torch.manual_seed(0)
    torch.save({"state_dict": Wav2Lip(img_size=96, width=0.25).eval().state_dict()}, str(d / "g.pth"))
    return {"face": str(d / "face.png"), "audio": tone_wav(d / "speech.wav", 0.4), "ckpt": str(d / "g.pth")}


def test_inference_with_gfpgan(job, weights, tmp_path, monkeypatch):
    """inference.py's path: the flags load the enhancer, one forward restores both frames' faces, only
    the paste's region differs from the run without it, and the summary times the enhancer."""
    from lipsync.render.inference import InferenceConfig, run_inference

    calls = []
    real = FaceEnhancer.restore

    def counted(self, faces):
        calls.append(len(faces))
        return real(self, faces)

    monkeypatch.setattr(FaceEnhancer, "restore", counted)

    def run(**kw):
        frames = []
        cfg = InferenceConfig(checkpoint_path=job["ckpt"], face=job["face"], audio=job["audio"], fps=5.0,
                              box=(40, 200, 60, 196), outfile=str(tmp_path / "out.mp4"), det_cache_dir="",
                              progress=False, device="cpu", precision="fp32", mask="ellipse", **kw)
        summary = run_inference(cfg, frame_sink=lambda i, f: frames.append(f.copy()))
        return summary, frames

    plain_summary, plain = run()
    summary, restored = run(enhancer="gfpgan", enhancer_path=weights["gfpgan"])
    assert calls == [2] and summary.frames == plain_summary.frames == len(restored) == 2
    assert summary.seconds["enhance"] > 0 and "enhance " in summary.line()
    assert "enhance" not in plain_summary.line()
    composer = CpuComposer(96, "feather")
    for p, r in zip(plain, restored):
        check_only_masked_pixels_change(p, r, weights_over_frame(composer, p.shape, BOX))


def test_cli_refusals_are_one_error_line(job, weights, tmp_path, capsys):
    import inference

    base = ["--checkpoint_path", job["ckpt"], "--face", job["face"], "--audio", job["audio"], "--quiet",
            "--outfile", str(tmp_path / "o.mp4"), "--box", "40", "200", "60", "196", "--fps", "5"]
    cases = [
        (["--enhancer", "gfpgan"], "get GFPGANv1.4.pth from the GFPGAN releases"),
        (["--enhancer", "codeformer", "--enhancer_path", str(tmp_path / "none.pth")],
         "--enhancer_path not found"),
        (["--enhancer", "codeformer", "--enhancer_path", weights["gfpgan"]], "not a CodeFormer state dict"),
        (["--enhancer", "codeformer", "--enhancer_path", weights["codeformer"], "--enhancer_weight", "2"],
         "fidelity, in \\[0, 1\\]"),
        (["--enhancer", "gfpgan", "--enhancer_path", weights["gfpgan"], "--preset", "published"],
         "--preset published"),
        (["--enhancer_path", weights["gfpgan"]], "give --enhancer gfpgan or codeformer too"),
        (["--enhancer_weight", "0.3"], "give --enhancer gfpgan or codeformer too"),
        (["--enhancer", "gfpgan", "--enhancer_path", weights["gfpgan"], "--enhancer_weight", "0.3"],
         "GFPGAN has none"),
        (["--enhancer", "gfpgan", "--save_avatar", str(tmp_path / "avatar")], "get GFPGANv1.4.pth"),
    ]
    for extra, message in cases:
        assert inference.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and re.search(message, err[0]), err
    assert not os.path.exists(tmp_path / "o.mp4")


def test_settings_are_declared_once():
    from inference import build_parser
    from lipsync.render.settings import AVATAR, SETTINGS

    args = build_parser().parse_args(["--checkpoint_path", "x", "--audio", "a"])
    assert (args.enhancer, args.enhancer_path, args.enhancer_weight) == ("none", None, 0.5)
    assert SETTINGS["enhancer"].choices == ("none", "gfpgan", "codeformer")
    # a render setting, like --mask: the avatar's frames, boxes and crops do not depend on it
    assert not {"enhancer", "enhancer_path", "enhancer_weight"} & {s.name for s in AVATAR}
