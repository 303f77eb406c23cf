"""int8 generators (lipsync.render.quantize): ONNX Runtime's static quantization calibrated on a job's
faces and speech, what the file records, inference.py --precision int8 end to end against fp32 on the
demo's trained generator, the cache, and the combinations that are refused."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import audio  # noqa: E402
import export_onnx  # noqa: E402
import inference  # noqa: E402
from conftest import FIXTURES, REFERENCE  # noqa: E402
from lipsync.render.avatar import prepare_avatar  # noqa: E402
from lipsync.render.avatar_settings import AvatarSettings  # noqa: E402
from lipsync.render.cpu import PrecisionError, cpu_capabilities  # noqa: E402
from lipsync.render.generator import Generator  # noqa: E402
from lipsync.render.inference import InferenceConfig, run_inference  # noqa: E402
from lipsync.render.onnx_model import OnnxError, OnnxGenerator, export, metadata, open_generator, session  # noqa: E402
from lipsync.render.quantize import (INT8_THRESHOLD, Calibration, Int8Files, calibration_from_avatar,  # noqa: E402
                                     compare_faces, quantize_generator, run_faces, unfused_session)
from media import make_face_video  # noqa: E402

TRAINED = os.path.join(FIXTURES, "tiny_generator_trained.pth")  # the demo's generator after 600 steps
WAV = os.path.join(REFERENCE, "speechlike_16k.wav")
BOX = (40, 200, 60, 196)  # top bottom left right, around the astronaut's face at 256x256
VNNI = cpu_capabilities().vnni


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The trained generator's fp32 export, a 2 s face video and 1.6 s of speech, and their calibration."""
    d = tmp_path_factory.mktemp("int8")
    fp32 = str(d / "tiny.onnx")
    export(TRAINED, fp32, kind="generator")
    video = make_face_video(d / "face.mp4", 50)
    wav_path = str(d / "speech.wav")
    audio.save_wav(audio.load_wav(WAV, audio.SAMPLE_RATE)[:int(1.6 * audio.SAMPLE_RATE)], wav_path, audio.SAMPLE_RATE)
    avatar = prepare_avatar(video, AvatarSettings(box=BOX), 96, progress=False)
    calib = calibration_from_avatar(avatar, audio.load_wav(wav_path, audio.SAMPLE_RATE), audio_name="speech.wav")
    return {"dir": d, "fp32": fp32, "video": video, "wav": wav_path, "calibration": calib}


def test_calibration_is_the_jobs_faces_and_windows(job):
    c = job["calibration"]
    assert c.mels.shape == (96, 80, 16) and c.faces.shape == (96, 96, 96, 3) and c.faces.dtype == np.uint8
    assert c.source == "face.mp4 (50 face crops) + speech.wav (96 mel windows)"
    calib, check = c.split()
    assert (len(calib), len(check)) == (64, 32) and not set(calib) & set(check)
    assert c.digest() == Calibration(c.mels.copy(), c.faces.copy(), "other").digest()
    batch = next(c.batches(check))
    assert batch["mel"].shape == (8, 1, 80, 16) and batch["face"].shape == (8, 6, 96, 96)
    assert batch["face"][:, :3, 48:].max() == 0 and batch["face"][:, 3:, 48:].max() > 0  # lower half masked
    with pytest.raises(ValueError, match="N >= 3"):
        Calibration(c.mels[:2], c.faces[:2], "x")


def test_quantized_file_records_what_made_it(job, tmp_path):
    out = str(tmp_path / "int8.onnx")
    info = quantize_generator(job["fp32"], out, job["calibration"], model=TRAINED)
    meta = metadata(session(out))
    assert meta["precision"] == "int8" and meta["kind"] == "generator" and meta["img_size"] == "96"
    assert meta["calibration"] == job["calibration"].source and meta["model"] == "tiny_generator_trained.pth"
    assert meta["calibration_sha256"] == job["calibration"].digest() and meta["calibration_frames"] == "64"
    q = info["quantizer"]
    assert (q["format"], q["activations"], q["weights"], q["per_channel"]) == ("QDQ", "uint8", "int8", True)
    assert q["reduce_range"] == (not VNNI)  # 7-bit weights where the kernels would saturate
    assert "int8 VNNI" in meta["quantized_on"] and info["quality"]["frames"] == 32
    import onnx

    graph = onnx.load(out).graph  # the audio path stays fp32: nothing quantizes the mel input
    assert q["fp32"] == "the nodes that see only the mel input"
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear" and "mel" in n.input]
    assert [n for n in graph.node if n.op_type == "QuantizeLinear" and "face" in n.input]
    assert os.path.getsize(out) < 0.5 * os.path.getsize(job["fp32"])  # weights in one byte, not four
    g = OnnxGenerator(out, device="cpu")  # auto: what the file holds
    assert g.precision == "int8" and not g.awaiting_calibration and g.int8["quality"] == info["quality"]
    assert "int8 vs fp32 on 32 faces" in g.tuning()
    with pytest.raises(PrecisionError, match="holds an int8 generator"):
        OnnxGenerator(out, precision="fp32")


