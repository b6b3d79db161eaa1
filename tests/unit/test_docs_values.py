"""Numbers and lists README.md and docs/tour.md state are the code's: each is checked against its source."""

import re
from pathlib import Path

from megatron_lite.kernels.dispatch import MAX_ROW_BLOCK

from megatron_lite.amounts import duration
from megatron_lite.cli import main
from megatron_lite.config import TrainConfig, load_config
from megatron_lite.parallel.data_parallel import DEFAULT_BUCKET_NUMEL
from megatron_lite.progress import LOG_EVERY_S
from megatron_lite.training import metrics
from megatron_lite.training.metrics import Throughput, closing_lines, step_lines
from megatron_lite.training.run_lock import EARLIER_START_WAIT_S
from megatron_lite.training.trackers import WANDB_ID_FILE

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TOUR = (ROOT / "docs" / "tour.md").read_text()


def _flat(text: str) -> str:
    """The text with its line breaks and indents as single spaces, as a reader sees a wrapped sentence."""
    return " ".join(text.split())


def test_readme_states_the_requeue_wait_for_an_earlier_starts_lock():
    assert f"waits for it up to {EARLIER_START_WAIT_S:.0f} s" in _flat(README)


def test_tour_states_the_norm_row_width_past_which_the_twin_runs():
    assert f"norm rows wider than {MAX_ROW_BLOCK} values" in _flat(TOUR)


def test_readme_lists_the_gpu_check_parts_and_budget_of_the_script():
    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    parts = re.search(r'^all_parts="([^"]+)"', script, re.M).group(1)
    budget = re.search(r"GPU_CHECK_BUDGET:-(\d+)", script).group(1)
    assert f"parts: `{parts}`" in _flat(README)
    assert f"`GPU_CHECK_BUDGET` seconds, default {budget}" in _flat(README)


def test_readme_shows_the_line_the_trainer_logs_for_a_step():
    """The quickstart's step 10 (global batch 8 x 256 tokens, 300 steps), as metrics.jsonl has it, and
    the loss the README's prose states for it."""
    row = {"step": 10, "loss": 7.82997, "lr": 1e-3 * 10 / 30, "grad_norm": 2.49725, "tokens_per_s": 567.958}
    (line,) = step_lines({**row, "mfu": 0.139788, "consumed_samples": 80, "skipped_steps": 0}, 300, 8 * 256)
    assert f" INFO megatron_lite.training.trainer: {line}\n" in README, line
    assert f"{row['loss']:.1f} at step 10 (the first logged step)" in _flat(README)


def test_readme_shows_the_summary_line_the_trainer_logs_at_the_end():
    """The quickstart's last line: 300 steps of 8 x 256 tokens at 1,108 tokens/s (554 s of steps) in
    569 s of wall time, setup and evaluations included; the prose states its losses and wall time."""
    tokens, tps, wall = 300 * 8 * 256, 1108.0, 569.0
    throughput = Throughput(1.0, None)
    throughput.add(tokens, tokens / tps)
    history = [{"step": 300, "loss": 4.48272, "eval_loss": 4.18957}]
    where = "runs/quickstart/checkpoints/step_00000300"
    (line,) = closing_lines(TrainConfig(steps=300), 0, history, False, wall, throughput, where)
    assert f" INFO megatron_lite.training.trainer: {line}\n" in README, line
    prose = (
        f"about {history[0]['loss']:.1f} at step 300, with an evaluation loss of about {history[0]['eval_loss']:.1f}"
    )
    assert prose in _flat(README)
    assert f"cores with other jobs: {duration(wall)})" in _flat(README)


def test_readme_states_the_interval_of_the_progress_lines_in_a_job_log():
    assert f"a dated line every {LOG_EVERY_S:.0f} s says how far the read got" in _flat(README)


def test_readme_names_the_file_that_keeps_the_wandb_run_id():
    assert f"whose id `{WANDB_ID_FILE}` keeps" in _flat(README)


