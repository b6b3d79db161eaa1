"""What each ``megatron-lite`` verb does once its command line is parsed (``cli.py`` builds the parsers).

Each ``run_*`` takes the parsed arguments and returns the exit status; a :class:`UserError` it raises is
reported by ``cli.main``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megatron_lite.errors import UserError, refuse_blank


def run_train(args: argparse.Namespace) -> int:
    from megatron_lite.train import run_training

    run_training(args.config, args.overrides)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from megatron_lite.training.evaluate import NonFiniteLossError, evaluate_held_out, evaluate_text

    try:
        if args.held_out:
            if args.json_key != "text":  # it would be ignored: the held-out samples are tokens already
                raise UserError(
                    f"--json-key {args.json_key} names the text of a JSON Lines --text, and --held-out scores the "
                    "run's held-out samples, tokenized already: leave --json-key out"
                )
            result = evaluate_held_out(args.checkpoint, args.device)
        else:
            result = evaluate_text(args.checkpoint, args.text, args.device, args.json_key)
    except UserError as e:
        if not args.json:
            raise
        # --json: the one line on stdout is JSON, failures too; strict JSON has no NaN or Infinity
        # (json.dumps would print them): a null loss, the tokens scored if any, the reason, exit 2
        tokens = e.tokens if isinstance(e, NonFiniteLossError) else None
        print(json.dumps({"loss": None, "tokens": tokens, "error": str(e)}))
        return 2
    if args.json:  # the documented line is exactly these two keys
        print(json.dumps({"loss": result["loss"], "tokens": result["tokens"]}, allow_nan=False))
    else:
        print(f"loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}) over {result['tokens']} tokens")
    return 0


def run_preprocess(args: argparse.Namespace) -> int:
    from megatron_lite.data.preprocess import preprocess

    _writable_parent("--output", args.output)
    stats = preprocess(
        args.input,
        args.tokenizer,
        args.output,
        json_key=args.json_key,
        append_eos=not args.no_eos,
        progress=not args.quiet,
        overwrite=args.overwrite,
        workers=args.workers,
    )
    print(json.dumps(stats))
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from megatron_lite.data.tokenizer import train_tokenizer

    _writable_parent("--output", args.output)
    path = train_tokenizer(
        args.input,  # files and quoted globs, as `preprocess` reads them
        args.output,
        args.vocab_size,
        max_bytes=args.max_bytes,
        progress=not args.quiet,
        json_key=args.json_key,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}")
    return 0


def _writable_parent(flag: str, path: str, create: bool = True) -> None:
    """Refuse, before any work, an output whose directory cannot be created or written. With
    ``create=False`` nothing is created: the nearest existing directory above it is probed (a
    command refused later, for a bad checkpoint, leaves no empty directories behind)."""
    from megatron_lite.checkpoint.storage import is_url
    from megatron_lite.training.preflight import probe_dir

    refuse_blank(flag, path)  # "" is the current directory, whose parent is probed and maybe not writable
    if not is_url(path):
        parent = Path(os.path.abspath(path)).parent  # `--out .`: the parent
        if not create:
            parent = next(p for p in (parent, *parent.parents) if p.exists() or p.is_symlink() or p == p.parent)
        probe_dir(f"the directory of {flag}", parent)


def run_doctor(args: argparse.Namespace) -> int:
    from megatron_lite import kernels
    from megatron_lite.doctor import report

    before = kernels.get_backend()  # the process's choice, as it was (main() also runs inside tests)
    try:
        kernels.set_backend(args.backend)
        print(report(as_json=args.json))
    except RuntimeError as e:  # triton not importable: what train refuses at startup
        if not args.json:
            raise UserError(f"doctor --backend {args.backend}: {e}") from None
        print(json.dumps({"error": f"doctor --backend {args.backend}: {e}"}))  # --json: JSON, failures too
        return 2
    finally:
        kernels.set_backend(before)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from megatron_lite import convert
    from megatron_lite.amounts import parse_size

    if args.action == "to-hf":
        size = parse_size(args.max_shard_size)
        _writable_parent("--out", args.out, create=False)
        r = convert.to_hf(args.checkpoint, args.out, step=args.step, max_shard_size=size, check=not args.no_verify)
        print(f"wrote {r.out}: {r.parameters:,} parameters; {', '.join(r.files)}")
        print(f"verified: {r.check.summary()}" if r.check else "not verified (--no-verify)")
    elif args.action == "from-hf":
        _writable_parent("--out", args.out, create=False)
        r = convert.from_hf(args.hf, args.out)
        print(f"wrote {r.checkpoint}: {r.parameters:,} parameters (weights only)")
        tok = "" if r.tokenizer else " data.tokenizer=MODEL"  # no sentencepiece model came with the weights
        print(f"train from it: megatron-lite train --config {r.config_path} data.path=PREFIX{tok} log.dir=RUN_DIR")
    else:
        r = convert.verify(args.checkpoint, args.hf, step=args.step)
        print(r.summary())
        if not r.passed:
            raise UserError(f"verification failed: {r.summary()}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from megatron_lite.amounts import parse_size
    from megatron_lite.config import load_config
    from megatron_lite.launcher.launch_vars import whole_number
    from megatron_lite.plan import format_plan, make_plan

    try:
        whole_number("--world-size", str(args.world_size), 1, None, "the ranks (GPUs) the job will have")
        gpu = None if args.gpu_memory is None else parse_size(args.gpu_memory, "--gpu-memory")
        if gpu == 0:  # no GPU has no memory: the check would be off without a word
            raise UserError(f"--gpu-memory {args.gpu_memory!r} is no memory: give one GPU's, e.g. 80GiB")
        plan = make_plan(load_config(args.config, args.overrides), args.world_size, gpu)
    except UserError as e:
        if not args.json:
            raise
        print(json.dumps({"error": str(e)}))  # --json: the one line on stdout is JSON, failures too
        return 2
    print(json.dumps(plan.to_json()) if args.json else format_plan(plan, width=args.width))
    return 0


def run_launch(args: argparse.Namespace) -> int:
    from megatron_lite.launcher.slurm import job_from_args, launch_slurm

    return launch_slurm(job_from_args(args), dry_run=args.dry_run, wait=args.wait)
