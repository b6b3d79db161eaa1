"""The CLI's log handler: each line of a multi-line message carries the line prefix."""

import logging
import re

from megatron_lite.cli import console_handler

PREFIX = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[rank 1/2\] INFO megatron_lite\.test_log_lines: "


def test_every_line_of_a_multi_line_message_carries_the_prefix_and_a_traceback_stays_as_python_prints_it(capsys):
    log = logging.getLogger("megatron_lite.test_log_lines")
    handler = console_handler({"RANK": "1", "WORLD_SIZE": "2"})
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("rank layout:\n%s", "rank pp dp tp\n   0  0  0  0")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("step failed:\nsee below")
    finally:
        log.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(PREFIX, "", line) for line in lines[:3]] == ["rank layout:", "rank pp dp tp", "   0  0  0  0"]
    assert all(re.match(PREFIX, line) for line in lines[:3]), lines
    assert re.match(PREFIX.replace("INFO", "ERROR") + "step failed:$", lines[3]), lines
    assert re.match(PREFIX.replace("INFO", "ERROR") + "see below$", lines[4]), lines
    assert lines[5] == "Traceback (most recent call last):" and lines[-1] == "ValueError: boom", lines
