"""Two-process DDP on CPU (gloo): AdamW + MoFOCallback against MoFO in configure_optimizers; run by
``tests/test_mofo_callback.py``.

Usage::

    python tests/scripts/ddp_mofo_callback.py OUT_DIR [--steps 8]

Lightning's ``ddp`` strategy re-launches this very command for rank 1, so it must run as its own process, never
inside pytest. Both ranks run two fits in turn, from the same initial weights and data: (a) a module whose
``configure_optimizers`` returns AdamW + a warmup-cosine schedule, with :class:`MoFOCallback`, and (b) the same module
returning :class:`lit_mofo.MoFO` with the same hyper-parameters. Each rank writes ``OUT_DIR/rank{r}.pt``: the initial
weights, the final weights of both fits, the optimizer class each fit ended with, its global step, and the learning
rate of every step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import AdamW, Optimizer

from lit_mofo import MoFO, warmup_lr_scheduler
from lit_mofo.callbacks.mofo_callback import MoFOCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM

HYPER: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.01}
FRACTION = 0.15


class ScheduledLM(TinyCausalLM):
    """AdamW (``use_mofo=False``) or MoFO over all parameters, with the paper's per-step warmup + cosine."""

    def __init__(self, use_mofo: bool, steps: int) -> None:
        super().__init__(seed=0)
        self.use_mofo = use_mofo
        self.steps = steps
        self.learning_rates: list[float] = []

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer: Optimizer
        if self.use_mofo:
            optimizer = MoFO(self.parameters(), **HYPER, fraction=FRACTION)
        else:
            optimizer = AdamW(self.parameters(), **HYPER)
        scheduler = warmup_lr_scheduler(optimizer, self.steps, schedule="cosine", warmup_ratio=0.25)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.learning_rates.append(self.trainer.optimizers[0].param_groups[0]["lr"])


def train(use_mofo: bool, steps: int, out_dir: Path) -> tuple[pl.Trainer, ScheduledLM]:
    module = ScheduledLM(use_mofo, steps)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        default_root_dir=out_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if use_mofo else [MoFOCallback(fraction=FRACTION)],
    )
    trainer.fit(module, SyntheticTokenDataModule(num_sequences=16 * steps, batch_size=8, seq_len=16))
    return trainer, module


def weights(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    initial = weights(TinyCausalLM(seed=0))
    results: dict[str, Any] = {"steps": args.steps, "initial": initial}
    for variant, use_mofo in (("callback", False), ("direct", True)):
        trainer, module = train(use_mofo, args.steps, args.out_dir)
        results.setdefault("final", {})[variant] = weights(module)
        results.setdefault("optimizer_types", {})[variant] = type(trainer.optimizers[0]).__name__
        results.setdefault("global_steps", {})[variant] = trainer.global_step
        results.setdefault("learning_rates", {})[variant] = module.learning_rates
        results["rank"], results["world_size"] = trainer.global_rank, trainer.world_size
    torch.save(results, args.out_dir / f"rank{results['rank']}.pt")


if __name__ == "__main__":
    main()
