"""The tokenizer's record (``PREFIX.json`` beside ``data.tokenizer``) goes into every checkpoint as
``tokenizer.json`` and from there into an export's ``megatron_lite.json``: only when it is the record
of the model the run loaded (its sha256)."""

import json
import shutil
from pathlib import Path

from convert_fixtures import exported_fixture, trained_fixture  # noqa: F401 (fixtures)

from megatron_lite.checkpoint.format import sha256_file
from megatron_lite.cli import main
from megatron_lite.training.run_lock import LOCK_FILE


def _tokenizer_copy(small_corpus, tmp_path: Path, record: dict | None) -> Path:
    """The small corpus's tokenizer model copied to ``tmp_path/tok/``, with ``record`` beside it."""
    _, tok = small_corpus
    (tmp_path / "tok").mkdir()
    model = Path(shutil.copy(tok, tmp_path / "tok" / "spm.model"))
    if record is not None:
        model.with_suffix(".json").write_text(json.dumps(record))
    return model


def test_a_record_of_another_tokenizer_is_refused_before_training(tiny_args, small_corpus, tmp_path, capsys):
    _, tok = small_corpus
    record = json.loads(tok.with_suffix(".json").read_text())
    model = _tokenizer_copy(small_corpus, tmp_path, {**record, "sha256": "0" * 64})  # a retrained model's
    capsys.readouterr()
    assert main(["train", *tiny_args, f"data.tokenizer={model}"]) == 2
    err = capsys.readouterr().err
    assert f"{model.with_suffix('.json')} is the record of another tokenizer than {model} beside it" in err, err
    assert f"the model's is {record['sha256'][:12]}..." in err and "Traceback" not in err
    written = [p.name for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != LOCK_FILE]
    assert written == []  # refused before the run wrote anything


def test_only_the_models_own_record_is_copied_into_checkpoints(tiny_args, small_corpus, tmp_path):
    _, tok = small_corpus
    record = json.loads(tok.with_suffix(".json").read_text())
    model = _tokenizer_copy(small_corpus, tmp_path, {"version": "1.0", "model": {"type": "BPE"}})  # HF's file
    assert main(["train", *tiny_args, "train.steps=1", f"data.tokenizer={model}"]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert (step / "tokenizer.model").is_file() and not (step / "tokenizer.json").exists()
    model.with_suffix(".json").write_text(json.dumps(record))
    assert main(["train", *tiny_args, "train.steps=2", f"data.tokenizer={model}"]) == 0
    assert json.loads((step.with_name("step_00000002") / "tokenizer.json").read_text()) == record


def _record_another_model(path: Path, key: str | None = None) -> dict:
    """Make the tokenizer record in JSON file ``path`` (under ``key``) another model's; returns it as it was."""
    whole = json.loads(path.read_text())
    record = whole[key] if key else whole
    path.write_text(
        json.dumps({**whole, key: {**record, "sha256": "0" * 64}} if key else {**record, "sha256": "0" * 64})
    )
    return record


def test_convert_carries_only_the_record_of_the_tokenizer_it_converts(trained, exported, tmp_path, caplog):
    """to-hf copies the checkpoint's record into megatron_lite.json, and from-hf copies it back into the
    checkpoint it imports: a record whose sha256 is not the tokenizer.model's is left out, with a warning."""
    step = tmp_path / "copy" / "step_00000002"
    shutil.copytree(trained / step.name, step)
    record = _record_another_model(step / "tokenizer.json")
    meta = json.loads((step / "metadata.json").read_text())
    meta["files"]["tokenizer.json"] = {
        "sha256": sha256_file(step / "tokenizer.json"),
        "bytes": len((step / "tokenizer.json").read_bytes()),
    }
    (step / "metadata.json").write_text(json.dumps(meta))
    assert main(["convert", "to-hf", "--checkpoint", str(step), "--out", str(tmp_path / "hf"), "--no-verify"]) == 0
    assert json.loads((tmp_path / "hf" / "megatron_lite.json").read_text())["tokenizer"] is None
    warned = f"the tokenizer record in {step / 'tokenizer.json'} is not the record of {step / 'tokenizer.model'} (it "
    assert warned in caplog.text
    assert json.loads((exported / "megatron_lite.json").read_text())["tokenizer"] == record  # the model's own
    hf = tmp_path / "hf2"
    shutil.copytree(exported, hf)
    _record_another_model(hf / "megatron_lite.json", "tokenizer")
    assert main(["convert", "from-hf", "--hf", str(hf), "--out", str(tmp_path / "imported")]) == 0
    assert not (tmp_path / "imported" / "step_00000000" / "tokenizer.json").exists()
    assert (
        f"the tokenizer record in {hf / 'megatron_lite.json'} is not the record of {hf / 'tokenizer.model'}"
        in caplog.text
    )
