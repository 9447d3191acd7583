"""Two-process DDP fine-tune with MoFO on CPU (gloo); run by ``tests/test_ddp.py``.

Usage::

    python tests/scripts/ddp_mofo.py OUT_DIR [--steps 10]

Lightning's ``ddp`` strategy re-launches this very command for rank 1, so it must run as its own process, never
inside pytest. Lightning swaps the loader's sampler for a ``DistributedSampler``, so the ranks see different
sequences; DDP all-reduces the gradients, so MoFO should select the same entries and take the same step on both.
Each rank writes ``OUT_DIR/rank{r}.pt``: its initial and final parameters, the batches it trained on, and per step
``optimizer.update_fraction``, ``optimizer.last_step_stats`` (as dicts) and, for every filtered (2-D) parameter,
the mask of the entries the step changed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lit_mofo import MoFO

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM

FRACTION = 0.15


class MoFOLM(TinyCausalLM):
    def configure_optimizers(self) -> MoFO:
        return MoFO(self.parameters(), lr=1e-3, fraction=FRACTION)


class StepRecorder(pl.Callback):
    """Each step's batch and what MoFO's step moved, on this rank."""

    def __init__(self) -> None:
        self.batches: list[Tensor] = []
        self.update_fractions: list[float] = []
        self.step_stats: list[list[dict[str, int]]] = []
        self.moved: list[dict[str, Tensor]] = []
        self._before: dict[str, Tensor] = {}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._before = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.dim() >= 2}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        optimizer = trainer.optimizers[0]
        assert isinstance(optimizer, MoFO)
        self.batches.append(batch[0].detach().clone())
        self.update_fractions.append(optimizer.update_fraction)
        self.step_stats.append([asdict(stats) for stats in optimizer.last_step_stats])
        parameters = dict(pl_module.named_parameters())
        self.moved.append({name: parameters[name].detach() != before for name, before in self._before.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    module = MoFOLM()
    initial = {name: p.detach().clone() for name, p in module.named_parameters()}
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=args.steps,
        default_root_dir=args.out_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, SyntheticTokenDataModule(num_sequences=32 * args.steps, batch_size=8))

    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "initial": initial,
            "final": {name: p.detach().clone() for name, p in module.named_parameters()},
            "batches": recorder.batches,
            "update_fractions": recorder.update_fractions,
            "step_stats": recorder.step_stats,
            "moved": recorder.moved,
        },
        args.out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
