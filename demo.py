"""The whole pipeline on the synthetic corpus, and proof that it learns.

    python demo.py --out demo_out

synthetic corpus -> hq videos -> preprocess (lbp) -> filelists -> expert -> generator (sync loss on)
-> inference on a held-out identity with held-out audio -> scoring against the true video.
Writes DIR/result.mp4, DIR/contact_sheet.png (rows: input, generated, truth) and DIR/metrics.json.
Runs on 2 CPU cores with the tiny preset; --steps_scale shortens or lengthens both trainings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clips_per_group", type=int, default=1, help="more groups = more identities to learn from")
    p.add_argument("--expert_steps", type=int, default=1200)
    p.add_argument("--generator_steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    return p


def log(msg):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def best_lag(measured, truth, max_lag=5) -> int:
    """The lag L (frames) maximising corr(measured[k + L], truth[k]): > 0 means the video is late."""
    best, best_c = 0, -2.0
    n = len(truth)
    for lag in range(-max_lag, max_lag + 1):
        a = measured[max(0, lag): n + min(0, lag)]
        b = truth[max(0, -lag): n - max(0, lag)]
        c = pearson(a, b)
        if c > best_c:
            best, best_c = lag, c
    return best


def expert_accuracy(ckpt: str, clips: list, hp, n: int = 256, seed: int = 123) -> float:
    import torch

    from lipsync.data import SyncDataset
    from models import cosine_sync_probability, load_model

    model = load_model(ckpt, kind="expert").model.eval()
    data = SyncDataset(clips, hp, seed=seed, samples_per_epoch=n, split="held-out")
    correct = 0
    with torch.no_grad():
        for i in range(0, n, 32):
            batch = [data[j] for j in range(i, min(n, i + 32))]
            x = torch.stack([b[0] for b in batch])
            mel = torch.stack([b[1] for b in batch])
            y = torch.stack([b[2] for b in batch])
            a, v = model(mel, x)
            p = cosine_sync_probability(a, v).unsqueeze(1)
            correct += int(((p > 0.5).float() == y).sum())
    return correct / n


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()
    q = ["--quiet"] if args.quiet else []
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    raw, pre, fl, ck = (os.path.join(out, d) for d in ("corpus", "preprocessed", "filelists", "checkpoints"))

    import color_syncnet_train
    import generate_filelists
    import generate_hq_videos
    import inference
    import preprocess
    import synthetic_corpus
    from hparams import get_hparams

    log("1/7 synthetic corpus")
    assert synthetic_corpus.main(["--out", raw, "--clips", str(args.clips), "--seconds", str(args.seconds),
                                  "--clips_per_group", str(args.clips_per_group), "--seed", str(args.seed),
                                  "--quiet"]) == 0
    log("2/7 enhanced (_hq) videos")
    if generate_hq_videos.main(["--data_root", raw, "--workers", "2", "--quiet"]) != 0:
        raise SystemExit("generate_hq_videos.py failed")
    log("3/7 preprocess (lbp face detector)")
    if preprocess.main(["--data_root", raw, "--preprocessed_root", pre, "--face_detector", "lbp", "--device", "cpu",
                        "--ngpu", "2", "--batch_size", "32", "--quiet"]) != 0:
        raise SystemExit("preprocess.py failed on some clips; see preprocessed/failures.json")
    log("4/7 filelists")
    assert generate_filelists.main(["--data_root", pre, "--out_dir", fl, "--val_fraction", "0.15",
                                    "--test_fraction", "0.15", "--seed", str(args.seed)]) == 0

    hp_over = f"seed={args.seed}"
    # a larger batch and step size than the tiny preset's, decayed to the end of the run, and augmented
    # windows (the held-out identity is a face the expert has never seen)
    expert_over = (hp_over + ",syncnet_lr=1e-3,syncnet_batch_size=32,syncnet_eval_interval=100,syncnet_augment=true,"
                   f"lr_schedule=cosine,lr_decay_steps={args.expert_steps}")
    log(f"5/7 expert ({args.expert_steps} steps)")
    expert_ckpt = os.path.join(ck, f"checkpoint_step{args.expert_steps:09d}.pth")
    if not os.path.exists(expert_ckpt):
        rc = color_syncnet_train.main(["--data_root", pre, "--checkpoint_dir", ck, "--filelists_dir", fl,
                                       "--preset", "tiny", "--hparams", expert_over, "--max_steps", str(args.expert_steps),
                                       "--device", args.device] + q)
        assert rc == 0, "expert training failed"
    log(f"6/7 generator ({args.generator_steps} steps, sync loss switched on when the expert agrees)")
    import wav2lip_train

    gen_ckpt = os.path.join(ck, f"wav2lip_checkpoint_step{args.generator_steps:09d}.pth")
    if not os.path.exists(gen_ckpt):
        rc = wav2lip_train.main(["--data_root", pre, "--checkpoint_dir", ck, "--filelists_dir", fl, "--preset", "tiny",
                                 "--hparams", hp_over, "--max_steps", str(args.generator_steps),
                                 "--syncnet_checkpoint_path", expert_ckpt, "--device", args.device] + q)
        assert rc == 0, "generator training failed"

    log("7/7 inference on a held-out identity with held-out audio, scored against the true video")
    import torch

    from lipsync import synthetic as S
    from lipsync.video import iter_frames, probe_video

    test = [line.strip() for line in open(os.path.join(fl, "test.txt")) if line.strip()]
    face_clip = os.path.join(raw, test[0] + ".mp4")
    truth_json = os.path.join(raw, test[0] + ".json")
    ident = S.Identity.from_dict(json.load(open(truth_json))["identity"])
    # held-out audio: fresh speech no clip was made from, longer than the face video (which loops),
    # so the unchanged input's mouth has only chance correlation with it
    import audio
    import cv2

    speech = os.path.join(out, "heldout_speech.wav")
    wav, _ = S.make_speech(np.random.default_rng(args.seed + 10_000), 2 * args.seconds, out)
    audio.save_wav(wav, speech, 16000)
    wav = audio.load_wav(speech, 16000)
    result = os.path.join(out, "result.mp4")
    torch.set_num_threads(2)
    rc = inference.main(["--checkpoint_path", gen_ckpt, "--face", face_clip, "--audio", speech, "--outfile", result,
                         "--face_detector", "lbp", "--pads", "0", "0", "0", "0", "--det_cache_dir", "",
                         "--device", args.device, "--quiet"])
    assert rc == 0, "inference failed"

    generated = list(iter_frames(probe_video(result)))
    source = list(iter_frames(probe_video(face_clip)))
    n = len(generated)
    inputs = [source[k % len(source)] for k in range(n)]  # what inference looped over (--loop repeat)
    truth_frames = list(S.render_frames(ident, wav, n_frames=n))
    true_open, _ = S.mouth_track(wav, n)
    renderer = S.Renderer(ident)
    # the head pose of output frame k is that of source frame k % len(source)
    gen_open = [S.measure_opening(generated[k], ident, k % len(source), renderer) for k in range(n)]
    in_open = [S.measure_opening(inputs[k], ident, k % len(source), renderer) for k in range(n)]
    truth_measured = [S.measure_opening(truth_frames[k], ident, k, renderer) for k in range(n)]

    # LSE-D / LSE-C of the result with the demo's expert, and of the same video with its audio 5 frames late
    from lipsync.evaluation import ExpertScorer, read_video_for_scoring, shift_audio, sync_score

    scorer = ExpertScorer(expert_ckpt)
    scored = read_video_for_scoring(result, "lbp", expert=scorer)
    lse = sync_score(*scorer.features(scored.faces, scored.wav))
    lse_late = sync_score(*scorer.features(scored.faces, shift_audio(scored.wav, 5)))

    hp = get_hparams("tiny", hp_over)
    test_dirs = [os.path.join(pre, c) for c in test]
    metrics = {
        "expert_val_accuracy": expert_accuracy(expert_ckpt, test_dirs, hp, n=1024),
        "mouth_open_corr": pearson(gen_open, true_open),
        "baseline_mouth_open_corr": pearson(in_open, true_open),
        "truth_measurement_corr": pearson(truth_measured, true_open),
        "av_offset_frames": best_lag(np.array(gen_open), np.array(true_open)),
        "lse_d": round(lse.lse_d, 4), "lse_c": round(lse.lse_c, 4), "lse_offset_frames": lse.offset,
        "lse_d_audio_5_late": round(lse_late.lse_d, 4), "lse_c_audio_5_late": round(lse_late.lse_c, 4),
        "sync_dist_at_0": round(lse.dist_at_0, 4), "sync_dist_at_0_audio_5_late": round(lse_late.dist_at_0, 4),
        "lse_offset_frames_audio_5_late": lse_late.offset,
        "frames": n,
        "face_clip": os.path.relpath(face_clip, out),
        "audio": os.path.relpath(speech, out),
        "expert_steps": args.expert_steps,
        "generator_steps": args.generator_steps,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    # contact sheet: input, generated, truth for a row of frames
    picks = np.linspace(0, n - 1, 8).astype(int)
    rows = [np.hstack([src[k] for k in picks]) for src in (inputs, generated, truth_frames)]
    sheet = np.vstack(rows)
    sheet = cv2.resize(sheet, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    cv2.imwrite(os.path.join(out, "contact_sheet.png"), sheet)
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
    log("metrics: " + json.dumps(metrics))
    targets = (metrics["expert_val_accuracy"] >= 0.9 and metrics["mouth_open_corr"] >= 0.8
               and metrics["baseline_mouth_open_corr"] <= 0.3 and abs(metrics["av_offset_frames"]) <= 1)
    log(f"targets {'met' if targets else 'NOT met'} (accuracy >= 0.90, correlation >= 0.80, baseline <= 0.30, "
        f"offset within 1 frame); wrote {result}, contact_sheet.png, metrics.json")
    return 0 if targets else 1


if __name__ == "__main__":
    sys.exit(main())
