"""MoFO under Lightning's ModelParallelStrategy (FSDP2) with 2 CPU processes; run by ``tests/test_mofo_sharded.py``.

Usage::

    python tests/scripts/model_parallel_mofo.py OUT_DIR [--steps 3]

The module shards its layers with ``fully_shard`` in ``configure_model``, so MoFO receives DTensor slices and must
agree each tensor's global threshold across the ranks. The run saves a (distributed) checkpoint and resumes from
it with a MoFO built with other options, which the checkpoint's must override. Lightning re-launches this very
command for rank 1, so it must run as its own process, never inside pytest. Each rank writes
``OUT_DIR/rank{r}.pt``: the gathered parameters after the first fit, every step's ``last_step_stats``, the
parameter types, and the resumed optimizer's options.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_mofo.optim.mofo import MoFO

FRACTION = 0.15


class ShardedMLP(pl.LightningModule):
    def __init__(self, **mofo_options: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 96), nn.Tanh(), nn.Linear(96, 40), nn.Tanh(), nn.Linear(40, 4))
        self.mofo_options = mofo_options
        self.stats: list[list[dict[str, int]]] = []

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> MoFO:
        return MoFO(self.parameters(), **{"lr": 1e-2, "fraction": FRACTION, **self.mofo_options})

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.stats.append([asdict(s) for s in self.trainer.optimizers[0].last_step_stats])


def trainer(steps: int, root: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps,
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 16, generator=gen), torch.randn(64, 4, generator=gen))
    module = ShardedMLP(selection="exact", sample_size=4096, seed=7)
    first = trainer(args.steps, args.out_dir)
    first.fit(module, DataLoader(data, batch_size=8))
    params = {name: p.detach().full_tensor() for name, p in module.named_parameters()}
    types = {name: f"{type(p).__name__}{tuple(p.placements)}" for name, p in module.named_parameters()}
    checkpoint = args.out_dir / "checkpoint"
    first.save_checkpoint(checkpoint)

    resumed_module = ShardedMLP(selection="sampled", seed=123, lr=5.0)  # the checkpoint's options must win
    resumed = trainer(args.steps + 2, args.out_dir)
    resumed.fit(resumed_module, DataLoader(data, batch_size=8), ckpt_path=checkpoint)
    group = resumed.optimizers[0].param_groups[0]
    torch.save(
        {
            "rank": first.global_rank,
            "params": params,
            "types": types,
            "stats": module.stats,
            "resumed_stats": resumed_module.stats,
            "resumed_options": {key: group[key] for key in ("lr", "selection", "seed", "sample_size")},
        },
        args.out_dir / f"rank{first.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
