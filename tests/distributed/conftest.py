"""Session-wide gloo worlds of 2 and 4 ranks, shared by every distributed test (start-up is the
expensive part: 5-13 s a world on 2 cores)."""

from __future__ import annotations

import os
import sys

import pytest

# The spawned ranks import this folder's modules by name (harness, the test modules).
sys.path.insert(0, os.path.dirname(__file__))

from harness import World  # noqa: E402


def _world(n: int):
    world = World(n)
    world.start()
    yield world
    world.close()


@pytest.fixture(scope="session")
def world2():
    yield from _world(2)


@pytest.fixture(scope="session")
def world4():
    yield from _world(4)
