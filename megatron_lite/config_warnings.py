"""Settings that are valid but probably not what was meant: :func:`config_warnings` names each, why,
and the fix (the trainer logs them at startup, ``plan`` prints them). Re-exported by
``megatron_lite.config``, where callers import it from.
"""

from __future__ import annotations

from megatron_lite.config_sections import Config, ModelConfig, ParallelConfig
from megatron_lite.config_validate import accumulation_steps
from megatron_lite.errors import UserError
from megatron_lite.training.lr import decay_end


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but probably not what was meant (defaults filled): each says why and the fix."""
    o, steps = cfg.optim, cfg.train.steps
    warnings = list(cfg.replaced_overrides)
    if o.warmup > steps:  # Megatron refuses this; a short smoke run of a long config is a fair use, so: a warning
        never = "" if o.decay_style == "constant" else ", and never decays"
        warnings.append(
            f"optim.warmup={o.warmup} is more than train.steps={steps}: the learning rate rises for the whole "
            f"run, reaching only {steps}/{o.warmup} of optim.lr={o.lr:g} at the last step{never}; "
            f"set optim.warmup to at most {steps} (commonly 1-10% of train.steps)"
        )
    elif why := _decay_warning(cfg):
        warnings.append(why)
    if why := _export_warning(cfg.model):
        warnings.append(why)
    if why := _schedule_warning(cfg.parallel) or _group_warning(cfg):
        warnings.append(why)
    return warnings


def _schedule_warning(p: ParallelConfig) -> str | None:
    """A ``parallel.schedule`` that runs as another one: any at ``pp=1`` (one stage runs each
    microbatch's forward, then its backward), ``interleaved`` at ``vp=1`` (1F1B exactly)."""
    if p.pp == 1 and p.schedule != "1f1b":
        return (
            f"parallel.schedule={p.schedule} has no effect at parallel.pp=1: one pipeline stage runs each "
            f"microbatch's forward, then its backward; set parallel.pp > 1 to pipeline the layers"
        )
    if p.schedule == "interleaved" and p.vp == 1:
        return (
            "parallel.schedule=interleaved at parallel.vp=1 runs 1f1b: each pipeline rank holds one chunk of "
            "layers; set parallel.vp > 1 (chunks per rank) to interleave them"
        )
    return None


def _group_warning(cfg: Config) -> str | None:
    """A schedule of vp > 1 chunks (interleaved, zb-h1) given microbatches per step that are no multiple
    of pp: it runs whole groups of pp microbatches (``schedules._one_f_one_b_slots``), and the ranks
    wait where the last group's missing ones would run. The interleaved bubble named is
    ``simulate.theory_bubble_ratio``'s (equal stages, free transfers): one microbatch past a multiple
    of pp makes it 1f1b's, all the interleaving's gain lost."""
    from megatron_lite.parallel.pipeline.simulate import theory_bubble_ratio  # imports torch: only when asked

    p, t = cfg.parallel, cfg.train
    if p.vp == 1 or p.schedule == "gpipe" or p.dp is None:  # dp: from the world size, not known yet
        return None
    m = accumulation_steps(cfg)
    if m % p.pp == 0:
        return None
    r, multiple = m % p.pp, t.micro_batch_size * p.dp * p.pp
    below = t.global_batch_size // multiple * multiple
    cost = ""
    if p.schedule == "interleaved":  # bubbles in microbatches' time: m x idle / busy
        bubble, full, one = (n * theory_bubble_ratio(p.pp, vp, n) for n, vp in ((m, p.vp), (p.pp, p.vp), (m, 1)))
        cost = (
            f": with equal stages a step's pipeline bubble is {bubble:g} microbatches' time, against "
            f"{full:g} with full groups (1f1b's: {one:g})"
        )
    return (
        f"parallel.schedule={p.schedule} with parallel.vp={p.vp} runs microbatches in groups of parallel.pp={p.pp}, "
        f"and the {m} per step (train.global_batch_size / (train.micro_batch_size x dp)) leave a last group of {r}, "
        f"whose ranks wait where the {p.pp - r} missing ones would run{cost}; set train.global_batch_size to a "
        f"multiple of train.micro_batch_size x dp x parallel.pp = {multiple} (e.g. "
        + (f"{below} or " if below else "")
        + f"{below + multiple})"
    )


def _export_warning(m: ModelConfig) -> str | None:
    """A model ``convert to-hf`` will refuse (``checkpoint.hf.check_exportable``, its one rule, e.g.
    a llama with LayerNorm or GELU): it trains, but its checkpoints never reach Hugging Face."""
    from megatron_lite.checkpoint.hf import check_exportable  # imports torch: only when asked

    try:
        check_exportable(m)
    except UserError as e:
        return f"`megatron-lite convert to-hf` will refuse this run's checkpoints: {e}"
    return None


def _decay_warning(cfg: Config) -> str | None:
    """The decay ends before the run does (e.g. a run's own resolved config.yaml reused with a
    longer train.steps keeps its decay_steps), so the last steps train at min_lr; else None. The
    default decay_steps (train.steps - warmup) ends after the last step; with min_lr == lr the
    decay changes nothing; the constant and inverse-square-root styles have no end."""
    o, steps = cfg.optim, cfg.train.steps
    end = decay_end(o)  # lr_at's arithmetic: step `end` (1-based) is the decay's last
    if end is None or end >= steps or o.min_lr == o.lr:
        return None
    rest = f"step {steps} trains" if end + 1 == steps else f"steps {end + 1}-{steps} train"
    return (
        f"optim.warmup={o.warmup} + optim.decay_steps={o.decay_steps} = {end} is less than train.steps={steps}: "
        f"the learning-rate decay ends at step {end}, and {rest} at optim.min_lr={o.min_lr:g}; leave "
        f"optim.decay_steps empty (optim.decay_steps=null) to decay over the whole run "
        f"({steps} - {o.warmup} = {steps - o.warmup} steps)"
    )
