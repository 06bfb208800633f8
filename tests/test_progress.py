"""Progress a user can follow in a log: a plain line at least every 30 s with the stage, step, loss
and time remaining (no terminal, so no bars)."""

from ccli.progress import Progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_every_30_seconds_with_the_time_remaining(capsys):
    clock = FakeClock()
    with Progress(enabled=True, clock=clock) as progress:
        task = progress.task("end to end", 100)
        for step in range(100):
            clock.now += 1.0  # one second a step: 100 s in all
            progress.update(task, info=f"loss {1 / (step + 1):.3f}")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "end to end: step 30/100, loss 0.033 (30s so far, about 1m10s left)",
        "end to end: step 60/100, loss 0.017 (1m00s so far, about 40s left)",
        "end to end: step 90/100, loss 0.011 (1m30s so far, about 10s left)",
    ]


def test_disabled_progress_prints_nothing(capsys):
    clock = FakeClock()
    with Progress(enabled=False, clock=clock) as progress:
        task = progress.task("layer 0 FFN", 10)
        for _ in range(10):
            clock.now += 60
            progress.update(task, info="rel. error 0.1")
        progress.log("done")
    assert capsys.readouterr().err == ""
