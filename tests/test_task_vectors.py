"""Task-vector edits (WiSE-FT, LiNeS): exact at the ends, per-block factors, restore bit for bit, validation."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lit_mofo.modules.causal_lm import CausalLMModule
from lit_mofo.scenario.data import ScenarioDataModule
from lit_mofo.scenario.vocab import build_tokenizer
from lit_mofo.snapshot import PretrainedSnapshot
from lit_mofo.task_vectors import (
    LiNeS,
    TaskVectorEditor,
    WiSEFT,
    apply_edit,
    edit_factors,
    edit_grid,
    interpolate_,
)

VOCAB = len(build_tokenizer())


def tiny_llama(layers: int = 4, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config).to(dtype)


def tiny_gpt2(layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=16, n_layer=layers, n_head=2, n_positions=16))


def fine_tune(model: nn.Module, frozen: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(θ₀, θ): θ₀ is a copy of the weights now; then every parameter not in ``frozen`` moves (some entries to -0.0)."""
    theta0 = {name: param.detach().clone() for name, param in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in frozen:
                continue
            noise = torch.randn(param.shape, generator=generator).to(param.dtype)
            param.add_(0.1 * noise)
            param.view(-1)[0] = -0.0  # a signed zero: a bit-exact restore keeps its sign
    theta = {name: param.detach().clone() for name, param in model.named_parameters()}
    return theta0, theta


def bits(tensor: Tensor) -> Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_bitwise(model: nn.Module, expected: dict[str, Tensor]) -> None:
    for name, param in model.named_parameters():
        assert torch.equal(bits(param.detach()), bits(expected[name])), name


# ---- exactness ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_ends_reproduce_theta0_and_the_fine_tune_bit_for_bit(dtype: torch.dtype) -> None:
    model = tiny_llama(dtype=dtype)
    theta0, theta = fine_tune(model)
    with TaskVectorEditor(model, theta0) as editor:
        for edit, expected in [
            (WiSEFT(0.0), theta0),
            (WiSEFT(1.0), theta),
            (LiNeS(0.0, 0.0), theta0),
            (LiNeS(1.0, 0.0), theta),
            (WiSEFT(0.5), None),
            (WiSEFT(0.0), theta0),
        ]:
            editor.apply(edit)
            if expected is not None:
                assert_bitwise(model, expected)
    assert_bitwise(model, theta)  # leaving the editor restores θ, signed zeros included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_factor_between_the_ends_is_one_float32_lerp_rounded_once(dtype: torch.dtype) -> None:
    theta0 = torch.randn(64, generator=torch.Generator().manual_seed(0)).to(dtype)
    theta = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.empty(64, dtype=dtype)
    interpolate_(out, theta0, theta, 0.3)
    assert torch.equal(out, torch.lerp(theta0.float(), theta.float(), 0.3).to(dtype))
    exact = theta0.double() + 0.3 * (theta.double() - theta0.double())
    scale = theta0.double().abs() + theta.double().abs()  # rounding errors are relative to the operands
    assert ((out.double() - exact).abs() <= 2 * torch.finfo(dtype).eps * scale).all()


def test_extrapolation_beyond_the_fine_tune_when_allowed() -> None:
    theta0, theta, out = torch.zeros(3), torch.tensor([1.0, -2.0, 4.0]), torch.empty(3)
    interpolate_(out, theta0, theta, WiSEFT(1.5, allow_extrapolation=True).alpha)
    assert torch.equal(out, torch.tensor([1.5, -3.0, 6.0]))


def test_unmoved_tensors_are_never_touched_nor_copied() -> None:
    model = tiny_llama()
    frozen = ("model.embed_tokens.weight", "lm_head.weight")
    theta0, theta = fine_tune(model, frozen=frozen)
    editor = TaskVectorEditor(model, theta0)
    assert set(editor.moved) == set(theta0) - set(frozen)
    editor.apply(WiSEFT(0.25))
    moved_bytes = sum(theta[name].numel() * theta[name].element_size() for name in editor.moved)
    assert editor.stash_nbytes == moved_bytes  # one copy of the moved tensors, nothing else
    for name in frozen:
        assert torch.equal(dict(model.named_parameters())[name], theta[name])
    editor.restore()
    assert editor.stash_nbytes == 0 and editor.applied is None
    assert_bitwise(model, theta)


def test_each_edit_starts_from_the_fine_tune_not_from_the_previous_edit() -> None:
    model = tiny_llama()
    theta0, theta = fine_tune(model)
    fresh = tiny_llama()
    fresh.load_state_dict(theta)
    apply_edit(fresh, theta0, WiSEFT(0.8))
    editor = TaskVectorEditor(model, theta0)
    editor.apply(WiSEFT(0.2))
    editor.apply(LiNeS.single_task(0.3))
    editor.apply(WiSEFT(0.8))
    assert editor.applied == WiSEFT(0.8)
    assert_bitwise(model, {name: p.detach() for name, p in fresh.named_parameters()})
    editor.restore()
    assert_bitwise(model, theta)


def test_apply_edit_compounds_and_keep_ends_the_editor() -> None:
    model = tiny_llama()
    theta0, _ = fine_tune(model)
    apply_edit(model, theta0, WiSEFT(0.5))
    once = {name: p.detach().clone() for name, p in model.named_parameters()}
    apply_edit(model, theta0, WiSEFT(0.5))  # from the edited weights: a quarter of the task vector is left
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach() - theta0[name], 0.5 * (once[name] - theta0[name]))
    with TaskVectorEditor(model, theta0) as editor:
        editor.apply(WiSEFT(0.0))
        editor.keep()
    assert_bitwise(model, theta0)  # kept: leaving the editor restored nothing


