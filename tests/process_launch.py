"""Launching a test's multi-process script (or the console script) in a subprocess, one way for every test file.

The child runs in its own session, so that on a timeout the whole process group is killed: a rank that hangs in a
collective, and the ranks Lightning launched from rank 0, go with it instead of outliving the test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_command(
    command: Sequence[str], *, cwd: Path = ROOT, timeout: float = 600, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (gloo kept on the loopback interface: no network here) and return its result; fail the test
    with the end of its stderr if it does not finish in ``timeout`` seconds."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if sys.platform == "linux":
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with subprocess.Popen(
        list(command),
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(map(str, command))[:200]} did not finish in {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)


def run_script(
    script: Path, *arguments: str, timeout: float = 600, **options: object
) -> subprocess.CompletedProcess[str]:
    """:func:`run_command` of ``python script arguments...`` with this interpreter."""
    return run_command([sys.executable, str(script), *arguments], timeout=timeout, **options)  # type: ignore[arg-type]


def run_ranks(script: Path, out_dir: Path, *arguments: str, timeout: float = 600, **options: object) -> list[dict]:
    """Run ``python script out_dir arguments...``, require success, and load the ``rank{0,1}.pt`` it wrote."""
    import torch

    result = run_script(script, str(out_dir), *arguments, timeout=timeout, **options)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
