"""Progress bars are drawn on a terminal only: in a file (a SLURM job log) tqdm's carriage-return
redraws would pile up into one long line, so a long read logs a line now and then instead."""

import io
import json
import logging
import sys
from types import SimpleNamespace

import pytest
from tqdm import tqdm

from megatron_lite import progress
from megatron_lite.amounts import byte_size, counted, duration
from megatron_lite.cli import main
from megatron_lite.progress import byte_progress, progress_bar


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


def test_a_line_logged_while_another_is_written_above_the_bar_is_a_line_of_its_own(monkeypatch):
    """A signal handler's log line (``received SIGTERM: ...``) runs between any two writes of the main
    thread: between a line and its end it was glued to that line, an empty line after it."""

    class Signalled(Stream):
        def write(self, s: str) -> int:
            n = super().write(s)
            if s.startswith("step 3"):  # the signal arrives as the step's line is being written
                logging.getLogger("fault").warning("received SIGTERM")
            return n

    stderr = Signalled(terminal=False)
    monkeypatch.setattr(sys, "stderr", stderr)
    console = logging.StreamHandler(stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    monkeypatch.setattr(logging.root, "handlers", [console])
    with progress.above_progress_bar():
        logging.getLogger("trainer").warning("step 3")
    assert stderr.getvalue() == "step 3\nreceived SIGTERM\n"


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


def test_sizes_read_in_the_largest_unit_that_holds_one():
    """A tiny corpus is ``740 bytes``, not ``0.0 MB``; a unit is passed once the number rounds to its base."""
    sizes = [0, 1, 740, 999.4, 999.6, 12_345, 999_949, 999_960, 4e6, 1.5e12]
    assert [byte_size(n) for n in sizes] == [
        "0 bytes",
        "1 byte",
        "740 bytes",
        "999 bytes",
        "1.0 KB",
        "12.3 KB",
        "999.9 KB",
        "1.0 MB",
        "4.0 MB",
        "1,500.0 GB",
    ]
    assert [byte_size(n, binary=True) for n in (1023, 1024, 12_345, 3 * 2**20, 2**30, 2**41)] == [
        "1,023 bytes",
        "1.0 KiB",
        "12.1 KiB",
        "3.0 MiB",
        "1.0 GiB",
        "2,048.0 GiB",
    ]


def test_a_count_names_one_thing_in_the_singular_and_others_in_the_plural():
    assert [counted(n, "node") for n in (0, 1, 2, 1024)] == ["0 nodes", "1 node", "2 nodes", "1,024 nodes"]
    assert [counted(n, "directory", "directories") for n in (1, 3)] == ["1 directory", "3 directories"]


def test_in_a_job_log_a_long_read_logs_one_line_per_interval_with_its_counts_rate_and_eta(monkeypatch, caplog):
    """stderr is a file: no bar, but a dated line every LOG_EVERY_S seconds (a clock of our own here:
    one MB read a second); on a terminal the bar instead, and nothing where progress is off."""
    now = [1000.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(sys, "stderr", Stream(False))
    caplog.set_level(logging.INFO, logger="megatron_lite.progress")
    docs = [0]
    with byte_progress(True, 100_000_000, "tokenizing", lambda: f"{docs[0]:,} documents") as meter:
        for _ in range(100):
            now[0] += 1
            docs[0] += 1
            meter.update(1_000_000)
    assert caplog.messages == [
        f"tokenizing | {s} documents | {s}.0 MB of 100.0 MB read ({s}%) | 1.0 MB/s | ETA {eta}"
        for s, eta in ((30, "1m10s"), (60, "40.0 s"), (90, "10.0 s"))
    ]
    caplog.clear()
    for terminal, show in ((True, True), (False, False)):
        monkeypatch.setattr(sys, "stderr", Stream(terminal))
        with byte_progress(show, 100, "tokenizing") as meter:
            now[0] += 3600
            meter.update(100)
        assert isinstance(meter, tqdm) and caplog.messages == []


def test_preprocess_and_tokenizer_train_in_a_job_log_say_how_far_they_got(tmp_path, monkeypatch, capsys, caplog):
    """Both verbs with stderr not a terminal (a SLURM job's log): progress lines through logging, with
    what was read so far (a tiny interval: a line at every document read); tokenizer train then says
    that sentencepiece trains, and in how long."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="megatron_lite.progress")
    caplog.set_level(logging.INFO, logger="megatron_lite.data.tokenizer_train")
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n" for i in range(200)))
    tok = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(src), "--output", str(tok), "--vocab-size", "300"]) == 0
    sampled = [m for m in caplog.messages if m.startswith("tokenizer sample | ")]
    assert [int(m.split(" | ")[1].split()[0]) for m in sampled] == list(range(0, 400, 2)), sampled[:3]
    assert "(100%)" in sampled[-1] and "\r" not in capsys.readouterr().err
    assert caplog.messages[-3] == sampled[-1], caplog.messages[-3:]
    sample = sum(len(line.encode()) for i in range(200) for line in (f"def f{i}(x):", f"    return x + {i}"))
    assert caplog.messages[-2] == f"training a 300-piece BPE on {sample / 1000:.1f} KB of sample lines (400 lines)..."
    assert caplog.messages[-1].startswith("trained the 300-piece tokenizer in ")
    caplog.clear()
    assert (
        main(["preprocess", "--input", str(src), "--tokenizer", f"{tok}.model", "--output", str(tmp_path / "d")]) == 0
    )
    stats = json.loads(capsys.readouterr().out)
    said = [m.split(" | ") for m in caplog.messages if m.startswith("tokenizing | ")]
    assert [int(s[1].split()[0]) for s in said] == list(range(200)), said[:3]  # documents written before each read
    tokens = [int(s[1].split(", ")[1].split()[0].replace(",", "")) for s in said]
    assert tokens == sorted(tokens) and 0 < tokens[-1] < stats["tokens"], (tokens[-3:], stats)
    read = (tmp_path / "docs.jsonl").stat().st_size
    assert said[-1][2] == f"{byte_size(read)} of {byte_size(read)} read (100%)" and said[-1][4] == "ETA 0.0 s", said[-1]
