"""Callback order: every pair of lit_mofo callbacks that meet on one Trainer gives the same run listed either way.

Each pair trains a tiny Llama (embeddings frozen by the module, as users do) for 6 steps with a Half Fine-Tuning
re-draw every 2 steps where HFT is in the pair, listed ``[a, b]`` and ``[b, a]``; both runs must end with
bit-identical weights and identical measurements. Each order is then resumed from the step-3 checkpoint of the
first run (with a dataloader that resumes mid-epoch, ``ResumableDataLoader``) and must end exactly like the
uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import TensorDataset

from lit_mofo import ForgettingMonitor, HalfFineTuning, L2ToPretrained, ParameterDrift
from lit_mofo.callbacks.mofo_callback import MoFOCallback
from lit_mofo.data import ResumableDataLoader
from lit_mofo.probes import CallableProbe

STEPS = 6
CHECKPOINT_STEP = 3  # between the re-draws at steps 2 and 4


class LM(pl.LightningModule):
    """A 2-block Llama trained with AdamW (weight decay on), its input embeddings frozen by the module itself."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
        )
        self.model = transformers.LlamaForCausalLM(config)
        self.model.model.embed_tokens.requires_grad_(False)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def weight_sum(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    return {"weight_sum": sum(float(p.double().sum()) for p in pl_module.parameters())}


def hft(**kwargs: Any) -> HalfFineTuning:
    return HalfFineTuning(seed=1, redraw_every_n_steps=2, **kwargs)


PAIRS: dict[str, Callable[[], tuple[pl.Callback, pl.Callback]]] = {
    "hft+l2": lambda: (hft(), L2ToPretrained(strength=0.5)),
    "hft_mask+l2": lambda: (hft(mode="mask", optimizer_state="reset"), L2ToPretrained(strength=0.5)),
    "hft_reset+drift": lambda: (hft(reset=True), ParameterDrift(every_n_train_steps=2, report=False)),
    "hft+mofo_callback": lambda: (hft(optimizer_state="reset"), MoFOCallback(fraction=0.5)),
    "monitor+hft_reset": lambda: (
        ForgettingMonitor(
            CallableProbe(weight_sum, higher_is_better=True, name="w"), every_n_train_steps=2, report=False
        ),
        hft(reset=True, snapshot_dtype="bfloat16"),
    ),
    "l2_bf16+drift": lambda: (
        L2ToPretrained(strength=0.5, snapshot_dtype="bfloat16"),
        ParameterDrift(every_n_train_steps=2, report=False),
    ),
}


@dataclass
class Run:
    weights: dict[str, Tensor]
    observations: dict[str, Any]


def observations(trainer: pl.Trainer, callbacks: tuple[pl.Callback, ...]) -> dict[str, Any]:
    """What each callback measured or decided, in a form that does not depend on wall-clock time."""
    seen: dict[str, Any] = {}
    for callback in callbacks:
        if isinstance(callback, HalfFineTuning):
            seen["hft"] = callback.history
        elif isinstance(callback, ParameterDrift):
            seen["drift"] = callback.history
        elif isinstance(callback, ForgettingMonitor):
            seen["monitor"] = [{k: v for k, v in r.items() if k != "seconds"} for r in callback.history]
        elif isinstance(callback, L2ToPretrained):
            seen["l2"] = callback.regularised_names
            if "l2_to_pretrained/penalty" in trainer.callback_metrics:
                seen["l2_penalty"] = trainer.callback_metrics["l2_to_pretrained/penalty"].item()
    return seen


def run(pair: str, reverse: bool, save_dir: Path | None = None, ckpt_path: Path | None = None) -> Run:
    first, second = PAIRS[pair]()
    callbacks = (second, first) if reverse else (first, second)
    extra: list[pl.Callback] = []
    if save_dir is not None:
        extra.append(ModelCheckpoint(dirpath=save_dir, every_n_train_steps=CHECKPOINT_STEP, save_top_k=-1))
    module = LM()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        callbacks=[*callbacks, *extra],
        logger=False,
        enable_checkpointing=save_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=save_dir,
    )
    tokens = torch.arange(16).repeat(4, 1) * 3 % 64  # 4 sequences, the same batch every step
    data = ResumableDataLoader(TensorDataset(tokens.repeat(20, 1)), batch_size=4)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    return Run(weights, observations(trainer, callbacks))


def assert_same_run(expected: Run, actual: Run) -> None:
    assert expected.weights.keys() == actual.weights.keys()
    different = [name for name, p in expected.weights.items() if not torch.equal(p, actual.weights[name])]
    assert not different, f"{len(different)} of {len(expected.weights)} tensors differ, e.g. {different[:3]}"
    assert expected.observations == actual.observations


# The resumed runs leave out the ModelCheckpoint that wrote the checkpoint (they write none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
@pytest.mark.parametrize("pair", list(PAIRS))
def test_a_pair_listed_either_way_trains_the_same_weights_and_measures_the_same(pair: str, tmp_path: Path) -> None:
    forward = run(pair, reverse=False, save_dir=tmp_path)
    backward = run(pair, reverse=True)
    assert_same_run(forward, backward)
    pretrained = dict(LM().named_parameters())
    assert sum(not torch.equal(p, pretrained[name]) for name, p in forward.weights.items()) > 10  # it trained

    checkpoint = tmp_path / f"epoch=0-step={CHECKPOINT_STEP}.ckpt"
    for reverse in (False, True):  # a resumed run continues the uninterrupted one, in either order
        assert_same_run(forward, run(pair, reverse=reverse, ckpt_path=checkpoint))


def test_the_frozen_embeddings_stay_frozen_and_every_trained_tensor_is_regularised_in_either_order() -> None:
    pretrained = LM()
    for reverse in (False, True):
        hft_first = run("hft+l2", reverse=reverse)
        embeddings = hft_first.weights["model.model.embed_tokens.weight"]
        assert torch.equal(embeddings, pretrained.model.model.embed_tokens.weight)
        # every tensor the module left trainable is regularised, also those HFT froze at the first draw
        trainable = [name for name, p in pretrained.named_parameters() if p.requires_grad]
        assert hft_first.observations["l2"] == trainable
