"""Sharded checkpoints reshard on load: a run saved in one layout resumes in another.

Each saving run trains 3 of 6 steps (``train.exit_after=3``) in one layout and saves; resuming runs
load that checkpoint in other layouts (tensor, data and pipeline parallel, virtual stages, sequence
parallelism and the distributed optimizer on or off, and one process) and train steps 4-6. Their
losses must equal the uninterrupted one-process run within rtol 1e-5: changing the layout changes the
order of fp32 reductions, so bitwise equality is not expected (test_trainer_parity.py measures ~1e-7).
A resume in the saving layout changes no sum's order: it equals that layout's uninterrupted run
bitwise. The model has GQA with fewer KV heads than tp=4 ranks (KV rows replicated), an untied head
and a vocabulary of 520 padded to 768 at tp=2, so every kind of box is exercised.
"""

import os
from pathlib import Path

import pytest
from test_trainer_parity import corpus, overrides  # noqa: F401 (corpus is a fixture)

from megatron_lite.config import load_config
from megatron_lite.errors import UserError
from megatron_lite.training.run_lock import LOCK_FILE
from megatron_lite.training.trainer import Trainer

SAVES = {
    "tp2_sp_dp2_distopt": ["parallel.tp=2", "parallel.sp=true", "optim.distributed=true"],
    "tp4": ["parallel.tp=4"],
}
RESUMES = {  # name: (saved by, layout it resumes in)
    "tp2_sp_dp2_distopt->dp4": ("tp2_sp_dp2_distopt", []),
    "tp2_sp_dp2_distopt->tp4": ("tp2_sp_dp2_distopt", ["parallel.tp=4"]),
    "tp4->dp4_distopt": ("tp4", ["optim.distributed=true"]),
    "tp4->tp2_dp2": ("tp4", ["parallel.tp=2", "parallel.sp=true"]),
}
PP_SAVE = ["parallel.tp=2", "parallel.pp=2"]
PP_RESUMES = {
    "tp2_pp2->tp4": ["parallel.tp=4"],
    "tp2_pp2->dp4": [],
    "tp2_pp2->pp2_dp2_distopt": ["parallel.pp=2", "optim.distributed=true"],
}


def run(base: list[str], root: Path, name: str, layout: list[str], *extra: str) -> list[float]:
    args = [*base, *layout, f"log.dir={root / name}", f"checkpoint.dir={root / name / 'ckpt'}", *extra]
    return [r["loss"] for r in Trainer(load_config(None, args)).fit()]


def step3(root: Path, name: str) -> str:
    return f"checkpoint.resume={root / name / 'ckpt' / 'step_00000003'}"


def _save_and_resume(rank: int, world: int, base: list[str], root: Path, port: int) -> dict[str, list[float]]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name, layout in SAVES.items():
        run(base, root, name, layout, "train.exit_after=3")
    return {name: run(base, root, name, layout, step3(root, src)) for name, (src, layout) in RESUMES.items()}


def refusal(base: list[str], root: Path, name: str, layout: list[str], *extra: str) -> str:
    """The error of a run every rank must refuse (each raises it: none is left waiting in a collective)."""
    with pytest.raises(UserError) as e:
        run(base, root, name, layout, *extra)
    return str(e.value)


def saved_files(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE}


def _pipeline(rank: int, world: int, base: list[str], root: Path, port: int) -> dict[str, list[float] | str]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    trainer = Trainer(load_config(None, [*base, *PP_SAVE, f"log.dir={root / 'probe'}"]))
    names = {n for chunk in trainer.engine.ddp.chunks for n, _ in chunk.named_parameters()}
    # the checkpoint must really come from pipeline stages: each rank holds one of the two layers
    assert ("layers.0.attn.qkv.weight" in names) != ("layers.1.attn.qkv.weight" in names), sorted(names)
    run(base, root, "tp2_pp2", PP_SAVE, "train.exit_after=3")
    resumed = {name: run(base, root, name, layout, step3(root, "tp2_pp2")) for name, layout in PP_RESUMES.items()}
    saved = saved_files(root / "tp2_pp2")
    other_model = ["parallel.tp=4", "model.hidden=128", "model.layers=3", "model.vocab_size=640"]
    refused = refusal(base, root, "tp2_pp2->tp4_other_model", other_model, step3(root, "tp2_pp2"))
    assert saved_files(root / "tp2_pp2") == saved
    return {**resumed, "refused": refused}


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):  # noqa: F811
    prefix, tok = corpus
    args = overrides(prefix, str(tok), str(tmp_path_factory.mktemp("unused")))[:-2]  # drop resume=none, log.dir
    return [*args, "train.steps=6", "model.kv_heads=2", "model.vocab_size=520", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory) -> list[float]:
    root = tmp_path_factory.mktemp("straight")
    return run(base, root, "one_process", [])


