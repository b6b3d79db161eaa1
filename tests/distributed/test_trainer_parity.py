"""The real Trainer under tensor, sequence, pipeline and data parallelism equals the one-process run.

Each layout trains the same tiny llama (gpt2 where the layout says so) on the same corpus for a few
steps with clipping (every step clips, so the global norm over dp, tp and pp shards is exercised);
per-step losses and global gradient norms must equal the single-process run within rtol 1e-5: TP
and DP change the order of the reductions (fp32 all-reduces of partial sums), so bitwise equality
is not expected, and 1e-5 is ~100x the differences measured. The bf16 layouts of
:data:`EXACT_LAYOUTS` change no sum's order, and their losses are compared bitwise (see there).
"""

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_lite.config import TrainConfig, load_config
from megatron_lite.data.corpus import prepare_default_corpus
from megatron_lite.parallel.pipeline.schedules import forward_table
from megatron_lite.training.trainer import Trainer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
LAYOUTS = [
    ["parallel.tp=2"],  # dp=2
    ["parallel.tp=2", "parallel.sp=true", "optim.distributed=true"],
    ["parallel.tp=4", "model.kv_heads=2"],  # tp > kv_heads: KV replicated on pairs of ranks
    # dp=4; the four ranks share one on-disk sample index (one builds each epoch, the others map it)
    [
        "optim.distributed=true",
        "parallel.overlap_grad_reduce=false",
        "parallel.overlap_param_gather=false",
        "data.index_cache=RUN/index",
    ],
    # tp=2 x pp=2, tied across stages, selective recomputation (1f1b: one backward per block)
    ["parallel.pp=2", "parallel.tp=2", "model.tie_embeddings=true", "train.recompute=selective"],
    ["parallel.pp=2", "optim.distributed=true", "parallel.schedule=zb-h1"],  # pp=2 x dp=2
    ["parallel.pp=4", "parallel.vp=2", "model.layers=8", "parallel.schedule=interleaved"],
    # interleaved with tied embeddings: rank 0 holds the embedding AND later stages' chunks
    ["parallel.pp=2", "parallel.vp=2", "model.layers=4", "parallel.schedule=interleaved", "model.tie_embeddings=true"],
    # gpt2 (LayerNorm and row-parallel biases summed over tp under SP, learned positions, tied head):
    # tp=2 x pp=2 with SP, zb-h1's split backward of recomputed blocks, 3 layers on 2 stages
    [
        "model.arch=gpt2",
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.sp=true",
        "parallel.schedule=zb-h1",
        "train.recompute=full",
        "model.layers=3",
    ],
    # ZeRO-1 over dp=2 with two chunks per rank (a grad buffer and a parameter gather each), GQA, 5
    # layers on 4 virtual stages, gpipe; grads reduced after the schedule, parameter all-gathers
    # overlapped with the next forward
    [
        "parallel.pp=2",
        "parallel.vp=2",
        "parallel.schedule=gpipe",
        "optim.distributed=true",
        "parallel.overlap_grad_reduce=false",
        "model.kv_heads=2",
        "model.layers=5",
    ],
]
# bf16 layouts that change no sum's order, so their losses are the one process's bits (compared with
# ==; the grad norms, whose sums of squares add over pp and dp in another order, within rtol 1e-5):
# each pipeline stage adds each microbatch's gradient into the fp32 main grads in the one process's
# order; dp=2 without accumulation (global batch = micro x dp) adds the two ranks' gradients once
# (a + b on both: addition commutes), their scale 1/2 applied after the backward rather than to its
# loss (halving is exact, in bf16 as in fp32); optim.clip_grad=0 keeps the reordered norm out of the
# update. The one-process twin runs on one thread, as every rank does (harness.py): more threads may
# block a CPU matmul's sums differently.
EXACT = ["train.dtype=bf16", "optim.clip_grad=0", "train.global_batch_size=4"]
EXACT_LAYOUTS = [
    # dp=2 x pp=2, ZeRO-1 gathering bf16 parameters, two chunks per rank, 5 layers on 4 virtual stages, GQA
    [
        "parallel.pp=2",
        "parallel.vp=2",
        "parallel.schedule=interleaved",
        "optim.distributed=true",
        "model.kv_heads=2",
        "model.layers=5",
    ],
    # pp=4 with 2 microbatches, fewer than the stages; the split backward of recomputed blocks
    ["parallel.pp=4", "parallel.schedule=zb-h1", "train.recompute=full", "model.layers=5"],
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


def train_curves(args: list[str]) -> list[float]:
    """Per step: the loss, then the global gradient norm (before clipping), flattened."""
    return [x for r in Trainer(load_config(None, args)).fit() for x in (r["loss"], r["grad_norm"])]


def twin(layout: list[str]) -> list[str]:
    """The one-process run of ``layout``: its model settings."""
    return [x for x in layout if x.startswith("model.")]


def _run_layouts(rank: int, world: int, base: list[str], port: int, layouts: list[list[str]]) -> list[list[float]]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_dir = base[-1].removeprefix("log.dir=")  # one run directory per layout: resume=none refuses a used one
    return [
        train_curves([*base, *[x.replace("RUN", run_dir) for x in layout], f"log.dir={run_dir}/{i}"])
        for i, layout in enumerate(layouts)
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    files = [STDLIB / n for n in ("textwrap.py", "shlex.py", "fractions.py", "heapq.py")]
    return prepare_default_corpus(tmp_path_factory.mktemp("corpus"), 512, progress=False, files=files)


def test_trainer_layouts_match_one_process(world4, corpus, tmp_path):
    prefix, tok = corpus
    base = overrides(prefix, str(tok), str(tmp_path / "run"))
    per_rank = world4.run(_run_layouts, base, 29500, LAYOUTS, timeout=180)
    references: dict[tuple[str, ...], list[float]] = {}
    for i, layout in enumerate(LAYOUTS):
        model = tuple(twin(layout))
        if model not in references:
            references[model] = train_curves([*base[:-1], f"log.dir={tmp_path / 'single' / str(i)}", *model])
        for rank, curves in enumerate(per_rank):
            assert curves[i] == pytest.approx(references[model], rel=1e-5), (layout, rank, curves[i])
    assert list((tmp_path / "run" / "index").glob("train-e0-*.perm.npy"))  # the cached layout used it


def test_bf16_layouts_that_keep_every_sum_in_order_match_bitwise(world4, corpus, tmp_path):
    prefix, tok = corpus
    base = [*overrides(prefix, str(tok), str(tmp_path / "run"))[:-1], *EXACT, f"log.dir={tmp_path / 'run'}"]
    per_rank = world4.run(_run_layouts, base, 29503, EXACT_LAYOUTS, timeout=180)
    # one thread, as each rank (tests/conftest.py): the same reduction order in every matmul
    assert torch.get_num_threads() == 1
    references = [
        train_curves([*base[:-1], f"log.dir={tmp_path / 'single' / str(i)}", *twin(layout)])
        for i, layout in enumerate(EXACT_LAYOUTS)
    ]
    for i, (layout, reference) in enumerate(zip(EXACT_LAYOUTS, references)):
        for rank, curves in enumerate(per_rank):
            got = curves[i]
            assert got[0::2] == reference[0::2], (layout, rank, got, reference)  # the losses
            assert got[1::2] == pytest.approx(reference[1::2], rel=1e-5), (layout, rank, got, reference)


@pytest.fixture(scope="module")
def world8():
    """The 8-rank world of this module's 3D tests (started here: no other module needs one)."""
    from harness import World

    world = World(8)
    world.start()
    yield world
    world.close()


def _run_3d(rank: int, world: int, args: list[str], port: int) -> tuple[list[dict], list[int]]:
    """(the logs, the local chunks this rank's evaluations ran, in order)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = Trainer(load_config(None, args))
    evaluated = []
    for c, chunk in enumerate(trainer.engine.chunks):
        chunk.register_forward_pre_hook(lambda *_, c=c: None if torch.is_grad_enabled() else evaluated.append(c))
    return trainer.fit(), evaluated


FULL_3D = {
    "1f1b": ["parallel.tp=2", "parallel.pp=2", "optim.distributed=true", "parallel.sp=true"],
    # vp=2: rank 0 holds the embedding and virtual stage 2, the last stage's rank the head's copy and
    # stage 1; 5 layers on 4 virtual stages; GQA with the KV heads split over tp; every block recomputed
    "interleaved": [
        "parallel.tp=2",
        "parallel.pp=2",
        "parallel.vp=2",
        "parallel.schedule=interleaved",
        "optim.distributed=true",
        "parallel.sp=true",
        "model.kv_heads=2",
        "model.layers=5",
        "train.recompute=full",
    ],
}


@pytest.mark.parametrize("schedule", FULL_3D)
def test_full_3d_tp2_pp2_dp2_with_eval_matches_one_process(world8, corpus, tmp_path, schedule):
    """8 ranks: tp=2 x pp=2 x dp=2, ZeRO-1 with both overlaps, tied embeddings across stages,
    gradient accumulation (global batch 8 = micro 2 x accum 2 x dp 2), evaluation through the
    pipeline; losses and held-out losses equal the one-process run (rtol 1e-5, as above).
    Evaluation is pipelined: every rank runs its chunks in the schedule's forward order (interleaved:
    both microbatches' chunk 0, then both chunk 1), not one microbatch through all its chunks at a time."""
    prefix, tok = corpus
    base = overrides(prefix, str(tok), str(tmp_path / "run"))
    extra = ["data.valid_fraction=0.25", "train.eval_every=2", "model.tie_embeddings=true"]
    layout = FULL_3D[schedule]
    per_rank = world8.run(_run_3d, [*base, *extra, *layout], 29501, timeout=180)
    reference = Trainer(load_config(None, [*base[:-1], f"log.dir={tmp_path / 'one'}", *extra, *twin(layout)])).fit()
    for key in ("loss", "eval_loss"):
        want = [r[key] for r in reference if key in r]
        assert len(want) == (4 if key == "loss" else 2)
        for records, _ in per_rank:
            assert [r[key] for r in records if key in r] == pytest.approx(want, rel=1e-5), key
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]  # rank 0's
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "consumed_samples"):  # DESIGN's fields
        assert all(key in r for r in rows), (key, rows)  # pp=2: the loss comes from the last stage's rank
    vp = 2 if "parallel.vp=2" in layout else 1
    batch = [c for _, c in forward_table(2, vp, 2)]  # one held-out global batch: 2 microbatches per dp rank
    evaluations = 2 * TrainConfig().eval_iters  # at steps 2 and 4
    for _, evaluated in per_rank:
        assert evaluated == batch * evaluations, evaluated


