"""``megatron-lite`` command line: train, eval, preprocess, tokenizer, convert, doctor, plan, launch.

Every verb is a thin wrapper over library code (``cli_verbs.py``); this module builds the parsers
and runs the chosen verb. A :class:`UserError` (bad config, missing data, bad path) prints one
``error: ...`` line and exits 2, with no traceback; with several ranks the line carries the log
lines' date and rank prefix (:func:`_report`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import NamedTuple

from megatron_lite import cli_verbs
from megatron_lite.errors import SetupInterrupted, UserError, explained

# A rank other than 0 that fails waits this long before printing its error itself (see _report).
ERROR_GRACE_S = 10.0
# The inputs `preprocess` and `tokenizer train` read, both through data/inputs.py.
INPUT_HELP = "files, globs or .jsonl files (.gz, .bz2, .xz: read decompressed)"
QUIET_HELP = "no progress: no bar on a terminal, no progress line every 30 s where stderr is a file (a job's log)"


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--width 0`` would divide by zero, ``--max-bytes 0`` would sample
    no text and then blame the input files for holding none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects a positive integer, got {value}")
    return value


class _OneConfig(argparse.Action):
    """``--config`` that refuses a second file: argparse keeps the last silently, and a run would
    train with one of two configs its command line names."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: str, option: str | None = None
    ) -> None:
        first = getattr(namespace, self.dest)
        if first is not None:
            raise argparse.ArgumentError(
                self,
                f"given twice ({first} and {value}): a run reads one config file; give --config once, "
                "with other settings as section.key=value overrides",
            )
        setattr(namespace, self.dest, value)


def add_config_option(p: argparse.ArgumentParser) -> None:
    """The ``--config FILE`` option and the ``section.key=value`` overrides of every verb that reads
    a run config (train, plan, launch slurm)."""
    p.add_argument(
        "--config",
        action=_OneConfig,
        help="YAML config file (see configs/); without one, every key not overridden takes its default",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="config overrides, e.g. train.steps=100 (every key, its default and meaning: docs/config.md)",
    )


def _add_data_verbs(sub) -> None:
    pp = sub.add_parser(
        "preprocess",
        help="tokenize files/globs/JSONL into a .bin/.idx dataset",
        description="Tokenize files/globs/JSONL into PREFIX.bin/.idx. Prints its stats as JSON, also recorded in "
        "PREFIX.json: documents, tokens, bytes (input bytes read, after decompression: a .gz counts as the file "
        "inside it), files, decode_errors, seconds. Inputs with no text are an error, or a warning each when "
        "other inputs have text. Temporary files left at --output by a run that was killed are removed.",
    )
    pp.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    pp.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    pp.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin, PREFIX.idx and PREFIX.json)")
    pp.add_argument("--json-key", default="text", help="field holding the text in JSONL inputs (default: text)")
    pp.add_argument("--no-eos", action="store_true", help="do not append EOS after each document")
    pp.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    pp.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output")
    pp.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="tokenizing processes: 1 to the usable CPUs, or auto (all); the output is the same for any N (default 1)",
    )
    pp.set_defaults(fn=cli_verbs.run_preprocess)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tk_sub = tk.add_subparsers(dest="action", required=True, metavar="ACTION")
    tt = tk_sub.add_parser(
        "train",
        help="train a sentencepiece BPE tokenizer (byte fallback)",
        description="Train a sentencepiece BPE tokenizer (byte fallback) into PREFIX.model and PREFIX.json. "
        "Temporary files left at --output by a run that was killed are removed.",
    )
    tt.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    tt.add_argument("--output", required=True, help="output prefix (writes PREFIX.model and PREFIX.json)")
    tt.add_argument("--vocab-size", type=int, default=8192, help="pieces in the vocabulary (default 8192)")
    tt.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=20_000_000,
        help="sample at most this many bytes of text (default: 20000000)",
    )
    tt.add_argument("--json-key", default="text", help="field holding the text in JSONL inputs (default: text)")
    tt.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    tt.add_argument("--overwrite", action="store_true", help="replace a tokenizer already at --output")
    tt.set_defaults(fn=cli_verbs.run_tokenizer)


