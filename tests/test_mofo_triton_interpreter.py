"""The Triton kernels' tests on CPU, through Triton's interpreter, in a process of their own.

Triton decides between compiled and interpreted kernels when it is first imported, and ``import lightning`` (so
any lit_mofo test module) imports it; ``TRITON_INTERPRET=1`` must therefore be set before the process starts. This
test runs ``tests/test_mofo_triton.py`` in such a process (its ``cuda`` variants skip there, its ``interpreter``
variants run) and fails if any of them fails, errors or is skipped, so the main test process stays untouched.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "test_mofo_triton.py"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (the dev extra)")
def test_the_triton_kernels_pass_their_tests_under_the_interpreter_on_cpu(tmp_path: Path) -> None:
    report = tmp_path / "interpreter.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS), f"--junitxml={report}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert report.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    cases = ET.parse(report).getroot().iter("testcase")
    interpreted = [case for case in cases if "[interpreter" in case.get("name", "")]
    failed = [
        f"{case.get('name')}: {(child.get('message') or '')[:500]}"
        for case in interpreted
        for child in case
        if child.tag in ("failure", "error", "skipped")
    ]
    assert not failed, "\n".join(failed) + "\n" + result.stdout[-3000:]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len(interpreted) >= 60, f"only {len(interpreted)} interpreter tests ran"
