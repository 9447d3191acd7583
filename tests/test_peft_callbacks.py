"""The weight callbacks on a LoRA model: ParameterDrift and L2ToPretrained on the effective weights W + scale·B·A,
HalfFineTuning refused, MoFOCallback over the adapters."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from peft import LoraConfig
from process_launch import run_ranks

from lit_mofo import HalfFineTuning, L2ToPretrained, MoFO, ParameterDrift
from lit_mofo.adapters import effective_name, lora_weights
from lit_mofo.blocks import detect_layout, parameter_roles
from lit_mofo.callbacks.mofo_callback import MoFOCallback
from lit_mofo.callbacks.parameter_drift import top_level_modules
from lit_mofo.data import ResumableDataLoader
from lit_mofo.modules import CausalLMModule

# CausalLMModule has a validation_step; these fits read no validation data, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

TINY: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 50,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def lora_module(seed: int = 0, **lora: Any) -> CausalLMModule:
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.0, **lora})
    return CausalLMModule(model_config=TINY, peft=config, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))


def data() -> ResumableDataLoader:
    ids = torch.randint(0, TINY["vocab_size"], (16, 8), generator=torch.Generator().manual_seed(1))
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    return ResumableDataLoader(rows, batch_size=4)


def fit(module: pl.LightningModule, callbacks: list[pl.Callback], steps: int = 4) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(module, data())
    return trainer


def test_the_effective_names_are_the_merged_models_and_blocks_see_through_the_adapters() -> None:
    module = lora_module()
    weights = lora_weights(module)
    merged_names = {f"model.{name}" for name, _ in module.merged_model().named_parameters()}
    assert {weight.name for weight in weights.values()} <= merged_names
    assert effective_name("model.base_model.model.model.layers.0.mlp.up_proj.base_layer.weight") == (
        "model.model.layers.0.mlp.up_proj.weight"
    )
    # Each adapted matrix keeps the role of the matrix it adapts (the layout looks through `.base_layer`).
    roles = parameter_roles(module)
    assert roles["model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == "attention"
    assert roles["model.base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"] == "ffn"
    block = detect_layout(module).blocks[0]
    assert len(block.attention) == 4 and len(block.ffn) == 3


def merged_drift(theta0: dict[str, torch.Tensor], merged: CausalLMModule) -> dict[tuple[str, str], dict[str, float]]:
    """The drift of a plain (merged) module from θ₀ by scope and group, computed directly."""
    roles = parameter_roles(merged)
    names = list(roles)
    modules = top_level_modules(merged, names)
    blocks = {name: str(i) for i, b in enumerate(detect_layout(merged).blocks) for name in b.parameters}
    sums: dict[tuple[str, str], list[float]] = {}
    for name, param in merged.named_parameters():
        before, after = theta0[name].double(), param.detach().double()
        figures = [
            float((after - before).pow(2).sum()),
            float(before.pow(2).sum()),
            float((after != before).sum()),
            param.numel(),
            float((after - before).abs().max()),
        ]
        keys = [("overall", "all"), ("role", roles[name]), ("module", modules[name])]
        if name in blocks:
            keys.append(("block", blocks[name]))
        for key in keys:
            total = sums.setdefault(key, [0.0, 0.0, 0.0, 0, 0.0])
            total[:4] = [a + b for a, b in zip(total[:4], figures[:4], strict=True)]
            total[4] = max(total[4], figures[4])
    return {
        key: {"relative_l2": math.sqrt(d / r), "changed": int(c), "numel": int(n), "max_abs_change": m}
        for key, (d, r, c, n, m) in sums.items()
    }


def test_drift_of_a_lora_fine_tune_equals_the_drift_of_its_merged_model() -> None:
    module = lora_module()
    base = CausalLMModule(model_config=TINY)
    base.model = module.merged_model()  # B = 0: the merged model is the pre-trained one
    theta0 = {name: param.detach().clone() for name, param in base.named_parameters()}
    drift = ParameterDrift(every_n_train_steps=2, report=False)
    fit(module, [drift])

    merged = CausalLMModule(model_config=TINY)
    merged.model = module.merged_model()
    expected = merged_drift(theta0, merged)
    final = {(r["scope"], r["group"]): r for r in drift.history if r["step"] == 4}
    assert final.keys() == expected.keys()
    for key, want in expected.items():
        got = final[key]
        # The same entries, computed with peft's own merge arithmetic: counts and maxima exactly.
        assert (got["changed"], got["numel"], got["max_abs_change"]) == (
            want["changed"],
            want["numel"],
            pytest.approx(want["max_abs_change"], rel=0, abs=0),
        ), key
        assert got["relative_l2"] == pytest.approx(want["relative_l2"], rel=1e-6), key
    assert final[("role", "attention")]["changed"] > 0 and final[("role", "embedding")]["changed"] == 0
    assert {r["step"] for r in drift.history} == {0, 2, 4}


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint, on purpose: it only reads it.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_drift_keeps_only_the_adapters_in_the_snapshot_and_resumes_from_a_checkpoint(tmp_path: Any) -> None:
    module = lora_module()
    drift = ParameterDrift(every_n_train_steps=2, report=False)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=4,
        callbacks=[drift, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data())
    saved = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=False)
    (snapshot,) = [value for key, value in saved.items() if "snapshot" in key.lower()]
    adapters = {name for weight in lora_weights(module).values() for name in weight.adapters}
    assert set(snapshot["tensors"]) == adapters  # no copy of the frozen base

    resumed_module = lora_module()
    resumed = ParameterDrift(every_n_train_steps=2, report=False)
    pl.Trainer(
        accelerator="cpu", max_steps=4, callbacks=[resumed], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
    ).fit(resumed_module, data(), ckpt_path=tmp_path / "epoch=0-step=2.ckpt")  # fmt: skip
    last = [r for r in resumed.history if r["step"] == 4]
    assert last == [r for r in drift.history if r["step"] == 4]


class PenalisedInTheLoss(CausalLMModule):
    """The reference: λ/2 Σ ||ΔW||² added to the loss itself (B starts at 0, so ΔW₀ = 0)."""

    strength = 0.5

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        penalty = sum(weight.delta().pow(2).sum() for weight in lora_weights(self).values())
        return super()._loss(batch) + 0.5 * self.strength * penalty


def sgd_lora(cls: type[CausalLMModule]) -> CausalLMModule:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    return cls(model_config=TINY, peft=config, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))


def test_l2_to_pretrained_on_lora_steps_as_the_penalty_on_the_effective_weights_in_the_loss() -> None:
    module, reference = sgd_lora(CausalLMModule), sgd_lora(PenalisedInTheLoss)
    l2 = L2ToPretrained(strength=PenalisedInTheLoss.strength)
    trainer = fit(module, [l2], steps=4)
    fit(reference, [], steps=4)
    assert sorted(l2.regularised_names) == sorted(weight.name for weight in lora_weights(module).values())
    assert all(".base_layer" not in name and ".lora_" not in name for name in l2.regularised_names)
    assert trainer.callback_metrics["l2_to_pretrained/penalty"] > 0  # ΔW moved away from 0 after the first step
    moved = 0
    for (name, param), (_, want) in zip(module.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(param, want, rtol=1e-5, atol=1e-7, msg=name)
        moved += int(".lora_" in name and not torch.equal(param, sgd_lora(CausalLMModule).get_parameter(name)))
    assert moved > 0
    # Without the penalty the fit ends elsewhere: the test would see a missing gradient.
    plain = sgd_lora(CausalLMModule)
    fit(plain, [], steps=4)
    assert any(
        not torch.allclose(p, q, rtol=1e-5, atol=1e-7)
        for p, q in zip(plain.parameters(), reference.parameters(), strict=True)
    )


def test_half_finetuning_refuses_a_peft_model_with_what_to_do() -> None:
    with pytest.raises(MisconfigurationException, match=r"HalfFineTuning does not work on a PEFT model.*drop `peft`"):
        fit(lora_module(), [HalfFineTuning()])


def test_mofo_callback_turns_the_adapters_adamw_into_mofo_over_the_adapters() -> None:
    module = lora_module()
    trainer = fit(module, [MoFOCallback(fraction=0.25)], steps=2)
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, MoFO)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert held == trainable and all(".lora_" in n for n, p in module.named_parameters() if id(p) in held)
    stats = optimizer.last_step_stats
    assert stats and all(0 < s.filtered_updated <= s.filtered_numel for s in stats if s.filtered_numel)


def test_dora_is_refused_by_the_weight_callbacks_with_the_fix() -> None:
    for callback, message in (
        (ParameterDrift(report=False), r"ParameterDrift measures a PEFT model's effective weights.*DoRA.*merged_model"),
        (L2ToPretrained(), r"L2ToPretrained penalises a PEFT model's effective weights.*DoRA"),
    ):
        with pytest.raises(MisconfigurationException, match=message):
            fit(lora_module(use_dora=True), [callback], steps=1)


def test_causal_lm_module_refuses_to_shard_a_peft_model_with_the_fix() -> None:
    module = lora_module()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    module._trainer = SimpleNamespace(strategy=strategy, world_size=2)  # type: ignore[assignment]
    with pytest.raises(MisconfigurationException, match=r"does not shard itself under ModelParallelStrategy.*'ddp'"):
        module.shard()


# ---------------------------------------------------------------------------------------------------- DDP
def callbacks() -> tuple[ParameterDrift, L2ToPretrained]:
    return ParameterDrift(every_n_train_steps=2, report=False), L2ToPretrained(strength=0.5)


@pytest.mark.slow
def test_ddp_drift_and_penalty_of_a_lora_fit_equal_the_one_process_fit(tmp_path: Path) -> None:
    ranks = run_ranks(Path(__file__).resolve().parent / "scripts" / "ddp_peft.py", tmp_path)

    module = sgd_lora(CausalLMModule)
    drift, l2 = callbacks()
    trainer = fit(module, [drift, l2], steps=4)
    for rank in ranks:
        for name, param in module.named_parameters():
            torch.testing.assert_close(rank["final"][name], param.detach(), rtol=1e-6, atol=1e-8, msg=name)
        assert [(r["step"], r["scope"], r["group"], r["changed"]) for r in rank["drift"]] == [
            (r["step"], r["scope"], r["group"], r["changed"]) for r in drift.history
        ]
        for got, want in zip(rank["drift"], drift.history, strict=True):
            assert got["relative_l2"] == pytest.approx(want["relative_l2"], rel=1e-5)
        assert rank["penalty"] == pytest.approx(float(trainer.callback_metrics["l2_to_pretrained/penalty"]), rel=1e-5)
    assert ranks[0]["drift"] == ranks[1]["drift"] and ranks[0]["penalty"] == ranks[1]["penalty"]