def test_readme_names_the_file_that_caches_the_measured_cpu_peak(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/u")
    assert f"cached in `~{str(metrics._cpu_cache_path()).removeprefix('/home/u')}`" in _flat(README)


def test_readme_says_how_many_of_the_startup_warnings_plan_prints(capsys):
    """``plan`` prints every ``config_warnings`` warning: the README's list counts them."""
    settings = ["train.steps=10", "optim.warmup=20", "model.norm=layernorm", "parallel.schedule=interleaved"]
    model = ["model.layers=1", "model.hidden=64", "model.heads=4", "model.vocab_size=500", "data.vocab_size=500"]
    assert main(["plan", "--world-size", "1", *model, "model.seq_len=32", *settings]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert [w.split()[1] for w in printed] == ["optim.warmup=20", "`megatron-lite", "parallel.schedule=interleaved"]
    assert "A warning at startup (`plan` prints the first three too) when:" in README


def test_readme_trains_its_own_data_tokenizer_on_the_files_it_preprocesses():
    """In "Your own data" the tokenizer is trained on the inputs the dataset is made of (a user copying
    both commands has one set of files), and the run trains on that dataset with that tokenizer."""
    block = re.search(r"## Your own data\n\n```bash\n(.*?)```", README, re.S).group(1)
    inputs = re.findall(r"megatron-lite (?:tokenizer train|preprocess) --input (\S+)", block)
    assert len(inputs) == 2 and inputs[0] == inputs[1], inputs
    tok = re.search(r"tokenizer train .*--output (\S+)", block).group(1)
    data = re.search(r"preprocess .*--output (\S+)", block).group(1)
    assert f"--tokenizer {tok}.model" in block and f"data.path={data} data.tokenizer={tok}.model" in block


def test_readme_layout_example_is_the_70b_configs():
    found = re.search(
        r"`(configs/\S+\.yaml)` works this through for a \S+ model on (\d+) GPUs \(tp (\d+) within a node, "
        r"pp (\d+) x vp (\d+) across nodes, dp (\d+)\)",
        _flat(README),
    )
    assert found, "README's worked layout example"
    path, world, tp, pp, vp, dp = found.groups()
    p = load_config(str(ROOT / path)).parallel
    assert (p.tp, p.pp, p.vp, p.dp) == (int(tp), int(pp), int(vp), int(dp))
    assert p.tp * p.pp * p.dp == int(world)
    assert f"megatron-lite plan --config {path} --world-size {world}" in README


def test_config_reference_states_the_default_gradient_bucket_in_mib():
    """`parallel.bucket_mb` counts MiB of fp32 grads: the default bucket is stated in the same unit."""
    mib = DEFAULT_BUCKET_NUMEL * 4 / 2**20
    reference = (ROOT / "docs" / "config.md").read_text()
    assert f"the default, {DEFAULT_BUCKET_NUMEL // 10**6}M elements ({mib:.1f} MiB)" in reference


def test_torchrun_examples_fit_the_ranks_they_name(capsys):
    """Each `launch/torchrun.sh --config configs/...` example of README.md and the script's header that
    names its ranks (`# 8 GPUs`, `# 4 CPU ranks`) passes `plan` for that world size, and starts a run of
    its own (a log.dir: without one it resumes the quickstart's finished run, which does nothing)."""
    script = (ROOT / "launch" / "torchrun.sh").read_text()
    example = re.compile(
        r"bash launch/torchrun\.sh --config (configs/\S+)((?: [\w.]+=\S+)+)\s+# (\d+) (?:GPUs|CPU ranks)"
    )
    found = [m.groups() for text in (README, script) for m in example.finditer(text)]
    assert len(found) >= 3, found
    for config, overrides, ranks in found:
        assert "log.dir=" in overrides, overrides
        argv = ["plan", "--config", str(ROOT / config), "--world-size", ranks, *overrides.split()]
        assert main(argv) == 0, (argv, capsys.readouterr().err)


def test_readme_states_the_python_floor_and_torch_pin_the_install_uses():
    """The quickstart's install paragraph: setup.py's python_requires, requirements/cpu.txt's torch pin
    (also in the command that puts the CPU wheel in first) and setup_env.sh's VENV variable."""
    floor = re.search(r'python_requires=">=([\d.]+)"', (ROOT / "setup.py").read_text()).group(1)
    pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements" / "cpu.txt").read_text(), re.M).group(1)
    text = _flat(README)
    assert f"with `python3` (Python {floor} or newer; `VENV=path` for another place)" in text
    assert f".venv/bin/pip install torch=={pin} --index-url" in text and f"with `torch=={pin}`" in text
    assert re.search(r"^VENV=\$\{VENV:-\.venv\}$", (ROOT / "launch" / "setup_env.sh").read_text(), re.M)


def test_readme_bubble_formula_is_the_simulators_where_it_says_it_holds():
    """(pp - 1) / (vp x m) holds for full groups of pp microbatches only: a short last group of an
    interleaved schedule idles the ranks longer (simulate.theory_bubble_ratio)."""
    from megatron_lite.parallel.pipeline.simulate import theory_bubble_ratio

    text = _flat(README)
    assert "(pp - 1) / (vp x microbatches) of the busy time where pp divides the microbatches" in text
    for pp, vp, m in ((4, 2, 8), (4, 3, 12), (2, 5, 6)):
        assert theory_bubble_ratio(pp, vp, m) == (pp - 1) / (vp * m)
    assert theory_bubble_ratio(4, 2, 9) > (4 - 1) / (2 * 9)  # the case the condition leaves out
