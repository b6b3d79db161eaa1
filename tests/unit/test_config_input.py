"""Bad config input of every kind gets one UserError naming the key, the problem and the fix."""

import json

import pytest

from megatron_lite.config import fill_defaults, load_config, validate
from megatron_lite.errors import UserError


def test_comma_lists_are_stripped_of_spaces(tmp_path):
    """`data.path='a, b'` read the prefix ' b' (a file name starting with a space)."""
    cfg = load_config(None, ["data.path= a , b,,c ", "data.weights=0.5, 0.3,0.2"])
    assert cfg.data.path == ["a", "b", "c"] and cfg.data.weights == [0.5, 0.3, 0.2]
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  path: a, b\n")
    assert load_config(f).data.path == ["a", "b"]


@pytest.mark.parametrize(
    "override",
    ["train.steps={", "train.steps=a: b: c", "model.layers='4", "train.steps=%x", "optim.lr=@", "train.steps=*a",
     "train.steps=!!python/object:x"],
)  # fmt: skip
def test_an_override_yaml_cannot_read_is_a_type_error_not_a_traceback(override):
    """Each raised PyYAML's own exception (a traceback from the CLI)."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^config key '{key}' expects (int|float), got "):
        load_config(None, [override])


def test_an_unclosed_flow_list_names_the_key_and_both_spellings():
    with pytest.raises(UserError, match=r"'data.path' got '\[a', which is not a YAML list .*data.path=a,b or"):
        load_config(None, ["data.path=[a"])


def test_a_comma_list_split_by_the_shell_says_to_quote_it():
    """`data.path=a, b` unquoted reaches us as two arguments, 'data.path=a,' and 'b'."""
    with pytest.raises(UserError, match=r"override 'b' is not .*quote a list with spaces \('data.path=a, b'\)"):
        load_config(None, ["data.path=a,", "b"])


def resolved(*overrides, world=1, vocab=100):
    cfg = load_config(None, list(overrides))
    fill_defaults(cfg, vocab)
    return validate(cfg, world)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        # refused only once the ranks had started, opening the data
        # a folder of text files, not tokenized yet: the message names both commands that make a dataset
        (
            ["data.path=d/a"],
            r"^data.path is set but data.tokenizer is not: .*\(data.tokenizer=PATH\)\. .*text files are tokenized "
            r"first: `megatron-lite tokenizer train --input FILES .*`megatron-lite preprocess --input FILES "
            r"--tokenizer tok/NAME.model --output data/NAME`, and data.path=data/NAME data.tokenizer=tok/NAME.model$",
        ),
        # refused by the dataset without the key's name (`blend weights must be ...`), after the ranks started
        (["data.path=a,b", "data.tokenizer=t.model", "data.weights=-1,2"], r"^data.weights must be finite .*-1.0"),
        (["data.path=a,b", "data.tokenizer=t.model", "data.weights=0,0"], r"^data.weights must be .*not all zero"),
        # refused by the dataset only once every rank had opened the data
        (["data.path=a,b,a", "data.tokenizer=t.model"], r"^data.path lists a more than once: .*data.weights$"),
        # became model.heads without a word
        (["model.kv_heads=0"], r"^model.kv_heads must be a positive integer, got 0"),
        # `seed must be a non-negative integer` from the dataset; 2**64 overflowed torch.manual_seed
        (["train.seed=-1"], r"^train.seed must be in \[0, 2\*\*32\), got -1"),
        (["train.seed=18446744073709551616"], r"^train.seed must be in \[0, 2\*\*32\)"),
        # `vocab_size 100 is too small` from the tokenizer trainer, after the ranks started
        (["data.vocab_size=100"], r"^data.vocab_size=100 is too small .*set data.vocab_size=262 or more"),
    ],
)
def test_data_and_seed_keys_are_refused_at_validation(overrides, expected):
    with pytest.raises(UserError, match=expected):
        resolved(*overrides)


def test_plan_refuses_data_path_without_tokenizer_by_the_same_message():
    from megatron_lite.plan import make_plan

    with pytest.raises(UserError, match=r"data.path is set but data.tokenizer is not"):
        make_plan(load_config(None, ["data.path=d/a", "model.vocab_size=500"]), 1)
    with pytest.raises(UserError, match=r"data.path is set but data.tokenizer is not"):
        make_plan(load_config(None, ["data.path=d/a"]), 1)


def test_a_warmup_longer_than_the_run_is_a_warning_with_the_numbers():
    """Accepted silently: the learning rate never reached optim.lr and never decayed."""
    from megatron_lite.config import config_warnings

    (why,) = config_warnings(resolved("train.steps=5", "optim.warmup=30", "optim.lr=1e-3"))
    assert why.startswith("optim.warmup=30 is more than train.steps=5: ") and "only 5/30 of optim.lr=0.001" in why
    assert "set optim.warmup to at most 5" in why
    assert config_warnings(resolved("train.steps=30", "optim.warmup=30")) == []


def test_a_schedule_that_runs_as_another_is_a_warning_naming_the_key_that_makes_it_work():
    """Any schedule at pp=1 runs each microbatch's forward then backward; interleaved at vp=1 is 1f1b
    (``build_schedule``): accepted, but the user asked for something this layout does not do."""
    from megatron_lite.config import config_warnings

    for schedule in ("interleaved", "gpipe", "zb-h1"):
        (why,) = config_warnings(resolved(f"parallel.schedule={schedule}"))
        assert why.startswith(f"parallel.schedule={schedule} has no effect at parallel.pp=1")
        assert "set parallel.pp > 1" in why
    (why,) = config_warnings(resolved("parallel.pp=2", "parallel.schedule=interleaved", world=2))
    assert why.startswith("parallel.schedule=interleaved at parallel.vp=1 runs 1f1b") and "parallel.vp > 1" in why
    interleaved = ["parallel.pp=2", "parallel.schedule=interleaved", "parallel.vp=2", "train.global_batch_size=16"]
    for ok in (interleaved, ["parallel.pp=2", "parallel.schedule=gpipe"]):
        assert config_warnings(resolved(*ok, "model.layers=4", world=2)) == []
    assert config_warnings(resolved()) == []


def test_microbatches_in_a_short_last_group_of_an_interleaved_schedule_are_a_warning_with_the_bubble():
    """Interleaved (and zb-h1 with vp > 1) run whole groups of pp microbatches: 9 microbatches on pp=4
    leave a last group of 1, and the ranks wait where 3 more would run. The bubble the warning names
    is the simulator's (equal stages, free transfers): at one microbatch too many, 1f1b's."""
    from megatron_lite.config import config_warnings
    from megatron_lite.parallel.pipeline import Costs, build_schedule, simulate

    layout = ["parallel.pp=4", "parallel.vp=2", "model.layers=8", "train.micro_batch_size=1"]
    for m, r, bubble, fix in ((9, 1, 3, "8 or 12"), (10, 2, 2.5, "8 or 12"), (3, 3, 2, "4")):
        (why,) = config_warnings(
            resolved(*layout, "parallel.schedule=interleaved", f"train.global_batch_size={m}", world=4)
        )
        assert (
            f"the {m} per step (train.global_batch_size / (train.micro_batch_size x dp)) leave a last group of {r}"
            in why
        )
        assert f"bubble is {bubble:g} microbatches' time, against 1.5 with full groups (1f1b's: 3)" in why
        assert why.endswith(f"train.micro_batch_size x dp x parallel.pp = 4 (e.g. {fix})")
        for name, vp, want in (("interleaved", 2, bubble), ("1f1b", 1, 3)):
            sim = simulate(build_schedule(name, 4, vp, m), Costs(1 / vp, 1 / vp, 1 / vp))  # per chunk
            assert sim.makespan / 3 - m == want, (name, m)  # a rank's F + B of one microbatch: 3
    (why,) = config_warnings(resolved(*layout, "parallel.schedule=zb-h1", "train.global_batch_size=9", world=4))
    assert why.startswith("parallel.schedule=zb-h1 with parallel.vp=2 runs microbatches in groups of parallel.pp=4")
    assert "whose ranks wait where the 3 missing ones would run; set train.global_batch_size" in why
    for schedule, m in (("interleaved", 8), ("gpipe", 9)):
        assert (
            config_warnings(resolved(*layout, f"parallel.schedule={schedule}", f"train.global_batch_size={m}", world=4))
            == []
        )


def test_a_decay_that_ends_before_the_run_is_a_warning_naming_the_step_lr_at_agrees_with():
    """A run's own config.yaml (decay_steps resolved) reused with a longer train.steps trains its
    last steps at min_lr: a warning says which; the default decay_steps never warns."""
    from megatron_lite.config import config_warnings
    from megatron_lite.training.lr import lr_at

    cfg = resolved("train.steps=8", "optim.warmup=1", "optim.decay_steps=4")
    (why,) = config_warnings(cfg)
    assert why.startswith("optim.warmup=1 + optim.decay_steps=4 = 5 is less than train.steps=8: ")
    assert "decay ends at step 5, and steps 6-8 train at optim.min_lr=3e-05" in why, why
    assert "leave optim.decay_steps empty (optim.decay_steps=null)" in why
    # lr_at (0-based steps) agrees: step 5 still decays, step 6 on is min_lr
    assert lr_at(4, cfg.optim) > cfg.optim.min_lr and lr_at(5, cfg.optim) == cfg.optim.min_lr
    (why,) = config_warnings(resolved("train.steps=8", "optim.warmup=2", "optim.decay_steps=5"))
    assert "decay ends at step 7, and step 8 trains at optim.min_lr" in why, why  # one step: no "steps 8-8"
    # min_lr == lr: a constant learning rate after warmup, whenever the decay ends
    assert (
        config_warnings(
            resolved("train.steps=8", "optim.warmup=1", "optim.decay_steps=1", "optim.lr=1e-3", "optim.min_lr=1e-3")
        )
        == []
    )
    assert config_warnings(resolved("train.steps=8", "optim.warmup=1", "optim.decay_steps=7")) == []
    for steps in (1, 2, 7, 100):
        for warmup in (0, 1, steps - 1, steps):
            assert config_warnings(resolved(f"train.steps={steps}", f"optim.warmup={warmup}")) == [], (steps, warmup)


def test_a_decay_of_zero_steps_is_refused_naming_the_constant_lr_setting():
    """optim.decay_steps=0 would drop to min_lr one step after warmup (lr_at decays over at least one
    step), where a Megatron user may mean a constant learning rate."""
    with pytest.raises(UserError) as e:
        resolved("optim.decay_steps=0")
    assert str(e.value) == (
        "optim.decay_steps must be >= 1 (for a constant learning rate after warmup set optim.decay_style=constant), "
        "got 0"
    )


@pytest.mark.parametrize("override", ["model.norm=layernorm", "model.activation=gelu"])
def test_a_llama_convert_to_hf_refuses_is_a_warning_by_the_exporters_own_rule(override, capsys):
    """Named at plan time, with the exporter's own words: no Hugging Face class computes it."""
    from megatron_lite.checkpoint.hf import check_exportable
    from megatron_lite.cli import main
    from megatron_lite.config import config_warnings

    cfg = resolved(override)
    with pytest.raises(UserError) as refusal:
        check_exportable(cfg.model)
    (why,) = config_warnings(cfg)
    assert why == f"`megatron-lite convert to-hf` will refuse this run's checkpoints: {refusal.value}"
    tiny = [
        "model.layers=2",
        "model.hidden=64",
        "model.vocab_size=500",
        "data.vocab_size=500",
        "model.seq_len=32",
        override,
    ]
    assert main(["plan", "--world-size", "1", "--json", *tiny]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == [why]
    for ok in ([], ["model.arch=gpt2"], ["model.norm=rmsnorm", "model.activation=swiglu"]):
        assert config_warnings(resolved(*ok)) == [], ok


def test_plan_prints_the_config_warnings(capsys):
    from megatron_lite.cli import main

    tiny = ["model.layers=2", "model.hidden=64", "model.vocab_size=500", "data.vocab_size=500", "model.seq_len=32"]
    assert main(["plan", "--world-size", "1", *tiny, "train.steps=5", "optim.warmup=30"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("warning: optim.warmup=30 is more than train.steps=5")


def test_an_evaluation_longer_than_the_held_out_split_is_a_warning():
    """train.eval_iters=100000000 would make the first evaluation run for days."""
    from types import SimpleNamespace

    from megatron_lite.training.preflight import eval_warning

    valid = SimpleNamespace(distinct_samples=40)
    why = eval_warning(resolved("train.eval_iters=100000000", "train.global_batch_size=8"), valid)
    assert why.startswith("train.eval_iters=100,000,000 x train.global_batch_size=8 = 800,000,000 samples")
    assert "the held-out split serves 40 before it repeats one" in why and "set train.eval_iters to at most 5 " in why
    assert eval_warning(resolved("train.eval_iters=5", "train.global_batch_size=8"), valid) is None
    assert eval_warning(resolved("train.eval_iters=5"), None) is None  # no held-out split: nothing evaluated
    # fewer held-out samples than one global batch: no train.eval_iters fits, so none is offered
    why = eval_warning(resolved("train.eval_iters=1", "train.global_batch_size=64", "train.micro_batch_size=4"), valid)
    assert why.endswith(
        "of 64 holds the same sample more than once; raise data.valid_fraction (or give the dataset more documents)"
    )


def test_a_run_longer_than_its_training_data_is_a_warning_naming_the_dataset_and_the_fix():
    """Epochs past the first are silent otherwise: the loss falls on repeated samples."""
    from types import SimpleNamespace

    from megatron_lite.training.preflight import repeat_warning

    train = SimpleNamespace(first_repeat=(40, "data/a"), prefixes=["data/a"])
    assert repeat_warning(resolved("train.steps=100", "train.global_batch_size=8"), train) == (
        "train.steps=100 x train.global_batch_size=8 = 800 training samples, but the training split serves 40 "
        "before it repeats one: the run reads dataset data/a 20.0 times over (epochs, each in a new order); if that "
        "is not meant, give more data (data.path) or at most train.steps=5 (one epoch)"
    )
    assert repeat_warning(resolved("train.steps=5", "train.global_batch_size=8"), train) is None  # one epoch
    one_batch = resolved("train.steps=1", "train.micro_batch_size=4", "train.global_batch_size=64")
    why = repeat_warning(one_batch, SimpleNamespace(first_repeat=(40, "data/b"), prefixes=["data/a", "data/b"]))
    assert "reads dataset data/b (the first of data.path to run out, for its weight) 1.6 times over" in why
    assert why.endswith(
        "; one global batch of 64 holds the same sample more than once; if that is not meant, give more data "
        "(data.path) or a train.global_batch_size of at most 40"
    ), why


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["parallel.pp=2", "parallel.vp=2", "parallel.schedule=1f1b"], r"^parallel.schedule=1f1b runs one chunk"),
        (["parallel.pp=2", "model.layers=1"], r"^cannot split model.layers=1 into parallel.pp x parallel.vp = 2 x 1"),
        (["parallel.pp=2", "parallel.schedule=zb-h1", "train.recompute=selective"], r"^parallel.schedule=zb-h1 "),
        # the tensor-parallel split of heads, KV heads, FFN and sequence needs no vocabulary
        (["parallel.tp=2", "model.heads=3", "model.hidden=96"], r"^model.heads=3 is not divisible by parallel.tp=2"),
        (["parallel.tp=2", "parallel.sp=true", "model.seq_len=33"], r"^parallel.sp=true .*model.seq_len=33"),
    ],
)
def test_the_trainer_checks_the_pipeline_before_any_process_group(overrides, expected):
    """Checked only once every rank had joined the process group and opened the data (the
    tensor-parallel split too: it was skipped while the vocabulary was unknown)."""
    from megatron_lite.training.trainer import check_layout

    cfg = load_config(None, ["train.micro_batch_size=4", *overrides])
    with pytest.raises(UserError, match=expected):
        check_layout(cfg, 2)  # no vocabulary yet: the data is not open


