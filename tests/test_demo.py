"""demo.py's pass/fail logic on recorded metrics, the ROC AUC it reports and its contact sheet (no training here)."""
import itertools

import numpy as np
import pytest

import demo
from lipsync.eval.metrics import roc_auc

# The last full run recorded in the README (AMD CPU, 880 s), with the AUC it now also reports.
RECORDED = {
    "expert_val_auc": 0.912, "expert_val_accuracy": 0.844, "known_shift_max_error_frames": 0,
    "known_shift_exact_fraction": 1.0, "mouth_open_corr": 0.942, "baseline_mouth_open_corr": 0.019,
    "av_offset_frames": 0, "lse_d": 0.630, "lse_c": 0.530,
}
# One change each that must make exactly that target miss
MISSES = {
    "expert_val_auc": 0.87,                  # the expert separates pairs barely better than a weak one
    "expert_val_accuracy": 0.74,
    "known_shift_max_error_frames": 1,       # one shift measured a frame off
    "mouth_open_corr": 0.79,
    "baseline_mouth_open_corr": 0.31,        # the unchanged input would already correlate
    "av_offset_frames": -2,                  # the generated mouth two frames early
}


def test_recorded_run_meets_every_target():
    rows = demo.check_targets(RECORDED)
    assert [r["key"] for r in rows] == [t.key for t in demo.TARGETS]
    assert all(r["met"] for r in rows)
    report = demo.targets_report(rows)
    assert report.splitlines()[0] == "all targets met:"
    assert "met    expert_val_auc = 0.912 (target >= 0.88)" in report
    assert "met    av_offset_frames = 0 (target |value| <= 1)" in report


def test_an_intel_run_of_the_issue_meets_them_too():
    """The run the issue quotes (accuracy 0.783 where the README's read 0.844) is the same pipeline
    learning: the targets are set so that it passes."""
    intel = dict(RECORDED, expert_val_accuracy=0.783, expert_val_auc=0.90)
    assert all(r["met"] for r in demo.check_targets(intel))


@pytest.mark.parametrize("key", sorted(MISSES))
def test_each_target_can_be_missed_alone(key):
    rows = demo.check_targets(dict(RECORDED, **{key: MISSES[key]}))
    assert [r["key"] for r in rows if not r["met"]] == [key]
    report = demo.targets_report(rows)
    assert report.splitlines()[0] == f"1 of {len(demo.TARGETS)} targets MISSED:"
    assert any(line.strip().startswith(f"MISSED {key} = ") for line in report.splitlines())


def test_absent_or_nan_metric_is_a_miss():
    rows = demo.check_targets({k: v for k, v in RECORDED.items() if k != "mouth_open_corr"})
    assert [r["key"] for r in rows if not r["met"]] == ["mouth_open_corr"]
    assert "MISSED mouth_open_corr = absent" in demo.targets_report(rows)
    rows = demo.check_targets(dict(RECORDED, expert_val_auc=float("nan")))
    assert [r["key"] for r in rows if not r["met"]] == ["expert_val_auc"]


def test_boundaries_are_inclusive():
    edge = dict(RECORDED, expert_val_auc=0.88, expert_val_accuracy=0.75, mouth_open_corr=0.80,
                baseline_mouth_open_corr=0.30, av_offset_frames=1)
    assert all(r["met"] for r in demo.check_targets(edge))


def test_roc_auc_counts_pairs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.4 * labels, 1)            # rounding makes ties
    pairs = [(1.0 if p > q else 0.5 if p == q else 0.0)
             for (p, lp), (q, lq) in itertools.product(zip(scores, labels), repeat=2) if lp == 1 and lq == 0]
    assert roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="both"):
        roc_auc([0.1, 0.2], [1, 1])


def test_contact_sheet_labels_rows_and_times():
    frames = [np.full((96, 128, 3), 200, np.uint8) for _ in range(50)]
    rows = {"input": frames, "generated": frames, "truth": frames}
    picks = [0, 25, 49]
    sheet = demo.contact_sheet(rows, picks, fps=25.0, scale=0.5)
    label_w, header_h, h, w = 130, 28, 48, 64
    assert sheet.shape == (header_h + 3 * h, label_w + 3 * w, 3)
    for i in range(3):     # each row's label is written in the label column
        assert (sheet[header_h + i * h:header_h + (i + 1) * h, :label_w] < 100).any()
    for j in range(3):     # each column has its time above it
        assert (sheet[:header_h, label_w + j * w:label_w + (j + 1) * w] < 100).any()
    # and the labels differ (not one text stamped three times)
    tiles = [sheet[header_h + i * h:header_h + (i + 1) * h, :label_w] for i in range(3)]
    assert not np.array_equal(tiles[0], tiles[1]) and not np.array_equal(tiles[1], tiles[2])
    assert (sheet[header_h:header_h + h, label_w:label_w + w] == 200).all()   # the frame itself


def test_speech_defaults_to_the_synthesiser_and_reaches_the_corpus(monkeypatch, tmp_path):
    """The demo's outcome must not depend on whether espeak-ng is installed: the default is the
    built-in synthesiser, and the choice is what the corpus stage is asked for."""
    import synthetic_corpus

    assert demo.build_parser().parse_args([]).speech == "synth"
    seen = []
    monkeypatch.setattr(synthetic_corpus, "main", lambda argv: seen.append(argv) or 2)   # stop after stage 1
    with pytest.raises(SystemExit, match="synthetic_corpus.py failed"):
        demo.main(["--out", str(tmp_path), "--quiet"])
    argv = seen[0]
    assert argv[argv.index("--speech") + 1] == "synth"


def test_espeak_without_espeak_ng_is_a_usage_error(monkeypatch, capsys):
    from lipsync.train import synthetic

    monkeypatch.setattr(synthetic, "espeak_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--speech", "espeak", "--out", "unused"])
    assert exc.value.code == 2
    assert "espeak-ng is not installed" in capsys.readouterr().err


def test_inference_finds_boxes_on_every_frame():
    """The demo's inference detects every frame, as preprocessing did for the training crops: with
    sparse detection (re-detection threshold 0.5) the same generator's mouth correlation read 0.68
    instead of 0.87."""
    import inference

    args = inference.build_parser().parse_args(demo.inference_argv("g.pth", "face.mp4", "speech.wav", "out.mp4", "cpu"))
    assert args.det_every == 1
    assert (args.face_detector, args.pads, args.blend) == ("lbp", [0, 0, 0, 0], "feather")
