"""What a resume changes since its checkpoint, short of what it refuses (``resume.py``).

Every setting but the model's may change on resume (``train.steps``, the batch sizes: the data
position is counted in samples and carries over, the layout: the checkpoint reshards on load,
``train.dtype``, intervals, data...). The trainer logs one line naming each setting changed since the
checkpoint (:func:`config_changes`), so that no run is changed by accident; the changes whose effect
is not plain from the value are also warned about, saying what they mean (seed and held-out split:
:func:`data_order_changes`; data and learning-rate schedule: :func:`resume_warnings`).

Another learning-rate schedule is allowed (e.g. a lower ``optim.lr`` past a divergence) but logged
(:func:`schedule_change`): the learning rate would otherwise jump without a word. Changed model
settings (:func:`model_changes`, both sides resolved by :func:`resolved_model`) are what
``resume.py`` refuses.
"""

from __future__ import annotations

from typing import Any

from megatron_lite.checkpoint.lineage import data_changes
from megatron_lite.checkpoint.reader import CheckpointReader
from megatron_lite.config import Config, config_from_dict, fill_defaults
from megatron_lite.training.lr import lr_at


def resolved_model(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved ``model`` section with every default resolved as the trainer resolves
    it; keys this version does not know are left out, keys it lacks take their defaults."""
    known = Config().to_dict()["model"]
    cfg = config_from_dict({"model": {k: v for k, v in saved.items() if k in known}})
    fill_defaults(cfg, vocab_size=cfg.model.vocab_size)
    return cfg.to_dict()["model"]


INIT_ONLY = ("init_std",)  # model settings read only to initialise weights, which a resume loads instead


def model_changes(saved: dict[str, Any], now: Config) -> list[str]:
    """``model.KEY: checkpoint A, now B`` for every resolved model setting of the saved config ``saved``
    (its ``model`` section) that differs, but those read only at initialisation (:data:`INIT_ONLY`);
    a ``model.vocab_size`` that follows the embedded corpus's ``data.vocab_size`` is named by that key
    (:func:`corpus_vocab_change`)."""
    before, after = resolved_model(saved["model"]), now.to_dict()["model"]
    return [
        (k == "vocab_size" and corpus_vocab_change(saved, now))
        or f"model.{k}: checkpoint {before[k]!r}, now {after[k]!r}"
        for k in after
        if k not in INIT_ONLY and before[k] != after[k]
    ]


def corpus_vocab_change(saved: dict[str, Any], now: Config) -> str | None:
    """A changed ``model.vocab_size`` named by the key the user changed, ``data.vocab_size``, when both
    runs train on the embedded corpus with its own tokenizer (trained to ``data.vocab_size`` pieces)
    and ``model.vocab_size`` is that vocabulary (its default) in both; else None."""
    data, model = saved.get("data") or {}, saved["model"]
    d, vocab = now.data, now.model.vocab_size
    ours = not d.path and not d.tokenizer and vocab == d.vocab_size
    theirs = not data.get("path") and not data.get("tokenizer") and model.get("vocab_size") == data.get("vocab_size")
    if ours and theirs:
        return (
            f"data.vocab_size: checkpoint {data['vocab_size']!r}, now {d.vocab_size!r} (the embedded corpus's "
            "tokenizer is trained to it, and model.vocab_size is that tokenizer's vocabulary)"
        )
    return None


PER_PROCESS = {("checkpoint", "resume"), ("train", "exit_after")}  # how this process starts and stops


def config_changes(saved: dict[str, Any], now: Config) -> list[str]:
    """``section.key A -> B`` for every setting of ``now`` that differs from the checkpoint's saved
    config (its ``model`` section resolved by :func:`resolved_model`), but those that say only how
    this process starts or stops (:data:`PER_PROCESS`); keys one side lacks are not compared."""
    before = {**saved, "model": resolved_model(saved["model"])} if "model" in saved else saved
    changes = []
    for section, values in now.to_dict().items():
        old = before.get(section) or {}
        changes += [
            f"{section}.{k} {old[k]} -> {v}"
            for k, v in values.items()
            if (section, k) not in PER_PROCESS and k in old and old[k] != v
        ]
    return changes


def data_order_changes(saved: dict[str, Any], now: Config, step: int) -> list[str]:
    """Why the samples after checkpoint ``step`` would differ from the original run's: another
    ``train.seed`` (data order) or ``data.valid_fraction`` (which documents are trained on)."""
    changes = []
    seed = saved.get("train", {}).get("seed")
    if seed is not None and seed != now.train.seed:
        changes.append(
            f"train.seed={now.train.seed} differs from the checkpoint's train.seed={seed}: the data order from "
            f"step {step} on differs from the original run's (resume with train.seed={seed} to keep it)"
        )
    fraction = saved.get("data", {}).get("valid_fraction")
    if fraction is not None and fraction != now.data.valid_fraction:
        changes.append(
            f"data.valid_fraction={now.data.valid_fraction} differs from the checkpoint's {fraction}: other "
            f"documents are trained on from step {step} on (some the run held out for evaluation) and the "
            f"eval loss is measured on others (resume with data.valid_fraction={fraction} to keep them)"
        )
    return changes


SCHEDULE_KEYS = ("lr", "min_lr", "warmup", "decay_steps", "decay_style", "wsd_decay_steps", "wsd_decay_shape")


def schedule_change(cfg: Config, reader: CheckpointReader) -> str | None:
    """A warning when this run's learning-rate schedule (resolved: ``optim.decay_steps`` defaults to
    ``train.steps - optim.warmup``, so a longer ``train.steps`` changes it) is not the checkpoint's and
    a step left to train, as printed, gets another learning rate than the checkpoint's run would give
    it, naming each change, the first such step and both its rates; else None. A change that shows only
    later (another decay style during warmup) is named at the step it shows."""
    saved = reader.meta["config"].get("optim", {})
    changed = [
        f"optim.{k} {saved[k]} -> {getattr(cfg.optim, k)}"
        for k in SCHEDULE_KEYS
        if k in saved and saved[k] != getattr(cfg.optim, k)
    ]
    if not changed:
        return None
    updates = reader.step - (reader.meta.get("trainer") or {}).get("skipped_steps", 0)  # the schedule's position
    for left in range(cfg.train.steps - reader.step):  # the steps left, each one update (no skips to come)
        before = f"{lr_at(updates + left, reader.config.optim):.4g}"
        now = f"{lr_at(updates + left, cfg.optim):.4g}"
        if now != before:
            break
    else:
        return None
    step = reader.step + 1 + left
    same = f"steps {reader.step + 1}-{step - 1} train as the checkpoint's run would, then " if left else ""
    return (
        f"the learning-rate schedule is not the checkpoint's ({', '.join(changed)}): {same}step {step} trains "
        f"with lr {now} where the checkpoint's run would use {before}"
    )


def resume_warnings(cfg: Config, reader: CheckpointReader, lineage: dict, weights: list[float]) -> list[str]:
    """What a resume changes without refusing it: other data than the checkpoint trained on (a new
    mixture may be intended; read from the checkpoint's ``consumed_samples`` on, as Megatron does) and
    another learning-rate schedule (:func:`schedule_change`). Nothing when the checkpoint already
    reached ``train.steps``: no step trains, so nothing changes."""
    if reader.step >= cfg.train.steps:
        return []
    warnings = []
    if changes := data_changes(reader.meta.get("lineage"), lineage, weights):
        consumed = reader.meta["trainer"]["consumed_samples"]
        warnings.append(
            "resuming with other data than the checkpoint trained on: "
            + "; ".join(changes)
            + "; the samples from here on are not the ones the run would have seen (restore the data and "
            f"settings to continue it exactly), and the data position carries over: the blend of this data is "
            f"read from its sample {consumed} on"
        )
    if why := schedule_change(cfg, reader):
        warnings.append(why)
    return warnings
