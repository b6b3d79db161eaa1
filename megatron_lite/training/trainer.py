"""The training loop, the same for one process and for any (tp, pp, dp) layout.

Setup order: the launch environment and the config's layout are checked before any process group
forms -> the process group -> train.dtype=fp8's requirements (``fp8.py``), the kernel backend, run
directories and a fresh start's checkpoint directory (``preflight.py``) -> data (the corpus is
built once per node, first) and the layout against the vocabulary -> the mesh -> the checkpoint to
start from (one saved with other model settings is refused: ``resume.py``) -> the
:class:`~megatron_lite.training.engine.Engine` (model, main grads, optimizer) -> its state restored.

One optimizer step: the loader yields this rank's microbatches of the global batch (which samples
depend only on seed and step) -> ``Engine.step`` (forward/backward, overlapped gradient reduction,
global clipping, AdamW or a skip on every rank) -> metrics on rank 0, evaluation and checkpoints.
Without a held-out sample there is no evaluation and no ``eval_loss``, said once at startup
(``build.build_data``). Setup, from the process group on, and the loop run under a ``FailureWatch``
(``launcher/failure_watch.py``): a rank that raises stops every rank within seconds, each logging its
error. A signal during setup (``fault.py: SetupSignals``) ends the run the same way; during the loop
it saves a checkpoint first.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_lite import kernels, plan
from megatron_lite.checkpoint.format import dtype_name, step_dir_name
from megatron_lite.checkpoint.lineage import Lineage
from megatron_lite.checkpoint.reader import CheckpointReader
from megatron_lite.checkpoint.writer import Checkpointer
from megatron_lite.config import Config, fill_defaults
from megatron_lite.data.gpt_dataset import GPTDataset, PretrainingLoader
from megatron_lite.data.token_range import check_batch_ids
from megatron_lite.errors import UserError
from megatron_lite.launcher.env import resolve_env
from megatron_lite.launcher.fail_fast import agree_on_config, fail_fast_setup
from megatron_lite.launcher.failure_watch import FailureWatch
from megatron_lite.models.transformer import count_parameters
from megatron_lite.parallel.mesh import ParallelDims, ParallelMesh, coordinate_table, init_distributed
from megatron_lite.plan import Layout
from megatron_lite.progress import above_progress_bar, progress_bar
from megatron_lite.training import build, fp8, metrics, preflight, resume
from megatron_lite.training.engine import Engine
from megatron_lite.training.evaluate import held_out_loss
from megatron_lite.training.fault import DivergenceError, PreemptionHandler, SetupSignals, SkippedSteps, any_rank
from megatron_lite.training.lr import lr_at
from megatron_lite.training.metrics import Throughput, closing_lines, flops_per_token, peak_flops, step_lines
from megatron_lite.training.trackers import Trackers, check_packages

log = logging.getLogger(__name__)


def check_layout(cfg: Config, world_size: int, vocab_size: int | None = None) -> Layout | None:
    """Every check that needs no process group. Without the vocabulary (before the data is open):
    everything ``plan`` checks but the vocabulary's tensor-parallel split; with it, everything."""
    fill_defaults(cfg, vocab_size=vocab_size)
    return plan.check_layout(cfg, world_size, need_vocab=vocab_size is not None)


