"""Config loading, overrides, defaults and validation errors (each names the problem)."""

import pytest

from megatron_lite.config import (
    accumulation_steps,
    fill_defaults,
    load_config,
    validate,
)
from megatron_lite.errors import UserError


def resolved(*overrides, world=1, vocab=100):
    cfg = load_config(None, list(overrides))
    fill_defaults(cfg, vocab)
    return validate(cfg, world)


def test_quickstart_loads_and_validates():
    cfg = load_config("configs/quickstart.yaml")
    fill_defaults(cfg, 8192)
    validate(cfg)
    assert cfg.model.arch == "llama" and cfg.model.kv_heads == 2
    assert accumulation_steps(cfg) == cfg.train.global_batch_size // cfg.train.micro_batch_size


def test_quickstart_as_gpt2_needs_kv_heads_equal_to_heads():
    cfg = fill_defaults(load_config("configs/quickstart.yaml", ["model.arch=gpt2"]), 8192)
    with pytest.raises(UserError, match=r"gpt2 has no grouped-query attention: model.kv_heads=2 but model.heads=6"):
        validate(cfg)
    cfg.model.kv_heads = cfg.model.heads
    validate(cfg)


def test_overrides_types_and_aliases():
    cfg = load_config(
        None,
        [
            "train.steps=7",
            "optim.lr=2e-3",
            "log.wandb=true",
            "checkpoint.async=true",
            "data.path=a,b",
            "model.kv_heads=null",
            "train.exit_after=3",
        ],
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == 2e-3 and cfg.log.wandb is True
    assert cfg.checkpoint.async_ is True and cfg.data.path == ["a", "b"]
    assert cfg.model.kv_heads is None and cfg.train.exit_after == 3


def test_defaults_follow_arch():
    g = resolved("model.arch=gpt2")
    assert (g.model.norm, g.model.activation, g.model.tie_embeddings) == ("layernorm", "gelu", True)
    assert g.model.ffn_hidden == 4 * g.model.hidden
    llama = resolved("model.hidden=384")
    assert llama.model.ffn_hidden == 1024 and llama.model.ffn_hidden % 64 == 0


@pytest.mark.parametrize(
    "override,expected",
    [
        ("model.hiden=3", "did you mean 'model.hidden'"),
        ("trian.steps=3", "did you mean 'train'"),
        ("train.steps=abc", "expects int"),
        ("train.steps", "section.key=value"),
    ],
)
def test_unknown_and_malformed_keys(override, expected):
    with pytest.raises(UserError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["model.hidden=100", "model.heads=3"],
            r"100 % 3 = 1; set model.hidden to a multiple of 2 x model.heads = 6 \(RoPE needs an even head dim\), "
            "e.g. 96 or 102$",
        ),
        (
            ["model.arch=gpt2", "model.hidden=2", "model.heads=3"],
            r"2 % 3 = 2; set model.hidden to a multiple of model.heads = 3, e.g. 3$",
        ),
        (
            ["model.heads=4", "model.kv_heads=3"],
            r"divisible by model.kv_heads \(3\): set model.kv_heads to one of 1, 2, 4$",
        ),
        (["train.steps=0"], "train.steps must be a positive integer"),
        (["train.global_batch_size=12", "train.micro_batch_size=8"], r"8 x 1 = 8"),
        (["model.arch=bert"], "is not one of: llama, gpt2"),
        (["kernels.backend=cuda"], r"kernels.backend='cuda' is not one of: auto, triton, torch$"),
        (["optim.min_lr=1", "optim.lr=0.1"], r"need optim.min_lr <= optim.lr; got lr=0.1, min_lr=1"),
        (["model.hidden=36", "model.heads=4"], r"RoPE needs an even head dim; .* = 36/4 = 9: .* = 8 \(e.g. 40\)$"),
        (["model.ffn_hidden=0"], r"model.ffn_hidden must be positive, got 0 \(leave it out for the arch's default\)$"),
        (["model.vocab_size=1"], r"model.vocab_size must be >= 2 \(or left empty to take the tokenizer's\), got 1$"),
        (["data.valid_fraction=1"], r"data.valid_fraction must be in \[0, 1\), got 1"),
        (
            ["data.path=[a,b]", "data.tokenizer=t.model", "data.weights=[1]"],
            r"data.weights has 1 entries but data.path has 2",
        ),
        (
            ["data.path=[a]", "data.tokenizer=t.model", "data.weights=[inf]"],
            r"data.weights must be finite numbers >= 0, not all zero, one per data.path prefix; got \[inf\]",
        ),
        (
            ["data.path=[a,b]", "data.tokenizer=t.model", "data.weights=[1e308,1e308]"],
            r"data.weights \[1e\+308, 1e\+308\] add up to more than a float holds; .* scale them down",
        ),
        (["parallel.sp=true"], r"needs parallel.tp > 1 .*: set parallel.tp > 1 or parallel.sp=false$"),
        # gpt2 as HF's GPT2LMHeadModel computes it, so `convert to-hf` can always write the model
        (
            ["model.arch=gpt2", "model.heads=4", "model.kv_heads=2"],
            r"kv_heads=2 but model.heads=4; set model.kv_heads=4",
        ),
        (["model.arch=gpt2", "model.activation=swiglu"], r"gpt2 uses norm=layernorm and activation=gelu, got .*swiglu"),
        (["model.arch=gpt2", "model.norm=rmsnorm"], r"got norm=rmsnorm, activation=gelu"),
    ],
)
def test_validation_errors_show_the_numbers(overrides, expected):
    with pytest.raises(UserError, match=expected):
        resolved(*overrides)


