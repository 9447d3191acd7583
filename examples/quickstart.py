"""Quickstart: fine-tune a tiny "pre-trained" Llama with AdamW and with MoFO, offline on CPU, and compare.

Run from the repository root::

    python examples/quickstart.py            # 60 steps each, well under a minute on 2 CPU cores
    python examples/quickstart.py --fast     # 10 steps each, a smoke test

A seeded, randomly initialised Llama stands in for the pre-trained model: it is saved with ``save_pretrained`` and
both fine-tunes load it back through ``TinyCausalLM(pretrained=...)``. Both use the same learning rate, steps and
data (``SyntheticTokenDataModule``); only the optimizer differs. The table reports, per optimizer, the mean
training loss of the last steps, the L2 distance of the weights from the pre-trained ones relative to their norm,
the share of weight entries that changed at all, and MoFO's realised update fraction as logged by the module.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from tiny_lm import SyntheticTokenDataModule, TinyCausalLM
from torch import nn
from torch.optim import Optimizer
from transformers.utils import logging as hf_logging

import lit_mofo

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
LOSS_WINDOW = 10  # steps averaged for the reported training loss


class FineTune(TinyCausalLM):
    """:class:`TinyCausalLM` with the optimizer built by ``optimizer_factory(self.parameters())``."""

    def __init__(self, optimizer_factory: OptimizerFactory, pretrained: str) -> None:
        super().__init__(pretrained=pretrained)
        self.optimizer_factory = optimizer_factory

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory(self.parameters())


@dataclass(frozen=True)
class Result:
    """One fine-tune: mean training loss of the last steps, ``||w - w0|| / ||w0||``, the share of entries with
    ``w != w0``, and the mean of the logged ``mofo/update_fraction`` (None for other optimizers)."""

    name: str
    train_loss: float
    relative_distance: float
    changed_share: float
    update_fraction: float | None


def finetune(name: str, factory: OptimizerFactory, pretrained: Path, args: argparse.Namespace, log_dir: Path) -> Result:
    module = FineTune(factory, pretrained=str(pretrained))
    initial = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.max_steps,
        logger=CSVLogger(log_dir, name="", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = SyntheticTokenDataModule(
        num_sequences=args.max_steps * args.batch_size, seq_len=args.seq_len, batch_size=args.batch_size
    )
    trainer.fit(module, data)

    rows = _read_metrics(log_dir / "metrics.csv")
    losses = [float(row["train_loss"]) for row in rows if row.get("train_loss")]
    fractions = [float(row["mofo/update_fraction"]) for row in rows if row.get("mofo/update_fraction")]
    with torch.no_grad():
        final = list(module.parameters())
        distance = torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in zip(final, initial, strict=True)))
        norm = torch.sqrt(sum((p0**2).sum() for p0 in initial))
        changed = sum(int((p != p0).sum()) for p, p0 in zip(final, initial, strict=True))
        numel = sum(p0.numel() for p0 in initial)
    return Result(
        name=name,
        train_loss=sum(losses[-LOSS_WINDOW:]) / len(losses[-LOSS_WINDOW:]),
        relative_distance=float(distance / norm),
        changed_share=changed / numel,
        update_fraction=sum(fractions) / len(fractions) if fractions else None,
    )


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def format_table(results: list[Result]) -> str:
    header = f"{'optimizer':<14}{'train loss':>12}{'rel. L2 dist':>14}{'changed':>10}{'update frac':>13}"
    lines = [header, "-" * len(header)]
    for r in results:
        fraction = "-" if r.update_fraction is None else f"{r.update_fraction:.4f}"
        lines.append(
            f"{r.name:<14}{r.train_loss:>12.4f}{r.relative_distance:>14.4f}{r.changed_share:>10.4f}{fraction:>13}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps per fine-tune (default 60)")
    parser.add_argument("--fast", action="store_true", help="10 steps per fine-tune unless --max-steps is given")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of both optimizers")
    parser.add_argument("--fraction", type=float, default=0.15, help="MoFO's update fraction")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pre-trained weights")
    args = parser.parse_args(argv)
    if args.max_steps is None:
        args.max_steps = 10 if args.fast else 60
    if args.max_steps < 1:
        parser.error(f"--max-steps={args.max_steps} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    hf_logging.disable_progress_bar()
    start = time.perf_counter()

    optimizers: dict[str, OptimizerFactory] = {
        # Partials, not lambdas, so the module's hyper-parameters stay picklable.
        # weight_decay=0 for both: the MoFO paper's setting, and AdamW's default 0.01 would blur the comparison.
        "AdamW": partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.0),
        f"MoFO({args.fraction:g})": partial(lit_mofo.MoFO, lr=args.lr, fraction=args.fraction),
    }
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = Path(tmp) / "pretrained"
        TinyCausalLM(seed=args.seed).model.save_pretrained(pretrained)
        results = [
            finetune(name, factory, pretrained, args, Path(tmp) / f"logs{i}")
            for i, (name, factory) in enumerate(optimizers.items())
        ]

    window = min(LOSS_WINDOW, args.max_steps)
    print(
        f"\nFine-tuned a tiny Llama for {args.max_steps} steps (batch {args.batch_size}, seq {args.seq_len}, "
        f"lr {args.lr:g}) on CPU from the same pre-trained weights w0.\n"
        f"train loss: mean of the last {window} steps; rel. L2 dist: ||w - w0|| / ||w0||; changed: share of weight "
        "entries != w0;\nupdate frac: MoFO's realised update fraction as logged each step (mean).\n"
    )
    print(format_table(results))
    print(f"\nfinished in {time.perf_counter() - start:.1f} s")
    return results


if __name__ == "__main__":
    main()
