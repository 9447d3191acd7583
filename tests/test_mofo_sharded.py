"""MoFO on sharded parameters: a global threshold, so 2 ranks holding slices step exactly like 1 process.

The sharded runs happen in ``tests/scripts/sharded_mofo.py`` (2 processes, gloo on CPU); the single-process
references are computed here with the same functions on whole tensors.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from process_launch import run_ranks, run_script
from torch import nn

from lit_mofo.optim import _cpu
from lit_mofo.optim.mofo import MoFO

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "sharded_mofo.py"
sys.path.insert(0, str(SCRIPT.parent))

import sharded_mofo  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, *extra: str) -> list[dict[str, Any]]:
    return run_ranks(SCRIPT, out_dir, "--port", str(free_port()), *extra)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(tmp_path_factory.mktemp("sharded"))


@pytest.fixture(scope="module")
def triton_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(tmp_path_factory.mktemp("sharded_triton"), "--triton")


def assert_identical(sharded: dict[str, Any], reference: dict[str, Any], label: str) -> None:
    assert sharded["stats"] == reference["stats"], f"{label}: per-step update counts differ"
    for i, (p, q) in enumerate(zip(sharded["params"], reference["params"], strict=True)):
        assert torch.equal(p, q), f"{label}: parameter {i} differs from the single-process run"
    for i, (p, q) in enumerate(zip(sharded.get("masters", []), reference.get("masters", []), strict=True)):
        assert (p is None) == (q is None) and (p is None or torch.equal(p, q)), f"{label}: master weight {i} differs"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(sharded_mofo.dtensor_scenarios()))
def test_sharded_dtensor_parameters_step_bit_identically_to_whole_tensors(ranks, scenario):
    config = sharded_mofo.dtensor_scenarios()[scenario]
    reference = sharded_mofo.run_dtensor_scenario(config, mesh=None)
    for rank in ranks:
        assert_identical(rank["results"][scenario], reference, f"{scenario}, rank {rank['rank']}")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (the dev extra)")
@pytest.mark.skipif(_cpu.load() is None, reason="the reference is the C kernels")
def test_sharded_dtensors_through_the_triton_kernels_give_the_single_process_c_kernels_bits(triton_ranks):
    # Run on CPU shards under Triton's interpreter; the kernels compute exactly what the C kernels compute.
    scenarios = sharded_mofo.triton_scenarios()
    for name, config in scenarios.items():
        reference = sharded_mofo.run_dtensor_scenario(sharded_mofo.dtensor_scenarios()[config["reference"]], mesh=None)
        for rank in triton_ranks:
            assert_identical(rank["results"][name], reference, f"{name}, rank {rank['rank']}")
    for rank in triton_ranks:
        assert rank["results"]["launches"].get("moments_bracket", 0) > 0, "the Triton kernels did not run"


@pytest.mark.slow
def test_fsdp2_fully_shard_training_matches_single_process_training_bit_for_bit(ranks):
    reference = sharded_mofo.run_fsdp2(mesh=None)
    for rank in ranks:
        result = rank["results"]["fsdp2"]
        assert all("Shard(dim=0)" in placement for placement in result["placements"]), result["placements"]
        assert_identical(result, reference, f"fsdp2, rank {rank['rank']}")
    filtered = [sum(g["filtered_updated"] for g in step) / sum(g["filtered_numel"] for g in step) for step in
                reference["stats"]]  # fmt: skip
    assert all(abs(f - sharded_mofo.FRACTION) < 0.01 for f in filtered)


@pytest.mark.slow
def test_bf16_master_weights_are_dtensors_sharded_like_their_parameters(ranks):
    for rank in ranks:
        for label in ("fused", "eager"):
            result = rank["results"][f"dtensor-bf16-master-{label}"]
            assert result["master_types"] == ["DTensor"] * len(sharded_mofo.PARAMS), result["master_types"]
            assert all(m.dtype == torch.float32 for m in result["masters"])


@pytest.mark.slow
def test_nonfinite_raise_stops_every_rank_when_one_shard_holds_the_nan(ranks):
    for rank in ranks:
        result = rank["results"]["raise"]
        assert "has 1 non-finite entries" in result["error"], (rank["rank"], result)
        assert result["unchanged"] and result["state"] == 0


def run_ok(script: Path, out_dir: Path, *extra: str) -> None:
    result = run_script(script, str(out_dir), *extra)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_lightning_model_parallel_strategy_gets_the_global_threshold_and_resumes_its_options(tmp_path):
    run_ok(SCRIPT.parent / "model_parallel_mofo.py", tmp_path, "--steps", "3")
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert all(t == "DTensor(Shard(dim=0),)" for t in rank0["types"].values()), rank0["types"]
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    # Each filtered tensor moves floor(0.15 * numel) entries of the *whole* tensor (random data: no ties),
    # not of each rank's slice; the ranks report the same global counts.
    expected = sum(int(0.15 * n) for n in (16 * 96, 96 * 40, 40 * 4))
    assert rank0["stats"] == rank1["stats"] and len(rank0["stats"]) == 3
    assert all(step[0]["filtered_updated"] == expected for step in rank0["stats"])
    assert rank0["resumed_options"] == {"lr": 1e-2, "selection": "exact", "seed": 7, "sample_size": 4096}
    assert len(rank0["resumed_stats"]) == 2 and rank0["resumed_stats"] == rank1["resumed_stats"]


@pytest.fixture
def single_process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dtensor_layouts_without_a_global_threshold_are_rejected(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, 1))
    param = nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh, [Shard(0), Shard(1)]))
    with pytest.raises(ValueError, match=r"2-D device mesh is not supported.*1-D mesh.*fully_shard"):
        MoFO([param])


def test_one_rank_dtensor_steps_like_a_plain_tensor(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    full = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    plain = nn.Parameter(full.clone())
    plain.grad = grad.clone()
    MoFO([plain], lr=0.1).step()
    for placement in (Shard(0), Replicate()):
        param = nn.Parameter(distribute_tensor(full.clone(), mesh, [placement]))
        optimizer = MoFO([param], lr=0.1)
        param.grad = distribute_tensor(grad.clone(), mesh, [placement])
        optimizer.step()
        assert torch.equal(param.full_tensor(), plain.detach())
        assert optimizer.last_step_stats[0].updated == 180
        assert type(optimizer.state[param]["exp_avg"]).__name__ == "DTensor"


def test_fsdp1_flattened_parameters_are_rejected_with_the_fsdp2_and_ddp_fixes():
    param = nn.Parameter(torch.zeros(12))
    param._fsdp_flattened = True  # how FSDP1 marks the views it hands the optimizer
    with pytest.raises(ValueError, match=r"FSDP1's flattened parameters.*per slice.*fully_shard.*strategy=\"ddp\""):
        MoFO([param])