@pytest.mark.parametrize(
    "overrides,world,expected",
    [
        # 32 over dp 32: one sequence per rank, so micro 1
        (["train.global_batch_size=32"], 32, r"set train.global_batch_size=256 or train.micro_batch_size=1 \("),
        # 12 over dp 1 with micro 8: the largest divisor of 12 not above 8
        (["train.global_batch_size=12"], 1, r"set train.global_batch_size=8 or train.micro_batch_size=6 \("),
        # 8 over dp 32: no micro batch size fits, so the fix names only the global batch
        (["train.global_batch_size=8"], 32, r"set train.global_batch_size=256 \(a multiple of 256; no train.micro"),
    ],
)
def test_a_global_batch_that_does_not_split_names_a_value_that_fits(overrides, world, expected):
    with pytest.raises(UserError, match=expected) as err:
        resolved("train.micro_batch_size=8", *overrides, world=world)
    assert "divides it" not in str(err.value)


def test_a_huge_micro_or_global_batch_is_one_error_at_once():
    """Both hung plan and train: a micro batch of 10**12 walked every candidate divisor; a global
    batch of 2**31 at micro 2 built and replayed a schedule of 2**30 microbatches."""
    with pytest.raises(UserError, match=r"set train.global_batch_size=1000000000000 or train.micro_batch_size=1 \("):
        resolved("train.micro_batch_size=1e12", "train.global_batch_size=1000000000001")
    # 1999999999990 = 2 x 999999999995: its largest divisor up to the micro batch, 5 below it
    with pytest.raises(UserError, match=r"or train.micro_batch_size=999999999995 \("):
        resolved("train.micro_batch_size=1e12", "train.global_batch_size=1999999999990")
    with pytest.raises(
        UserError, match=r"= 2147483648 / 2 = 1,073,741,824 microbatches per step, more than 65,536: .*at least 32768\)"
    ):
        resolved("train.micro_batch_size=2", "train.global_batch_size=2147483648")
    assert accumulation_steps(resolved("train.micro_batch_size=1", "train.global_batch_size=65536")) == 65536


