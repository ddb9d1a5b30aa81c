"""Helpers shared by test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m liverus.cli ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "liverus.cli", *args], capture_output=True, text=True, timeout=timeout)
