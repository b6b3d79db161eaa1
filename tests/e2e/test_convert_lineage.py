"""`convert to-hf` carries the checkpoint's lineage into the export (``megatron_lite.json`` and the model
card): code commit, Python, the run's working directory, dataset fingerprints, tokenizer sha256, step;
relative data paths shown as recorded with the directory they are relative to. `convert from-hf` keeps
it in ``origin.json`` as where the weights were trained, and a later export or import carries it on."""

import json

import pytest
from train_checks import run_in_a_project

from megatron_lite.cli import main

pytest.importorskip("transformers")


def test_the_export_carries_the_lineage_and_the_round_trip_keeps_it(tiny_args, small_corpus, tmp_path, monkeypatch):
    prefix, _ = small_corpus
    project, step = run_in_a_project(tiny_args, prefix, tmp_path, monkeypatch)
    lineage = json.loads((step / "metadata.json").read_text())["lineage"]
    assert lineage["workdir"] == str(project) and lineage["datasets"][0]["prefix"] == "data/c"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the record names the run's directory, not the converter's
    hf = tmp_path / "hf"
    assert main(["convert", "to-hf", "--checkpoint", str(step), "--out", str(hf), "--no-verify"]) == 0
    record = json.loads((hf / "megatron_lite.json").read_text())
    assert record["lineage"] == lineage and record["step"] == 1
    card = (hf / "README.md").read_text()
    data, tok = lineage["datasets"][0], lineage["tokenizer"]
    assert f"- run started in `{project}`" in card and f"Python {lineage['python']}" in card
    assert f"- dataset `data/c` (relative to `{project}`): .idx sha256 `{data['idx_sha256']}`" in card
    assert f"  - `data/c` (relative to `{project}`): " in card  # the training section's dataset list too
    assert f"- tokenizer `{tok['path']}`: sha256 `{tok['sha256']}`" in card
    if lineage["git_commit"]:
        assert f"- code: megatron-lite commit `{lineage['git_commit']}`" in card

    back = tmp_path / "back"
    assert main(["convert", "from-hf", "--hf", str(hf), "--out", str(back)]) == 0
    origin = json.loads((back / "step_00000000" / "origin.json").read_text())
    assert origin["exported_from"] == {"checkpoint": str(step.resolve()), "step": 1, "lineage": lineage}
    again = tmp_path / "again"
    assert main(["convert", "to-hf", "--checkpoint", str(back), "--out", str(again), "--no-verify"]) == 0
    record = json.loads((again / "megatron_lite.json").read_text())
    assert record["origin"]["exported_from"]["lineage"] == lineage and record["lineage"] is None
    card = (again / "README.md").read_text()
    assert f"  - exported by megatron-lite from checkpoint `{step.resolve()}` (step 1)" in card
    assert f"    - dataset `data/c` (relative to `{project}`): " in card
    # imported once more: the import it exports trained nothing, the run that trained the weights is kept
    assert main(["convert", "from-hf", "--hf", str(again), "--out", str(tmp_path / "back2")]) == 0
    origin2 = json.loads((tmp_path / "back2" / "step_00000000" / "origin.json").read_text())
    assert origin2["exported_from"] == origin["exported_from"]
