"""The learning-rate schedules of ``optim.decay_style`` at chosen steps, computed by hand; each bad key or
combination refused at config load; the startup warnings and the resume warning of each style."""

import math
import re
from types import SimpleNamespace

import pytest
import yaml

from megatron_lite.config import OptimConfig, config_from_dict, config_warnings, fill_defaults, load_config, validate
from megatron_lite.errors import UserError
from megatron_lite.training import trainer
from megatron_lite.training.lr import lr_at
from megatron_lite.training.resume_changes import schedule_change

# lr 1, min_lr 0.1, 4 warmup steps (0.25, 0.5, 0.75, 1 at steps 0-3), then 10 decay steps (steps 4-13):
# a 14-step run with the default decay_steps. Steps are lr_at's, 0-based.
BASE = dict(lr=1.0, min_lr=0.1, warmup=4, decay_steps=10)
WSD = dict(wsd_decay_steps=4, wsd_decay_shape="linear")  # the last 4 decay steps (10-13) decay


def resolved(*overrides: str) -> object:
    cfg = load_config(None, list(overrides))
    return validate(fill_defaults(cfg, 100))


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "inverse-square-root", "wsd"])
def test_every_style_warms_up_linearly_to_lr(style):
    o = OptimConfig(**BASE, decay_style=style, **WSD if style == "wsd" else {})
    assert [lr_at(s, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # first warmup step, ..., end of warmup


def test_the_default_is_the_cosine_schedule_bit_for_bit():
    """The cosine formula of optim.decay_steps' docstring, in lr_at's order of operations, at every step
    of the default schedule (100 warmup steps, 900 decay steps) and past it."""
    o = fill_defaults(load_config(None, []), 100).optim
    assert o.decay_style == "cosine"
    for step in range(100, 1010):
        progress = min((step - 100) / 900, 1.0)
        assert lr_at(step, o) == 3e-5 + 0.5 * (3e-4 - 3e-5) * (1.0 + math.cos(math.pi * progress)), step


def test_linear_decays_by_equal_steps_to_min_lr():
    o = OptimConfig(**BASE, decay_style="linear")
    assert lr_at(4, o) == 1.0  # decay step 0: 0.1 + 0.9 x 1
    assert lr_at(9, o) == pytest.approx(0.55, rel=1e-12)  # decay step 5 of 10: 0.1 + 0.9 x 0.5
    assert lr_at(13, o) == pytest.approx(0.19, rel=1e-12)  # the run's last step, decay step 9: 0.1 + 0.9 x 0.1
    assert lr_at(14, o) == 0.1 and lr_at(1000, o) == 0.1  # after the decay: min_lr, exactly


def test_constant_keeps_lr_after_warmup_whatever_min_lr_and_decay_steps():
    o = OptimConfig(**BASE, decay_style="constant")
    assert [lr_at(s, o) for s in (4, 9, 13, 14, 10**6)] == [1.0] * 5


def test_inverse_square_root_is_megatrons_floored_at_min_lr():
    """lr x sqrt(warmup) / sqrt(s) at the run's step s (lr_at's step + 1): 2 / sqrt(s) with warmup 4."""
    o = OptimConfig(**BASE, decay_style="inverse-square-root")
    assert lr_at(4, o) == pytest.approx(2 / math.sqrt(5), rel=1e-12)  # s = 5, first after warmup: 0.894...
    assert lr_at(15, o) == 0.5 and lr_at(63, o) == 0.25  # s = 16: 2 / 4; s = 64: 2 / 8
    assert lr_at(399, o) == 0.1  # s = 400: 2 / 20 = min_lr
    assert lr_at(1599, o) == 0.1  # s = 1600: 2 / 40 = 0.05, floored at min_lr
    # warmup 0 counts as 1 (Megatron's max(warmup, 1)): lr / sqrt(s) from the first step
    o.warmup = 0
    assert [lr_at(s, o) for s in (0, 3, 15)] == [1.0, 0.5, 0.25]


@pytest.mark.parametrize(
    "shape,mid,last",
    [
        ("linear", 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.25),  # 1 - p at p = 2/4 and 3/4
        ("cosine", 0.1 + 0.9 * 0.5, 0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2),  # (1 + cos(pi p)) / 2
        ("1-sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.5)), 0.1 + 0.9 * (1 - math.sqrt(0.75))),  # 1 - sqrt(p)
    ],
)
def test_wsd_holds_lr_then_decays_its_last_steps_along_its_shape(shape, mid, last):
    """10 decay steps, the last 4 decaying: steps 4-9 stable at lr, steps 10-13 at p = 0, 1/4, 2/4, 3/4."""
    o = OptimConfig(**BASE, decay_style="wsd", wsd_decay_steps=4, wsd_decay_shape=shape)
    assert [lr_at(s, o) for s in range(4, 10)] == [1.0] * 6
    assert lr_at(10, o) == pytest.approx(1.0, rel=1e-12)  # the first wsd decay step is at lr
    assert lr_at(12, o) == pytest.approx(mid, rel=1e-12) and lr_at(13, o) == pytest.approx(last, rel=1e-12)
    assert lr_at(14, o) == 0.1 and lr_at(1000, o) == 0.1  # after the decay: min_lr, exactly


def test_an_empty_wsd_shape_is_linear_and_a_relaunch_derives_it_again(tmp_path):
    """The relaunch config.yaml leaves it empty, as the other keys derived from others."""
    cfg = resolved("optim.decay_style=wsd", "optim.wsd_decay_steps=4")
    assert cfg.optim.wsd_decay_shape == "linear"
    cfg.save(tmp_path / "config.yaml", relaunch=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["wsd_decay_shape"] is None
    assert (
        resolved(
            "optim.decay_style=wsd", "optim.wsd_decay_steps=4", "optim.wsd_decay_shape=1-sqrt"
        ).optim.wsd_decay_shape
        == "1-sqrt"
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.decay_style=exponential"], "optim.decay_style='exponential' is not one of: cosine, linear, constant, "
         "inverse-square-root, wsd"),
        (["optim.decay_style=wsd", "optim.wsd_decay_steps=2", "optim.wsd_decay_shape=sqrt"],
         "optim.wsd_decay_shape='sqrt' is not one of: linear, cosine, 1-sqrt"),
        (["optim.decay_style=wsd", "optim.wsd_decay_steps=0"],
         "optim.wsd_decay_steps must be >= 1 (the last decay steps of optim.decay_style=wsd), got 0"),
        (["optim.decay_style=wsd", "optim.wsd_decay_steps=-5"],
         "optim.wsd_decay_steps must be >= 1 (the last decay steps of optim.decay_style=wsd), got -5"),
        (["optim.decay_style=wsd"],
         "optim.decay_style=wsd needs optim.wsd_decay_steps, the last steps of the 6 decay steps "
         "(optim.decay_steps) that decay to optim.min_lr after the stable ones at optim.lr; e.g. "
         "optim.wsd_decay_steps=1 (a fifth of them)"),
        (["optim.decay_style=wsd", "optim.wsd_decay_steps=7"],
         "optim.wsd_decay_steps=7 is more than optim.decay_steps=6, the decay steps after warmup (train.steps - "
         "optim.warmup unless set) whose last ones it decays: set optim.wsd_decay_steps to at most 6, or raise "
         "train.steps (or optim.decay_steps)"),
        (["optim.decay_style=wsd", "optim.wsd_decay_steps=4", "optim.decay_steps=3"],
         "optim.wsd_decay_steps=4 is more than optim.decay_steps=3, "),
        (["optim.wsd_decay_shape=cosine"],
         "optim.wsd_decay_shape=cosine is read only by optim.decay_style=wsd, not by optim.decay_style=cosine, which "
         "would ignore it: set optim.decay_style=wsd, or leave optim.wsd_decay_shape empty (=null)"),
        (["optim.decay_style=constant", "optim.wsd_decay_steps=2", "optim.wsd_decay_shape=linear"],
         "optim.wsd_decay_steps=2 and optim.wsd_decay_shape=linear are read only by optim.decay_style=wsd, not by "
         "optim.decay_style=constant, which would ignore them: set optim.decay_style=wsd, or leave "
         "optim.wsd_decay_steps and optim.wsd_decay_shape empty (=null)"),
    ],
)  # fmt: skip
def test_each_bad_schedule_is_one_error_naming_the_key_value_and_fix(overrides, message):
    """train.steps 10, warmup 4: 6 decay steps by default."""
    with pytest.raises(UserError) as e:
        resolved("train.steps=10", "optim.warmup=4", *overrides)
    assert str(e.value).startswith(message), str(e.value)


def test_a_bad_schedule_is_refused_before_any_rank_starts(monkeypatch):
    def started(*_: object) -> None:
        raise AssertionError("the process group was set up before the config was checked")

    monkeypatch.setattr(trainer, "init_distributed", started)
    with pytest.raises(UserError, match=r"^optim.decay_style=wsd needs optim.wsd_decay_steps"):
        trainer.Trainer(load_config(None, ["optim.decay_style=wsd", "data.vocab_size=300"]))


def test_a_decay_that_ends_before_the_run_warns_for_the_styles_that_end():
    """linear and wsd end where cosine does (warmup + decay_steps); constant and inverse-square-root
    never end, so a short decay_steps (unused by them) is no warning."""
    short = ("train.steps=8", "optim.warmup=1", "optim.decay_steps=4")
    for style in (["optim.decay_style=linear"], ["optim.decay_style=wsd", "optim.wsd_decay_steps=2"]):
        (why,) = config_warnings(resolved(*short, *style))
        assert "the learning-rate decay ends at step 5, and steps 6-8 train at optim.min_lr" in why, (style, why)
    for style in ("constant", "inverse-square-root"):
        assert config_warnings(resolved(*short, f"optim.decay_style={style}")) == [], style


def test_a_warmup_longer_than_the_run_says_never_decays_but_for_constant():
    (why,) = config_warnings(resolved("train.steps=4", "optim.warmup=8", "optim.decay_style=inverse-square-root"))
    assert "reaching only 4/8 of optim.lr=0.0003 at the last step, and never decays; set optim.warmup" in why, why
    (why,) = config_warnings(resolved("train.steps=4", "optim.warmup=8", "optim.decay_style=constant"))
    assert "reaching only 4/8 of optim.lr=0.0003 at the last step; set optim.warmup to at most 4" in why, why


@pytest.mark.parametrize(
    "saved,now,named",
    [
        ({}, {"decay_style": "wsd", **WSD},
         "optim.decay_style cosine -> wsd, optim.wsd_decay_steps None -> 4, optim.wsd_decay_shape None -> linear"),
        ({}, {"decay_style": "linear"}, "optim.decay_style cosine -> linear"),
        ({"decay_style": "wsd", **WSD}, {"decay_style": "wsd", **WSD, "wsd_decay_steps": 3},
         "optim.wsd_decay_steps 4 -> 3"),
        ({"decay_style": "wsd", **WSD}, {"decay_style": "wsd", **WSD, "wsd_decay_shape": "1-sqrt"},
         "optim.wsd_decay_shape linear -> 1-sqrt"),
    ],
)  # fmt: skip
def test_resuming_with_another_decay_style_or_wsd_setting_warns_with_both_rates(saved, now, named):
    """As another optim.lr or decay_steps: named, with step 12's rate in both schedules (step 11 of lr_at:
    cosine 0.286, linear 0.37, wsd's first decay step 1.0 with 3 decay steps, 0.775 with 4, 0.55 with 1-sqrt)."""
    before, after = (fill_defaults(config_from_dict({"optim": {**BASE, **o}}), 100) for o in (saved, now))
    reader = SimpleNamespace(step=11, meta={"config": before.to_dict(), "trainer": {}}, config=before)
    rates = [f"{lr_at(11, c.optim):.4g}" for c in (after, before)]
    assert rates[0] != rates[1]
    assert schedule_change(after, reader) == (
        f"the learning-rate schedule is not the checkpoint's ({named}): step 12 trains with lr {rates[0]} where "
        f"the checkpoint's run would use {rates[1]}"
    )


def test_the_checkpoint_format_names_every_key_the_schedule_reads():
    """A checkpoint is self-describing: its format's note on the LR schedule (which has no state of its
    own) names every optim key a resume compares, so a reader can recompute the next learning rate."""
    from megatron_lite.checkpoint import format as checkpoint_format
    from megatron_lite.training.resume_changes import SCHEDULE_KEYS

    start = checkpoint_format.__doc__.index('"optimizer": {"step"')
    note = " ".join(line.split("#", 1)[-1].strip() for line in checkpoint_format.__doc__[start:].splitlines()[:6])
    assert "trainer.skipped_steps" in note, note
    assert all(re.search(rf"\b{k}\b", note) for k in SCHEDULE_KEYS), (note, SCHEDULE_KEYS)


@pytest.mark.parametrize("style", ["cosine", "linear", "wsd"])
def test_one_decay_step_is_at_lr_and_the_next_at_min_lr(style):
    """decay_steps 1 (wsd: its one step the decaying one): the warmup's last step (3) and the decay's only
    step (4) at lr, min_lr from step 5 on."""
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup=4, decay_steps=1, decay_style=style)
    if style == "wsd":
        o.wsd_decay_steps, o.wsd_decay_shape = 1, "linear"
    assert [lr_at(s, o) for s in range(3, 8)] == [1.0, 1.0, 0.1, 0.1, 0.1]


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_a_wsd_decay_over_every_decay_step_is_the_plain_schedule_of_its_shape(shape):
    """wsd_decay_steps = decay_steps leaves no stable step: the same rate as decay_style=<shape> at every
    step, the warmup's, the boundary (step = warmup) and past the end."""
    wsd = OptimConfig(**BASE, decay_style="wsd", wsd_decay_steps=10, wsd_decay_shape=shape)
    plain = OptimConfig(**BASE, decay_style=shape)
    assert [lr_at(s, wsd) for s in range(20)] == [lr_at(s, plain) for s in range(20)]
    assert lr_at(4, wsd) == 1.0 and lr_at(5, wsd) < 1.0 and lr_at(14, wsd) == 0.1


def test_a_constant_lr_below_the_default_min_lr_trains_at_lr():
    """constant never reads optim.min_lr (3e-5 by default): an lr below it is no error; another style,
    which ends at or is floored by min_lr, is refused naming the fix."""
    cfg = resolved("optim.decay_style=constant", "optim.lr=1e-5")
    assert [lr_at(s, cfg.optim) for s in (99, 100, 999)] == [1e-5] * 3
    for style in ("cosine", "inverse-square-root"):
        with pytest.raises(UserError) as e:
            resolved(f"optim.decay_style={style}", "optim.lr=1e-5")
        assert (
            str(e.value)
            == "need optim.min_lr <= optim.lr; got lr=1e-05, min_lr=3e-05: set optim.min_lr to at most 1e-05"
        )


def test_a_schedule_change_that_shows_only_later_is_named_at_the_step_it_shows():
    """Resumed inside warmup with linear for cosine: steps 3-5 (lr_at 2-4: warmup, then decay step 0 at lr
    in both) train as before; step 6 (decay step 1) gets linear's 0.91 for cosine's 0.978. A wsd shape
    changed where the decay is one step (at lr in every shape, then min_lr) never shows: no warning."""
    before, after = (
        fill_defaults(config_from_dict({"optim": {**BASE, **o}}), 100) for o in ({}, {"decay_style": "linear"})
    )
    reader = SimpleNamespace(step=2, meta={"config": before.to_dict(), "trainer": {}}, config=before)
    assert schedule_change(after, reader) == (
        "the learning-rate schedule is not the checkpoint's (optim.decay_style cosine -> linear): steps 3-5 train "
        "as the checkpoint's run would, then step 6 trains with lr 0.91 where the checkpoint's run would use 0.978"
    )
    one = {"decay_style": "wsd", "wsd_decay_steps": 1}
    before, after = (
        fill_defaults(config_from_dict({"optim": {**BASE, **one, "wsd_decay_shape": shape}}), 100)
        for shape in ("linear", "cosine")
    )
    reader = SimpleNamespace(step=2, meta={"config": before.to_dict(), "trainer": {}}, config=before)
    assert schedule_change(after, reader) is None
