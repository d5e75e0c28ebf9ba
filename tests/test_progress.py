"""Progress off a terminal: a few log lines, not a wall of carriage returns."""

import logging

from post import progress


def test_off_a_terminal_a_line_every_tenth_and_one_at_the_end(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    caplog.set_level(logging.INFO, logger="post.progress")
    bar = progress.steps(25, initial=3, desc="tune")
    for _ in range(22):
        bar.update(1)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    # 22 steps left at the start: every 2nd step logs, the last one (25/25) always
    assert len(lines) == 11 and lines[0].startswith("tune: step 5/25, ") and lines[-1].startswith("tune: step 25/25")
    assert lines[-1].endswith("0s left") and "s/step" in lines[0]


def test_disabled_progress_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="post.progress")
    bar = progress.steps(10, desc="transfer", enabled=False)
    for _ in range(10):
        bar.update(1)
    assert not caplog.records