def test_layout_must_fill_world():
    with pytest.raises(
        UserError, match=r"parallel.tp=2 x parallel.pp=1 x parallel.dp=3 = 6 does not equal world size 4"
    ):
        resolved("parallel.tp=2", "parallel.dp=3", world=4)
    with pytest.raises(UserError, match=r"parallel.tp=3 x parallel.pp=1 = 3 does not divide world size 4"):
        resolved("parallel.tp=3", world=4)
    assert resolved("parallel.tp=2", "train.micro_batch_size=4", world=4).parallel.dp == 2


def test_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layrs: 2\n")
    with pytest.raises(UserError, match="did you mean 'model.layers'"):
        load_config(bad)
    bad.write_text("model:\n  layers: 2\n  hidden: 64\n  layers: 3\n")  # PyYAML alone keeps the last
    with pytest.raises(UserError, match=r"not valid YAML \(line 4\): key 'layers' is given twice; keep one$"):
        load_config(bad)
    bad.write_text("model: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("model: 5\n")
    with pytest.raises(UserError, match=r"config section 'model' in .* must be a mapping of keys .*not int 5"):
        load_config(bad)
    bad.write_text("- model.layers=2\n- train.steps=5\n")
    with pytest.raises(
        UserError, match=r"bad.yaml' holds a YAML list, not a mapping of sections: write each section as"
    ):
        load_config(bad)
    bad.write_text("modle: 5\n")
    with pytest.raises(UserError, match=r"unknown config section 'modle' in '.*bad.yaml'; did you mean 'model'"):
        load_config(bad)
    bad.write_text("train:\n  step: 5\n")  # a key, or a value, the file gives: the message names the file
    with pytest.raises(UserError, match=r"^config file '.*bad.yaml': unknown config key 'train.step'; did you mean"):
        load_config(bad)
    bad.write_text("train:\n  steps: five\n")
    with pytest.raises(UserError, match=r"^config file '.*bad.yaml': .*train.steps"):
        load_config(bad)
    bad.write_text("model:\ntrain:\n  steps: 7\n")  # a section with every key commented out
    assert load_config(bad).train.steps == 7
    with pytest.raises(UserError, match=r"is a directory, not a YAML file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "override",
    ["optim.beta1=1.5", "optim.eps=-1", "model.init_std=-0.02", "model.norm_eps=-1", "model.rope_theta=0",
     "optim.lr=inf", "optim.warmup=-1", "optim.weight_decay=-0.1", "optim.clip_grad=-1", "parallel.timeout_s=0",
     "parallel.bucket_mb=-1", "parallel.bucket_mb=nan", "parallel.bucket_mb=inf", "parallel.bucket_mb=1e308",
     "checkpoint.every=-1", "model.seq_len=1e12",
     "train.eval_every=-5", "train.exit_after=-1", "train.exit_after=0", "optim.decay_steps=-3", "optim.beta2=nan",
     "optim.lr=1e308", "optim.min_lr=1e39", "optim.eps=1e38", "optim.weight_decay=1e20"],
)  # fmt: skip
def test_out_of_range_values_are_one_error_naming_the_key(override):
    """Each of these would be a traceback from AdamW (also one overflowing fp32, e.g. lr x weight_decay)
    or torch.normal_ at startup, or a run silently broken (NaN losses, one-element gradient buckets, a
    checkpoint every step)."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"^{key} must be .*, got "):
        resolved(override)


def test_a_fractional_bucket_size_is_kept_and_saved(tmp_path):
    """parallel.bucket_mb sizes buckets below 1 MiB (tiny models, several buckets per chunk)."""
    cfg = resolved("parallel.bucket_mb=0.01")
    assert cfg.parallel.bucket_mb == 0.01
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").parallel.bucket_mb == 0.01
    assert resolved("parallel.bucket_mb=2").parallel.bucket_mb == 2


def test_null_or_empty_string_keys_are_refused_not_the_text_none(tmp_path):
    """`dir:` left empty in YAML (or `log.dir=$UNSET`) named the run directory 'None' (or the
    current directory); an empty `path:` read the dataset prefix 'None'."""
    for override in ("log.dir=", "log.dir=null", "data.cache_dir=~", "train.dtype="):
        with pytest.raises(UserError, match=r"expects str, got nothing \(null or empty\); give a value"):
            load_config(None, [override])
    f = tmp_path / "c.yaml"
    f.write_text("log:\n  dir:\n")
    with pytest.raises(UserError, match=r"'log.dir' expects str, got nothing"):
        load_config(f)
    f.write_text("data:\n  path:\n")  # every prefix commented out: empty, the embedded corpus
    assert load_config(f).data.path == [] == load_config(None, ["data.path=null"]).data.path
    assert load_config(None, ["data.tokenizer=null"]).data.tokenizer is None  # optional: null is the default


def test_string_overrides_are_taken_as_typed():
    """YAML would read these as numbers or booleans and the run directory became '1000', 'True', '15'."""
    for text in ("1_000", "on", "017", "12:30", "2024_01", "1e3"):
        assert load_config(None, [f"log.dir={text}", f"log.wandb_project={text}"]).log.dir == text
        assert load_config(None, [f"log.wandb_project={text}"]).log.wandb_project == text


def test_string_keys_in_a_yaml_file_are_taken_as_written(tmp_path):
    """The same in a file: `dir: 2024_01` was the run directory '202401' (YAML's int)."""
    f = tmp_path / "c.yaml"
    for text in ("1_000", "on", "017", "2024_01", "1e3"):
        f.write_text(f"log:\n  dir: {text}\n  wandb_project: '{text}'\ntrain:\n  steps: 1_000\n")
        cfg = load_config(f)
        assert (cfg.log.dir, cfg.log.wandb_project, cfg.train.steps) == (text, text, 1000)  # numbers stay YAML's
    f.write_text("log:\n  dir: ~\n")  # YAML's null, not a home directory
    with pytest.raises(UserError, match="got nothing"):
        load_config(f)


def test_a_leading_tilde_in_a_path_key_is_the_home_directory(tmp_path, monkeypatch):
    """bash leaves `log.dir=~/runs` alone (not an assignment: the name has a dot): the run went to a
    directory literally named '~' in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(
        None, ["log.dir=~/runs/a", "data.path=~/d1,x/d2", "data.tokenizer=~/t.model", "checkpoint.resume=auto"]
    )
    assert cfg.log.dir == f"{tmp_path}/runs/a" and cfg.data.path == [f"{tmp_path}/d1", "x/d2"]
    assert cfg.data.tokenizer == f"{tmp_path}/t.model" and cfg.checkpoint.resume == "auto"
    f = tmp_path / "c.yaml"
    f.write_text("checkpoint:\n  dir: ~/ck\n  init_from: s3://b/~x\n")
    assert load_config(f).checkpoint.dir == f"{tmp_path}/ck" and load_config(f).checkpoint.init_from == "s3://b/~x"
    assert load_config(None, ["log.wandb_project=~p"]).log.wandb_project == "~p"  # not a path


def test_an_empty_list_override_is_refused_not_the_embedded_corpus():
    """`data.path=$DATA` with DATA unset trained on the embedded corpus without a word."""
    with pytest.raises(UserError, match=r"'data.path=' gives data.path no value.*data.path=\[\]"):
        load_config(None, ["data.path="])
    assert load_config(None, ["data.path=[]"]).data.path == []


def test_a_dashed_override_names_the_undashed_form(capsys):
    from megatron_lite.cli import parse_args

    with pytest.raises(SystemExit):
        parse_args(["train", "--train.steps=2"])
    assert "config overrides take no dashes: train.steps=2" in capsys.readouterr().err


def test_a_key_given_twice_on_the_command_line_takes_the_last_value_and_is_named_with_both(tmp_path, capsys):
    """`train optim.lr=1e-3 ... optim.lr=2e-3` kept the last value without a word."""
    from megatron_lite.cli import main
    from megatron_lite.config import config_warnings

    cfg = load_config(None, ["optim.lr=1e-3", "train.seed=5", "optim.lr=2e-3", "optim.lr=0.002"])
    assert cfg.optim.lr == 2e-3
    want = (
        "optim.lr is given more than once on the command line, optim.lr=1e-3 and then optim.lr=2e-3: the last one "
        "counts (optim.lr=2e-3); drop the others"
    )
    assert config_warnings(fill_defaults(cfg, 100)) == [want]  # 2e-3 then 0.002: the same value, nothing to say
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: 1.0e-3\n")
    assert config_warnings(fill_defaults(load_config(f, ["optim.lr=2e-3"]), 100)) == []  # the file, then an override
    tiny = ["model.layers=2", "model.hidden=64", "model.vocab_size=500", "data.vocab_size=500", "model.seq_len=32"]
    assert main(["plan", "--world-size", "1", *tiny, "optim.lr=1e-3", "optim.lr=2e-3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"warning: {want}"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.steps=1e40"], r"^train.steps=1e40 is outside int64 \(at most 2\*\*63-1 = 9,223,372,036,854,775,807"),
        (["model.layers=1e400"], r"^model.layers=1e400 is outside int64"),  # a float's inf: a traceback
        (["train.micro_batch_size=-1e400"], r"^train.micro_batch_size=-1e400 is outside int64"),
        (["checkpoint.keep=9223372036854775808"], r"^checkpoint.keep=9223372036854775808 is outside int64"),
        ([f"optim.decay_steps=1{'0' * 400}"], r"^optim.decay_steps=about 10\*\*400 is outside int64"),  # no float
        (["train.steps=9223372036854775807"], r"^train.steps x train.global_batch_size = 9223372036854775807 x 8 = "),
        (["train.eval_iters=2e18"], r"^train.eval_iters x train.global_batch_size = 2000000000000000000 x 8 = 1.6e"),
        (["model.vocab_size=1e17"], r"^model.vocab_size x model.hidden = 100000000000000000 x 256 = 2.56e\+19 ele"),
        (["model.ffn_hidden=1e17"], r"^model.hidden x model.ffn_hidden = 256 x 100000000000000000 = 2.56e\+19"),
        (["model.layers=1e14"], r"^model.layers x model.hidden x model.ffn_hidden = .* = 1.8e\+19 parameters"),
        (["model.seq_len=1048576", "train.micro_batch_size=1e11", "train.global_batch_size=1e11"], r"= 1.05e\+19 logi"),
    ],
)
def test_integers_beyond_int64_alone_or_multiplied_are_refused_naming_the_keys(overrides, expected):
    """`model.layers=1e30` was an OverflowError inside the pipeline partition, `model.vocab_size=1e30` a
    torch C++ trace, `train.micro_batch_size=1e30` filled the machine's memory, `train.steps=1e400` a
    traceback in the config parser, and `train.steps=1e40` ran on."""
    with pytest.raises(UserError, match=expected):
        resolved(*overrides)


def test_the_largest_real_runs_are_far_inside_the_int64_limits():
    """A 405B-class model, 128k context and vocabulary, 16M-token batches for 10M steps: valid."""
    big = ["model.layers=126", "model.hidden=16384", "model.heads=128", "model.kv_heads=8", "model.ffn_hidden=53248"]
    big += ["model.vocab_size=128256", "model.seq_len=131072", "train.steps=1e7"]
    big += ["train.micro_batch_size=1", "train.global_batch_size=128", "checkpoint.keep=9223372036854775807"]
    assert resolved(*big).train.steps == 10**7
    # read exactly, not through a float (1234567890123456768)
    assert load_config(None, ["train.steps=1.234567890123456789e18"]).train.steps == 1234567890123456789