def _add_convert_verb(sub) -> None:
    cv = sub.add_parser("convert", help="Hugging Face interop: to-hf, from-hf, verify")
    cv_sub = cv.add_subparsers(dest="action", required=True, metavar="ACTION")
    ct = cv_sub.add_parser("to-hf", help="export a checkpoint as a transformers model directory")
    cf = cv_sub.add_parser("from-hf", help="import a Llama/Mistral/Qwen2/GPT-2 directory as a checkpoint")
    cc = cv_sub.add_parser("verify", help="compare a checkpoint's tensors and logits with a transformers model's")
    for c in (ct, cc):
        c.add_argument("--checkpoint", required=True, help="a step directory or a run's checkpoint directory")
        c.add_argument(
            "--step",
            type=int,
            help="this step under --checkpoint, which is then the run's checkpoint directory (default: the newest "
            "good one)",
        )
    ct.add_argument("--out", required=True, help="new output directory")
    ct.add_argument(
        "--max-shard-size", default="5GB", help="split model.safetensors above this: 500MB, 2GB, bytes (default: 5GB)"
    )
    ct.add_argument("--no-verify", action="store_true", help="skip the check of every tensor and the logits")
    cf.add_argument("--hf", required=True, help="Hugging Face model directory (config.json, *.safetensors)")
    cf.add_argument("--out", required=True, help="new checkpoint root (writes OUT/step_00000000, OUT/config.yaml)")
    cc.add_argument("--hf", required=True, help="Hugging Face model directory")
    cv.set_defaults(fn=cli_verbs.run_convert)


def _add_launch_verbs(sub) -> None:
    pl = sub.add_parser("plan", help="check a parallel layout for N ranks; memory and pipeline bubble")
    add_config_option(pl)
    pl.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) the job will have")
    pl.add_argument(
        "--gpu-memory",
        help="one GPU's memory, e.g. 80GiB (80GB is 80e9 bytes): a warning where a rank's peak estimate exceeds it",
    )
    pl.add_argument("--json", action="store_true", help="print one JSON line")
    pl.add_argument("--width", type=_positive_int, default=100, help="columns of the pipeline timeline (default: 100)")
    pl.set_defaults(fn=cli_verbs.run_plan)

    from megatron_lite.launcher.slurm import add_slurm_arguments

    la = sub.add_parser("launch", help="render and submit a multi-node job")
    la_sub = la.add_subparsers(dest="target", required=True, metavar="TARGET")
    add_slurm_arguments(
        la_sub.add_parser(
            "slurm", help="sbatch launch/train.sbatch (train_container.sbatch with --container-image) for this config"
        )
    )
    la.set_defaults(fn=cli_verbs.run_launch)


def build_parser() -> argparse.ArgumentParser:
    """Every verb: train, eval, preprocess, tokenizer, convert, doctor, plan, launch."""
    p = argparse.ArgumentParser(prog="megatron-lite", description="Megatron-style pretraining, easy to run.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    t = sub.add_parser("train", help="train a model (single process, torchrun or srun)")
    add_config_option(t)
    t.set_defaults(fn=cli_verbs.run_train)

    e = sub.add_parser("eval", help="mean next-token loss of a checkpoint on a text file or its run's held-out samples")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="a step directory (.../step_XXXXXXXX), or the directory holding the steps: the run's "
        "checkpoint.dir, by default <log.dir>/checkpoints (its newest good step is used); "
        "the run's log.dir itself is not accepted",
    )
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="UTF-8 text file, or JSON Lines (.jsonl/.json: the text of each document)")
    what.add_argument("--held-out", action="store_true", help="the run's held-out samples (its eval_loss)")
    e.add_argument("--json-key", default="text", help="field holding the text in a JSON Lines --text (default: text)")
    nan = 'a failure (a NaN or infinite loss, a bad path) is a null loss with an "error" naming it (exit status 2)'
    e.add_argument("--json", action="store_true", help=f'print one line {{"loss": ..., "tokens": ...}}; {nan}')
    e.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda (default: auto)")
    e.set_defaults(fn=cli_verbs.run_eval)

    _add_data_verbs(sub)
    _add_convert_verb(sub)
    d = sub.add_parser("doctor", help="versions, devices, kernel backends, optional packages")
    d.add_argument("--json", action="store_true", help="print the report as one JSON object")
    d.add_argument(
        "--backend",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="report the kernels a run with kernels.backend=BACKEND takes here (default: auto)",
    )
    d.set_defaults(fn=cli_verbs.run_doctor)
    _add_launch_verbs(sub)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. ``section.key=value`` overrides may sit on both sides of options
    (``train a=1 --config F b=2``): argparse fills a positional list once, from the first run of
    positionals, and hands back the later ones unparsed; they are still overrides, in order (what
    ``parse_intermixed_args`` does, which refuses parsers with subcommands)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") for x in extra):
            dashed = next((x for x in extra if x.startswith("-") and "." in x.split("=")[0]), None)
            hint = f" (config overrides take no dashes: {dashed.lstrip('-')})" if dashed else ""
            parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
        args.overrides = [*args.overrides, *extra]
    return args


