"""lipsync.core.progress: a tqdm bar on a terminal, a few plain lines anywhere else."""
import io

from lipsync.core.progress import LineProgress, progress_bar


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_occasional_lines_not_a_flood():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(desc="preprocess", total=1000, unit="clip", file=out, interval=30, clock=clock)
    for _ in range(1000):       # 1000 updates over 100 s
        clock.t += 0.1
        bar.update(1)
    bar.close()
    bar.close()                 # closing twice prints once
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines   # at 30, 60, 90 s and the end
    assert lines[0].startswith("preprocess: 300/1000 clip (30%) 30 s, 10 clip/s")
    assert lines[-1].startswith("preprocess: done 1000/1000 clip (100%) 100 s")


def test_iteration_postfix_write_and_early_exit():
    out, clock = io.StringIO(), Clock()
    assert isinstance(progress_bar(range(10), file=out), LineProgress)
    bar = LineProgress(range(10), desc="steps", unit="step", file=out, interval=5, clock=clock)
    assert len(bar) == 10
    bar.set_postfix({"loss": "0.5"})
    bar.write("step 3: val loss 0.4")
    for i in bar:
        clock.t += 1
        if i == 6:
            break
    text = out.getvalue().splitlines()
    assert text[0] == "step 3: val loss 0.4"
    assert text[1].startswith("steps: 5/10 step (50%) 5 s") and text[1].endswith("loss=0.5")
    # left early: the last line says where it stopped, not "done"
    assert text[-1].startswith("steps: 6/10 step (60%)") and len(text) == 3


def test_terminal_gets_tqdm_and_disable_prints_nothing():
    from tqdm import tqdm

    term = Terminal()
    with progress_bar(total=3, desc="t", file=term) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "3/3" in term.getvalue()
    quiet = io.StringIO()
    with progress_bar(total=3, desc="q", file=quiet, disable=True) as bar:
        bar.update(3)
        bar.set_postfix(x=1)
    assert quiet.getvalue() == ""