def test_a_dotted_key_at_the_top_of_a_yaml_file_says_how_to_nest_it(tmp_path):
    """`model.layers: 4` in a file was "unknown config section 'model.layers'; did you mean 'model'?"."""
    f = tmp_path / "c.yaml"
    f.write_text("model.layers: 4\n")
    with pytest.raises(UserError, match=r"key 'model.layers' at the top level: .*a line `model:`, then `  layers: 4`"):
        load_config(f)


def test_a_config_file_that_is_not_utf8_or_cannot_be_read_is_one_error(tmp_path, monkeypatch):
    """A Latin-1 byte raised UnicodeDecodeError (a traceback from the CLI); so did an unreadable file."""
    f = tmp_path / "c.yaml"
    f.write_bytes(b"train:\n  steps: 5 # caf\xe9\n")
    with pytest.raises(UserError, match=r"c.yaml' is not UTF-8 text \(line 2: byte 0xe9\)$"):
        load_config(f)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(f), "read_text", denied)
    with pytest.raises(UserError, match=r"c.yaml' cannot be read: Permission denied$"):
        load_config(f)


@pytest.mark.parametrize("text", ["? [a]\n: 1\n", "model:\n  ? {a: 1}\n  : 2\n", "[layers]: 2\n"])
def test_a_yaml_key_that_is_a_list_or_mapping_is_one_error_naming_the_line(tmp_path, text):
    """An unhashable key raised TypeError from the duplicate-key check (a traceback from the CLI)."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(
        UserError, match=r"c.yaml' is not valid YAML \(line \d\): a key is a list or mapping, not a name; "
    ):
        load_config(f)


def test_yaml_nested_past_pythons_stack_is_one_error(tmp_path):
    """PyYAML composes recursively: 5,000 nested lists raised RecursionError (a traceback from the CLI)."""
    f = tmp_path / "c.yaml"
    f.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match=r"c.yaml' is not valid YAML: lists or mappings nested too deeply$"):
        load_config(f)
    f.write_text("model:\n  layers: 2\n")
    with pytest.raises(UserError, match=r"model.layers"):  # an override's value YAML cannot read stays text
        load_config(f, ["model.layers=" + "{" * 5000 + "}" * 5000])


def test_a_config_path_that_is_empty_or_no_regular_file_is_named_for_what_it_is(tmp_path):
    """`--config ''` was "config file '.' is a directory"; `--config /dev/null` "does not exist"."""
    with pytest.raises(UserError, match=r"^--config is given an empty file name .*give a YAML file$"):
        load_config("")
    with pytest.raises(UserError, match=r"^config file '/dev/null' is not a regular file; give a YAML file"):
        load_config("/dev/null")
    with pytest.raises(UserError, match=r"c.yaml' does not exist"):
        load_config(tmp_path / "c.yaml")


def test_a_data_vocab_size_beyond_sentencepieces_int32_is_refused_at_validation():
    """data.vocab_size=2**31 passed plan; train then got sentencepiece's ValueError (a traceback)."""
    cfg = fill_defaults(load_config(None, ["data.vocab_size=2147483648"]), 8192)
    with pytest.raises(UserError, match=r"^data.vocab_size=2147483648 is too large .* 2,147,483,647 \(2\*\*31-1\) "):
        validate(cfg)
    validate(fill_defaults(load_config(None, ["data.vocab_size=2147483647"]), 8192))
