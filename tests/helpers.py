"""Helpers shared by test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m liverus.cli ARGS`` and capture its output."""
    return subprocess.run([sys.executable, "-m", "liverus.cli", *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, *extra: str, env: dict | None = None, stderr=subprocess.STDOUT):
    """``liverus serve`` on a free loopback port; returns ``(process, url)`` once ``/api/health`` answers.

    Raises:
        RuntimeError: with the server's output if it does not come up within two minutes.
    """
    import os
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "liverus.cli", "serve", "--model", str(model), "--port", str(port), *extra],
        stdout=subprocess.PIPE if stderr == subprocess.STDOUT else subprocess.DEVNULL,
        stderr=stderr,
        text=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    out = proc.stdout or proc.stderr
    raise RuntimeError("server did not start: " + (out.read() if out else ""))
