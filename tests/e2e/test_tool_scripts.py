"""The thin scripts in ``tools/`` that DESIGN.md names run the same code as their CLI verbs."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megatron_lite.cli import main

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# ~100 KB of source every machine has: enough text for a 512-token vocabulary
CORPUS_FILES = [STDLIB / n for n in ("textwrap.py", "shlex.py", "fractions.py", "heapq.py", "glob.py", "fnmatch.py")]


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("script", "usage"),
    [
        ("preprocess_data.py", "megatron-lite preprocess"),
        ("train_tokenizer.py", "megatron-lite tokenizer train"),
        ("convert_checkpoint.py", "megatron-lite convert"),
    ],
)
def test_tool_help_is_the_verbs(script, usage):
    r = tool(script, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: {usage}"), r.stdout


@pytest.mark.parametrize("action", ["to-hf", "from-hf"])
def test_convert_tool_takes_the_verbs_flags(action, capsys):
    r = tool("convert_checkpoint.py", action, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(SystemExit) as e:
        main(["convert", action, "--help"])
    assert e.value.code == 0
    assert r.stdout == capsys.readouterr().out


def test_tools_train_a_tokenizer_and_build_the_same_dataset_as_the_cli(tmp_path, capsys):
    inputs = [str(p) for p in CORPUS_FILES]
    r = tool("train_tokenizer.py", "--input", *inputs, "--output", str(tmp_path / "tok"), "--vocab-size", "512")
    assert r.returncode == 0, r.stderr[-2000:]
    model = tmp_path / "tok.model"
    assert model.is_file() and (tmp_path / "tok.json").is_file()
    r = tool("preprocess_data.py", "--input", *inputs, "--tokenizer", str(model), "--output", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-2000:]
    argv = ["preprocess", "--input", *inputs, "--tokenizer", str(model), "--output", str(tmp_path / "b"), "--quiet"]
    assert main(argv) == 0
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes(), ext
    # the same --output again is refused, leaving the dataset as it was, until --overwrite asks for it
    before = (tmp_path / "b.bin").read_bytes()
    argv[2 : 2 + len(inputs)] = inputs[:1]
    capsys.readouterr()
    assert main(argv) == 2 and (tmp_path / "b.bin").read_bytes() == before
    refused = capsys.readouterr().err
    assert f"--output {tmp_path / 'b'} would replace {tmp_path / 'b.bin'}, {tmp_path / 'b.idx'}" in refused, refused
    assert "pass --overwrite to replace it, or choose another --output prefix" in refused, refused
    assert main([*argv, "--overwrite"]) == 0 and (tmp_path / "b.bin").read_bytes() != before
    retrain = ["tokenizer", "train", "--input", *inputs, "--output", str(tmp_path / "tok"), "--vocab-size", "400"]
    kept = model.read_bytes()
    assert main([*retrain, "--quiet"]) == 2 and model.read_bytes() == kept
    refused = capsys.readouterr().err
    assert f"--output {tmp_path / 'tok'} would replace {model}" in refused and "pass --overwrite" in refused, refused
    assert main([*retrain, "--quiet", "--overwrite"]) == 0


def test_tool_errors_are_the_verbs(tmp_path):
    r = tool("preprocess_data.py", "--input", str(tmp_path / "none.txt"), "--tokenizer", "x.model", "--output", "o")
    assert r.returncode == 2 and r.stderr == f"error: input file {tmp_path / 'none.txt'} not found\n", r.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "tools").glob("*.py")))
def test_every_tool_answers_help(script):
    """`python tools/X.py --help` says what the script is, never nothing (a module kernel_static.py imports
    included)."""
    r = tool(script, "--help")
    assert r.returncode == 0 and r.stdout.strip(), (r.stdout, r.stderr[-2000:])
    assert "usage:" in r.stdout or "run python tools/kernel_static.py" in r.stdout, r.stdout


def test_a_module_of_a_tool_run_as_a_command_is_refused_naming_the_tool():
    r = tool("ttir_offsets.py")
    assert r.returncode == 2 and "run python tools/kernel_static.py" in r.stderr, (r.returncode, r.stderr)