def _train_tied(rank: int, world: int, args: list[str], port: int) -> tuple[list[float], float]:
    """(loss and grad norm per step, largest difference between the tied embedding's two copies)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = Trainer(load_config(None, args))
    curves = [x for r in trainer.fit() for x in (r["loss"], r["grad_norm"])]
    engine = trainer.engine
    engine.optimizer.finish_param_sync()  # the last step's parameter all-gathers
    copies = [torch.empty_like(engine.runtime.tied) for _ in range(2)]
    dist.all_gather(copies, engine.runtime.tied.detach(), group=engine.runtime.embed_group)
    return curves, (copies[0] - copies[1]).abs().max().item()


def test_tied_copies_stay_bitwise_equal_over_dp4(world8, corpus, tmp_path):
    """pp=2 x dp=4, ZeRO-1, tied embeddings: the two stages reduce the embedding's gradient over dp
    in buffers of different layouts (model.vocab_size=515 shifts the offsets), so each adds the four
    ranks' values in its own order; the first stage's embedding and the last stage's head copy must
    still be the same bits after training, and the losses those of one process (rtol 1e-5)."""
    prefix, tok = corpus
    base = [*overrides(prefix, str(tok), str(tmp_path / "run")), "model.tie_embeddings=true", "model.vocab_size=515"]
    per_rank = world8.run(_train_tied, [*base, "parallel.pp=2", "optim.distributed=true"], 29502, timeout=180)
    reference = train_curves([*base[:-3], f"log.dir={tmp_path / 'one'}", *base[-2:]])
    for curves, gap in per_rank:
        assert gap == 0.0
        assert curves == pytest.approx(reference, rel=1e-5)


def _run_buckets(rank: int, world: int, args: list[str], port: int) -> tuple[list[float], list[int]]:
    """(the loss and grad norm per step, the number of buckets of each of this rank's chunks)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = Trainer(load_config(None, args))
    curves = [x for r in trainer.fit() for x in (r["loss"], r["grad_norm"])]
    return curves, [len(buffer.buckets) for buffer in trainer.engine.ddp.buffers]


def test_several_buckets_per_chunk_in_3d_match_one_process(world8, corpus, tmp_path):
    """tp=2 x pp=2 x dp=2 x vp=2, ZeRO-1 with both overlaps, SP, tied embeddings, one KV head
    (replicated over tp), parallel.bucket_mb=0.01: a bucket closes at the first whole parameter
    reaching 2,621 fp32 elements, so each chunk (a block of ~25k grads on a tp rank, with the
    embedding or the head on some) reduces, shards and gathers four or five buckets. Losses and grad
    norms within rtol 1e-5, as above."""
    prefix, tok = corpus
    base = overrides(prefix, str(tok), str(tmp_path / "run"))
    model = ["model.kv_heads=1", "model.layers=4", "model.vocab_size=515", "model.tie_embeddings=true"]
    layout = ["parallel.tp=2", "parallel.pp=2", "parallel.vp=2", "parallel.schedule=interleaved"]
    layout += ["parallel.sp=true", "optim.distributed=true", "parallel.bucket_mb=0.01"]
    per_rank = world8.run(_run_buckets, [*base, *model, *layout], 29504, timeout=180)
    reference = train_curves([*base[:-1], f"log.dir={tmp_path / 'one'}", *model])
    for curves, buckets in per_rank:
        assert len(buckets) == 2 and min(buckets) >= 2, buckets
        assert curves == pytest.approx(reference, rel=1e-5)
