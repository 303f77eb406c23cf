"""benchmarks/serve_benchmark.py's arithmetic: when each frame's audio was due, frames/s and
latencies of a session, lower bounds for frames that never came (the benchmark itself is not a test)."""
import importlib.util
import os

import numpy as np
import pytest

import audio
from conftest import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serve_benchmark", os.path.join(ROOT, "benchmarks", "serve_benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_due_times_and_latencies(bench):
    """40 ms messages from t0 = 100 s: frame 0 needs the first 200 * 15 + 400 = 3400 samples, which
    message 5 (samples 3200-3839, due at 100.2 s) brings; every frame arriving 50 ms after its due
    time gives 50 ms latencies and 25 frames/s; the end-completed frames are left out."""
    run = bench.ClientRun(step=640)
    run.t0 = 100.0
    assert run.due(0, 25.0) == pytest.approx(100.2)
    assert run.due(1, 25.0) == pytest.approx(100.24)   # sample 3999 -> message 6
    n_samples = 2 * audio.SAMPLE_RATE
    n = audio.num_frames_for_audio(n_samples, 25.0)   # 50
    for k in range(n):
        run.arrived[k] = (run.due(k, 25.0) if k < 45 else 102.0) + 0.05
        run.order.append(k)
    run.end = {"type": "end", "frames": n, "dropped": 0}
    got = bench.session_numbers(run, n_samples, 25.0)
    # frames 0..44 are completed by the audio (frame 44 needs sample 200 * (140 + 15) + 399 < 32000)
    assert len(got["latencies"]) == 45 and np.allclose(got["latencies"], 0.05)
    assert got["fps"] == pytest.approx(25.0, rel=0.05)
    assert got["frames"] == got["expected"] == n and got["in_order"] and got["ended"] and not got["cut"]


def test_a_run_cut_short_counts_missing_frames_as_lower_bounds(bench):
    run = bench.ClientRun(step=640)
    run.t0 = 0.0
    for k in range(10):
        run.arrived[k] = run.due(k, 25.0) + 1.0
        run.order.append(k)
    run.cut_at = 5.0
    got = bench.session_numbers(run, audio.SAMPLE_RATE * 2, 25.0)
    lat = got["latencies"]
    assert len(lat) == 45 and np.allclose(lat[:10], 1.0)
    assert np.allclose(lat[10:], [5.0 - run.due(k, 25.0) for k in range(10, 45)])
    assert got["cut"] and got["frames"] == 10 and got["fps"] == pytest.approx(25.0, rel=0.05)
