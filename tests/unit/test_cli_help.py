"""The CLI help says exactly which paths a command accepts."""

import argparse

import pytest

from megatron_lite.cli import build_parser, main
from megatron_lite.launcher.slurm import TEMPLATES


def test_eval_checkpoint_help_names_what_is_accepted(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a run's or one step's" not in text  # a run's log.dir is not a checkpoint
    assert "step_XXXXXXXX" in text and "<log.dir>/checkpoints" in text and "checkpoint.dir" in text
    assert "log.dir itself is not accepted" in text


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) of every command that takes options: `eval`, `convert to-hf`, ..."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from _leaf_parsers(child, (*path, name))


def test_every_option_of_every_command_says_what_it_does():
    bare = [
        f"megatron-lite {' '.join(words)} {a.option_strings[-1]}"
        for words, parser in _leaf_parsers(build_parser())
        for a in parser._actions
        if a.option_strings and a.help in (None, "") and not isinstance(a, argparse._HelpAction)
    ]
    assert not bare, f"options without help text: {bare}"


def test_every_option_with_a_default_states_it():
    """A user reading `--help` learns what an option left out means (`--max-bytes`, `--device`, ...)."""
    unstated = [
        f"megatron-lite {' '.join(words)} {a.option_strings[-1]} (default {a.default!r}): {a.help}"
        for words, parser in _leaf_parsers(build_parser())
        for a in parser._actions
        if a.option_strings
        and a.default not in (None, False, argparse.SUPPRESS)
        and not any(f"default{sep}{a.default}" in a.help for sep in (" ", ": "))
    ]
    assert not unstated, f"options whose help does not state their default: {unstated}"


def test_every_verb_taking_overrides_points_to_the_config_reference():
    overrides = {
        " ".join(words): a.help
        for words, parser in _leaf_parsers(build_parser())
        for a in parser._actions
        if a.dest == "overrides"
    }
    assert sorted(overrides) == ["launch slurm", "plan", "train"]
    assert all("docs/config.md" in text for text in overrides.values()), overrides


def test_config_option_says_what_a_run_without_it_uses():
    """`megatron-lite train` alone is a run of every default (log.dir runs/default), not a usage error."""
    helps = {
        " ".join(words): next(a.help for a in parser._actions if "--config" in a.option_strings)
        for words, parser in _leaf_parsers(build_parser())
        if any("--config" in a.option_strings for a in parser._actions)
    }
    assert sorted(helps) == ["launch slurm", "plan", "train"]
    assert all("without one, every key not overridden takes its default" in h for h in helps.values()), helps


def test_launch_slurm_help_names_every_template_it_submits():
    launch = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["launch"]
    targets = next(a for a in launch._actions if isinstance(a, argparse._SubParsersAction))
    text = next(c.help for c in targets._choices_actions if c.dest == "slurm")
    assert all(name in text for name in TEMPLATES.values()), text


def test_tokenizer_train_and_preprocess_describe_the_same_inputs():
    """Both read their --input through data/inputs.py: JSONL and compressed files included."""
    parsers = dict(_leaf_parsers(build_parser()))
    helps = [
        next(a.help for a in parsers[words]._actions if "--input" in a.option_strings)
        for words in (("preprocess",), ("tokenizer", "train"))
    ]
    assert helps[0] == helps[1] and ".jsonl" in helps[0] and ".gz" in helps[0], helps


def test_quiet_says_it_silences_the_progress_lines_of_a_jobs_log_too():
    """--quiet turns off the bar on a terminal and, where stderr is a file, the 30 s progress lines
    (progress.byte_progress): its help names both, the same for both verbs that read inputs."""
    parsers = dict(_leaf_parsers(build_parser()))
    for words in (("preprocess",), ("tokenizer", "train")):
        (quiet,) = [a.help for a in parsers[words]._actions if "--quiet" in a.option_strings]
        assert "bar" in quiet and "30 s" in quiet, (words, quiet)


def test_verify_and_to_hf_name_both_checks():
    """`convert verify` (and to-hf unless --no-verify) compares every tensor, then the logits."""
    convert = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["convert"]
    verbs = next(a for a in convert._actions if isinstance(a, argparse._SubParsersAction))
    verify = next(c.help for c in verbs._choices_actions if c.dest == "verify")
    no_verify = next(a.help for a in verbs.choices["to-hf"]._actions if "--no-verify" in a.option_strings)
    for text in (verify, no_verify):
        assert "tensor" in text and "logits" in text, text


def test_output_piped_into_head_is_no_traceback():
    """`megatron-lite plan ... | head -3`: the reader leaving is exit status 141, with no BrokenPipeError traceback."""
    import subprocess
    import sys

    code = "import sys; from megatron_lite.cli import main; sys.exit(main(sys.argv[1:]))"
    # a timeline wider than a pipe holds (64 KiB), so the writer is still writing when the reader leaves
    argv = [
        "plan",
        "--world-size",
        "4",
        "model.vocab_size=500",
        "data.vocab_size=500",
        "parallel.pp=4",
        "--width",
        "50000",
    ]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()  # the reader takes a line, then goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--world-size", "1", "--width", "0"],  # a timeline of no columns would divide by zero
        ["tokenizer", "train", "--input", "x.txt", "--output", "t", "--max-bytes", "0"],  # no text sampled
    ],
)
def test_counts_that_must_be_positive_are_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "expects a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "verb", [["train"], ["plan", "--world-size", "1"], ["launch", "slurm", "--nodes", "1", "--dry-run"]]
)
def test_config_given_twice_is_one_usage_error_naming_both_files(verb, tmp_path, capsys):
    """argparse alone keeps the last --config: a run would train with one of the two files without a word."""
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for f in (a, b):
        f.write_text("train:\n  stepz: 1\n")  # read, it would fail: nothing may start whichever is taken
    with pytest.raises(SystemExit) as stop:
        main([*verb, "--config", str(a), "model.layers=2", f"--config={b}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert f"argument --config: given twice ({a} and {b})" in line and "give --config once" in line, err