def test_the_threshold_tells_noise_from_a_changed_mouth():
    rng = np.random.default_rng(0)
    fp32 = rng.integers(40, 216, (20, 96, 96, 3), dtype=np.uint8)
    noise = (fp32.astype(int) + rng.integers(-2, 3, fp32.shape)).astype(np.uint8)  # PSNR ~ 47 dB
    mouth = fp32.copy()
    mouth[7, 60:80, 30:60] = 0  # one frame: a dark open mouth where fp32 has none
    assert INT8_THRESHOLD.met(compare_faces(fp32, noise))
    assert not INT8_THRESHOLD.met(compare_faces(fp32, mouth))


def test_int8_as_vnni_computes_it_is_within_the_threshold(job, tmp_path):
    """8-bit weights (what a CPU with VNNI gets), judged by the same file computed op by op (the
    numbers of 32-bit accumulation) on any CPU."""
    out = str(tmp_path / "vnni.onnx")
    quantize_generator(job["fp32"], out, job["calibration"], reduce_range=False)
    c = job["calibration"]
    _, check = c.split()
    quality = compare_faces(run_faces(session(job["fp32"]), c, check), run_faces(unfused_session(out), c, check))
    print(f"int8 (8-bit weights, computed op by op) vs fp32: {quality}")
    assert INT8_THRESHOLD.met(quality), quality
    assert quality["max_abs"] > 0  # int8 really ran


@pytest.mark.skipif(not VNNI, reason="this CPU has no VNNI (AVX512-VNNI / AVX-VNNI): its int8 kernels saturate "
                                     "with 8-bit weights, so int8 runs with 7-bit ones here (tested below)")
def test_int8_kernels_with_vnni_are_within_the_threshold(job, tmp_path):
    out = str(tmp_path / "vnni.onnx")
    info = quantize_generator(job["fp32"], out, job["calibration"])
    assert info["quantizer"]["reduce_range"] is False
    assert INT8_THRESHOLD.met(info["quality"]), info["quality"]


def run_frames(job, tmp_path, precision, **kw):
    frames = {}
    cfg = InferenceConfig(checkpoint_path=kw.pop("checkpoint_path", TRAINED), face=job["video"], audio=job["wav"],
                          outfile=str(tmp_path / f"{precision}.mp4"), box=BOX, blend="none", det_cache_dir="",
                          progress=False, device="cpu", precision=precision, threads=2, **kw)
    summary = run_inference(cfg, frame_sink=lambda i, f: frames.__setitem__(i, f[BOX[0]:BOX[1], BOX[2]:BOX[3]].copy()))
    return summary, np.stack([frames[i] for i in range(len(frames))])


def test_inference_int8_end_to_end_is_within_the_threshold_of_fp32(job, tmp_path):
    """inference.py --precision int8 with a checkpoint: exported, quantized on this job's own faces and
    speech, cached; the face box of its frames (hard paste: only the generator differs) against fp32's."""
    cache = str(tmp_path / "cache")
    _, fp32 = run_frames(job, tmp_path, "fp32")
    summary, int8 = run_frames(job, tmp_path, "int8", int8_cache_dir=cache)
    quality = compare_faces(fp32, int8)
    print(f"inference.py frames (face box), int8 vs fp32 on {cpu_capabilities().line()}: {quality}")
    assert INT8_THRESHOLD.met(quality), quality
    assert quality["max_abs"] > 0  # int8 really ran
    assert "int8 vs fp32 on 32 faces of this job" in summary.tuning
    files = sorted(os.listdir(cache))
    assert sorted(f.rsplit("-", 1)[1] for f in files) == ["fp32.onnx", "int8.onnx"]
    stamps = {f: os.stat(os.path.join(cache, f)).st_ino for f in files}  # a rewrite (atomic rename) is a new inode
    _, again = run_frames(job, tmp_path, "int8", int8_cache_dir=cache)  # the same job: the same file, reused
    assert {f: os.stat(os.path.join(cache, f)).st_ino for f in os.listdir(cache)} == stamps
    assert np.array_equal(again, int8)


