"""Two-process DDP fine-tune with HalfFineTuning on CPU (gloo); run by ``tests/test_half_finetuning.py``.

Usage::

    python tests/scripts/ddp_hft.py OUT_DIR --mode {freeze,mask} [--steps 8] [--redraw 3]

``--mode freeze`` runs under ``strategy="ddp_find_unused_parameters_true"``, ``--mode mask`` under plain
``strategy="ddp"``; the selection is re-drawn every ``--redraw`` steps. Lightning's ``ddp`` strategy re-launches this
very command for rank 1, so it must run as its own process, never inside pytest. Each rank writes
``OUT_DIR/rank{r}.pt``: its initial and final parameters and, per step, the frozen selection it trained with, the
names of the tensors the step changed and how many tensors had ``requires_grad=False`` at the optimizer step.

The callback takes its default seed (``seed=None``): ``seed_everything(3)`` as a script would call it, then a
``torch.manual_seed`` as a module's ``__init__`` may do. :func:`build` is imported by the test to draw the same
selection in one process and compare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM

from lit_mofo.callbacks.half_finetuning import HalfFineTuning


class AdamWLM(TinyCausalLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


class StepRecorder(pl.Callback):
    """Per step on this rank: the selection it trained with, what changed, how many flags were off."""

    def __init__(self, hft: HalfFineTuning) -> None:
        self.hft = hft
        self.frozen: list[tuple[str, ...]] = []
        self.changed: list[list[str]] = []
        self.requires_grad_false: list[int] = []
        self._before: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._before = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.frozen.append(self.hft.frozen_names)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.requires_grad_false.append(sum(not p.requires_grad for p in pl_module.parameters()))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.changed.append(
            [name for name, p in pl_module.named_parameters() if not torch.equal(p, self._before[name])]
        )


def build(mode: str, redraw: int) -> tuple[AdamWLM, HalfFineTuning]:
    """The module and the callback, seeded as a user script would seed them."""
    pl.seed_everything(3)
    torch.manual_seed(11)  # e.g. in the module's __init__; the draw must not depend on it
    module = AdamWLM(num_hidden_layers=4)
    return module, HalfFineTuning(mode=mode, redraw_every_n_steps=redraw, optimizer_state="reset")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mode", choices=["freeze", "mask"], required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--redraw", type=int, default=3)
    args = parser.parse_args()

    module, hft = build(args.mode, args.redraw)
    initial = {name: p.detach().clone() for name, p in module.named_parameters()}
    recorder = StepRecorder(hft)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true" if args.mode == "freeze" else "ddp",
        max_steps=args.steps,
        default_root_dir=args.out_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[hft, recorder],
    )
    trainer.fit(module, SyntheticTokenDataModule(num_sequences=16 * args.steps, batch_size=8))

    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": args.steps,
            "initial": initial,
            "final": {name: p.detach().clone() for name, p in module.named_parameters()},
            "frozen": recorder.frozen,
            "changed": recorder.changed,
            "requires_grad_false": recorder.requires_grad_false,
            "seed": hft.state_dict()["seed"],
        },
        args.out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
