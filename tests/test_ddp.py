"""MoFO under 2-process DDP on CPU: all-reduced gradients give every rank the same selection and the same step.

The training runs in ``tests/scripts/ddp_mofo.py`` as a separate process: Lightning's ``ddp`` strategy re-launches
the current command for rank 1, which must not be pytest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from process_launch import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_mofo.py"
STEPS = 10
FRACTION = 0.15


def run_ddp_script(out_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_script(SCRIPT, str(out_dir), "--steps", str(STEPS), timeout=timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    result = run_ddp_script(out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.slow
def test_ddp_ranks_train_on_different_batches(ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == STEPS
    for step, (batch0, batch1) in enumerate(zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)):
        assert not torch.equal(batch0, batch1), f"step {step}: both ranks trained on the same batch"


@pytest.mark.slow
def test_ddp_ranks_end_with_identical_weights_that_moved(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = ranks
    assert rank0["final"].keys() == rank1["final"].keys() == rank0["initial"].keys()
    for name in rank0["final"]:
        assert torch.equal(rank0["initial"][name], rank1["initial"][name]), name
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
    moved = [name for name in rank0["final"] if not torch.equal(rank0["final"][name], rank0["initial"][name])]
    assert moved == list(rank0["final"]), "every parameter should have moved in 10 steps"


@pytest.mark.slow
def test_ddp_ranks_move_the_same_entries_of_each_weight_matrix_every_step(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = ranks
    assert len(rank0["moved"]) == len(rank1["moved"]) == STEPS
    for step, (moved0, moved1) in enumerate(zip(rank0["moved"], rank1["moved"], strict=True)):
        assert moved0.keys() == moved1.keys() and len(moved0) > 0
        for name, mask in moved0.items():
            assert torch.equal(mask, moved1[name]), f"step {step}, {name}: the ranks selected different entries"
            assert mask.float().mean().item() == pytest.approx(FRACTION, abs=2e-3), f"step {step}, {name}"


@pytest.mark.slow
def test_ddp_ranks_realise_the_same_update_fraction_every_step(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = ranks
    assert len(rank0["update_fractions"]) == STEPS
    assert rank0["update_fractions"] == rank1["update_fractions"]
    assert rank0["step_stats"] == rank1["step_stats"]
    for step, groups in enumerate(rank0["step_stats"]):
        filtered_updated = sum(g["filtered_updated"] for g in groups)
        filtered_numel = sum(g["filtered_numel"] for g in groups)
        assert filtered_numel > 0
        assert filtered_updated / filtered_numel == pytest.approx(FRACTION, abs=2e-3), f"step {step}"