def test_lines_single_task_keeps_the_last_block_exactly_and_copies_nothing_of_it() -> None:
    model = tiny_llama(layers=4)
    theta0, theta = fine_tune(model)
    edit = LiNeS.single_task(0.7)  # alpha + beta = 1
    factors = edit_factors(model, edit)
    last = [name for name in factors if name.startswith("model.layers.3.")]
    assert last and {factors[name] for name in last} == {1.0}
    editor = TaskVectorEditor(model, theta0)
    editor.apply(edit)
    params = dict(model.named_parameters())
    for name in last:
        assert torch.equal(bits(params[name].detach()), bits(theta[name])), name
    assert not set(last) & set(editor._stash)


# ---- LiNeS factors --------------------------------------------------------------------------------------------------


def expected_factor(alpha: float, beta: float, layer: int, num_layers: int) -> float:
    """λ(l) = alpha + beta (l - 1) / (L - 1), blocks l = 1..L."""
    return alpha + beta * (layer - 1) / (num_layers - 1)


def test_lines_factors_follow_the_formula_on_a_llama_layout() -> None:
    model = tiny_llama(layers=4)
    factors = edit_factors(model, LiNeS(0.2, 0.6))
    for name, factor in factors.items():
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2]) + 1
            assert factor == pytest.approx(expected_factor(0.2, 0.6, layer, 4), abs=1e-12), name
        else:
            assert factor == 0.2, name
    assert factors["model.layers.0.self_attn.q_proj.weight"] == 0.2
    assert factors["model.layers.2.input_layernorm.weight"] == pytest.approx(0.2 + 0.6 * 2 / 3, abs=1e-12)
    assert factors["model.layers.3.mlp.down_proj.weight"] == pytest.approx(0.8, abs=1e-12)
    for outside in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert factors[outside] == 0.2  # the reference's rule: everything outside the blocks gets alpha


def test_lines_factors_follow_the_formula_on_a_gpt2_layout() -> None:
    model = tiny_gpt2(layers=3)
    factors = edit_factors(model, LiNeS(0.1, 0.9))
    assert "lm_head.weight" not in factors  # tied to the token embedding: one tensor, one factor
    for name, factor in factors.items():
        if name.startswith("transformer.h."):
            layer = int(name.split(".")[2]) + 1
            assert factor == pytest.approx(expected_factor(0.1, 0.9, layer, 3), abs=1e-12), name
        else:
            assert factor == 0.1, name
    assert factors["transformer.h.1.attn.c_attn.bias"] == pytest.approx(0.55, abs=1e-12)
    assert factors["transformer.h.2.ln_2.weight"] == 1.0
    assert {factors[n] for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight")} == {
        0.1
    }


