"""The launch layer without a cluster or a process group: sbatch rendering, `launch slurm
--dry-run`, the master-address check and the fail-fast guard in one process."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_scripts import ROOT, SLURM_STUBS, run_launch_script
from tiny_config import tiny

from megatron_lite.cli import log_format, main
from megatron_lite.errors import UserError
from megatron_lite.launcher.env import check_master_resolves
from megatron_lite.launcher.failure_watch import STORE_LOOKS_PER_S, poll_interval
from megatron_lite.launcher.slurm import (
    TEMPLATE_DIR,
    TEMPLATES,
    SlurmJob,
    render_sbatch,
    sbatch_directives,
    template_variables,
)
from megatron_lite.parallel.mesh import init_distributed

TINY = tiny(2)


def _render(job: SlurmJob) -> str:
    template = (TEMPLATE_DIR / job.template).read_text()
    return render_sbatch(template, sbatch_directives(job, "runs/x/slurm-%j.out"), template_variables(job))


def _directives(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))


def test_cpu_job_renders_without_gpus_and_with_quoted_arguments():
    job = SlurmJob("configs/c.yaml", 2, 2, gpus_per_node=None, overrides=["log.dir=runs/a b"], cpus_per_rank=1)
    script = _render(job)
    d = _directives(script)
    assert d["nodes"] == "2" and d["ntasks-per-node"] == "1" and d["cpus-per-task"] == "2"
    assert "gpus-per-node" not in d and d["output"] == "runs/x/slurm-%j.out"
    assert "TRAIN_ARGS=(--config configs/c.yaml 'log.dir=runs/a b')  # megatron-lite train" in script
    assert "\nLAUNCHER=torchrun  #" in script and "\nPROCS_PER_NODE=2  #" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_rendezvous_port_is_the_jobs_own_unless_given():
    """Two jobs sharing a node must not meet at one fixed port (at torchrun's 29500 the second job's
    agent would join the first one's store and die with it)."""
    for job in (SlurmJob("c.yaml", 2, 2, gpus_per_node=None), SlurmJob("c.yaml", 2, 8, container_image="img")):
        script = _render(job)
        assert "\nMASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}  #" in script
        assert "is already in use on $MASTER_ADDR" in script
        given = _render(dataclasses.replace(job, master_port=23456))
        assert "\nMASTER_PORT=23456  #" in given


def test_a_requeued_job_appends_to_its_log_and_torchrun_passes_sigusr1_on():
    """A requeued job (same id, same slurm-%j.out) truncated the log of its earlier run, the one that
    says why it stopped; torchrun died of SIGUSR1 (launcher/torchrun.py)."""
    for job in (SlurmJob("c.yaml", 2, 2, gpus_per_node=None), SlurmJob("c.yaml", 2, 8, container_image="img")):
        script = _render(job)
        assert _directives(script)["open-mode"] == "append"
        assert "-m megatron_lite.launcher.torchrun" in script and "torch.distributed.run" not in script
    assert "-m megatron_lite.launcher.torchrun" in (ROOT / "launch" / "torchrun.sh").read_text()


def test_log_lines_name_their_rank_when_there_are_several():
    assert log_format({}) == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    assert "[rank 3/4] %(levelname)s" in log_format({"RANK": "3", "WORLD_SIZE": "4"})
    srun = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}
    assert "[rank 2/4] " in log_format(srun)
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}  # the batch script: one process, no rank
    assert "[rank" not in log_format(batch) and "[rank" not in log_format({"RANK": "0", "WORLD_SIZE": "1"})


def test_srun_style_gets_one_task_per_rank_and_added_directives_follow_the_template():
    job = SlurmJob(None, 4, 8, launcher="srun", partition="gpu", account="proj", time="1:00:00")
    script = _render(job)
    d = _directives(script)
    assert d["ntasks-per-node"] == "8" and d["gpus-per-node"] == "8" and d["cpus-per-task"] == "8"
    assert d["partition"] == "gpu" and d["account"] == "proj" and d["time"] == "1:00:00"
    lines = script.splitlines()
    last_directive = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert lines[last_directive + 1] == "set -euo pipefail"
    assert "TRAIN_ARGS=()" in script


