"""Where metrics go: ``<log.dir>/metrics.jsonl`` always; TensorBoard and W&B when enabled.

A tracker asked for whose package is not installed is a setup error (:func:`check_packages`, before
the data is built or a step taken). One that cannot start for another reason (no network, bad key)
is logged as a warning and dropped: it never crashes a run. Nor does a tracker whose write fails (a
full disk under ``log.dir``): one warning names it and the step, and the log's step lines go on. W&B
runs offline unless an API key is configured, and only the resolved config (which holds no secrets)
and scalar metrics are ever sent.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from megatron_lite import jsontext
from megatron_lite.config import Config
from megatron_lite.errors import UserError

log = logging.getLogger(__name__)
METRICS_FILE, DROPPED_FILE = "metrics.jsonl", "metrics.dropped.jsonl"  # in log.dir (JsonlTracker)
WANDB_ID_FILE = "wandb/run_id"  # in log.dir: the W&B run every launch of this run logs to (WandbTracker)
# log.<key> -> (the package to install, the module its tracker imports)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb", "wandb")}


def check_packages(tensorboard: bool, wandb: bool) -> None:
    """One :class:`UserError` naming the key and the fix where a tracker asked for cannot be imported."""
    for key, wanted in (("tensorboard", tensorboard), ("wandb", wandb)):
        package, module = TRACKER_PACKAGES[key]
        if not wanted:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(
                f"log.{key}=true but {module} cannot be imported ({e}): install it (pip install {package}) "
                f"or set log.{key}=false"
            ) from None


def _clean(v: Any) -> Any:
    """JSON-safe value: non-finite floats become null (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class JsonlTracker:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    A run that starts at ``step`` (resumed from that checkpoint, or 0) first drops the rows of
    later steps an earlier attempt logged past its last usable checkpoint: the steps are run again,
    and the file keeps one row per step. The dropped rows are not lost: they are appended to
    ``metrics.dropped.jsonl`` beside it (a fresh run in an old run's ``log.dir``, e.g. with another
    ``checkpoint.dir``, would otherwise erase that run's whole history).
    """

    def __init__(self, run_dir: Path, step: int = 0) -> None:
        self.path = run_dir / METRICS_FILE
        if self.path.exists():
            self._drop_rows_after(step)
        self._f = self.path.open("a", buffering=1)

    def _drop_rows_after(self, step: int) -> None:
        """Move the rows past ``step`` aside, and end the last row kept with its line break (a crash can
        cut a row's write just before it), so the rows this run appends start lines of their own."""
        lines = self.path.read_text().splitlines(keepends=True)
        keep = [_whole(line) for line in lines if _row_step(line) <= step]
        dropped = [_whole(line) for line in lines if _row_step(line) > step]
        if keep == lines:
            return
        kept_aside = self.path.with_name(DROPPED_FILE)
        if dropped:
            with kept_aside.open("a") as f:  # first, so a crash below loses no row
                f.writelines(dropped)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)  # atomic: a crash here leaves the old file or the new one
        if not dropped:
            return
        log.warning(
            "metrics.jsonl: moved %d rows past step %d, which this run logs again, to %s",
            len(dropped),
            step,
            kept_aside,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in metrics.items()}) + "\n")

    def close(self, failed: bool = False) -> None:
        self._f.close()


def _whole(line: str) -> str:
    return line if line.endswith("\n") else line + "\n"


def _row_step(line: str) -> float:
    """The step of one metrics.jsonl line; a torn last line (a crash mid-write) counts as past any step."""
    try:
        return jsontext.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class TensorBoardTracker:
    """Event files under ``<run_dir>/tensorboard``. A run that starts at ``step`` marks the events of
    later steps an earlier attempt wrote as purged (TensorBoard's ``purge_step``), as
    :class:`JsonlTracker` does with its rows: the curves then show each step once. The old event
    files stay on disk."""

    def __init__(self, run_dir: Path, step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step + 1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k != "step" and v is not None:
                self._w.add_scalar(k, v, step)

    def close(self, failed: bool = False) -> None:
        self._w.close()


INIT_TIMEOUT_S = 30.0


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_run_id(run_dir: Path, step: int, new_id: str) -> str:
    """The W&B run id of a run that starts at ``step``: the one its earlier launches logged to
    (``<log.dir>/wandb/run_id``) when it resumes (``step`` > 0), else ``new_id``, recorded there."""
    path = run_dir / WANDB_ID_FILE
    if step > 0:
        try:
            if saved := path.read_text().strip():
                return saved
        except OSError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new_id + "\n")
    return new_id