def test_wise_ft_gives_every_tensor_alpha_and_one_block_lines_gives_alpha() -> None:
    assert set(edit_factors(tiny_gpt2(), WiSEFT(0.4)).values()) == {0.4}
    single = edit_factors(tiny_llama(layers=1), LiNeS(0.3, 0.7))
    assert set(single.values()) == {0.3}


def test_factors_are_given_for_the_lightning_modules_parameter_names() -> None:
    module = CausalLMModule(model_config=tiny_llama(layers=2).config)
    factors = edit_factors(module, LiNeS(0.0, 1.0), ["model.model.layers.1.self_attn.o_proj.weight"])
    assert factors == {"model.model.layers.1.self_attn.o_proj.weight": 1.0}


# ---- with the shared snapshot (θ₀ as the callbacks hold it) -------------------------------------------------------


class EditAtTrainEnd(pl.Callback):
    """Holds the shared snapshot like lit_mofo's callbacks; at the end of training tries edits with it."""

    def __init__(self) -> None:
        self.before: dict[str, Tensor] = {}
        self.results: dict[str, Any] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        snapshot = PretrainedSnapshot.attach(pl_module, owner=self)
        snapshot.capture(trainer, pl_module, list(self.before))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snapshot = PretrainedSnapshot.get(pl_module)
        assert snapshot is not None
        theta0 = {name: snapshot[name] for name in snapshot}
        after = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        with TaskVectorEditor(pl_module, theta0) as editor:
            editor.apply(WiSEFT(0.0))
            self.results["alpha0"] = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
            editor.apply(LiNeS.single_task(0.5))
        self.results["restored"] = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        self.results["after"] = after
        PretrainedSnapshot.detach(pl_module, owner=self)


def test_edits_work_on_a_lightning_module_with_the_shared_snapshot() -> None:
    config = tiny_llama(layers=2).config
    config.vocab_size = VOCAB
    module = CausalLMModule(model_config=config, optimizer=partial(torch.optim.AdamW, lr=1e-2))
    callback = EditAtTrainEnd()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback],
    )
    trainer.fit(module, ScenarioDataModule(num_train=16, num_val=0, batch_size=8))
    assert_bitwise(module, callback.results["after"])
    for name, value in callback.results["alpha0"].items():
        assert torch.equal(bits(value), bits(callback.before[name])), name
    for name, value in callback.results["restored"].items():
        assert torch.equal(bits(value), bits(callback.results["after"][name])), name
    assert any(not torch.equal(callback.before[n], callback.results["after"][n]) for n in callback.before)


# ---- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: WiSEFT(1.5), r"WiSEFT\(\): alpha=1.5 is invalid; the valid range is \[0, 1\].*allow_extrapolation"),
        (lambda: WiSEFT(-0.1), r"alpha=-0.1 is invalid"),
        (lambda: WiSEFT(True), r"alpha=True is invalid"),
        (lambda: WiSEFT(float("nan")), r"alpha=nan is invalid"),
        (lambda: WiSEFT("0.5"), r"alpha='0.5' is invalid"),
        (lambda: LiNeS(0.5, 0.6), r"beta=0.6 is invalid; the valid range is \[0, 0.5\].*single_task"),
        (lambda: LiNeS(0.5, -0.1), r"beta=-0.1 is invalid"),
        (lambda: LiNeS(0.5, -0.1, allow_extrapolation=True), r"beta >= 0"),
        (lambda: LiNeS.single_task(2.0), r"alpha=2.0 is invalid"),
        (lambda: edit_grid(), r"number of edits=0 is invalid; the valid range is an integer >= 1.*wise_ft=\[0.5\]"),
        (lambda: edit_grid(lines=[(0.1,)]), r"lines entry \(0.1,\) is invalid.*\(alpha, beta\) pair"),
        (lambda: edit_grid(lines=["ab"]), r"lines entry 'ab' is invalid"),
        (lambda: edit_grid(wise_ft=[0.5, 0.5]), r"lists \['WiSE-FT alpha=0.5'\] more than once"),
    ],
)
def test_bad_edits_and_grids_are_refused_with_the_valid_range(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_extrapolation_is_accepted_only_when_asked_for() -> None:
    assert WiSEFT(1.5, allow_extrapolation=True).alpha == 1.5
    assert LiNeS(0.5, 1.0, allow_extrapolation=True).block_factor(1, 2) == 1.5


def test_edit_grid_lists_wise_ft_then_lines_edits_in_order() -> None:
    grid = edit_grid(wise_ft=[1.0, 0.5], lines=[(0.2, 0.8), [0.0, 1.0]])
    assert grid == (WiSEFT(1.0), WiSEFT(0.5), LiNeS(0.2, 0.8), LiNeS(0.0, 1.0))
    assert [edit.key for edit in grid] == ["wise_ft_a1", "wise_ft_a0.5", "lines_a0.2_b0.8", "lines_a0_b1"]


def test_lines_needs_transformer_blocks() -> None:
    with pytest.raises(ValueError, match=r"has none that lit_mofo\.blocks\.detect_layout recognises; use WiSEFT"):
        edit_factors(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), LiNeS(0.5, 0.5))