def test_export_onnx_int8_then_inference_runs_the_file(job, tmp_path, capsys):
    out = str(tmp_path / "g_int8.onnx")
    rc = export_onnx.main(["--checkpoint_path", TRAINED, "--out", out, "--int8", "--calibration_face", job["video"],
                           "--calibration_audio", job["wav"], "--box", *map(str, BOX)])
    line = capsys.readouterr().out
    assert "int8 (" in line and "calibrated on face.mp4 (50 face crops) + speech.wav" in line
    assert rc == 0 and "(within PSNR" in line  # int8 within the threshold (and the fp32 export within tolerance)
    assert metadata(session(out))["precision"] == "int8"
    g = open_generator(out, device="cpu", precision="int8")
    assert isinstance(g, OnnxGenerator) and g.precision == "int8" and not g.awaiting_calibration


def test_refused_combinations(job, tmp_path, capsys):
    with pytest.raises(PrecisionError, match="runs on the CPU"):
        open_generator(TRAINED, device="cuda", precision="int8", int8_cache_dir="")
    with pytest.raises(PrecisionError, match="ONNX Runtime"):
        Generator(TRAINED, device="cpu", precision="int8")
    g = open_generator(job["fp32"], device="cpu", precision="int8", int8_cache_dir="")
    assert g.awaiting_calibration and g.precision == "int8"
    rng = np.random.default_rng(0)
    with pytest.raises(PrecisionError, match="calibrated on its first job"):
        g.generate(rng.standard_normal((2, 80, 16)).astype(np.float32), np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(PrecisionError, match="fp32"):
        OnnxGenerator(job["fp32"], precision="bf16")
    rc = inference.main(["--checkpoint_path", TRAINED, "--face", job["video"], "--audio", job["wav"], "--quiet",
                         "--outfile", str(tmp_path / "x.mp4"), "--precision", "int8", "--device", "cuda"])
    assert rc == 2 and "error: --precision int8 runs on the CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_onnx.main(["--checkpoint_path", TRAINED, "--out", "x.onnx", "--int8", "--calibration_face", "f.mp4"])
    expert = tmp_path / "expert.pth"
    from models import SyncNet_color

    torch.save({"state_dict": SyncNet_color(img_size=96, width=0.125).state_dict()}, expert)
    assert export_onnx.main(["--checkpoint_path", str(expert), "--out", str(tmp_path / "e.onnx"), "--int8"]) == 2
    assert "--int8 quantizes a generator" in capsys.readouterr().err


def test_int8_files_are_named_by_what_they_depend_on(job, tmp_path):
    files = Int8Files(str(tmp_path))
    full = job["calibration"]
    c = Calibration(full.mels[:12], full.faces[:12], full.source)  # few rows: quick to quantize
    a, _, found = files.int8(job["fp32"], job["fp32"], c)
    b, _, found_again = files.int8(job["fp32"], job["fp32"], c)
    other = Calibration(c.mels[::-1].copy(), c.faces, c.source)
    d, _, _ = files.int8(job["fp32"], job["fp32"], other)
    assert (found, found_again, a == b, a != d) == (False, True, True, True)
    assert Int8Files("").directory != Int8Files(None).directory  # '' keeps nothing: a folder of its own


def test_auto_keeps_its_choice_on_a_vnni_cpu(monkeypatch):
    """int8 is asked for, never chosen by auto (its speed-up is not measured on a VNNI CPU yet)."""
    import lipsync.render.cpu as cpu

    caps = cpu.CpuCapabilities("test", 2, "AVX512", False, False, True, vnni=True)
    monkeypatch.setattr(cpu, "cpu_capabilities", lambda: caps)
    assert cpu.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert cpu.resolve_precision("int8", torch.device("cpu")) == "int8"
    assert caps.line().endswith("int8 VNNI: yes")


def test_an_onnx_file_runs_on_the_cpu_with_device_auto_beside_a_gpu(job, monkeypatch):
    """inference.py --checkpoint_path G_int8.onnx (docs/onnx.md) on a machine with a GPU: --device auto
    means the CPU for ONNX Runtime, not a refusal of a device the user did not ask for."""
    import lipsync.render.inference as li

    monkeypatch.setattr(li, "resolve_device", lambda name="auto": torch.device("cuda" if name == "auto" else name))
    for precision in ("auto", "fp32"):
        g = li.load_generator(InferenceConfig(checkpoint_path=job["fp32"], face=job["video"], audio=job["wav"],
                                              device="auto", precision=precision))
        assert isinstance(g, OnnxGenerator) and g.device.type == "cpu"


def test_int8_file_names_follow_the_export_they_come_from(job, tmp_path, monkeypatch):
    """The int8 file of a checkpoint is quantized from its fp32 export, which another torch (or opset)
    writes anew: the int8 file must not be reused across that change."""
    files = Int8Files(str(tmp_path))
    before = files.int8_path(TRAINED, job["calibration"])
    assert files.int8_path(TRAINED, job["calibration"]) == before
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert files.int8_path(TRAINED, job["calibration"]) != before


def test_an_unusable_cache_dir_says_which_flag(tmp_path, job, capsys):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with pytest.raises(OnnxError, match="--int8_cache_dir .* cannot be used"):
        Int8Files(str(blocked / "int8")).fp32(TRAINED)


def test_an_int8_file_does_not_claim_its_check_was_on_this_job(job, tmp_path):
    """A file from export_onnx.py --int8 was checked on its calibration inputs, not on the job it runs."""
    out = str(tmp_path / "int8.onnx")
    c = job["calibration"]
    quantize_generator(job["fp32"], out, Calibration(c.mels[:12], c.faces[:12], c.source))
    line = OnnxGenerator(out, device="cpu").tuning()
    assert "faces of the int8 file's calibration inputs" in line and "this job" not in line


def test_export_onnx_int8_names_a_missing_calibration_file_before_exporting(tmp_path, capsys):
    missing_face = ["--calibration_face", str(tmp_path / "no.mp4"), "--calibration_audio", WAV]
    missing_audio = ["--calibration_face", WAV, "--calibration_audio", str(tmp_path / "no.wav")]
    for flags, flag in ((missing_face, "--calibration_face"), (missing_audio, "--calibration_audio")):
        rc = export_onnx.main(["--checkpoint_path", TRAINED, "--out", str(tmp_path / "x.onnx"), "--int8", *flags])
        out, err = capsys.readouterr()
        assert rc == 2 and f"error: {flag} not found" in err and "exported" not in out
    assert not os.path.exists(tmp_path / "x.onnx")


def test_export_onnx_help_describes_the_int8_file_in_full(capsys):
    with pytest.raises(SystemExit):
        export_onnx.main(["--help"])
    assert "or an int8 generator calibrated on a face and speech." in " ".join(capsys.readouterr().out.split())


def test_the_int8_cache_keeps_the_most_recently_used_files(job, tmp_path, monkeypatch):
    """One int8 file per job: without a bound, ~/.cache grows by a third of the fp32 export per job."""
    files = Int8Files(str(tmp_path))
    monkeypatch.setattr(files, "keep", 2)
    full = job["calibration"]
    cals = [Calibration(full.mels[k:k + 6], full.faces[k:k + 6], full.source) for k in (0, 6, 12)]
    first, _, _ = files.int8(job["fp32"], job["fp32"], cals[0])
    second, _, _ = files.int8(job["fp32"], job["fp32"], cals[1])
    os.utime(first, (1e9, 1e9))
    os.utime(second, (1.5e9, 1.5e9))  # newer than first, until first is reused
    again, _, found = files.int8(job["fp32"], job["fp32"], cals[0])  # reused: now the most recent
    assert found and again == first
    third, _, _ = files.int8(job["fp32"], job["fp32"], cals[2])
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and os.path.basename(second) not in left
    assert {os.path.basename(first), os.path.basename(third)} == set(left)
