"""A checkpoint whose lineage records no ``workdir`` (the directory its run started in, the base of its
relative data paths): eval --held-out reads the run's relative paths from its own directory and says
so once; convert and resume need no workdir."""

import json
import logging

from train_checks import run_in_a_project

from megatron_lite.cli import main

NO_WORKDIR = "records no working directory of its run"


def test_a_checkpoint_without_workdir_is_read_relative_to_this_directory(
    tiny_args, small_corpus, tmp_path, monkeypatch, capsys, caplog
):
    prefix, tok = small_corpus
    project, step = run_in_a_project(tiny_args, prefix, tmp_path, monkeypatch)
    meta = json.loads((step / "metadata.json").read_text())
    assert meta["lineage"].pop("workdir") == str(project)
    (step / "metadata.json").write_text(json.dumps(meta))

    caplog.set_level(logging.INFO)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(step), "--held-out", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 8 * 32
    said = [r.getMessage() for r in caplog.records if NO_WORKDIR in r.getMessage()]
    assert said == [
        f"checkpoint {step} {NO_WORKDIR}: its relative data paths (data.path=data/c) are read relative to this "
        f"directory, {project}"
    ]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--checkpoint", str(step), "--held-out"]) == 2
    assert "error: dataset file data/c.bin does not exist; checkpoint" in capsys.readouterr().err

    monkeypatch.chdir(project)
    out = tmp_path / "hf"
    assert main(["convert", "to-hf", "--checkpoint", str(step), "--out", str(out), "--no-verify"]) == 0
    assert json.loads((out / "megatron_lite.json").read_text())["step"] == 1
    own = [a for a in tiny_args if not a.startswith("data.path=")]
    assert main(["train", *own, "data.path=data/c", "train.steps=2"]) == 0  # resumes step 1
    resumed = json.loads((step.with_name("step_00000002") / "metadata.json").read_text())
    assert resumed["lineage"]["workdir"] == str(project)
