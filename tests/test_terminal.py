"""What the terminal shows: progress lines without NaN, one-line errors, user-facing help."""

from __future__ import annotations


from sims_platform.utils.progress import Progress


def test_progress_line_before_a_rate_is_known_says_eta_unknown(capsys):
    p = Progress("iter 0 generate", total=100, unit="img", interval=0.0)
    p._emit()  # nothing done yet: no rate
    line = capsys.readouterr().err.strip()
    assert line == "[iter 0 generate] 0/100 img (0%) eta ?", line
    p.update(50)
    line = capsys.readouterr().err.strip()
    assert "nan" not in line and "img/s eta" in line and " 0.0 img/s" not in line, line


def test_progress_resumed_at_shows_no_nan(capsys):
    Progress("iter 0 train-base", total=2048, done=1024, unit="img")
    line = capsys.readouterr().err.strip()
    assert line == "[iter 0 train-base] resumed at 1024/2048 img (50%) eta ?", line


