"""Progress output: tqdm's bar on a terminal, plain lines every N seconds in a log."""

import io

from tqdm import tqdm

from lorakit.progress import LogLines, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_lines_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LogLines(10, "train", initial=2, file=out, interval=30.0, clock=clock)
    for step in range(3, 11):
        clock.t += 10.0
        bar.set_postfix(loss=f"{1 / step:.3f}", refresh=False)
        bar.update(1)
    bar.close()
    bar.close()   # a second close writes nothing
    assert out.getvalue().splitlines() == [
        "train: step 5/10 (50%), loss=0.200, 00:30 elapsed, 00:50 left",
        "train: step 8/10 (80%), loss=0.125, 01:00 elapsed, 00:20 left",
        "train: step 10/10 (100%), loss=0.100, 01:20 elapsed, 00:00 left",
    ]
    assert "\r" not in out.getvalue()


def test_nothing_is_written_for_a_run_with_no_steps():
    out = io.StringIO()
    LogLines(4, "train", initial=4, file=out).close()   # resumed at its end
    assert out.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_bar_and_a_log_the_lines():
    assert isinstance(progress(5, "x", file=io.StringIO()), LogLines)
    bar = progress(5, "x", file=Terminal())
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    quiet = progress(5, "x", enabled=False, file=io.StringIO())
    assert isinstance(quiet, tqdm) and quiet.disable

