"""Progress bars are drawn on a terminal only: in a file (a SLURM job log) tqdm's carriage-return
redraws would pile up into one long line."""

import io
import sys

import pytest

from megatron_lite.progress import progress_bar


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
