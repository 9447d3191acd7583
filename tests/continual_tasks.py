"""Small tasks that make a continual run in seconds: progressions of one stride per stage, a tiny Llama, and a
task probe per stage (next-token accuracy and loss on held-out progressions of the stage's stride).

Strides conflict (after ``x`` the next token is ``x + stride``), so training a later stage costs the earlier ones:
the accuracy matrix has forgetting in it. Shared by ``tests/test_continual.py`` and ``tests/scripts/continual.py``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit_mofo.continual import Stage, StageSequence
from lit_mofo.data import ResumableDataLoader
from lit_mofo.modules import CausalLMModule
from lit_mofo.probes.base import Probe, find_language_model

VOCAB = 32
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

    def __init__(self, stride: int, num_sequences: int = 24, batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stride, self.num_sequences, self.batch_size, self.seed = stride, num_sequences, batch_size, seed

    def train_dataloader(self) -> ResumableDataLoader:
        rows = progressions(self.stride, self.num_sequences, seed=1000 + self.seed)
        return ResumableDataLoader(_Rows(rows), batch_size=self.batch_size, shuffle=True, collate_fn=_collate)


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
        from functools import partial

        from lit_mofo import MoFO

        options["optimizer"] = partial(MoFO, lr=1e-2, fraction=0.5)
    return CausalLMModule(model_config=dict(MODEL_CONFIG), **{**options, **kwargs})
