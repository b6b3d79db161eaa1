"""``python -m megatron_lite.train --config FILE [section.key=value ...]``, the same as
``megatron-lite train``; runs as one process or under ``torchrun`` / ``srun``."""

from __future__ import annotations

import logging
import sys

import torch.distributed as dist

from megatron_lite.config import load_config
from megatron_lite.parallel.mesh import shutdown_distributed

log = logging.getLogger(__name__)


def run_training(config_path: str | None, overrides: list[str]) -> list[dict]:
    """Load the config and train; returns the logged metrics of this process."""
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    try:
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
