"""The one exception type for mistakes a user can fix (bad config, missing data, bad path).

The CLI prints a ``UserError`` as one line, ``error: <message>`` (with several ranks after the log
lines' date and rank prefix, once per launch: ``cli._report``), and exits 2 without a traceback;
every other exception is a bug and keeps its traceback, except :class:`SetupInterrupted` (a signal
that ends a run before its first step), which exits 128 + the signal's number, and a collective that
failed because a peer process is gone, which the failure watch has already explained (:func:`explained`).
"""

import signal


class UserError(Exception):
    """A problem in the user's input, with a message that names it and the fix.

    ``told_every_rank``: every rank of the launch has already logged it (a training loop's failure,
    ``launcher/failure_watch.py``), so this rank prints it at once instead of leaving it to rank 0.
    ``raised_on_every_rank``: every rank raised the same verdict together, which rank 0 prints, and
    the first rank of each other machine after a wait, for that machine's log."""

    told_every_rank = False
    raised_on_every_rank = False  # a verdict every rank reached together (``fail_fast.py``)


def on_every_rank(error: UserError) -> UserError:
    """``error`` marked as a verdict every rank reached together (``UserError.raised_on_every_rank``):
    a failure watch reports no rank as the one that failed, and the CLI says it once."""
    error.raised_on_every_rank = True
    return error


def refuse_blank(flag: str, value: object, to: str = "write to") -> None:
    """A path option given as ``""`` or spaces (an unset shell variable: ``--out "$OUT"``) would mean
    the current directory or a directory named by spaces: one :class:`UserError` naming ``flag``
    and asking for the path to ``to`` (``write to``, ``read``)."""
    if not str(value).strip():
        what = "empty" if not str(value) else f"only spaces ({str(value)!r})"
        raise UserError(f"{flag} is {what}, which names no path (an unset shell variable?); give the path to {to}")


class SetupInterrupted(BaseException):
    """SIGTERM, SIGINT or SIGUSR1 arrived during a run's setup, before its first step
    (``training/fault.py: SetupSignals``). A ``BaseException``, as ``KeyboardInterrupt`` is, so that
    no ``except Exception`` of the setup code stops it on its way out. The handler has logged it;
    the process exits with :attr:`exit_status`, 128 + the signal's number (143 for SIGTERM), the
    status of a process that the signal ended."""

    def __init__(self, signum: int) -> None:
        self.signal = signal.Signals(signum)
        self.exit_status = 128 + int(signum)
        super().__init__(f"received {self.signal.name} during setup (before the first step); no checkpoint saved")


def mark_explained(error: BaseException) -> None:
    """``error`` is fully explained by lines already logged (a survivor's collective failing because
    a peer process is gone: ``launcher/failure_watch.py``): the CLI exits 1 without its traceback."""
    error.megatron_lite_explained = True


def explained(error: BaseException) -> bool:
    """Whether :func:`mark_explained` marked ``error``."""
    return getattr(error, "megatron_lite_explained", False)
