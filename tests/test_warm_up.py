"""`python -m agent warm-up`: a server start up to ready, then exit (the real CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, timeout

pytestmark = pytest.mark.unit


def warm_up(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "agent", "warm-up", "--log-format", "console", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout(120),
    )


def test_warm_up_builds_the_caches_serve_uses_then_exits(tmp_path: Path) -> None:
    avatars = tmp_path / "avatars"
    result = warm_up(tmp_path, "--renderer", "cpu", "--avatar-dir", str(avatars))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warmed up in" in result.stdout and "(renderer cpu)" in result.stdout
    assert " ready " in result.stderr  # the server's own readiness log line
    # The default avatar was made and prepared where serve will look for it.
    made = sorted(p.name for p in (avatars / "default").iterdir())
    assert made, "no prepared avatar"
    again = warm_up(tmp_path, "--renderer", "cpu", "--avatar-dir", str(avatars))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (avatars / "default").iterdir()) == made


def test_warm_up_that_fails_says_why_and_exits_1(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = warm_up(tmp_path, "--renderer", "cpu", "--avatar-dir", str(blocker / "avatars"))
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("avatar agent: warm-up failed:") and "Not a directory" in last


def test_warm_up_with_missing_checkpoints_is_a_config_error(tmp_path: Path) -> None:
    result = warm_up(tmp_path, "--renderer", "latentsync", "--avatar-dir",
                     str(tmp_path / "avatars"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "warm-up: config: LatentSync checkpoints missing" in result.stderr
    assert "Traceback" not in result.stderr
