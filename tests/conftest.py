"""Test-suite root: test modules in every folder import this folder's helpers (``ports``) by name."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
