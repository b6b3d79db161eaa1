"""Test-suite root: test modules in every folder import this folder's helpers (``ports``) by name.

The pytest process trains, evaluates and converts its tiny models with one intra-op thread, as the
spawned ranks of ``tests/distributed`` do: the suite shares a 2-core machine with its own spawned ranks
and subprocesses (and whatever else runs there), and an op split over two threads waits for the
descheduled one at every op. Measured with two busy processes beside it: a 100-step run of the e2e
tiny model took 11-55 s with two threads, 0.75-4.5 s with one (0.6-0.7 s either way on an idle
machine). Processes the tests launch keep torch's default, as a user's would.
"""

import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
