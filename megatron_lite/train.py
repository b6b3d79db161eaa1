"""``python -m megatron_lite.train --config FILE [section.key=value ...]``, the same as
``megatron-lite train``; runs as one process or under ``torchrun`` / ``srun``."""

from __future__ import annotations

import sys

import torch.distributed as dist

from megatron_lite.config import load_config


def run_training(config_path: str | None, overrides: list[str]) -> list[dict]:
    """Load the config and train; returns the logged metrics of this process."""
    from megatron_lite.training.trainer import Trainer

    cfg = load_config(config_path, overrides)
    try:
        history = Trainer(cfg).fit()
        if dist.is_initialized():
            # no rank tears its connections down while a peer may still be finishing its last
            # collective with it (an abort in gloo's teardown fails a finished torchrun rank)
            dist.barrier()
        return history
    finally:
        # a process group left alive at interpreter exit can abort in gloo's teardown (SIGABRT),
        # which torchrun reports as a failed rank after a successful run
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from megatron_lite.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
