"""Fail together: a rank that fails during setup stops every rank at once, with ITS error.

Without this, rank 3 raising while it loads its checkpoint shard leaves the other ranks waiting
in their next collective until the process group's timeout, and their logs show only a timeout.
:func:`fail_fast_setup` guards one stretch of setup that has NO collectives inside: every rank runs
it, then all ranks exchange (rank, error) with one ``all_gather_object``; if any rank failed, each
raises the same :class:`UserError` naming the lowest failing rank and its message (the failing rank
also logs its traceback when the error is a bug rather than a ``UserError``).

Before the process group exists, :func:`agree_before_joining` does the same over the rendezvous
store, for the checks a rank makes before joining (its config): ``init_distributed`` runs it.

Where the trainer calls it (once per collective-free stretch; a collective inside the block would
hang the healthy ranks there before they reach the exchange)::

    env = init_distributed(timeout_s, setup_error=error)  # every rank raises any rank's config error
    with fail_fast_setup("setup"):          # local work only: data paths, tokenizer, config check,
        ...                                 # checkpoint found and readable, model built on meta
    mesh = ParallelMesh.build(dims)         # collectives
    with fail_fast_setup("loading the checkpoint"):
        ...

In a single process (no process group) the error passes through unchanged.

In the training loop, and in the setup once the process group exists, there is no collective-free
stretch to guard: :class:`~megatron_lite.launcher.failure_watch.FailureWatch` guards those instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator

import torch.distributed as dist

from megatron_lite.errors import UserError, on_every_rank

log = logging.getLogger(__name__)


def describe(error: BaseException) -> str:
    """A failure as the other ranks are told it: a ``UserError``'s own message, else its type too."""
    if isinstance(error, UserError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def agree_on_failure(error: Exception | None, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Every rank of ``group`` (default: the world) calls this with its own error or None; if any
    rank failed, every rank raises the same :class:`UserError` naming the first failing rank."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if error is not None:
            raise error
        return
    reports: list[tuple[int, str | None] | None] = [None] * dist.get_world_size(group)
    message = None if error is None else describe(error)
    dist.all_gather_object(reports, (dist.get_rank(), message), group=group)
    failed = [(rank, msg) for rank, msg in reports if msg is not None]
    if failed:
        raise _verdict(failed, f"failed during {what}") from error


def _verdict(failed: list[tuple[int, str]], what: str) -> UserError:
    rank, msg = failed[0]
    also = f" ({_others(r for r, _ in failed[1:])} failed too)" if len(failed) > 1 else ""
    return on_every_rank(UserError(f"rank {rank} {what}: {msg}{also}"))  # a FailureWatch has no rank to stop


def _others(ranks: Iterable[int], shown: int = 8) -> str:
    """``rank 1``, ``ranks 1, 2`` or, past ``shown`` ranks, ``ranks 1, ..., 8 and 503 more``."""
    ranks = list(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    listed = ", ".join(str(r) for r in ranks[:shown])
    return f"ranks {listed}" + (f" and {len(ranks) - shown} more" if len(ranks) > shown else "")


def attempt_key() -> str:
    """The store key prefix of this launch attempt: torchrun's agent store outlives a restart."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def agree_before_joining(
    store: dist.Store, rank: int, world_size: int, error: Exception | None, hosts_store: bool
) -> None:
    """The same verdict for the checks a rank makes before it joins the process group (its config,
    its launch environment): every rank posts its error or none to the rendezvous ``store``, then
    reads all of them; if any rank failed, every rank raises the same :class:`UserError` naming the
    first failing rank. Without it the failing machine's ranks exit while every other rank waits in
    ``init_process_group`` for them until the timeout, and then reports only that timeout.

    The rank that ``hosts_store`` (rank 0 of a launch without torchrun's agent store) leaves only
    once every rank has read the verdicts, which it serves."""
    verdicts = dist.PrefixStore(f"megatron_lite/before_joining/{attempt_key()}", store)
    verdicts.set(f"rank/{rank}", "" if error is None else describe(error))
    verdicts.wait([f"rank/{r}" for r in range(world_size)])
    reports = [(r, verdicts.get(f"rank/{r}").decode()) for r in range(world_size)]
    failed = [(r, msg) for r, msg in reports if msg]
    if not failed:
        return
    verdicts.set(f"read/{rank}", "")
    if hosts_store:
        with contextlib.suppress(RuntimeError):  # a rank that died meanwhile: its verdict was read
            verdicts.wait([f"read/{r}" for r in range(world_size)])
    raise _verdict(failed, "failed before joining the process group") from error


@contextlib.contextmanager
def fail_fast_setup(what: str = "setup", group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Run the ``with`` block on every rank, then make all ranks fail together if any rank's block
    raised (see the module docstring). ``what`` names the stage in the error message."""
    error = None
    try:
        yield
    except Exception as e:  # a KeyboardInterrupt or SystemExit is not a setup error: let it go
        error = e
        if not isinstance(e, UserError) and dist.is_initialized():
            log.exception("rank %d failed during %s", dist.get_rank(), what)
    agree_on_failure(error, what, group)


def agree_on_config(sections: dict[str, dict]) -> None:
    """Refuse, on every rank at once, a launch whose ranks resolved different configs (``to_dict()``;
    another file or override on one machine): each would run its own schedule until a collective
    met a mismatch, and gloo aborts the process there while NCCL hangs. One all-gather of a hash,
    and a second of the configs only when they differ, to name the keys."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    text = json.dumps(sections, sort_keys=True, default=str)
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, hashlib.sha256(text.encode()).hexdigest())
    if len(set(digests)) == 1:
        return
    configs: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(configs, json.loads(text))
    rank = next(r for r, d in enumerate(digests) if d != digests[0])
    flat = [
        {f"{sec}.{key}": v for sec, keys in c.items() for key, v in keys.items()} for c in (configs[0], configs[rank])
    ]
    keys = sorted(k for k in flat[0].keys() | flat[1].keys() if flat[0].get(k) != flat[1].get(k))
    differ = ", ".join(f"{k}={flat[0].get(k)} on rank 0 but {flat[1].get(k)} on rank {rank}" for k in keys[:5])
    more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
    fix = "give every rank the same config file and overrides"
    raise on_every_rank(UserError(f"the ranks resolved different configs: {differ}{more}; {fix}"))
