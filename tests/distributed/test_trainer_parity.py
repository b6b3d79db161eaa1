"""The real Trainer under tensor, sequence and data parallelism equals the one-process run.

Each layout trains the same tiny llama on the same corpus for a few steps with clipping (every step
clips, so the global norm over dp, tp and pp shards is exercised); per-step losses must equal the
single-process run within rtol 1e-5: TP and DP change the order of the reductions (fp32
all-reduces of partial sums), so bitwise equality is not expected, and 1e-5 is ~100x the
differences measured.
"""

import os
import sysconfig
from pathlib import Path

import pytest

from megatron_lite.config import load_config
from megatron_lite.data.corpus import prepare_default_corpus
from megatron_lite.training.trainer import Trainer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
LAYOUTS = [
    ["parallel.tp=2"],  # dp=2
    ["parallel.tp=2", "parallel.sp=true", "optim.distributed=true"],
    ["parallel.tp=4", "model.kv_heads=2"],  # tp > kv_heads: KV replicated on pairs of ranks
    ["optim.distributed=true", "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"],  # dp=4
]


def overrides(prefix: str, tok: str, run_dir: str) -> list[str]:
    return [
        f"data.path={prefix}",
        f"data.tokenizer={tok}",
        "model.layers=2",
        "model.hidden=64",
        "model.heads=4",
        "model.kv_heads=4",
        "model.seq_len=32",
        "train.micro_batch_size=2",
        "train.global_batch_size=8",
        "train.steps=4",
        "optim.warmup=1",
        "optim.lr=3e-3",
        "optim.clip_grad=0.5",
        "log.every=1",
        "log.progress=false",
        "data.valid_fraction=0",
        "checkpoint.resume=none",
        f"log.dir={run_dir}",
    ]


def train_losses(args: list[str]) -> list[float]:
    return [r["loss"] for r in Trainer(load_config(None, args)).fit()]


def _run_layouts(rank: int, world: int, base: list[str], port: int) -> list[list[float]]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [train_losses([*base, *layout]) for layout in LAYOUTS]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    files = [STDLIB / n for n in ("textwrap.py", "shlex.py", "fractions.py", "heapq.py")]
    return prepare_default_corpus(tmp_path_factory.mktemp("corpus"), 512, progress=False, files=files)


def test_trainer_layouts_match_one_process(world4, corpus, tmp_path):
    prefix, tok = corpus
    base = overrides(prefix, str(tok), str(tmp_path / "run"))
    per_rank = world4.run(_run_layouts, base, 29500)
    references: dict[tuple[str, ...], list[float]] = {}
    for i, layout in enumerate(LAYOUTS):
        model = tuple(x for x in layout if x.startswith("model."))  # the one-process twin of the layout
        if model not in references:
            references[model] = train_losses([*base[:-1], f"log.dir={tmp_path / 'single'}", *model])
        for rank, losses in enumerate(per_rank):
            assert losses[i] == pytest.approx(references[model], rel=1e-5), (layout, rank, losses[i])
