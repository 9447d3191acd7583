"""Exact resume of the data order under 2-process DDP or FSDP2 (gloo); run by ``tests/test_resume.py``.

Usage::

    python tests/scripts/resume_order.py OUT_DIR --strategy {ddp,fsdp2}

One launch, four fits of a tiny Llama on :class:`~lit_mofo.scenario.ScenarioDataModule` (a
:class:`~lit_mofo.data.ResumableDataLoader` with ``shuffle=True``; Lightning shards it with its distributed
sampler): an uninterrupted fit of ``STEPS`` steps over three epochs of ``BATCHES_PER_EPOCH`` batches per rank that
writes a checkpoint after every step (sharded directories under FSDP2), then one fit resumed from each of the
checkpoints in ``RESUME_FROM`` - in the middle of epoch 0, on the last batch of epoch 0 and in the middle of epoch
1 - to the same step. Lightning re-launches this very command for rank 1, so it must run as its own process, never
inside pytest. Each rank writes ``OUT_DIR/rank{r}.pt``: per fit (``"uninterrupted"`` or the step resumed from) the
batches it trained on as ``(global_step, epoch, batch_idx, sum of the input ids)``, the whole weights when training
started and at the end. ``--resume CHECKPOINT --devices N`` runs only a fit resumed from ``CHECKPOINT`` on ``N``
processes (``"resumed"``): a sharded checkpoint of 2 ranks resharded onto another number of processes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lit_mofo.modules import CausalLMModule
from lit_mofo.scenario import ScenarioDataModule, load_tokenizer
from lit_mofo.strategy import StrategyAdapter

BATCH = 4  # per rank
BATCHES_PER_EPOCH = 3  # per rank
STEPS = 8  # epochs 0 and 1, then two batches of epoch 2
RESUME_FROM = (2, 3, 5)  # mid-epoch 0, the last batch of epoch 0, mid-epoch 1


class Trace(Callback):
    """What each training batch of this rank is (the step, the epoch, the batch index and its data), and the whole
    weights when training starts (after a resumed fit's restore)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, int, int]] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = _whole_weights(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append((trainer.global_step, trainer.current_epoch, idx, int(batch["input_ids"].sum())))


def _whole_weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    parameters = StrategyAdapter.named_parameters(module)
    return {name: StrategyAdapter.full(p.detach()).clone() for name, p in parameters.items()}


def fit(strategy: str, root: Path, ckpt_path: Path | None = None, devices: int = 2) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    trace = Trace()
    callbacks: list[Callback] = [trace]
    if ckpt_path is None:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "checkpoints", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp"
        if strategy == "ddp"
        else ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
        max_steps=STEPS,
        default_root_dir=root,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=ckpt_path is None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    config = {
        "model_type": "llama",
        "vocab_size": len(load_tokenizer()),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    module = CausalLMModule(model_config=config)
    data = ScenarioDataModule(num_train=2 * BATCH * BATCHES_PER_EPOCH, num_val=0, batch_size=BATCH)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "batches": trace.batches,
        "start": trace.start,
        "weights": _whole_weights(module),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), required=True)
    parser.add_argument("--resume", type=Path, default=None, help="only resume this checkpoint, on --devices")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.resume is not None:
        run = fit(args.strategy, args.out_dir, ckpt_path=args.resume, devices=args.devices)
        torch.save({"resumed": run}, args.out_dir / f"rank{run['rank']}.pt")
        return

    runs: dict[str, dict[str, Any]] = {"uninterrupted": fit(args.strategy, args.out_dir)}
    for step in RESUME_FROM:
        runs[str(step)] = fit(args.strategy, args.out_dir, ckpt_path=args.out_dir / "checkpoints" / f"step={step}.ckpt")
    rank = runs["uninterrupted"]["rank"]
    torch.save(runs, args.out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
