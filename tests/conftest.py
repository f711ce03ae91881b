"""Shared test fixtures.

Timeouts scale from one unit (TIMEOUT_UNIT_S, env AVATAR_TEST_TIMEOUT_UNIT).

Hypothesis: with CI set (as `.ci/run` is run) its examples are derandomized, so a
CI verdict depends on the code alone; everywhere else each run draws new examples
and keeps failures in `.hypothesis/`. Run the suite locally to explore.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TIMEOUT_UNIT_S = float(os.environ.get("AVATAR_TEST_TIMEOUT_UNIT", "1.0"))
REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


def timeout(units: float) -> float:
    """A timeout of `units` test time units (raise the unit on slow machines)."""
    return units * TIMEOUT_UNIT_S


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for a module (use with `pytest.mark.usefixtures`).

    Tiny models gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP threads spin against other processes: one tiny UNet forward took 4 s with
    2 threads and 0.3 s with 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
