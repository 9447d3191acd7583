"""Half Fine-Tuning of a mixture-of-experts model on 2 CPU processes (gloo); run by ``tests/test_half_finetuning.py``.

Usage::

    python tests/scripts/moe_hft.py OUT_DIR --strategy {ddp,fsdp2} [--steps 6]

A tiny Mixtral (4 experts fused into 3-D tensors per block, transformers >= 5) in
:class:`~lit_mofo.modules.CausalLMModule` with AdamW (weight decay 0.1 on the matrices, experts included) and
``HalfFineTuning(redraw_every_n_steps=2, reset=True)``, fitted twice per launch: ``mode="freeze"`` with
``optimizer_state="keep"``, then ``mode="mask"`` with ``optimizer_state="reset"``. ``ddp`` runs under
``strategy="ddp_find_unused_parameters_true"``, ``fsdp2`` under ``ModelParallelStrategy`` (the module shards every
block, so the expert tensors are sharded on their expert dimension: 2 experts per rank). Every rank is fed the same
batches.

Per step each rank records, on its own part of every tensor (its shard under FSDP2): the frozen experts, whether
every frozen row (and every wholly frozen tensor) came out of the step bit-identical, whether every trainable row
of a partially frozen tensor moved, and with ``optimizer_state`` ``"keep"``/``"reset"`` whether the frozen rows of
Adam's moments were kept / are zero. Each rank writes ``OUT_DIR/<mode>.rank{r}.pt`` with those records, the draws
and the final weights (whole tensors, gathered).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_mofo import HalfFineTuning
from lit_mofo.modules import CausalLMModule
from lit_mofo.strategy import StrategyAdapter, full_state_dict

VOCAB, SEQ, BATCH = 64, 8, 4
CONFIG = {
    "model_type": "mixtral",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": SEQ,
    "tie_word_embeddings": False,
}


class Tokens(Dataset[dict[str, Tensor]]):
    def __init__(self, sequences: int) -> None:
        self.ids = torch.randint(0, VOCAB, (sequences, SEQ), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[index]}


class SliceRecorder(pl.Callback):
    """Per step, on this rank's part of the tensors: what was frozen and whether it stayed put."""

    def __init__(self, hft: HalfFineTuning) -> None:
        self.hft = hft
        self.records: list[dict[str, Any]] = []
        self._before: dict[str, Tensor] = {}
        self._moments: dict[tuple[str, str], Tensor] = {}
        self._rows: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        params = StrategyAdapter.named_parameters(pl_module)
        self._rows = {}
        for name, experts in self.hft.frozen_slices.items():
            mask = torch.zeros(params[name].shape[0], dtype=torch.bool)
            mask[list(experts)] = True
            self._rows[name] = StrategyAdapter.shard_like(mask, params[name])
        watched = set(self._rows) | set(self.hft.frozen_names)
        self._before = {name: StrategyAdapter.local(params[name]).detach().clone() for name in watched}
        state = trainer.optimizers[0].state
        self._moments = {
            (name, key): StrategyAdapter.local(state[params[name]][key]).clone()
            for name in self._rows
            for key in ("exp_avg", "exp_avg_sq")
            if key in state.get(params[name], {})
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        params = StrategyAdapter.named_parameters(pl_module)
        optimizer = trainer.optimizers[0]
        frozen_kept, trainable_moved, moments_kept, moments_zero = True, True, True, True
        for name in self.hft.frozen_names:
            frozen_kept &= torch.equal(StrategyAdapter.local(params[name]), self._before[name])
        for name, rows in self._rows.items():
            now, before = StrategyAdapter.local(params[name]).detach(), self._before[name]
            frozen_kept &= torch.equal(now[rows], before[rows])
            trainable_moved &= bool((now[~rows] != before[~rows]).flatten(1).any(1).all()) if (~rows).any() else True
            state = optimizer.state.get(params[name], {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    moment = StrategyAdapter.local(state[key])
                    moments_zero &= not bool(moment[rows].any())
                    if (name, key) in self._moments:
                        moments_kept &= torch.equal(moment[rows], self._moments[(name, key)][rows])
        self.records.append(
            {
                "step": trainer.global_step,
                "frozen_slices": self.hft.frozen_slices,
                "frozen_names": self.hft.frozen_names,
                "local_rows": {name: int(rows.sum()) for name, rows in self._rows.items()},
                "frozen_kept": frozen_kept,
                "trainable_moved": trainable_moved,
                "moments_zero": moments_zero,
                "moments_kept": moments_kept,
            }
        )


def fit(strategy: str, mode: str, optimizer_state: str, steps: int) -> dict[str, Any]:
    pl.seed_everything(0)
    module = CausalLMModule(
        model_config=CONFIG, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    )
    hft = HalfFineTuning(mode=mode, optimizer_state=optimizer_state, redraw_every_n_steps=2, reset=True, seed=0)
    recorder = SliceRecorder(hft)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=(
            ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
            if strategy == "fsdp2"
            else "ddp_find_unused_parameters_true"
        ),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[hft, recorder],
    )
    trainer.fit(module, DataLoader(Tokens(BATCH * steps), batch_size=BATCH))
    return {
        "rank": trainer.global_rank,
        "records": recorder.records,
        "history": hft.history,
        "final": full_state_dict(module),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    for mode, optimizer_state in (("freeze", "keep"), ("mask", "reset")):
        result = fit(args.strategy, mode, optimizer_state, args.steps)
        torch.save(result, args.out_dir / f"{mode}.rank{result['rank']}.pt")


if __name__ == "__main__":
    main()
