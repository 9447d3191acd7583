"""Fixtures for every test."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_pytest_arguments_in_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run LightningCLI with ``args=[...]``; with pytest's own arguments still in ``sys.argv`` it warns that
    both were given. The command line it would read is the program name alone."""
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