class WandbTracker:
    """One W&B run per training run: every launch of it (a resume, a requeue) logs to the same run
    id (:func:`wandb_run_id`, W&B's ``resume="allow"``), a fresh start (step 0) to a new one. W&B's
    steps only increase: steps a rerun from an earlier checkpoint logs again keep their first values
    there (``metrics.jsonl`` and TensorBoard hold the rerun's)."""

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any], step: int = 0) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key_configured() else "offline")
        # wandb waits 90 s for an unreachable server by default; WANDB_INIT_TIMEOUT still overrides
        settings = wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", INIT_TIMEOUT_S)))
        run = {"project": project, "dir": str(run_dir), "config": config, "resume": "allow"}
        run["id"] = wandb_run_id(run_dir, step, uuid.uuid4().hex[:12])  # W&B ids: [a-z0-9]
        try:
            self._run = wandb.init(**run, mode=mode, settings=settings)
        except Exception as e:  # no network: keep the metrics locally (`wandb sync` uploads them later)
            if mode != "online":
                raise
            # The cause may be the network or the login (WANDB_MODE=online without an API key): name it.
            log.warning("W&B could not start online (%s: %s); logging offline instead", type(e).__name__, str(e)[:200])
            mode = "offline"
            wandb.teardown()  # the failed start still holds the run id: "run ID ... is in use"
            self._run = wandb.init(**run, mode=mode)
        log.info("W&B tracker started (%s mode, run id %s)", mode, run["id"])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._run.log({k: v for k, v in metrics.items() if v is not None and k != "step"}, step=step)

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)  # a failed run shows as failed in W&B


class Trackers:
    """Fan-out to every enabled tracker; on ranks other than the logging rank, does nothing.
    ``step``: the step the run starts from (see :class:`JsonlTracker`)."""

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        *,
        active: bool,
        tensorboard: bool,
        wandb: bool,
        wandb_project: str,
        step: int = 0,
    ) -> None:
        self._all: list[Any] = []
        if not active:
            return
        self._all.append(JsonlTracker(run_dir, step))
        optional = [
            ("tensorboard", tensorboard, lambda: TensorBoardTracker(run_dir, step)),
            ("wandb", wandb, lambda: WandbTracker(run_dir, wandb_project, config, step)),
        ]
        for name, enabled, make in optional:
            if not enabled:
                continue
            try:
                self._all.append(make())
            except Exception as e:  # an optional tracker must never stop training
                log.warning(
                    "log.%s=true but the tracker could not start (%s: %s); continuing without it",
                    name,
                    type(e).__name__,
                    e,
                )

    @classmethod
    def from_config(cls, run_dir: Path, cfg: Config, *, active: bool, step: int = 0) -> Trackers:
        """The trackers ``cfg.log`` enables (``log.tensorboard``, ``log.wandb``); W&B records ``cfg``."""
        return cls(
            run_dir,
            cfg.to_dict(),
            active=active,
            tensorboard=cfg.log.tensorboard,
            wandb=cfg.log.wandb,
            wandb_project=cfg.log.wandb_project,
            step=step,
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for t in list(self._all):
            try:
                t.log(metrics, step)
            except Exception as e:  # a full disk under log.dir: the run and its checkpoints go on
                path = getattr(t, "path", None)
                log.warning(
                    "tracker %s failed at step %d%s (%s: %s); disabling it: later steps' metrics are in this "
                    "log's step lines only",
                    type(t).__name__,
                    step,
                    f" writing {path}" if path else "",
                    type(e).__name__,
                    e,
                )
                self._all.remove(t)

    def close(self, failed: bool = False) -> None:
        """Flush and close every tracker; ``failed``: the run ends with an error."""
        for t in self._all:
            try:
                t.close(failed)
            except Exception as e:
                log.warning("tracker %s failed to close: %s", type(t).__name__, e)