def _report(error: UserError, environ: Mapping[str, str] = os.environ) -> None:
    """Say a refusal: one line ``error: <message>`` on stderr. A single process prints it bare, the
    command's answer to whoever ran it. In a launch of several ranks it is a line of a job log
    shared with every rank, so it carries the log lines' prefix (:func:`console_formatter`: date,
    rank, level, logger), once per launch where one line tells it:

    - Rank 0 says it at once: every rank usually reaches the same verdict.
    - Another rank waits ``ERROR_GRACE_S`` first: its exit would make the launcher (torchrun, srun)
      kill every rank, maybe before rank 0 has said it, and rank 0's exit normally ends it.
    - After that wait, an error every rank raised together (``UserError.raised_on_every_rank``, a
      verdict shared at the rendezvous) is said again only by the first rank of each other machine,
      whose log may be its own; the rest of that machine's ranks exit without a line.
    - Otherwise the error may be this rank's alone (e.g. its data shard): it says it. An error every
      rank has already logged (``UserError.told_every_rank``) is said at once."""
    position = _launch_position(environ)
    if position is None:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return
    if position.rank != "0":
        if not error.told_every_rank:
            time.sleep(ERROR_GRACE_S)
        if error.raised_on_every_rank and position.local_rank != "0":
            return
    # formatted here rather than logged: the line reaches stderr once, whatever handlers a program
    # embedding main() set up (basicConfig adds none where the root logger has some)
    record = logging.LogRecord(__name__, logging.ERROR, __file__, 0, "error: %s", (error,), None)
    print(console_formatter(environ).format(record), file=sys.stderr, flush=True)


class LaunchPosition(NamedTuple):
    """Where a process sits in a launch of several ranks, as text from the launcher's variables."""

    rank: str
    world: str
    local_rank: str  # 0 for the first rank on each machine (and where the launcher sets none)


def _launch_position(environ: Mapping[str, str]) -> LaunchPosition | None:
    """The position in a launch of several ranks (torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or an
    srun step's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), else None. The precedence of
    ``launcher.env.resolve_env``, read without importing anything: this runs before any verb, and for
    errors raised before the mesh exists."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, world, local = environ["RANK"], environ["WORLD_SIZE"], environ.get("LOCAL_RANK", "0")
    elif (
        "SLURM_PROCID" in environ
        and "SLURM_NTASKS" in environ
        and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)
    ):
        rank, world, local = environ["SLURM_PROCID"], environ["SLURM_NTASKS"], environ.get("SLURM_LOCALID", "0")
    else:
        return None
    return LaunchPosition(rank, world, local.strip()) if world.strip() not in ("", "1") else None


def log_format(environ: Mapping[str, str] = os.environ) -> str:
    """The log line format: with several ranks each line names its rank, since every rank's lines
    land in one job log (a preemption warning, a failure) and would otherwise read the same."""
    position = _launch_position(environ)
    tag = f"[rank {position.rank}/{position.world}] " if position else ""
    return "%(asctime)s " + tag + "%(levelname)s %(name)s: %(message)s"


class PrefixedLines(logging.Formatter):
    """Gives every line of a multi-line message (the kernel report, the rank-layout table) the
    line prefix (date, rank, level, logger), so each line of a job log of many ranks can be
    attributed and grepped; a traceback follows unprefixed, as Python prints it."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        message = record.message
        try:
            lines = []
            for line in message.split("\n"):
                record.message = line
                lines.append(super().formatMessage(record))
        finally:
            record.message = message
        return "\n".join(lines)


def console_formatter(environ: Mapping[str, str] = os.environ) -> logging.Formatter:
    """Every line in :func:`log_format` (:class:`PrefixedLines`): the CLI's log lines and, with several
    ranks, its ``error:`` line."""
    return PrefixedLines(log_format(environ), datefmt="%Y-%m-%d %H:%M:%S")  # jobs run for days


def console_handler(environ: Mapping[str, str] = os.environ) -> logging.Handler:
    """The CLI's log handler: stderr, every line in :func:`console_formatter`."""
    handler = logging.StreamHandler()
    handler.setFormatter(console_formatter(environ))
    return handler


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``megatron-lite`` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, handlers=[console_handler()])
    try:
        return args.fn(args)
    except UserError as e:
        _report(e)
        return 2
    except SetupInterrupted as e:  # the signal's handler logged it (training/fault.py: SetupSignals)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `megatron-lite plan ... | head`: the reader left, which is no error
        # Python would print a second traceback flushing stdout at exit: point it at /dev/null
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # a shell's status for a process that SIGPIPE ended
    except Exception as e:
        if explained(e):  # a peer gone, which the failure watch has logged: the traceback adds nothing
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
