"""The CLI help says exactly which paths a command accepts."""

import pytest

from megatron_lite.cli import main


def test_eval_checkpoint_help_names_what_is_accepted(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a run's or one step's" not in text  # a run's log.dir is not a checkpoint
    assert "step_XXXXXXXX" in text and "<log.dir>/checkpoints" in text and "checkpoint.dir" in text
    assert "log.dir itself is not accepted" in text
