"""log.dir at startup: a directory (or anything but a file) where the run writes one of its files is
one error naming it, before anything is trained, not a traceback from the config save or the tracker."""

import pytest

from megatron_lite.config import Config
from megatron_lite.errors import UserError
from megatron_lite.training import preflight


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "metrics.dropped.jsonl"])
def test_a_directory_where_the_run_writes_a_file_is_refused(tmp_path, name):
    cfg = Config()
    cfg.log.dir = str(tmp_path / "run")
    preflight.check_log_dir(cfg)  # created, writable, nothing in the way
    (tmp_path / "run" / name).mkdir()
    with pytest.raises(UserError) as e:
        preflight.check_log_dir(cfg)
    want = f"log.dir={cfg.log.dir!r} holds {str(tmp_path / 'run' / name)!r}, which is not a file, where the run writes"
    assert str(e.value).startswith(want) and "choose another log.dir" in str(e.value), e.value
    (tmp_path / "run" / name).rmdir()
    (tmp_path / "run" / name).write_text("")  # a file of that name is the run's own (a relaunch)
    preflight.check_log_dir(cfg)