def test_the_editor_refuses_a_theta0_of_another_model() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"theta0 names \['decoder.weight'\], which is not a parameter"):
        TaskVectorEditor(model, {"decoder.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"has shape \(1,\) but the parameter has \(16,\)"):
        TaskVectorEditor(model, {"model.norm.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="is not a parameter of LlamaForCausalLM"):
        edit_factors(model, WiSEFT(0.5), ["model.missing"])


# ---- LoRA (PEFT) ----------------------------------------------------------------------------------------------------


def test_on_a_lora_model_editing_the_b_matrices_scales_the_effective_task_vector() -> None:
    """ΔW = scale·B·A with B₀ = 0 (peft's default init): editing B alone, with θ₀(B) = 0, gives θ₀ + λ·ΔW per layer,
    i.e. the edit of the merged weights, and LiNeS gives each B its block's factor."""
    from peft import LoraConfig

    config = tiny_llama(layers=3).config
    module = CausalLMModule(model_config=config, peft=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    pretrained = {name: p.detach().clone() for name, p in module.merged_model().named_parameters()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    finetuned = {name: p.detach().clone() for name, p in module.merged_model().named_parameters()}
    theta0 = {name: torch.zeros_like(p) for name, p in module.named_parameters() if ".lora_B." in name}
    for edit in (WiSEFT(0.3), LiNeS(0.2, 0.8)):
        with TaskVectorEditor(module, theta0) as editor:
            factors = editor.apply(edit)
            edited = dict(module.merged_model().named_parameters())
        for name, value in edited.items():
            if name.startswith("model.layers.") and name.endswith("proj.weight"):
                layer = int(name.split(".")[2])
                factor = edit.alpha if isinstance(edit, WiSEFT) else edit.block_factor(layer, 3)
                expected = pretrained[name] + factor * (finetuned[name] - pretrained[name])
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(value, pretrained[name]), name  # no adapter: frozen
        b_factors = {factors[n] for n in theta0 if ".layers.2." in n}
        assert b_factors == {1.0 if isinstance(edit, LiNeS) else 0.3}


def test_lines_sees_every_layer_of_a_hybrid_and_the_experts_of_a_moe_block() -> None:
    # Jamba's layer list mixes a Mamba layer and an attention layer with fused experts: both are blocks.
    from transformers import JambaConfig, JambaForCausalLM

    torch.manual_seed(0)
    model = JambaForCausalLM(
        JambaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            num_experts=4,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,
            attn_layer_offset=1,
            mamba_d_state=8,
            mamba_dt_rank=8,
        )
    )
    factors = edit_factors(model, LiNeS(0.2, 0.6))
    for name, factor in factors.items():
        if name.startswith("model.layers.0."):  # the Mamba layer, A_log and conv1d included
            assert factor == pytest.approx(0.2), name
        elif name.startswith("model.layers.1."):  # the attention layer, its fused experts and router included
            assert factor == pytest.approx(0.8), name
        else:
            assert factor == pytest.approx(0.2), name
    assert factors["model.layers.1.feed_forward.experts.gate_up_proj"] == pytest.approx(0.8)
