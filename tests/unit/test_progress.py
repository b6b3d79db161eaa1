"""Progress bars are drawn on a terminal only: in a file (a SLURM job log) tqdm's carriage-return
redraws would pile up into one long line."""

import io
import sys

import pytest

from megatron_lite.progress import duration, progress_bar


class Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal,show,drawn", [(True, True, True), (False, True, False), (True, False, False)])
def test_a_bar_is_drawn_where_shown_on_a_terminal_only(terminal, show, drawn, monkeypatch):
    stderr = Stream(terminal)
    monkeypatch.setattr(sys, "stderr", stderr)
    with progress_bar(show, total=3, unit="step") as bar:
        for _ in range(3):
            bar.update(1)
    assert ("3/3" in stderr.getvalue()) == drawn, stderr.getvalue()
    assert ("\r" in stderr.getvalue()) == drawn


def test_durations_read_as_seconds_then_minutes_then_hours():
    assert [duration(s) for s in (0.04, 59.94, 60, 725.9, 3599, 3600, 11041, 400000)] == [
        "0.0 s",
        "59.9 s",
        "1m00s",
        "12m05s",
        "59m59s",
        "1h00m",
        "3h04m",
        "111h06m",
    ]