def assert_every_rank(per_rank: list[dict[str, list[float]]], names, want: list[float]) -> None:
    for name in names:
        for rank, losses in enumerate(per_rank):
            assert losses[name] == pytest.approx(want, rel=1e-5), (name, rank, losses[name])


def test_checkpoints_reshard_across_layouts(world4, base, straight, tmp_path):
    per_rank = world4.run(_save_and_resume, base, tmp_path, 29500, timeout=240)
    assert_every_rank(per_rank, RESUMES, straight[3:])
    # and the tp=2 x dp=2 distributed-optimizer checkpoint in one process (tp=1, pp=1, dp=1)
    one = run(base, tmp_path, "tp2_sp_dp2_distopt->one_process", [], step3(tmp_path, "tp2_sp_dp2_distopt"))
    assert one == pytest.approx(straight[3:], rel=1e-5)


def test_pipeline_checkpoint_reshards(world4, base, straight, tmp_path):
    """A tp=2 x pp=2 checkpoint resumes in other layouts; resumed in another layout with another model,
    it is one error on every rank naming each setting, and the checkpoint is left as it was."""
    per_rank = world4.run(_pipeline, base, tmp_path, 29500, timeout=240)
    assert_every_rank(per_rank, PP_RESUMES, straight[3:])
    for rank, results in enumerate(per_rank):
        error = results["refused"]
        assert "was saved with other model settings: " in error, (rank, error)
        for change in ("model.layers: checkpoint 2, now 3", "model.hidden: checkpoint 64, now 128"):
            assert change in error, (rank, error)
        assert "model.vocab_size: checkpoint 520, now 640" in error, (rank, error)
    one = run(base, tmp_path, "tp2_pp2->one_process", [], step3(tmp_path, "tp2_pp2"))
    assert one == pytest.approx(straight[3:], rel=1e-5)


TIED = ["model.layers=4", "model.tie_embeddings=true"]
INTERLEAVED = ["parallel.pp=2", "parallel.vp=2", "parallel.schedule=interleaved", "optim.distributed=true"]


def _interleaved_tied(rank: int, world: int, base: list[str], root: Path, port: int) -> dict[str, list[float]]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    whole = run(base, root, "vp2_tied_whole", [*TIED, *INTERLEAVED])
    run(base, root, "vp2_tied", [*TIED, *INTERLEAVED], "train.exit_after=3")
    return {
        "whole": whole[3:],
        "vp2_tied->vp2_tied": run(base, root, "vp2_tied->vp2_tied", [*TIED, *INTERLEAVED], step3(root, "vp2_tied")),
        "vp2_tied->dp4": run(base, root, "vp2_tied->dp4", TIED, step3(root, "vp2_tied")),
    }


def test_interleaved_tied_checkpoint_holds_the_embedding(world4, base, tmp_path):
    """Interleaved stages (pp=2 x dp=2, distributed optimizer) with tied embeddings: rank 0 holds the
    embedding and a later stage, the last stage's rank the head's copy; the checkpoint must hold the
    embedding once (the owner's). It resumes in its own layout, bitwise as if never stopped, and at
    dp=4 without pipeline stages or the distributed optimizer."""
    want = run(base, tmp_path, "tied_straight", TIED)[3:]
    per_rank = world4.run(_interleaved_tied, base, tmp_path, 29500, timeout=240)
    for rank, losses in enumerate(per_rank):
        assert losses["vp2_tied->vp2_tied"] == losses["whole"], (rank, losses)
        for name in ("vp2_tied->vp2_tied", "vp2_tied->dp4"):
            assert losses[name] == pytest.approx(want, rel=1e-5), (name, rank, losses[name])
    one = run(base, tmp_path, "vp2_tied->one_process", TIED, step3(tmp_path, "vp2_tied"))
    assert one == pytest.approx(want, rel=1e-5)


GPT2 = ["model.arch=gpt2", "model.kv_heads=4", "model.layers=3"]  # LayerNorm, biases, learned positions, tied


def _gpt2(rank: int, world: int, base: list[str], root: Path, port: int) -> list[float]:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(
        base,
        root,
        "gpt2_tp2_pp2_sp",
        [*GPT2, "parallel.tp=2", "parallel.pp=2", "parallel.sp=true"],
        "train.exit_after=3",
    )
    return run(base, root, "gpt2->dp4_distopt", [*GPT2, "optim.distributed=true"], step3(root, "gpt2_tp2_pp2_sp"))


def test_gpt2_checkpoint_reshards(world4, base, tmp_path):
    """gpt2's column-parallel biases (split over tp), row-parallel biases and LayerNorms (replicated),
    learned positions and tied head, saved by tp=2 x pp=2 with sequence parallelism, resume at dp=4
    with the distributed optimizer."""
    want = run(base, tmp_path, "gpt2_straight", GPT2)[3:]
    per_rank = world4.run(_gpt2, base, tmp_path, 29500, timeout=240)
    for rank, losses in enumerate(per_rank):
        assert losses == pytest.approx(want, rel=1e-5), (rank, losses)
