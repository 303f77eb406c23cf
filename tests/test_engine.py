"""The inference engine: one render path for CLI and library, saved avatars, several audios, precision,
threads, sparse detection."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import audio
import inference
from conftest import REFERENCE, ROOT, reproducible_generator
from lipsync.render.avatar import load_avatar, prepare_avatar
from lipsync.render.avatar_settings import AvatarSettings
from lipsync.render.boxes import DetectionSettings, FaceFinder
from lipsync.render.engine import render
from lipsync.render.cpu import CpuTuner, cpu_capabilities, resolve_precision
from lipsync.render.generator import Generator
from lipsync.render.inference import InferenceConfig, run_inference
from media import ffmpeg, make_face_video, tone_wav
from models import Wav2Lip

WAV = os.path.join(REFERENCE, "speechlike_16k.wav")  # 3.3 s -> 83 frames at 25 fps


def save_generator(path, img_size=96, width=0.25, seed=0):
    torch.manual_seed(seed)
    gen = Wav2Lip(img_size=img_size, width=width).eval()
    torch.save({"state_dict": gen.state_dict()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("engine")
    return {"dir": d, "ckpt": save_generator(d / "g.pth"), "video": make_face_video(d / "face.mp4", 30),
            "wav2": tone_wav(d / "tone.wav", 1.5)}


def cfg_for(env, tmp_path, **kw):
    base = dict(checkpoint_path=env["ckpt"], face=env["video"], audio=WAV, outfile=str(tmp_path / "out.mp4"),
                face_detector="lbp", det_cache_dir="", progress=False, device="cpu", precision="fp32")
    base.update(kw)
    return InferenceConfig(**base)


def frames_of(cfg, **kw):
    got = {}
    summary = run_inference(cfg, frame_sink=lambda i, f: got.__setitem__(i, f.copy()), **kw)
    return summary, [got[i] for i in range(len(got))]


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), "--quiet", *args],
                          capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------
def test_library_render_equals_cli_composition(env, tmp_path):
    """render(generator, avatar, wav) yields exactly the frames run_inference encodes."""
    cfg = cfg_for(env, tmp_path)
    gen = reproducible_generator(env["ckpt"])
    _, via_run = frames_of(cfg, generator=gen)
    avatar = prepare_avatar(env["video"], cfg.avatar_settings(), gen.img_size, progress=False)
    wav = audio.load_wav(WAV, audio.SAMPLE_RATE)
    via_lib = list(render(gen, avatar, wav, loop="repeat", blend="feather", mask=cfg.mask))  # --mask auto
    assert len(via_lib) == len(via_run) == 83
    assert all(np.array_equal(a, b) for a, b in zip(via_lib, via_run))


def test_saved_avatar_renders_the_cold_frames_without_detection(env, tmp_path, monkeypatch):
    folder = str(tmp_path / "avatar")
    cold, cold_frames = frames_of(cfg_for(env, tmp_path, save_avatar=folder), generator=reproducible_generator(env["ckpt"]))
    meta = json.load(open(os.path.join(folder, "avatar.json")))
    assert meta["frames"] == 30 and meta["img_size"] == 96 and meta["settings"]["face_detector"] == "lbp"

    import face_detection

    monkeypatch.setattr(face_detection, "get_detector", lambda *a, **k: pytest.fail("detector ran"))
    warm, warm_frames = frames_of(cfg_for(env, tmp_path, face=None, avatar=folder), generator=reproducible_generator(env["ckpt"]))
    assert warm.seconds["detect"] == 0 and warm.seconds["crop"] == 0
    assert cold.seconds["crop"] > 0
    assert len(warm_frames) == len(cold_frames) == 83
    assert all(np.array_equal(a, b) for a, b in zip(warm_frames, cold_frames))


def test_save_avatar_alone_then_many_audios_one_bad(env, tmp_path, monkeypatch):
    folder = str(tmp_path / "anna")
    r = cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--save_avatar", folder,
            "--face_detector", "lbp", "--det_cache_dir", "")
    assert r.returncode == 0, r.stderr
    assert "saved avatar" in r.stdout and os.path.isfile(os.path.join(folder, "crops.npy"))

    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(3000))
    mp3 = str(tmp_path / "speech.mp3")
    ffmpeg("-i", WAV, mp3)
    out = tmp_path / "outs"
    loads = []
    real_init = Generator.__init__
    monkeypatch.setattr(Generator, "__init__", lambda self, *a, **k: (loads.append(1), real_init(self, *a, **k))[1])
    code = inference.main(["--checkpoint_path", env["ckpt"], "--avatar", folder, "--audio", WAV, str(bad), mp3,
                           env["wav2"], "--outdir", str(out), "--quiet", "--device", "cpu"])
    assert code == 1 and len(loads) == 1
    assert sorted(os.listdir(out)) == ["speech.mp4", "speechlike_16k.mp4", "tone.mp4"]
    from lipsync.media.video import count_frames, probe_video

    assert count_frames(probe_video(str(out / "tone.mp4"))) == 38  # 1.5 s at 25 fps, rounded up


def test_output_names_never_collide():
    names = inference.output_names(["a/x.wav", "b/x.mp3", "c/y.wav"], "out")
    assert names == [os.path.join("out", n) for n in ("x_wav.mp4", "x_mp3.mp4", "y.mp4")]


@pytest.fixture(scope="module")
def avatar_dir(env, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("av") / "avatar")
    assert cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--save_avatar", folder,
               "--face_detector", "lbp", "--det_cache_dir", "").returncode == 0
    return folder


def _damage(folder, tmp_path, how):
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)
    meta_path = os.path.join(copy, "avatar.json")
    meta = json.load(open(meta_path))
    if how == "version":
        meta["version"] = 99
    elif how == "json":
        open(meta_path, "w").write("{not json")
        return copy, []
    elif how == "truncated crops":
        data = open(os.path.join(copy, "crops.npy"), "rb").read()
        open(os.path.join(copy, "crops.npy"), "wb").write(data[: len(data) // 2])
    elif how == "edited boxes":
        boxes = np.load(os.path.join(copy, "boxes.npy"))
        boxes[3] += 7
        np.save(os.path.join(copy, "boxes.npy"), boxes)
    elif how == "missing source":
        os.remove(os.path.join(copy, meta["source"]))
    elif how == "not an avatar":
        os.remove(meta_path)
        return copy, []
    elif how == "edited settings":  # rotate the frames the boxes were found in: wrong frames if believed
        meta["settings"]["rotate"] = True
    json.dump(meta, open(meta_path, "w"))
    return copy, []


@pytest.mark.parametrize("case,extra,expected", [
    ("detector", ["--face_detector", "sfd"], "--face_detector"),
    ("pads", ["--pads", "0", "20", "0", "0"], "--pads"),
    ("resize", ["--resize_factor", "2"], "--resize_factor"),
    ("published", ["--preset", "published"], "--det_every"),   # boxes from every 5th frame are not published
    ("layout", ["288"], "288x288"),
    ("version", [], "version"),
    ("json", [], "damaged"),
    ("truncated crops", [], "checksum"),
    ("edited boxes", [], "checksum"),
    ("missing source", [], "missing"),
    ("not an avatar", [], "not an avatar folder"),
    ("edited settings", [], "edited"),
])
def test_refused_avatar_folders(env, avatar_dir, tmp_path, case, extra, expected):
    folder, ckpt = avatar_dir, env["ckpt"]
    if case in ("version", "json", "truncated crops", "edited boxes", "missing source", "not an avatar",
                "edited settings"):
        folder, extra = _damage(avatar_dir, tmp_path, case)
    if case == "layout":
        ckpt, extra = save_generator(tmp_path / "g288.pth", img_size=288, width=0.0625), []
    out = tmp_path / "o.mp4"
    r = cli("--checkpoint_path", ckpt, "--avatar", folder, "--audio", env["wav2"], "--outfile", str(out), *extra)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert expected in lines[0] and "--save_avatar" in lines[0], lines[0]
    assert not out.exists()


def test_avatar_flags_that_match_are_accepted(env, avatar_dir, tmp_path):
    r = cli("--checkpoint_path", env["ckpt"], "--avatar", avatar_dir, "--audio", env["wav2"], "--outfile",
            str(tmp_path / "o.mp4"), "--face_detector", "lbp", "--pads", "0", "10", "0", "0")
    assert r.returncode == 0, r.stderr


def test_saving_over_a_folder_of_other_files_is_refused(env, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    r = cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--save_avatar", str(folder),
            "--box", "40", "200", "60", "196")
    assert r.returncode == 2 and "other files" in r.stderr
    assert os.listdir(folder) == ["keep.txt"] and [p for p in os.listdir(tmp_path) if "partial" in p] == []
    # an avatar.json among other files does not make a folder an avatar to replace
    (folder / "avatar.json").write_text("{}")
    (folder / "sub").mkdir()
    r = cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--save_avatar", str(folder),
            "--box", "40", "200", "60", "196")
    assert r.returncode == 2 and "other files" in r.stderr and sorted(os.listdir(folder)) == [
        "avatar.json", "keep.txt", "sub"]
    r = cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--save_avatar", str(folder / "keep.txt"),
            "--box", "40", "200", "60", "196")
    assert r.returncode == 2 and "is a file" in r.stderr and (folder / "keep.txt").read_text() == "mine"


def test_an_interrupted_save_keeps_the_avatar_it_would_replace(env, avatar_dir, tmp_path, monkeypatch):
    """Ctrl-C between moving the old avatar aside and moving the new one in: the old one is back."""
    import shutil

    from lipsync.render.avatar import load_avatar, save_avatar

    folder = str(tmp_path / "mine")
    shutil.copytree(avatar_dir, folder)
    before = load_avatar(folder, 96)
    renames = []
    real_rename = os.rename

    def rename(a, b):
        renames.append((a, b))
        if len(renames) == 2:
            raise KeyboardInterrupt
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_avatar(before, folder)
    monkeypatch.undo()
    after = load_avatar(folder, 96)
    assert np.array_equal(np.asarray(after.crops), np.asarray(before.crops))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    from lipsync.core.fileio import current_umask

    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~current_umask()  # readable as the umask says, not 0700


@pytest.mark.parametrize("extra,expected", [
    (["--resize_factor", "300"], "--resize_factor 300"),
    (["--det_jump_iou", "5"], "--det_jump_iou"),
    (["--face_cache_mb", "-5"], "--face_cache_mb"),
])
def test_flag_values_that_cannot_work(env, tmp_path, extra, expected):
    r = cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--audio", env["wav2"], "--face_detector",
            "lbp", "--outfile", str(tmp_path / "o.mp4"), *extra)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and lines[-1].startswith("error:") and expected in lines[-1], r.stderr


def test_an_output_never_overwrites_an_input(env, tmp_path):
    """--audio clips/talk.mp4 --outdir clips would name its output clips/talk.mp4: refused, the input kept;
    --outfile with --outdir is a usage error."""
    import shutil

    clips = tmp_path / "clips"
    clips.mkdir()
    talk = clips / "talk.mp4"
    shutil.copy(env["video"], talk)
    data = talk.read_bytes()
    for args in (["--face", str(talk), "--audio", str(talk), env["wav2"], "--outdir", str(clips)],
                 ["--face", str(talk), "--audio", env["wav2"], "--outfile", str(talk)]):
        r = cli("--checkpoint_path", env["ckpt"], "--box", "40", "200", "60", "196", *args)
        assert r.returncode == 2 and "one of the inputs" in r.stderr, r.stderr
        assert talk.read_bytes() == data
    r = cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--audio", env["wav2"], "--outdir",
            str(tmp_path / "o"), "--outfile", str(tmp_path / "x.mp4"))
    assert r.returncode == 2 and "not both" in r.stderr


# ---------------------------------------------------------------------------------------------
def test_threads_flag_and_tuner(env, tmp_path, monkeypatch):
    seen = set()
    real = Generator.decode
    monkeypatch.setattr(Generator, "decode", lambda self, *a: (seen.add(torch.get_num_threads()), real(self, *a))[1])
    summary, _ = frames_of(cfg_for(env, tmp_path, threads=1, box=[40, 200, 60, 196]))
    assert "1 thread(s)" in summary.tuning and seen == {1}

    tuner = CpuTuner(cores=2, explore_every=4)
    speed = {(2, 8): 0.01, (2, 32): 0.012, (1, 8): 0.03, (1, 32): 0.028}  # seconds per frame, idle
    idle = dict(speed)
    busy = {(2, 8): 0.09, (2, 32): 0.05, (1, 8): 0.03, (1, 32): 0.028}  # a hog holds a core: barriers wait
    for phase, speed in (("idle", idle), ("busy", busy), ("idle again", idle)):
        chosen = []
        for _ in range(40):
            c = tuner.choose()
            chosen.append(c)
            tuner.record(c, c[1], speed[c] * c[1])
        assert tuner.best() == min(speed, key=speed.get), phase
        assert chosen[-16:].count(tuner.best()) >= 12, (phase, chosen)  # settled: exploring now and then only


def test_precision_choice(monkeypatch):
    import lipsync.render.cpu as g

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(g.PrecisionError):
        resolve_precision("fp64", cpu)
    for bf16 in (True, False):
        caps = g.CpuCapabilities("test", 2, "AVX512", bf16, False, True)
        monkeypatch.setattr(g, "cpu_capabilities", lambda caps=caps: caps)
        assert resolve_precision("auto", cpu) == ("bf16" if bf16 else "fp32")
    assert "bf16 matrix support" in cpu_capabilities().line()
    # parity mode (--blend none --loop repeat) runs in fp32 whatever the CPU
    cfg = InferenceConfig(checkpoint_path="x", face="y", audio="z", blend="none", loop="repeat")
    assert cfg.parity and cfg.avatar_settings().detection.every == 1 and cfg.avatar_settings().detection.scale == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(env, tmp_path):
    r = cli("--checkpoint_path", env["ckpt"], "--face", env["video"], "--audio", env["wav2"], "--outfile",
            str(tmp_path / "o.mp4"), "--device", "cuda", "--box", "40", "200", "60", "196")
    assert r.returncode == 2 and "CUDA" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------
def moving_face_frame(k, cut=40):
    """Frame ``k`` (384x384 BGR) of :func:`moving_face_clip`, before encoding."""
    from media import astronaut

    frame = np.full((384, 384, 3), 70, np.uint8)
    x, y = (10 + k, 10) if k < cut else (120, 120)
    frame[y:y + 256, x:x + 256] = astronaut((256, 256))
    return frame


def moving_face_clip(path, n=60, cut=40):
    """384x384 clip: the photograph glides right by 1 px/frame, then jumps (a cut) at frame ``cut``."""
    from lipsync.media.video import VideoWriter

    with VideoWriter(str(path), 384, 384, 25) as w:
        for k in range(n):
            w.write(moving_face_frame(k, cut))
    return str(path)


def test_sparse_detection_follows_every_frame_detection(tmp_path):
    """Every 5th frame detected, the rest interpolated, is as close to the face's true place as
    detecting every frame. The truth is the box found on the unencoded first frame, moved as the
    photograph moves; the detector (lbp) is not perfect, so sparse is judged against what dense
    achieves on the same decoded frames (their pixels depend on the ffmpeg build)."""
    from face_detection import box_iou
    from lipsync.media.frames import FaceSource

    clip = moving_face_clip(tmp_path / "move.mp4")
    frames = list(FaceSource(clip).frames())
    calls = {"dense": 0, "sparse": 0}
    results = {}
    for name, every in (("dense", 1), ("sparse", 5)):
        finder = FaceFinder(DetectionSettings(detector="lbp", every=every, scale=1.0), "cpu")
        real = finder.detector.detect_all
        finder.detector.detect_all = lambda fr, real=real, name=name: (
            calls.__setitem__(name, calls[name] + len(fr)), real(fr))[1]
        results[name] = finder.run(iter(frames))
    x1, y1, x2, y2 = FaceFinder(DetectionSettings(detector="lbp"), "cpu").run(iter([moving_face_frame(0)]))[0]
    truth = [(x1 + k, y1, x2 + k, y2) if k < 40 else (x1 + 110, y1 + 110, x2 + 110, y2 + 110) for k in range(60)]
    dense, sparse = results["dense"], results["sparse"]
    assert len(dense) == len(sparse) == 60 and all(d is not None for d in dense)
    iou = {name: [box_iou(a, b) for a, b in zip(results[name], truth)] for name in results}
    missed = {name: sum(v < 0.5 for v in iou[name]) for name in iou}
    assert np.mean(iou["dense"]) > 0.85 and missed["dense"] <= 4, iou["dense"]  # the detector itself
    assert np.mean(iou["sparse"]) > np.mean(iou["dense"]) - 0.03, iou
    assert missed["sparse"] <= missed["dense"], iou
    assert min(iou["sparse"][40:]) > 0.75  # after the cut the boxes are at the new place
    assert calls["sparse"] < 0.5 * calls["dense"]


def test_photo_avatar_round_trip(env, tmp_path):
    import cv2

    from lipsync.media.frames import FaceSource

    photo = str(tmp_path / "face.png")
    cv2.imwrite(photo, next(FaceSource(env["video"]).frames()))
    folder = str(tmp_path / "photo_avatar")
    settings = AvatarSettings(fps=30.0, detection=DetectionSettings(detector="lbp"))
    from lipsync.render.avatar import save_avatar

    save_avatar(prepare_avatar(photo, settings, 96, with_crops=True, progress=False), folder)
    av = load_avatar(folder, 96)
    assert av.n_frames == 1 and av.fps == 30.0 and av.crops.shape == (1, 96, 96, 3)
    gen = Generator(env["ckpt"], device="cpu", precision="fp32")
    frames = list(render(gen, av, audio.load_wav(env["wav2"], audio.SAMPLE_RATE)))
    assert len(frames) == 45  # 1.5 s at 30 fps


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blend", ["none", "feather"])
def test_device_composer_matches_opencv_path(env, blend):
    """The batched torch crop / generate / paste (what CUDA runs) gives the OpenCV path's frames,
    run here on the CPU: within 2 grey levels for 99.9% of pixels (interpolation rounding)."""
    gen = Generator(env["ckpt"], device="cpu", precision="fp32")
    settings = AvatarSettings(box=(40, 200, 60, 196))
    wav = audio.load_wav(env["wav2"], audio.SAMPLE_RATE)
    ref = list(render(gen, prepare_avatar(env["video"], settings, 96, progress=False), wav, blend=blend))
    dev = list(render(gen, prepare_avatar(env["video"], settings, 96, progress=False), wav, blend=blend,
                      on_device=True))
    assert len(ref) == len(dev) == 38
    diff = np.abs(np.stack(ref).astype(int) - np.stack(dev).astype(int))
    assert np.mean(diff <= 2) > 0.999 and diff.max() <= 4, (np.mean(diff <= 2), diff.max())
    assert np.array_equal(np.stack(ref)[:, :40], np.stack(dev)[:, :40])  # outside the box: untouched


def test_device_composer_crops_like_opencv():
    from lipsync.render.blending import cut_crop
    from lipsync.render.gpu import TorchComposer

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    boxes = [(10, 90, 20, 100), (0, 120, 0, 160), (30, 61, 40, 77)]
    comp = TorchComposer(96, "none", torch.device("cpu"))
    got = comp.crops(comp.upload(frames), boxes).numpy()
    want = np.stack([cut_crop(f, b, 96) for f, b in zip(frames, boxes)])
    assert np.abs(got.astype(int) - want).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned buffers, copy stream, nvenc)")
def test_cuda_render_matches_cpu(env):
    gen_cpu = Generator(env["ckpt"], device="cpu", precision="fp32")
    gen_gpu = Generator(env["ckpt"], device="cuda", precision="fp32")
    settings = AvatarSettings(box=(40, 200, 60, 196))
    wav = audio.load_wav(env["wav2"], audio.SAMPLE_RATE)
    a = np.stack(list(render(gen_cpu, prepare_avatar(env["video"], settings, 96, progress=False), wav)))
    b = np.stack(list(render(gen_gpu, prepare_avatar(env["video"], settings, 96, progress=False), wav)))
    assert np.mean(np.abs(a.astype(int) - b) <= 2) > 0.999


TRAINED = os.path.join(ROOT, "tests", "fixtures", "tiny_generator_trained.pth")  # the demo's generator, 600 steps


@pytest.mark.skipif(not cpu_capabilities().bf16_matrix,
                    reason="this CPU has no bf16 matrix units (AMX / AVX512-BF16): bf16 would be emulated")
def test_bf16_frames_match_fp32_for_a_trained_generator(env):
    """Inside the face box (where the generator's output goes), bf16 against fp32: PSNR >= 45 dB and
    99.9% of pixels within 4 grey levels."""
    box = (40, 200, 60, 196)
    wav = audio.load_wav(WAV, audio.SAMPLE_RATE)
    outs = {}
    for precision in ("fp32", "bf16"):
        gen = Generator(TRAINED, device="cpu", precision=precision)
        avatar = prepare_avatar(env["video"], AvatarSettings(box=box), gen.img_size, progress=False)
        outs[precision] = np.stack([f[box[0]:box[1], box[2]:box[3]] for f in render(gen, avatar, wav, blend="none")])
    diff = np.abs(outs["fp32"].astype(np.float64) - outs["bf16"])
    psnr = 10 * np.log10(255 ** 2 / np.mean(diff ** 2))
    assert psnr >= 45 and np.mean(diff <= 4) >= 0.999, (psnr, np.mean(diff <= 4), diff.max())
    assert diff.max() > 0  # bf16 really ran (its frames are not bit-identical)
