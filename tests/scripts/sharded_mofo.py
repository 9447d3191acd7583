"""MoFO on sharded (DTensor / FSDP2) parameters in 2 CPU processes (gloo); run by ``tests/test_mofo_sharded.py``.

Usage::

    python tests/scripts/sharded_mofo.py OUT_DIR [--port 29533] [--triton]

Each rank writes ``OUT_DIR/rank{r}.pt`` with, per scenario, the full (gathered) parameters after the steps and
the optimizer's ``last_step_stats`` of every step. The test repeats each scenario in one process on whole tensors
and expects the very same numbers: MoFO agrees a global threshold, so sharding must not change a single bit.

Scenarios:

- ``dtensor-{exact,sampled}-{fused,eager}``: parameters distributed by hand over a 1-D mesh (``Shard(0)`` with
  uneven splits, ``Shard(1)``, a 1-D ``Shard(0)`` tensor that takes the dense step, ``Replicate()``), gradients
  drawn from a seeded generator on every rank and distributed alike;
- ``dtensor-overflow`` / ``dtensor-bracket-above`` / ``dtensor-bracket-below``: the exact selection's repair
  branches, forced on every rank, where candidates are gathered from all ranks;
- ``dtensor-nonfinite-{fused,eager}``: gradients with NaN and infinite entries (``nonfinite="skip"``): the same
  entries are left out on every rank and in the single process;
- ``dtensor-bf16-master-{fused,eager}``: bfloat16 parameters with MoFO's float32 master weights, which are
  DTensors sharded like the parameters;
- ``raise``: ``nonfinite="raise"`` with a NaN that only rank 0's shard holds: every rank raises (none enters the
  step's collectives alone) and nothing changes;
- with ``--triton``, only ``dtensor-*-triton``: the exact (with its repair branches), sampled and non-finite
  scenarios through the Triton kernels (``fused=True``), run on CPU shards under Triton's interpreter; the test
  compares them with the single-process C kernels, which compute the same bits;
- ``fsdp2``: a small MLP sharded with ``torch.distributed.fsdp.fully_shard``, trained on the same batch on both
  ranks (so that the averaged gradient is the single-process one).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

if __name__ == "__main__" and "--triton" in sys.argv:
    # Triton chooses interpreted kernels when it is first imported (torch.distributed's imports pull it in).
    os.environ["TRITON_INTERPRET"] = "1"
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lit_mofo.optim import _kernels, _selection
from lit_mofo.optim.mofo import MoFO

STEPS = 3
WORLD_SIZE = 2

# (shape, placement) per parameter; "S0"/"S1" shard dim 0/1, "R" replicates.
PARAMS: list[tuple[tuple[int, ...], str]] = [
    ((33, 10), "S0"),  # 17 + 16 rows
    ((7, 5, 3), "S0"),  # 4 + 3
    ((64, 130), "S1"),
    ((300, 200), "S0"),  # above the exact selection's small-tensor limit: sampled bracket
    ((9,), "S0"),  # dense step
    ((120, 150), "R"),
]
FRACTION = 0.15


def triton_scenarios() -> dict[str, dict[str, Any]]:
    """The Triton kernels' sharded scenarios; ``reference`` is the single-process run that gives the same bits."""
    scenarios: dict[str, dict[str, Any]] = {}
    for name, scenario in dtensor_scenarios().items():
        if scenario["fused"] is None:
            scenarios[f"{name.removesuffix('-fused')}-triton"] = {**scenario, "fused": True, "reference": name}
    return scenarios


def dtensor_scenarios() -> dict[str, dict[str, Any]]:
    scenarios: dict[str, dict[str, Any]] = {}
    for selection in ("exact", "sampled"):
        for fused, label in ((None, "fused"), (False, "eager")):
            scenarios[f"dtensor-{selection}-{label}"] = {"selection": selection, "fused": fused}
    scenarios["dtensor-overflow"] = {"selection": "exact", "fused": None, "patch": "overflow"}
    scenarios["dtensor-bracket-above"] = {"selection": "exact", "fused": None, "patch": "above"}
    scenarios["dtensor-bracket-below"] = {"selection": "exact", "fused": None, "patch": "below"}
    for fused, label in ((None, "fused"), (False, "eager")):
        scenarios[f"dtensor-nonfinite-{label}"] = {"selection": "exact", "fused": fused, "nonfinite": True}
    for fused, label in ((None, "fused"), (False, "eager")):
        scenarios[f"dtensor-bf16-master-{label}"] = {"selection": "exact", "fused": fused, "dtype": "bfloat16"}
    return scenarios


def patched(patch: str | None) -> dict[str, Any]:
    """Module attributes to replace for a scenario (applied identically in the single-process reference)."""
    if patch == "overflow":
        return {"candidate_capacity": lambda share, local: 17}
    if patch == "above":
        return {"bracket_ranks": lambda k, numel, size: (1, 2)}
    if patch == "below":
        return {"bracket_ranks": lambda k, numel, size: (size - 1, size)}
    return {}


def initial_params() -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen) for shape, _ in PARAMS]


