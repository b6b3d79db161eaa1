"""The training loop: one optimizer step = the global batch's microbatches, accumulated.

Order of one step: the loader yields this rank's microbatches of the global batch (which samples
depend only on seed and step) -> forward/backward each under autocast, loss scaled by
1/accumulation so the gradient is the mean over the global batch -> clip the global norm (a
non-finite norm skips the step) -> AdamW with the scheduled LR -> metrics, eval and checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_lite import kernels
from megatron_lite.checkpoint.local import find_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from megatron_lite.config import Config, fill_defaults, validate
from megatron_lite.data.gpt_dataset import PretrainingLoader
from megatron_lite.errors import UserError
from megatron_lite.models.transformer import build_model, count_parameters
from megatron_lite.training import build
from megatron_lite.training.lr import lr_at
from megatron_lite.training.metrics import Throughput, flops_per_token, peak_flops
from megatron_lite.training.trackers import Trackers

log = logging.getLogger(__name__)


class Trainer:
    """Owns the model, optimizer, data position and trackers of one run (one process)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.device = build.resolve_device(cfg.train.device)
        kernels.set_backend(cfg.kernels.backend)
        prefixes, tok_path = build.resolve_data_paths(cfg, progress=cfg.log.progress)
        self.data = build.build_data(cfg, prefixes, tok_path)
        self._resolve_config()
        self.dtype = build.resolve_dtype(cfg.train.dtype, self.device)
        self.run_dir = Path(cfg.log.dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(self.run_dir / "config.yaml")
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, cfg.train.seed, self.device)
        self.model.recompute = cfg.train.recompute != "none"
        self.optimizer = build.build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.loader = PretrainingLoader(self.data.train, cfg.train.micro_batch_size, cfg.train.global_batch_size)
        self.step = 0
        self.skipped_steps = 0
        self._maybe_resume()
        self.trackers = Trackers(
            self.run_dir,
            cfg.to_dict(),
            active=True,
            tensorboard=cfg.log.tensorboard,
            wandb=cfg.log.wandb,
            wandb_project=cfg.log.wandb_project,
        )
        peak = peak_flops(self.device, self.dtype)
        self.throughput = Throughput(flops_per_token(cfg.model), peak)
        log.info(
            "model: %s parameters (%s without embeddings); device %s, dtype %s, kernels %s",
            f"{count_parameters(self.model):,}",
            f"{count_parameters(self.model, True):,}",
            self.device,
            str(self.dtype).replace("torch.", ""),
            kernels.get_backend(),
        )

    def _resolve_config(self) -> None:
        cfg, tok_vocab = self.cfg, self.data.tokenizer.vocab_size
        fill_defaults(cfg, vocab_size=tok_vocab)
        validate(cfg, world_size=1)
        if cfg.model.vocab_size < tok_vocab:
            raise UserError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({tok_vocab}); leave it empty to use the tokenizer's"
            )

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "data": self.loader.state_dict(),
            "rng": rng,
        }

    def save(self) -> Path:
        c = self.cfg.checkpoint
        tok = self.data.tokenizer_path
        files = {"tokenizer.model": tok, "tokenizer.json": tok.with_suffix(".json")}
        files = {k: v for k, v in files.items() if v.is_file()}
        path = save_checkpoint(c.dir, self.step, self.state_dict(), self.cfg.to_dict(), c.keep, files)
        log.info("saved checkpoint %s", path)
        return path

    def _maybe_resume(self) -> None:
        c = self.cfg.checkpoint
        path, weights_only = resolve_resume(c.dir, c.resume), False
        if path is None and c.init_from:
            path, weights_only = find_checkpoint(c.init_from), True
        if path is None:
            return
        state, _ = load_checkpoint(path)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint {path} does not fit this model (changed model.* settings?): {e}") from None
        if weights_only or state.get("weights_only"):  # e.g. made by `convert from-hf`
            log.info("initialised the model from %s (weights only: step 0, fresh optimizer and data order)", path)
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        log.info("resumed from %s at step %d", path, self.step)

    # ---- one step ----------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _forward_backward(self, micro: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for batch in micro:
            batch = batch.to(self.device, non_blocking=True)
            with self._autocast():
                loss = self.model(batch[:, :-1], batch[:, 1:]) / len(micro)
            self.scaler.scale(loss).backward()
            total += loss.detach()
        return total

    def train_step(self) -> dict[str, float]:
        """Run one optimizer step; returns loss, grad_norm, lr and whether it was skipped."""
        lr = lr_at(self.step, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self._forward_backward(self.loader.next_step())
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip_grad or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        finite = bool(torch.isfinite(grad_norm))
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # with fp16 the scaler itself skips non-finite steps
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 0 if finite else 1
        self.step += 1
        return {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr, "skipped": not finite}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over ``train.eval_iters`` global batches of the held-out split (always the same ones)."""
        if self.data.valid is None:
            return None
        t = self.cfg.train
        loader = PretrainingLoader(self.data.valid, t.micro_batch_size, t.global_batch_size)
        self.model.eval()
        losses = []
        for _ in range(t.eval_iters):
            for batch in loader.next_step():
                batch = batch.to(self.device)
                with self._autocast():
                    losses.append(self.model(batch[:, :-1], batch[:, 1:]).float())
        self.model.train()
        return torch.stack(losses).mean().item()

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to ``train.steps`` (or ``train.exit_after`` steps in this process); returns the logs."""
        cfg, history = self.cfg, []
        stop = (
            cfg.train.steps if cfg.train.exit_after is None else min(cfg.train.steps, self.step + cfg.train.exit_after)
        )
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            disable=not cfg.log.progress,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        while self.step < stop:
            start = time.perf_counter()
            out = self.train_step()
            self.throughput.add(tokens_per_step, time.perf_counter() - start)
            record = self._after_step(out, bar)
            if record:
                history.append(record)
        bar.close()
        if cfg.checkpoint.every == 0 or self.step % cfg.checkpoint.every:
            self.save()
        self.trackers.close()
        return history

    def _after_step(self, out: dict, bar: tqdm) -> dict | None:
        cfg, step = self.cfg, self.step
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
        record = None
        is_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps
        if step % cfg.log.every == 0 or step == cfg.train.steps or is_eval:
            record = {
                "step": step,
                "loss": out["loss"],
                "lr": out["lr"],
                "grad_norm": out["grad_norm"],
                **self.throughput.report(),
                "consumed_samples": self.loader.state_dict()["consumed_samples"],
                "skipped_steps": self.skipped_steps,
            }
            if self.device.type == "cuda":
                record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            if is_eval:
                record["eval_loss"] = self.evaluate()
            self.trackers.log(record, step)
            bar.set_postfix(loss=f"{out['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            self.save()
        return record