def test_container_variant_sets_the_image():
    job = SlurmJob("c.yaml", 2, 8, container_image="nvcr.io#nvidia/pytorch:24.05-py3", python="python")
    script = _render(job)
    assert job.template == "train_container.sbatch"
    assert "CONTAINER_IMAGE='nvcr.io#nvidia/pytorch:24.05-py3'  #" in script
    assert '--container-image="$CONTAINER_IMAGE"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_installed_package_ships_the_templates_of_launch(tmp_path):
    """A wheel install has no launch/ folder: setup.py ships launch/*.sbatch as package data, and
    slurm.py finds that copy. build_py lays out files as the wheel does (0.3 s, vs. pip wheel's 2 s)."""
    build = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)]
    subprocess.run(build, cwd=ROOT, check=True, capture_output=True)
    shipped = tmp_path / "megatron_lite" / "launcher" / "templates"
    for name in TEMPLATES.values():
        assert (shipped / name).read_bytes() == (ROOT / "launch" / name).read_bytes(), name
    code = "from megatron_lite.launcher import slurm; print(slurm.TEMPLATE_DIR)"  # -S: not the editable install
    env = {"PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True)
    assert r.returncode == 0 and Path(r.stdout.decode().strip()) == shipped, r.stderr.decode()[-2000:]
    assert TEMPLATE_DIR == ROOT / "launch"  # this source checkout


def test_render_refuses_a_variable_the_template_lacks():
    with pytest.raises(ValueError, match="defines no variable NOPE"):
        render_sbatch("#!/bin/bash\nA=${A:-1}\n", {}, {"NOPE": "1"})


def test_launch_dry_run_prints_the_script_and_checks_the_layout_first(capsys):
    args = ["launch", "slurm", "--cpu", "--nodes", "2", "--procs-per-node", "2", "--dry-run"]
    assert main([*args, *TINY, "parallel.tp=2", "train.global_batch_size=16"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("#!/bin/bash") and "parallel.tp=2" in captured.out
    assert "layout ok: 2 nodes x 2 = 4 ranks = pp 1 x dp 2 x tp 2; about " in captured.err
    one = ["launch", "slurm", "--cpu", "--nodes", "1", "--procs-per-node", "1", "--dry-run", *TINY]
    assert main(one) == 0
    summary = capsys.readouterr().err
    assert re.search(r"^layout ok: 1 node x 1 = 1 rank = pp 1 x dp 1 x tp 1; about \d+\.\d MiB per rank ", summary)
    assert main([*args, *TINY, "parallel.tp=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "parallel.tp=3 x parallel.pp=1 = 3 does not divide world size 4" in err


def test_launch_refuses_tensor_parallel_groups_that_span_nodes(capsys):
    """tp=4 on nodes of 2 ranks (or 6: ranks 4-7 sit on two nodes) passed the layout check: TP's per-layer
    collectives then cross the network. The fix names the tp values the model and the node both take."""

    def launch(procs: int) -> int:
        args = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", str(procs), "--dry-run", *TINY]
        return main([*args, "parallel.tp=4", "train.micro_batch_size=1", f"train.global_batch_size={procs // 2}"])

    for procs in (2, 6):
        assert launch(procs) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: parallel.tp=4 does not divide the "), err
        assert f"{procs} ranks per node, so tensor-parallel groups would span nodes: set parallel.tp to " in err, err
        assert "give each node a multiple of 4 ranks (--gpus-per-node, --procs-per-node)" in err, err
    assert "set parallel.tp to 1 or 2 (pipeline" in err, err  # 4 heads: 1, 2, 4 fit; 6 ranks: 1, 2, 3, 6
    assert launch(4) == 0
    assert "layout ok: 2 nodes x 4 = 8 ranks = pp 1 x dp 2 x tp 4" in capsys.readouterr().err


def test_tp_values_suggested_for_nodes_keep_a_set_parallel_dp(capsys):
    """parallel.dp=3 set on 2 nodes of 6 ranks with tp=4: tp=1 or 2 fit the node but not
    tp x pp x dp = 12, so naming them sent the user on to the next refusal."""
    args = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "6", "--dry-run", *TINY]
    assert main([*args, "parallel.tp=4", "parallel.dp=3", "train.micro_batch_size=1", "train.global_batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "parallel.tp=4 does not divide the 6 ranks per node, so tensor-parallel groups would span nodes: " in err
    assert "set parallel.tp" not in err and "give each node a multiple of 4 ranks" in err, err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--gpus-per-node", "8", "--procs-per-node", "16"], "--procs-per-node 16 is more than --gpus-per-node 8"),
        (["--gpus-per-node", "1", "--procs-per-node", "2"], "of its own; use at most 1 rank per node (or --cpu"),
        (["--cpu", "--procs-per-node", "2", "--cpus-per-rank", "0"], "--cpus-per-rank=0 is out of range"),
        (["--cpu", "--procs-per-node", "0"], "--procs-per-node=0 is out of range: set the ranks per node, 1 or more"),
        (["--procs-per-node", "0"], "--procs-per-node=0 is out of range"),
        (["--gpus-per-node", "0"], "--gpus-per-node=0 is out of range: set the GPUs per node, 1 or more"),
        (["--cpu", "--procs-per-node", "2", "--master-port", "70000"], "--master-port=70000 is not a TCP port"),
        (
            ["--cpu", "--procs-per-node", "2", "--rdzv-timeout", "0"],
            "--rdzv-timeout=0 is out of range: set the seconds",
        ),
        (["--cpu"], "--cpu needs --procs-per-node (CPU processes per node)"),
        (
            ["--job-name", "my run"],
            "sbatch --job-name='my run' holds a space, which sbatch cannot take: give --job-name",
        ),
        (["--time", ""], "sbatch --time='' is empty, which sbatch cannot take: give --time a value without spaces"),
    ],
)
def test_launch_refuses_a_job_that_cannot_run_before_writing_it(options, message, capsys):
    """Each is refused before a script is written: otherwise 16 ranks on 8 GPUs fail in the job,
    --cpus-per-rank 0 and --procs-per-node 0 read as the defaults, port 70000 fails in torchrun, an
    #SBATCH line cuts a value at its first space."""
    args = ["launch", "slurm", "--nodes", "2", *options, "--dry-run", *TINY, "train.global_batch_size=64"]
    assert main([*args, "train.micro_batch_size=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_unresolvable_master_is_an_error_naming_it_within_seconds():
    start = time.monotonic()
    with pytest.raises(UserError, match=r"rendezvous host 'no-such-host\.invalid' \(MASTER_ADDR\) does not resolve"):
        check_master_resolves("no-such-host.invalid", 29500)
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29500"}
    with pytest.raises(UserError, match="no-such-host.invalid"):
        init_distributed(timeout_s=600, environ=env)  # fails before any rendezvous, not after 600 s
    assert time.monotonic() - start < 30
    check_master_resolves("127.0.0.1", 29500)


@pytest.mark.parametrize("host", ["node..cluster", "a" * 64])
def test_a_malformed_master_name_is_refused_at_once(host, capfd):
    """A name with an empty or 64-character label: its lookup died of a traceback in its thread, and the
    check said there was no answer within 20 s, as if the name server were down."""
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"rendezvous host '{host}' \(MASTER_ADDR\) does not resolve: .*label"):
        check_master_resolves(host, 29500)
    assert time.monotonic() - start < 5 and "Traceback" not in capfd.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_check_without_a_gpu_refuses_at_once_naming_the_cpu_checks(tmp_path):
    # it ran every part for minutes (nvidia-smi not found, the 0.56B step killed for memory) before
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    r = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(tmp_path / "out")], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device here" in r.stderr and "tools/run_tests.sh" in r.stderr
    assert time.monotonic() - start < 30 and not (tmp_path / "out").exists()


def test_a_large_world_looks_for_failed_ranks_less_often():
    """Every rank of the world asks the one rendezvous store: their looks together stay bounded."""
    assert poll_interval(1.0, 8) == 1.0 and poll_interval(1.0, 500) == 1.0
    assert poll_interval(1.0, 4096) == 4096 / STORE_LOOKS_PER_S
    for world in (8, 1000, 4096, 65536):
        assert world / poll_interval(1.0, world) <= STORE_LOOKS_PER_S


@pytest.mark.parametrize("template", TEMPLATES.values())
@pytest.mark.parametrize(
    "env, line",
    [
        ({"PROCS_PER_NODE": "abc"}, "PROCS_PER_NODE=abc is not a whole number: set the ranks per machine, 1 or more"),
        ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is not a TCP port: set one in 1-65535"),
        (
            {"RDZV_TIMEOUT": "10m"},
            "RDZV_TIMEOUT=10m is not a whole number: set the seconds the machines wait for each other at the "
            "rendezvous, 1 or more",
        ),
    ],
)
def test_sbatch_templates_refuse_a_bad_variable_in_one_line_before_training_starts(template, env, line, tmp_path):
    """The bare-metal template checks in its batch shell; the container one inside its image, as its
    step's tasks start (the batch host may have no megatron-lite), before torchrun or a rank."""
    for name, text in SLURM_STUBS.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    job = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(tmp_path)}
    job["CONTAINER_IMAGE"] = "img"
    r = run_launch_script(template, {**job, **env}, path=str(tmp_path))
    assert r.returncode == 2 and r.stderr.splitlines() == [f"launch/{template}: {line}"], r.stderr


@pytest.mark.parametrize("template", TEMPLATES.values())
def test_sbatch_templates_run_outside_a_job_say_to_submit_them(template, tmp_path):
    r = run_launch_script(template, {"CONTAINER_IMAGE": "img"}, path=str(tmp_path))
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"launch/{template}: not inside a SLURM job: submit it with sbatch (or megatron-lite launch slurm); "
        "for one machine use launch/torchrun.sh"
    ], r.stderr


def test_launch_variable_check_runs_the_command_after_it_only_when_every_value_is_good():
    check = [sys.executable, "-m", "megatron_lite.launcher.launch_vars", "s"]
    good = subprocess.run([*check, "PROCS_PER_NODE=2", "--", "echo", "started"], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout == "started\n", good.stderr
    bad = subprocess.run([*check, "PROCS_PER_NODE=0", "--", "echo", "started"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "", bad.stdout
    assert bad.stderr == "s: PROCS_PER_NODE=0 is out of range: set the ranks per machine, 1 or more\n", bad.stderr


@pytest.mark.parametrize("template", sorted(TEMPLATES.values()))
def test_sbatch_header_example_submits_a_layout_that_fits_its_config(template, capsys):
    """The header's `sbatch --nodes=N ... --config FILE` gives N x the template's PROCS_PER_NODE ranks,
    which the config's layout must fill (a config with parallel.dp set names its world size)."""
    text = (ROOT / "launch" / template).read_text()
    header = re.sub(r"\\\n#\s*", "", text)  # continued lines joined
    nodes, config = re.search(rf"sbatch --nodes=(\d+) launch/{template} --config (\S+)", header).groups()
    procs = re.search(r"^PROCS_PER_NODE=\$\{PROCS_PER_NODE:-(\d+)\}", text, re.M).group(1)
    assert main(["plan", "--config", str(ROOT / config), "--world-size", str(int(nodes) * int(procs))]) == 0
    assert "error" not in capsys.readouterr().err
