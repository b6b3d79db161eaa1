"""The sbatch templates' thread setting: OMP_NUM_THREADS=1 only for several ranks per node, as
launch/torchrun.sh sets it, read off the command each template's step would start; the job line
they print first; the rendezvous timeout their torchrun gets."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from launch_scripts import SLURM_STUBS, run_launch_script
from ports import free_port

from megatron_lite.launcher.slurm import TEMPLATE_DIR, TEMPLATES, SlurmJob, render_sbatch, template_variables


def _job_output(tmp_path: Path, template: str, stubs: dict[str, str] = SLURM_STUBS, **env: str) -> str:
    """What the job prints, its step printing instead of starting: the OMP_NUM_THREADS its command sees
    and the arguments after ``-m megatron_lite.launcher.torchrun`` (or ``-m megatron_lite.train``)."""
    stub = tmp_path / "python"  # the interpreter, except that torchrun and a rank only say how they start
    stub.write_text(
        "#!/bin/sh\n"
        'case "$1 $2" in\n'
        '  "-m megatron_lite.launcher.torchrun"|"-m megatron_lite.train") shift 2\n'
        '    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS-unset} $*"; exit 0;;\n'
        "esac\n"
        f'exec {sys.executable} "$@"\n'
    )
    stub.chmod(0o755)
    for name, text in stubs.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    job = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(tmp_path)}
    job.update(CONTAINER_IMAGE="img", MASTER_PORT=str(free_port()), PYTHON=str(stub))
    r = run_launch_script(template, {**job, **env}, path=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _step_start(tmp_path: Path, template: str, **env: str) -> str:
    """The line the job's step prints instead of starting (:func:`_job_output`)."""
    (line,) = [x for x in _job_output(tmp_path, template, **env).splitlines() if x.startswith("OMP_NUM_THREADS=")]
    return line


@pytest.mark.parametrize("template", TEMPLATES.values())
def test_sbatch_templates_count_the_jobs_nodes_and_ranks_in_words_that_fit_one(template, tmp_path):
    for nodes, procs, words in (("1", "1", "1 node x 1 rank"), ("2", "4", "2 nodes x 4 ranks")):
        out = _job_output(tmp_path, template, SLURM_NNODES=nodes, PROCS_PER_NODE=procs)
        assert out.startswith(f"job 7: {words} via torchrun"), out


@pytest.mark.parametrize("template", TEMPLATES.values())
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
@pytest.mark.parametrize("procs, threads", [("1", "unset"), ("4", "1")])
def test_sbatch_templates_set_one_thread_per_rank_only_for_several_ranks_per_node(
    template, launcher, procs, threads, tmp_path, monkeypatch
):
    """One rank per node keeps every core (torchrun leaves OMP_NUM_THREADS alone for one process);
    several get one thread each. The user's own setting stands either way."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    line = _step_start(tmp_path, template, LAUNCHER=launcher, PROCS_PER_NODE=procs)
    assert line.startswith(f"OMP_NUM_THREADS={threads} "), line
    if launcher == "torchrun":
        assert f" --nproc_per_node={procs} " in line, line
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert _step_start(tmp_path, template, LAUNCHER=launcher, PROCS_PER_NODE=procs).startswith("OMP_NUM_THREADS=6 ")


@pytest.mark.parametrize("template", TEMPLATES.values())
def test_sbatch_templates_take_the_first_host_of_a_long_node_list(template, tmp_path):
    """`scontrol show hostnames | head -n1` under pipefail ended the job with exit 141 (SIGPIPE) when
    scontrol was still writing as head exited: 20,000 hosts, one write each, fill the pipe first."""
    many = "#!/bin/sh\necho 127.0.0.1\ni=0; while [ $i -lt 20000 ]; do echo node$i; i=$((i + 1)); done\n"
    out = _job_output(tmp_path, template, {**SLURM_STUBS, "scontrol": many}, SLURM_NNODES="2", PROCS_PER_NODE="4")
    assert out.startswith("job 7: 2 nodes x 4 ranks via torchrun") and "rendezvous 127.0.0.1:" in out, out


@pytest.mark.parametrize("template", TEMPLATES.values())
def test_sbatch_templates_hand_rdzv_timeout_to_torchruns_rendezvous(template, tmp_path):
    """RDZV_TIMEOUT set how long launch/torchrun.sh's machines wait at the rendezvous, but the sbatch
    templates (and the train.sbatch `launch slurm` writes from them) left torchrun's 600 s."""
    rendered = tmp_path / "train.sbatch"
    image = "img" if "container" in template else None  # the interpreter: _job_output's stand-in
    job = SlurmJob("c.yaml", 2, 2, gpus_per_node=None, container_image=image, python=str(tmp_path / "python"))
    assert job.template == template
    rendered.write_text(render_sbatch((TEMPLATE_DIR / template).read_text(), {}, template_variables(job)))
    for script in (template, str(rendered)):
        assert " --rdzv_conf=join_timeout=600,timeout=600 " in _step_start(tmp_path, script), script  # torchrun's own
        line = _step_start(tmp_path, script, RDZV_TIMEOUT="1800")
        assert " --rdzv_conf=join_timeout=1800,timeout=1800 -m megatron_lite.train " in line, line
    # launch slurm --rdzv-timeout: written into the script, so a resubmission waits as long
    written = dataclasses.replace(job, rdzv_timeout=900)
    rendered.write_text(render_sbatch((TEMPLATE_DIR / template).read_text(), {}, template_variables(written)))
    assert " --rdzv_conf=join_timeout=900,timeout=900 " in _step_start(tmp_path, str(rendered))