class Trainer:
    """Owns this rank's engine, data position and trackers for one run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.started = cfg, time.perf_counter()
        # a layout that cannot fill the world fails before any group forms
        check_layout(cfg, resolve_env(os.environ).world_size)
        self.env = init_distributed(cfg.parallel.timeout_s)
        self.rank, self.world = self.env.rank, self.env.world_size
        self.device = build.resolve_device(cfg.train.device)
        # a signal from here to the loop ends the run with one line (fault.py: SetupSignals); a rank that
        # fails or is signalled stops the others at once: they would wait for it in their next collective
        with SetupSignals(), FailureWatch(cfg.parallel.timeout_s, where="during setup"):
            self._check_and_make_mesh()
            self._build()
            self._log_setup()

    def _check_and_make_mesh(self) -> None:
        """Setup before the mesh: preflight, data, the config against the data's vocabulary (the same
        on every rank), then the mesh."""
        cfg = self.cfg
        self._preflight()
        kernels.set_backend(cfg.kernels.backend)
        self.data = self._prepare_data()
        with fail_fast_setup("checking the config"):
            self.layout = check_layout(cfg, self.world, self.data.tokenizer.vocab_size)
            unchecked = build.check_data_vocab(self.data, cfg.model.vocab_size)  # no mid-run surprise
        agree_on_config(cfg.to_dict())  # resolved: the tokenizer's vocabulary filled in
        if self.rank == 0:
            local_ranks = self.env.local_world_size
            for why in [
                *self.data.warnings,
                *preflight.setup_warnings(cfg, self.world, self.device, local_ranks, self.data.train, self.data.valid),
                *unchecked,
            ]:
                log.warning("%s", why)
            if cfg.data.valid_fraction == 0:  # Megatron's way too: an empty split is never evaluated
                log.info(
                    "data.valid_fraction=0: no held-out split, so no evaluation runs and metrics.jsonl has no eval_loss"
                )
        p = cfg.parallel
        self.mesh = ParallelMesh.build(ParallelDims(tp=p.tp, pp=p.pp, dp=p.dp, vp=p.vp))

    def _build(self) -> None:
        """The mesh's part of setup: checkpoint chosen, run directory, engine, loader, checkpointer,
        trainer state restored, trackers."""
        cfg = self.cfg
        self.dtype = build.resolve_dtype(cfg.train.dtype, self.device)
        self.run_dir = Path(cfg.log.dir)
        if self.rank == 0 and self.world > 1:
            log.info("rank layout:\n%s", coordinate_table(self.mesh.dims))
        torch.manual_seed(cfg.train.seed)
        with fail_fast_setup("loading the checkpoint"):
            start = resume.start_from(cfg, self.rank, self.data.tokenizer_path)
        if self.rank == 0:  # only once the checkpoint was accepted: a refused run overwrites nothing
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml", relaunch=True)
        self.engine = Engine(cfg, self.mesh, self.layout, self.device, self.dtype, model_state=start and start[1])
        self.loader = self._loader(self.data.train)
        self.step, self.skipped_steps = 0, 0  # the skip_watch says why, and stops a run that diverged
        self.skip_watch = SkippedSteps(self.engine.scaler, active=self.rank == 0)
        self.checkpointer = self._make_checkpointer(start[0] if start else None)
        self.lineage = Lineage(self.data.train, self.data.tokenizer_path) if self.rank == 0 else None  # hashes once
        if start:
            self._restore(*start)
        # a launched rank ignores a preemption signal that comes after its loop (fault.py: late signals)
        self.preemption = PreemptionHandler(ignore_after_request=self.env.launcher != "none")
        self.preempted = False
        self.trackers = Trackers.from_config(self.run_dir, cfg, active=self.rank == 0, step=self.step)
        # only rank 0 logs MFU; measuring a CPU peak on every rank at once would measure contention.
        # Every rank tells which CPUs it may run on, so rank 0 counts its own share of them once.
        share = metrics.local_cpu_share() if self.device.type == "cpu" else 1.0
        peak = peak_flops(self.device, self.dtype, share) if self.rank == 0 else None
        self.throughput = Throughput(flops_per_token(cfg.model), peak, self.world)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len

    def _preflight(self) -> None:
        """The startup checks that need no data: kernels and fp8 on this device, the run and
        checkpoint directories and the trackers' packages, before any slow work (a bad path would
        otherwise fail the first save, and hang the peers)."""
        cfg = self.cfg
        with fail_fast_setup("checking the kernels and run directories"):
            if cfg.train.dtype == "fp8" and (why := fp8.device_problem(self.device)):  # the rest: check_layout
                raise UserError(f"train.dtype=fp8: {why}")
            preflight.check_kernels(cfg.kernels.backend, self.device)
            if self.rank == 0:
                preflight.check_log_dir(cfg)
                check_packages(cfg.log.tensorboard, cfg.log.wandb)  # only rank 0 writes to the trackers
            preflight.check_checkpoint_dir(cfg, self.world)  # every rank writes there: each checks its own view
            if self.rank == 0:
                preflight.check_fresh_start(cfg)
                preflight.check_start_tokenizer(cfg)  # these two before the embedded corpus is built
                preflight.check_start_vocab(cfg)
        preflight.check_shared_checkpoint_dir(cfg, self.rank, self.world)  # one machine's view is not enough

    def _make_checkpointer(self, source: CheckpointReader | None) -> Checkpointer:
        """The writer. Rank 0 copies into every checkpoint the tokenizer (and its record) and, when the
        run starts from a Hugging Face import (or a checkpoint of one), its ``origin.json``, which makes
        ``convert to-hf`` write the source's class again (e.g. Mistral)."""
        c, files = self.cfg.checkpoint, {}
        if self.rank == 0:
            record = self.data.tokenizer_record  # None: no record of this model to copy
            files = {"tokenizer.model": self.data.tokenizer_path, **({"tokenizer.json": record} if record else {})}
            origin = source.local_file("origin.json") if source is not None else None
            if origin is not None:
                files["origin.json"] = self.run_dir / "origin.json"
                shutil.copyfile(origin, files["origin.json"])
        return Checkpointer(c.dir, c.keep, c.async_, files, spared=resume.other_runs_checkpoints(self.cfg, self.rank))

    def _prepare_data(self) -> build.DataBundle:
        """Build the default corpus once per node (local rank 0 first), then open it on every rank."""
        with fail_fast_setup("preparing the data"):  # also the barrier: local rank 0 builds first
            if self.env.local_rank == 0:
                paths = build.resolve_data_paths(self.cfg, progress=self.cfg.log.progress and self.rank == 0)
        with fail_fast_setup("opening the data"):
            if self.env.local_rank != 0:
                paths = build.resolve_data_paths(self.cfg, progress=False)
            return build.build_data(self.cfg, *paths)

    def _log_setup(self) -> None:
        if self.rank != 0:
            return
        model = torch.nn.ModuleList(self.engine.chunks)  # every chunk of this rank (vp > 1), each parameter once
        n, body = count_parameters(model), count_parameters(model, True)
        sizes = f"{n:,} parameters on this rank ({body:,} without embeddings)"
        dtype, backend = str(self.dtype).replace("torch.", ""), kernels.get_backend()
        log.info("model: %s; world %d; device %s, dtype %s, kernels %s", sizes, self.world, self.device, dtype, backend)
        log.info("kernels on %s:\n%s", self.device, preflight.kernel_report(self.device))

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The trainer's part of a checkpoint, identical on every rank (JSON): data position, skipped
        steps and the streak of them this step ends in, loss scale. Model, optimizer and RNG are
        per-rank tensors (see :meth:`save`)."""
        return {
            "skipped_steps": self.skipped_steps,
            "consumed_samples": self.loader.consumed_samples,
            "scaler": self.engine.scaler.state_dict() if self.engine.scaler else None,
            "skip_streak": self.skip_watch.state_dict(),
        }

    def save(self) -> None:
        """Checkpoint this step: every rank writes its own boxes (``checkpoint/format.py``); with
        ``checkpoint.async`` the files are written in the background while training goes on."""
        pieces, optimizer_step = self.engine.sharded_state()
        rng = {"rng/torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {}
        if self.rank == 0:
            p = self.cfg.parallel
            meta = {
                "step": self.step,
                "weights_only": False,
                "config": self.cfg.to_dict(),
                "layout": {
                    "world_size": self.world,
                    "tp": p.tp,
                    "pp": p.pp,
                    "vp": p.vp,
                    "dp": p.dp,
                    "distributed_optimizer": self.cfg.optim.distributed,
                    "param_dtype": dtype_name(self.dtype),
                },
                "optimizer": {"step": optimizer_step},
                "trainer": self.state_dict(),
                "lineage": self.lineage.at(self.loader.consumed_samples),
            }
        self.checkpointer.save(self.step, pieces, rng, self.mesh.coordinate, meta)

    def _restore(self, reader: CheckpointReader, weights: dict | None) -> None:
        """Optimizer, masters, data position, scaler and RNG; a weights-only start has only weights
        (the engine was built from them)."""
        if weights is not None:
            if self.rank == 0:
                log.info(
                    "initialised the model from %s (weights only: step 0, fresh optimizer and data order)",
                    reader.location,
                )
            reader.close()
            return
        with fail_fast_setup("reading the checkpoint's trainer state"):
            state = reader.meta["trainer"]
            rng = resume.read_rng(reader, self.rank, self.world, self.cfg.parallel)
        self.engine.load_sharded_state(reader, reader.meta["optimizer"]["step"])
        if self.engine.scaler and state["scaler"]:
            self.engine.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict({"consumed_samples": state["consumed_samples"]})
        self.step, self.skipped_steps = reader.step, state["skipped_steps"]
        self.skip_watch.load_state_dict(state.get("skip_streak"))
        resume.set_rng(rng, self.device)
        if self.rank == 0:
            if rng is None:
                log.info("the layout changed since the checkpoint: RNG states not restored (the model has no dropout)")
            log.info("resumed from %s at step %d", reader.location, self.step)
            if changed := resume.config_changes(reader.meta.get("config") or {}, self.cfg):
                log.info("settings changed since the checkpoint (saved -> now): %s", "; ".join(changed))
            for why in resume.resume_warnings(self.cfg, reader, self.lineage.static, self.data.train.weights):
                log.warning("%s", why)
        reader.close()

    # ---- steps -------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step: loss (global-batch mean), grad_norm, lr, skipped."""
        lr = lr_at(self.step - self.skipped_steps, self.cfg.optim)  # a skipped step leaves the schedule where it is
        micro = self.loader.next_step()
        check_batch_ids(micro, self.cfg.model.vocab_size, f"step {self.step + 1}", self.data.tokenizer_path)
        out = self.engine.step(micro, lr)
        self.skipped_steps += int(out["skipped"])
        self.step += 1
        return {**out, "lr": lr}

    def evaluate(self) -> float:
        """Mean loss over ``train.eval_iters`` global batches of the held-out split (always the same ones),
        their token ids checked as the training batches' are (held-out documents are never trained on)."""
        where = f"the evaluation at step {self.step}"
        return held_out_loss(
            self._loader(self.data.valid), self.cfg, where, self.data.tokenizer_path, self.engine.eval_loss
        )

    def _loader(self, dataset: GPTDataset) -> PretrainingLoader:
        """This dp rank's microbatches of ``dataset``, from its first global batch."""
        t = self.cfg.train
        return PretrainingLoader(dataset, t.micro_batch_size, t.global_batch_size, self.mesh.dp_rank, self.mesh.dp_size)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to ``train.steps`` (or ``train.exit_after`` steps in this process); returns the logs."""
        cfg, history = self.cfg, []
        t = cfg.train
        if self.step >= t.steps:  # saving again would only rewrite the checkpoint just loaded
            if self.rank == 0:
                log.info("%s", metrics.nothing_to_train(self.step, t.steps))
            with self.preemption:  # nothing to save: a preemption signal from here on is harmless
                self.checkpointer.close()
            self.trackers.close()
            return history
        first, stop = self.step, t.steps if t.exit_after is None else min(t.steps, self.step + t.exit_after)
        watch = FailureWatch(cfg.parallel.timeout_s, settle=self._settle_save, note=self.checkpointer.unsaved_note)
        try:  # log lines printed above the progress bar, not through it
            with self.preemption, watch, above_progress_bar():
                self._loop(stop, history, watch)
        except BaseException:
            self.trackers.close(failed=True)  # flushed, and marked failed (W&B), before the error goes up
            raise
        self.trackers.close()  # before the summary: W&B prints its own as it finishes, and ours is the last word
        if self.rank == 0:
            wall, where = time.perf_counter() - self.started, self.checkpointer.storage.url(step_dir_name(self.step))
            for line in closing_lines(t, first, history, self.preempted, wall, self.throughput, where):
                log.info("%s", line)
        return history

    def _loop(self, stop: int, history: list[dict], watch: FailureWatch) -> None:
        """The steps up to ``stop`` (or a preemption), then the last save, committed."""
        cfg, t = self.cfg, self.cfg.train
        show = cfg.log.progress and self.rank == 0
        bar = progress_bar(show, total=t.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1)
        while self.step < stop and not self.preempted:
            watch.step = self.step + 1
            start = time.perf_counter()
            out = self.train_step()
            self.throughput.add(self.tokens_per_step, time.perf_counter() - start)
            record = self._after_step(out, bar, stop)
            if record:
                history.append(record)
        bar.close()
        if self.checkpointer.last_step != self.step:  # the step it stops at, unless a periodic save was it
            self.save()
        self.checkpointer.close()  # waits for an async save; raises if any save failed

    def _settle_save(self, error: BaseException) -> None:
        """The loop raised: commit an async save in flight only where every rank stands at this same
        point (an error raised on every rank after the step's collectives: training diverged; or one
        process that failed, an interrupt aside); elsewhere a peer may be gone (``Checkpointer.settle``)."""
        together = getattr(error, "raised_on_every_rank", False) or (self.world == 1 and isinstance(error, Exception))
        self.checkpointer.settle(commit=together)

    def _after_step(self, out: dict, bar: tqdm, stop: int) -> dict | None:
        """Metrics, evaluation and checkpoint after one step. The step a run stops at (``stop``: train.steps
        or train.exit_after, a preemption signal, or the skipped step that makes the run diverged) always
        gets a metrics row, whatever ``log.every``: a resumed run's rows go on from the next step without a gap."""
        cfg, step = self.cfg, self.step
        bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)  # before update(), which redraws
        bar.update(1)
        try:
            self.skip_watch.update(step, out)
        except DivergenceError:  # raised on every rank alike: each logs (rank 0 writes) the row, then stops
            self._log_step(out, bar, is_eval=False)
            raise
        record = None
        is_eval = self.data.valid is not None and (  # no held-out split (module docstring): no evaluation
            (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps
        )
        if step % cfg.log.every == 0 or step == stop or is_eval:
            record = self._log_step(out, bar, is_eval)
        # one all-reduce a step: any rank signalled? any rank still writing an async checkpoint?
        self.preempted, writing = any_rank([self.preemption.requested, self.checkpointer.writing], self.device)
        if self.preempted:
            self.preemption.peer_requested()  # its own copy of the signal may come late: harmless then
        if self.preempted and record is None:  # every rank stops at this step (the all-reduce says so): its row too
            record = self._log_step(out, bar, is_eval=False)
        if self.checkpointer.in_flight and not writing:  # every rank's file is complete: commit it now; a failed
            self.checkpointer.wait()  # one stops the run at this step (as a failed synchronous save), not later
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and not self.skip_watch.hold_save(step):
            self.save()
        return record

    def _log_step(self, out: dict, bar: tqdm, is_eval: bool) -> dict:
        """This step's metrics row (with the evaluation's loss when ``is_eval``), sent to the trackers."""
        step = self.step
        record = {
            "step": step,
            "loss": out["loss"],
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            **self.throughput.report(),
            "consumed_samples": self.loader.consumed_samples,
            "skipped_steps": self.skipped_steps,
        }
        if self.device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if is_eval:
            record["eval_loss"] = self.evaluate()
        self.trackers.log(record, step)
        if self.rank == 0:  # one line for the row (and one for its evaluation), on a terminal or in a job log
            for line in step_lines(record, self.cfg.train.steps, self.tokens_per_step):
                log.info("%s", line)
        bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        return record
