"""Preemption: a signal asks for a checkpoint at the next step boundary and a clean exit.

Clusters warn a job before killing it: Kubernetes and most schedulers send SIGTERM, SLURM sends
the signal chosen with ``sbatch --signal=USR1@120`` to the job's tasks (with ``B:`` only to the
batch shell, which must then pass it on). The handler only sets a flag, since a checkpoint needs collectives that
cannot run inside a signal handler. Each step the trainer combines the flags of all ranks with one
all-reduce (:func:`any_rank`, a few bytes): a signal that reached only some ranks still stops every
rank at the same step, which saves a checkpoint and exits 0, so the job can be requeued and
resume with ``checkpoint.resume=auto``.

:class:`PreemptionHandler` is installed for the training loop only. During setup there is nothing
to save: :class:`SetupSignals` (from joining the process group until the loop) ends the run instead,
with one log line and exit status 128 + the signal's number. Joining the process group itself keeps
the default actions: a Python handler would run only after the blocking rendezvous returned.

:class:`SkippedSteps`: divergence, a gradient norm that stays non-finite, stops the run with one error.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from megatron_lite.errors import SetupInterrupted, UserError
from megatron_lite.launcher.failure_watch import failure_being_handled

log = logging.getLogger(__name__)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SETUP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
MAX_SKIPS_IN_A_ROW = 10


class PreemptionHandler:
    """Sets :attr:`requested` on SIGTERM or SIGUSR1 while installed (a context manager).

    Signal handlers can only be installed from the main thread; elsewhere (a trainer driven from
    a worker thread) nothing is installed and :attr:`requested` stays False.

    ``ignore_after_request``: for a launched rank, whose signals can come late. :meth:`uninstall`
    leaves SIGUSR1 ignored, and SIGTERM too once a signal came, instead of putting back the old
    handlers (whose default action ends the process). Launchers deliver one preemption twice (SLURM
    signals every process of the step, and torchrun passes the signal it got on to the ranks), so a
    second copy can arrive after the rank saved and left the loop; and ``sbatch --signal=USR1@120``
    fires on its own schedule, maybe while a rank that finished training closes its trackers or
    process groups. Either killed a rank whose work was saved, and torchrun or srun reported it
    failed. A SIGTERM that is the first signal still ends the process: it is also how a rank is
    told its launcher died (``launcher/orphan.py``). A rank that stops for a peer's signal (the
    trainer calls :meth:`peer_requested`) counts as signalled: its own copy may come only after it
    saved, when srun delivers to the ranks one by one.
    """

    def __init__(
        self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS, ignore_after_request: bool = False
    ) -> None:
        self.signals = signals
        self.ignore_after_request = ignore_after_request
        self.requested = False
        self.stopping = False  # this rank or a peer was signalled: every rank stops at this step
        self._previous: dict[signal.Signals, object] = {}

    def peer_requested(self) -> None:
        """Another rank got a preemption signal and this one stops with it (:func:`any_rank`)."""
        self.stopping = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Promise no save that may not come: a rank stopping for a failure (a peer gone, the launcher
        tearing the job down) never finishes its step; a healthy one saves unless its step fails."""
        self.requested = True
        name = signal.Signals(signum).name
        if failure_being_handled():
            log.warning("received %s while the run stops for a failure: exiting without a checkpoint", name)
            return
        log.warning("received %s: stopping at the end of this step with a checkpoint (if the step can finish)", name)

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before (see ``ignore_after_request``)."""
        for sig, previous in self._previous.items():
            late = self.ignore_after_request and (self.requested or self.stopping or sig == signal.SIGUSR1)
            signal.signal(sig, signal.SIG_IGN if late else previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


class SetupSignals:
    """Ends the run when SIGTERM, SIGINT or SIGUSR1 arrives during setup (a context manager around it):
    the handler logs ``received SIGTERM during setup (before the first step); no checkpoint saved;
    exiting`` and raises :class:`~megatron_lite.errors.SetupInterrupted`, which the CLI turns into exit
    status 128 + the signal's number. Without it SIGTERM and SIGUSR1 would end the rank silently (their
    default action), the other ranks waiting for it in their next collective.

    Raising unwinds the setup as any error does: a corpus being built removes its temporary
    directory, a checkpoint being restored was only read, and a trainer's ``FailureWatch`` posts the
    signal as this rank's failure, so the other ranks stop at once with its message. The handler
    runs when the main thread next runs Python: one waiting in a collective for a slower peer leaves
    when that collective returns. Later copies of a signal (SLURM signals every process of a step
    and torchrun passes its own copy on), and a signal while a failure is on its way out, are
    ignored: the rank is already leaving. Installed from the main thread only, as
    :class:`PreemptionHandler`.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SETUP_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        error = SetupInterrupted(signum)
        self.received = error.signal
        if failure_being_handled():  # let the failure on its way out finish telling the other ranks
            log.warning("received %s while the run stops for a failure: exiting", error.signal.name)
            return
        log.warning("%s; exiting", error)
        raise error

    def __enter__(self) -> SetupSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over every rank of the world (one all-reduce of ``len(flags)`` bytes).

    The trainer calls it once a step, after the step's metrics and evaluation: a preemption signal
    that reaches any rank before that call on step ``t`` stops every rank after step ``t`` (with a
    checkpoint of it); one that comes later, after step ``t + 1``. Its read is the step's second
    (the engine's read of grad norm and loss is the first), and it stays separate: no reduction of
    the engine spans the world (the loss is reduced over pp and dp, the grad norm over tp and pp, and
    over dp only with the distributed optimizer), so the flags would have to be threaded through both,
    into ``global_grad_norm``'s sums of squares and the loss's dp mean, giving the engine and the
    parallel layers a trainer's state (signals, async saves) to carry, to save one reduction of a few
    bytes; and they would be read before the optimizer step, so a signal during it, the metrics or an
    evaluation would wait a step longer."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor(flags, dtype=torch.uint8, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


class DivergenceError(UserError):
    """Training diverged (:class:`SkippedSteps`): raised on every rank at the same point of the same
    step, after all of that step's collectives, so the ranks can still act together on it, and no
    rank is reported as the one that failed (``raised_on_every_rank``)."""

    raised_on_every_rank = True


class SkippedSteps:
    """Says why an optimizer step was skipped (its gradient norm was not finite) and stops a run that
    diverged. With an fp16 loss scaler a skip is routine while the scale backs off (logged at INFO);
    it is hopeless once the loss itself is not finite or the scale is at its floor. Without a
    scaler (fp32, bf16) every skip is hopeless and a warning. ``limit`` hopeless skips in a row stop
    the run with :class:`DivergenceError` (a ``UserError``): the weights no longer change, so going on
    would only burn the budget (skipped steps do not touch them). Every rank reads the same
    all-reduced norm and loss, so every rank stops at the same step."""

    def __init__(self, scaler: Any, active: bool, limit: int = MAX_SKIPS_IN_A_ROW) -> None:
        self.scaler, self.active, self.limit = scaler, active, limit
        self.in_a_row, self.since = 0, 0

    def update(self, step: int, out: dict) -> None:
        """``out``: the engine's step result (``loss``, ``grad_norm``, ``skipped``) of step ``step``."""
        if not out["skipped"]:
            self.in_a_row = 0
            return
        s = self.scaler
        hopeless = s is None or not math.isfinite(out["loss"]) or s.scale <= s.min_scale
        if self.active:
            log.log(
                logging.WARNING if hopeless else logging.INFO,
                "step %d: the gradient norm is %s (loss %s): the optimizer step was skipped%s",
                step,
                out["grad_norm"],
                out["loss"],
                f" (fp16 loss scale now {s.scale:g})" if s is not None else "",
            )
        if not hopeless:
            return
        self.in_a_row += 1
        self.since = step if self.in_a_row == 1 else self.since
        if self.in_a_row >= self.limit:
            raise DivergenceError(
                f"training diverged: {self.in_a_row} steps in a row were skipped, their gradient norm not finite "
                f"(steps {self.since}-{step}, loss {out['loss']}); resume from an earlier checkpoint (those of steps "
                f"before {self.since} are kept) with a lower optim.lr or a longer optim.warmup"
            )

    def state_dict(self) -> dict[str, int]:
        """The streak of hopeless skips this step ends in (``in_a_row`` 0: none), for the checkpoint a
        preemption or ``train.exit_after`` saves inside one: its relaunch counts on from there."""
        return {"in_a_row": self.in_a_row, "since": self.since}

    def load_state_dict(self, state: dict[str, int] | None) -> None:
        """A checkpoint's streak (:meth:`state_dict`); None (saved before streaks were recorded): none."""
        self.in_a_row, self.since = (state["in_a_row"], state["since"]) if state else (0, 0)

    def hold_save(self, step: int) -> bool:
        """Whether the periodic checkpoint of ``step`` is held back: it falls in a streak of hopeless
        skips. Its weights are those the streak started from, the ones that no longer train, and
        saving it would rotate out (``checkpoint.keep``) the checkpoints from before the divergence,
        the ones to resume from. Saves go on once a step succeeds; a preemption or the run's end still
        saves. The same verdict on every rank (the skips are)."""
        if self.in_a_row and self.active:
            log.warning(
                "step %d: checkpoint not saved: the last %d steps were skipped (gradient norm not finite); "
                "the checkpoints from before step %d are kept",
                step,
                self.in_a_row,
                self.since,
            )
        return self.in_a_row > 0
