"""tools/bench/step_throughput.py feeds its baselines as the trainer feeds itself: every step takes the
loader's next batch and copies it to the device (a batch reused on the device would time training
without the data handling that ``Trainer.train_step`` pays)."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench" / "step_throughput.py"


def load_script():
    spec = importlib.util.spec_from_file_location("step_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Loader:
    """The part of ``PretrainingLoader`` a step uses: ``next_step()``, one microbatch a call."""

    def __init__(self) -> None:
        self.batches = [torch.full((2, 5), i) for i in range(3)]
        self.handed = 0

    def next_step(self) -> list[torch.Tensor]:
        self.handed += 1
        return [self.batches[self.handed - 1]]


def test_each_baseline_step_trains_on_the_loaders_next_batch():
    model, loader, seen = nn.Linear(5, 1), Loader(), []

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch)
        return model(batch.float()).mean()

    step = load_script().make_step(model, loss_of, loader, torch.device("cpu"), autocast=False)
    for _ in range(3):
        step()
    assert loader.handed == 3
    assert [int(b[0, 0]) for b in seen] == [0, 1, 2]
    assert all(b.device == torch.device("cpu") for b in seen)