def step_grads(step: int, nonfinite: bool = False) -> list[Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(shape, generator=gen) * (1 + step) for shape, _ in PARAMS]
    if nonfinite:
        for grad in grads:
            flat = grad.view(-1)
            index = torch.randperm(flat.numel(), generator=gen)[: max(3, flat.numel() // 40)]
            flat[index[0::3]] = math.nan
            flat[index[1::3]] = math.inf
            flat[index[2::3]] = -math.inf
    return grads


def optimizer_kwargs(scenario: dict[str, Any]) -> dict[str, Any]:
    return {
        "lr": 1e-2,
        "fraction": FRACTION,
        "weight_decay": 0.1,
        "selection": scenario["selection"],
        "fused": scenario["fused"],
        "sample_size": 1024,
    }


def run_dtensor_scenario(scenario: dict[str, Any], mesh: Any | None) -> dict[str, Any]:
    """The scenario on DTensors over ``mesh``, or on plain tensors when ``mesh`` is None (the reference)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    placements = {"S0": [Shard(0)], "S1": [Shard(1)], "R": [Replicate()]}
    dtype = getattr(torch, scenario.get("dtype", "float32"))
    originals = {name: getattr(_selection, name) for name in patched(scenario.get("patch"))}
    for name, value in patched(scenario.get("patch")).items():
        setattr(_selection, name, value)
    try:
        params = []
        for tensor, (_, placement) in zip(initial_params(), PARAMS, strict=True):
            tensor = tensor.to(dtype)
            if mesh is not None:
                tensor = distribute_tensor(tensor, mesh, placements[placement])
            params.append(nn.Parameter(tensor))
        optimizer = MoFO(params, **optimizer_kwargs(scenario))
        stats = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the non-finite scenarios' warnings
            for step in range(STEPS):
                grads = step_grads(step, scenario.get("nonfinite", False))
                for p, grad, (_, placement) in zip(params, grads, PARAMS, strict=True):
                    grad = grad.to(dtype)
                    p.grad = grad if mesh is None else distribute_tensor(grad, mesh, placements[placement])
                optimizer.step()
                stats.append([asdict(s) for s in optimizer.last_step_stats])
        final = [p.detach().full_tensor() if mesh is not None else p.detach().clone() for p in params]
        masters = [optimizer.state[p].get("master_weight") for p in params]
        master_types = [type(m).__name__ if m is not None else None for m in masters]
        masters = [m.full_tensor() if mesh is not None and m is not None else m for m in masters]
    finally:
        for name, value in originals.items():
            setattr(_selection, name, value)
    return {"params": final, "stats": stats, "masters": masters, "master_types": master_types}


def run_raise(mesh: Any | None) -> dict[str, Any]:
    """``nonfinite="raise"`` with one NaN in the first row of a ``Shard(0)`` tensor: only rank 0 holds it."""
    from torch.distributed.tensor import Shard, distribute_tensor

    full = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    param = nn.Parameter(full.clone() if mesh is None else distribute_tensor(full.clone(), mesh, [Shard(0)]))
    optimizer = MoFO([param], lr=0.1, nonfinite="raise")
    grad = torch.ones(8, 6)
    grad[0, 0] = math.nan
    param.grad = grad if mesh is None else distribute_tensor(grad, mesh, [Shard(0)])
    try:
        optimizer.step()
        error = ""
    except RuntimeError as err:
        error = str(err)
    final = param.detach().full_tensor() if mesh is not None else param.detach().clone()
    return {"error": error, "unchanged": bool(torch.equal(final, full)), "state": len(optimizer.state)}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 150), nn.Tanh(), nn.Linear(150, 130), nn.Tanh(), nn.Linear(130, 5))


def run_fsdp2(mesh: Any | None) -> dict[str, Any]:
    """Train the MLP on one fixed batch per step; sharded with fully_shard when ``mesh`` is given.

    On one thread in both places: a matmul's bits depend on how many threads split it, and the pytest process
    (the reference) and the spawned ranks need not default to the same count (the CI machine's did not).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_fsdp2(mesh)
    finally:
        torch.set_num_threads(threads)


def _run_fsdp2(mesh: Any | None) -> dict[str, Any]:
    model = mlp()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = MoFO(model.parameters(), lr=1e-2, fraction=FRACTION)
    gen = torch.Generator().manual_seed(1)
    stats = []
    for _ in range(STEPS):
        x, y = torch.randn(16, 24, generator=gen), torch.randn(16, 5, generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        stats.append([asdict(s) for s in optimizer.last_step_stats])
    params = [p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]
    return {
        "params": params,
        "stats": stats,
        "placements": [str(getattr(p, "placements", "")) for p in model.parameters()],
    }


def worker(rank: int, out_dir: Path, port: int, triton: bool) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        if triton:
            _kernels.FUSED_KERNELS["cpu"] = _kernels.TRITON_KERNELS  # CPU shards through the interpreted Triton kernels
            results = {name: run_dtensor_scenario(scenario, mesh) for name, scenario in triton_scenarios().items()}
            kernels = _kernels.load_triton()
            results["launches"] = dict(kernels.launches) if kernels is not None else {}
        else:
            results = {name: run_dtensor_scenario(scenario, mesh) for name, scenario in dtensor_scenarios().items()}
            results["fsdp2"] = run_fsdp2(mesh)
            results["raise"] = run_raise(mesh)
        torch.save({"rank": rank, "results": results}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--triton", action="store_true", help="the Triton scenarios, under Triton's interpreter")
    args = parser.parse_args()
    mp.spawn(worker, args=(args.out_dir, args.port, args.triton), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main()
