"""Shared test fixtures.

Timeouts scale from one unit (TIMEOUT_UNIT_S, env AVATAR_TEST_TIMEOUT_UNIT).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
