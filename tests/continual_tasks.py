"""Small tasks that make a continual run in seconds: progressions of one stride per stage, a tiny Llama, and a
task probe per stage (next-token accuracy and loss on held-out progressions of the stage's stride).

Strides conflict (after ``x`` the next token is ``x + stride``), so training a later stage costs the earlier ones:
the accuracy matrix has forgetting in it. Shared by ``tests/test_continual.py`` and ``tests/scripts/continual.py``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import Dataset

from lit_mofo import ForgettingMonitor, HalfFineTuning, L2ToPretrained, MoFOCallback, ParameterDrift
from lit_mofo.continual import ContinualLearning, Stage, StageSequence
from lit_mofo.data import ResumableDataLoader
from lit_mofo.modules import CausalLMModule
from lit_mofo.probes.base import Probe, find_language_model

VOCAB = 33  # odd: under FSDP2 the embedding and the head split unevenly over 2 ranks (17 + 16 rows)
SEQ_LEN = 12
MODEL_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def progressions(stride: int, count: int, seed: int) -> Tensor:
    """``count`` rows of ``x[t+1] = (x[t] + stride) % VOCAB`` from seeded random starts."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB, (count, 1), generator=generator)
    return (start + stride * torch.arange(SEQ_LEN)) % VOCAB


class _Rows(Dataset):  # type: ignore[type-arg]
    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Tensor:
        return self.rows[index]


def _collate(rows: list[Tensor]) -> dict[str, Tensor]:
    return {"input_ids": torch.stack(rows)}


class StrideData(pl.LightningDataModule):
    """Training progressions of one stride, shuffled from torch's global RNG as lit_mofo's data modules are (so
    ``seed_everything`` gives the same order on every process, and the loader resumes exactly across passes)."""

    def __init__(
        self, stride: int, num_sequences: int = 24, batch_size: int = 4, seed: int = 0, num_val: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stride, self.num_sequences, self.batch_size, self.seed = stride, num_sequences, batch_size, seed
        self.num_val = num_val

    def train_dataloader(self) -> ResumableDataLoader:
        rows = progressions(self.stride, self.num_sequences, seed=1000 + self.seed)
        return ResumableDataLoader(_Rows(rows), batch_size=self.batch_size, shuffle=True, collate_fn=_collate)

    def val_dataloader(self) -> ResumableDataLoader | list[Any]:
        if not self.num_val:
            return []
        rows = progressions(self.stride, self.num_val, seed=2000 + self.seed)
        return ResumableDataLoader(_Rows(rows), batch_size=self.batch_size, collate_fn=_collate)


class StrideProbe(Probe):
    """Next-token accuracy (``accuracy``, higher is better) and mean loss (``loss``) on held-out progressions of
    ``stride``: one forward of the whole set on every process (the same everywhere, so nothing to reduce)."""

    def __init__(self, stride: int, count: int = 16, name: str = "stride") -> None:
        self.name = name
        self.rows = progressions(stride, count, seed=7 + stride)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"accuracy": True, "loss": False}

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        model = find_language_model(pl_module)
        rows = self.rows.to(pl_module.device)
        logits = model(input_ids=rows).logits.float()
        predicted = logits[:, :-1].argmax(-1)
        accuracy = (predicted == rows[:, 1:]).double().mean().item()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1)).item()
        return {"accuracy": accuracy, "loss": loss}


STRIDES = {"plus1": 1, "plus3": 3, "minus2": -2}


def stage_sequence(max_steps: int | list[int | None] = 4, lrs: list[float | None] | None = None) -> StageSequence:
    """Three stages (``plus1``, ``plus3``, ``minus2``) with their probes."""
    budgets = max_steps if isinstance(max_steps, list) else [max_steps] * len(STRIDES)
    lrs = lrs or [None] * len(STRIDES)
    return StageSequence(
        [
            Stage(name, StrideData(stride, seed=index), StrideProbe(stride), max_steps=budget, lr=lr)
            for index, ((name, stride), budget, lr) in enumerate(zip(STRIDES.items(), budgets, lrs, strict=True))
        ]
    )


def tiny_module(**kwargs: Any) -> CausalLMModule:
    """A tiny Llama in a CausalLMModule (MoFO at lr 1e-2 unless ``optimizer`` is given), always the same weights."""
    torch.manual_seed(0)
    options: dict[str, Any] = {"warmup_ratio": 0.0}
    if "optimizer" not in kwargs:
        from lit_mofo import MoFO

        options["optimizer"] = partial(MoFO, lr=1e-2, fraction=0.5)
    return CausalLMModule(model_config=dict(MODEL_CONFIG), **{**options, **kwargs})


class Seen(Callback):
    """The fingerprint of every training batch (``(step, sum of the token ids)``), to show what each rank trained on,
    and the stage protocol's calls ``(hook, stage index, global step, the stage's start step, resumed)``."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int]] = []
        self.protocol: list[tuple[str, int, int, int, bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append((trainer.global_step, int(batch["input_ids"].sum())))

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        self.protocol.append(("start", stage.index, trainer.global_step, stage.start_step, stage.resumed))

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        self.protocol.append(("end", stage.index, trainer.global_step, stage.start_step, stage.resumed))


def multi_process_run(
    directory: Path, strategy: Any = "auto", devices: int = 1, ckpt_path: Path | None = None, checkpoint_at: int = 0
) -> dict[str, Any]:
    """The continual run the multi-process tests compare: 3 stages of 4 steps (stage 2 at its own lr), AdamW made
    MoFO by MoFOCallback, HalfFineTuning (mask: plain DDP works) drawing per stage, L2 to the previous stage,
    ParameterDrift and a ForgettingMonitor; every rank fed the same batches. Returns what a rank saw and measured."""
    pl.seed_everything(0)
    continual = ContinualLearning(every_n_train_steps=2)
    hft = HalfFineTuning(mode="mask", seed=5)
    drift = ParameterDrift(every_n_train_steps=2)
    monitor = ForgettingMonitor({"general": StrideProbe(2)}, every_n_train_steps=2)
    seen = Seen()
    l2 = L2ToPretrained(strength=0.1, anchor="previous_stage")
    callbacks: list[Callback] = [continual, hft, drift, monitor, l2, MoFOCallback(0.5), seen]
    if checkpoint_at:
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory / "checkpoints", filename="{step}", every_n_train_steps=checkpoint_at, save_top_k=-1
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        use_distributed_sampler=False,  # the same batches on every rank: the one-process gradient
        callbacks=callbacks,
        logger=False,
        default_root_dir=directory,
        enable_checkpointing=bool(checkpoint_at),
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=3,
    )
    module = tiny_module(optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0))
    trainer.fit(module, datamodule=stage_sequence(4, lrs=[None, 5e-3, None]), ckpt_path=ckpt_path)
    from lit_mofo.strategy import full_state_dict

    weights = {name: tensor.detach().clone() for name, tensor in full_state_dict(module).items()}
    return {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "rows": continual.rows,
        "history": continual.history,
        "stage_starts": continual.stage_starts,
        "hft": hft.history,
        "drift": drift.history,
        "stage_drift": drift.stage_history,
        "monitor": [{k: v for k, v in r.items() if k != "seconds"} for r in monitor.history],
        "batches": seen.batches,
        "protocol": seen.protocol,
        "weights": weights,
    }
