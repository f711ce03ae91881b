"""Running a Triton kernel in Triton's interpreter (CPU tensors, no GPU): in a fresh
process, since `TRITON_INTERPRET` is read when a kernel is defined."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_interpreted(script: str, timeout: float = 300) -> str:
    """Run `script` with TRITON_INTERPRET=1 from the repository root; its last stdout line."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]
