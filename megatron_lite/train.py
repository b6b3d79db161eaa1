"""``python -m megatron_lite.train --config FILE [section.key=value ...]``, the same as
``megatron-lite train``; runs as one process or under ``torchrun`` / ``srun``."""

from __future__ import annotations

import logging
import os
import sys

import torch.distributed as dist

from megatron_lite.config import Config, load_config
from megatron_lite.errors import UserError
from megatron_lite.launcher.env import resolve_env
from megatron_lite.parallel.mesh import init_distributed, shutdown_distributed

log = logging.getLogger(__name__)


def run_training(config_path: str | None, overrides: list[str]) -> list[dict]:
    """Load the config and train; returns the logged metrics of this process.

    The config is loaded and checked for the launch's world size before this rank joins the process
    group, and the verdict is shared there: one machine's bad config (a file that differs, a typo in
    one machine's overrides) stops every rank at once with its message, instead of leaving the other
    machines' ranks waiting in the rendezvous for ``parallel.timeout_s``. The run then holds its
    directories locked until it ends (``training/run_lock.py``), before the trainer reads or writes
    anything there."""
    from megatron_lite.training.run_lock import hold_run_dirs
    from megatron_lite.training.trainer import Trainer, check_layout

    cfg, error = None, None
    try:
        cfg = load_config(config_path, overrides)
        check_layout(cfg, resolve_env(os.environ).world_size)
    except UserError as e:
        error = e
    env = init_distributed((cfg or Config()).parallel.timeout_s, setup_error=error)
    try:
        with hold_run_dirs(cfg, env.rank):  # for the whole run: a second run into its directories is refused
            history = Trainer(cfg).fit()  # the trainer (and the groups it holds) is garbage from here
    except BaseException:
        if dist.is_initialized():  # no barrier: the other ranks may be gone
            dist.destroy_process_group()
        raise
    alive = shutdown_distributed()
    if alive:
        log.warning("%d gloo threads outlive the process groups: the process may abort at exit", alive)
    return history


if __name__ == "__main__":
    from megatron_lite.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
