"""Half Fine-Tuning: the paper's per-block selection, frozen tensors that stay put, re-draws, resets, resume, DDP."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from process_launch import run_ranks, run_script
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lit_mofo.callbacks.half_finetuning import HalfFineTuning
from lit_mofo.data import ResumableDataLoader
from lit_mofo.optim.mofo import MoFO
from lit_mofo.snapshot import PretrainedSnapshot

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tiny_lm import synthetic_progressions  # noqa: E402

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}


# ---------------------------------------------------------------------------------------------------- fixtures
class LM(pl.LightningModule):
    """Any transformers model that takes ``input_ids`` and ``labels``, trained with AdamW (or MoFO)."""

    def __init__(self, model: nn.Module, optimizer: str = "adamw", lr: float = 1e-2, weight_decay: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "mofo":
            return MoFO(self.parameters(), lr=self.lr, fraction=0.5, weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def tiny_llama(layers: int = 4) -> nn.Module:
    config = transformers.LlamaConfig(**SMALL, num_hidden_layers=layers, num_key_value_heads=2, vocab_size=128)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(layers: int = 4) -> nn.Module:
    config = transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def tiny_neox(layers: int = 4) -> nn.Module:
    return transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**SMALL, num_hidden_layers=layers, vocab_size=128)
    )


def tiny_bert(layers: int = 4) -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(**SMALL, num_hidden_layers=layers, vocab_size=128))


def loader(batches: int = 8, repeat: bool = False) -> ResumableDataLoader:
    """``batches`` batches of 4 progressions; with ``repeat`` every batch is the same one (position-independent).
    Resumable, as lit_mofo recommends: a fit resumed mid-epoch continues at the next batch."""
    tokens = (
        synthetic_progressions(4, 16, 128).repeat(batches, 1)
        if repeat
        else synthetic_progressions(4 * batches, 16, 128)
    )
    return ResumableDataLoader(TensorDataset(tokens), batch_size=4)


def trainer(max_steps: int, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "deterministic": True,
    }
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, **{**defaults, **kwargs})


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class DrawRecorder(pl.Callback):
    """Listed after HFT: per step, the selection it trained with (HFT re-draws when the step's batch starts), the
    optimizer state right after that draw and after the step, and what the step changed."""

    def __init__(self, hft: HalfFineTuning) -> None:
        self.hft = hft
        self.frozen: list[tuple[str, ...]] = []  # the selection each step trained with
        self.changed: list[set[str]] = []
        self.requires_grad_at_step: list[dict[str, bool]] = []
        self.grad_at_step: list[dict[str, bool]] = []
        self.state_at_start: list[set[str]] = []  # names with optimizer state when the step starts, after the draw
        self.state_after: list[dict[str, dict[str, Tensor]]] = []
        self._before: dict[str, Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._before = snapshot(pl_module)
        self.frozen.append(self.hft.frozen_names)
        state = trainer.optimizers[0].state
        self.state_at_start.append({name for name, p in pl_module.named_parameters() if p in state})

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.requires_grad_at_step.append({name: p.requires_grad for name, p in pl_module.named_parameters()})
        self.grad_at_step.append({name: p.grad is not None for name, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        after = dict(pl_module.named_parameters())
        self.changed.append({name for name, p in after.items() if not torch.equal(p, self._before[name])})
        optimizer = trainer.optimizers[0]
        self.state_after.append(
            {
                name: {key: value.clone() for key, value in optimizer.state[p].items() if isinstance(value, Tensor)}
                for name, p in after.items()
                if p in optimizer.state
            }
        )


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))


def block_counts(hft: HalfFineTuning) -> list[dict[str, int]]:
    """Per block: how many attention/FFN matrices and norm layers are frozen."""
    assert hft.layout is not None
    frozen = set(hft.frozen_names)
    return [
        {
            "attention": sum(name in frozen for name in block.attention),
            "ffn": sum(name in frozen for name in block.ffn),
            "norm": sum(group[0] in frozen for group in block.norm_modules),
        }
        for block in hft.layout.blocks
    ]


def fit(module: pl.LightningModule, hft: HalfFineTuning, steps: int = 3, **kwargs: Any) -> DrawRecorder:
    recorder = DrawRecorder(hft)
    trainer(steps, [hft, recorder], **kwargs).fit(module, loader())
    return recorder


# ---------------------------------------------------------------------------------------------------- selection
# builder, attention frozen per block, FFN frozen per block (set over the blocks), norms frozen per block
PAPER_COUNTS = [
    (tiny_llama, {2}, [1, 1, 2, 2], 1),  # 2 of {q,k,v,o}; half the blocks freeze 2 of {gate,up,down}, half 1
    (tiny_gpt2, {1}, [1, 1, 1, 1], 1),  # 1 of {c_attn, c_proj}; 1 of {c_fc, c_proj}
    (tiny_neox, {1}, [1, 1, 1, 1], 1),  # 1 of {query_key_value, dense}; 1 of {h_to_4h, 4h_to_h}
    (tiny_bert, {2}, [1, 1, 1, 1], 1),  # 2 of {query, key, value, output}; 1 of {intermediate, output}
]


@pytest.mark.parametrize(
    ("builder", "attention", "ffn", "norms"), PAPER_COUNTS, ids=lambda v: getattr(v, "__name__", None)
)
def test_category_level_freezes_the_papers_share_of_each_category_per_block(
    builder: Callable[[], nn.Module], attention: set[int], ffn: list[int], norms: int
) -> None:
    torch.manual_seed(0)
    module = LM(builder())
    hft = HalfFineTuning(seed=3)
    fit(module, hft, steps=1)
    counts = block_counts(hft)
    assert len(counts) == 4
    assert {c["attention"] for c in counts} == attention
    assert sorted(c["ffn"] for c in counts) == ffn
    assert all(c["norm"] == norms for c in counts)
    layout = hft.layout
    assert layout is not None
    frozen = set(hft.frozen_names)
    # Embeddings, head and everything outside the blocks train; biases and norm biases follow their matrix/norm.
    assert not frozen & {*layout.embeddings, *layout.head, *layout.other}
    for block in layout.blocks:
        for matrix, bias in block.biases:
            assert (matrix in frozen) == (bias in frozen)
        for group in block.norm_modules:
            assert len({name in frozen for name in group}) == 1


def test_selections_differ_between_blocks_and_seeds_but_repeat_for_a_seed() -> None:
    def frozen(seed: int) -> tuple[str, ...]:
        hft = HalfFineTuning(seed=seed)
        fit(LM(tiny_llama(8)), hft, steps=1)
        return hft.frozen_names

    assert frozen(1) == frozen(1)
    assert frozen(1) != frozen(2)
    hft = HalfFineTuning(seed=1)
    fit(LM(tiny_llama(8)), hft, steps=1)
    patterns = {
        tuple(n.split("layers.")[1].split(".", 1)[1] for n in hft.frozen_names if f"layers.{b}." in n) for b in range(8)
    }
    assert len(patterns) > 1, "every block froze the same matrices"


def test_layer_level_freezes_half_the_blocks_whole() -> None:
    hft = HalfFineTuning(granularity="layer", seed=0)
    fit(LM(tiny_llama(4)), hft, steps=1)
    assert hft.layout is not None
    frozen = set(hft.frozen_names)
    whole = [set(block.parameters) <= frozen for block in hft.layout.blocks]
    untouched = [not set(block.parameters) & frozen for block in hft.layout.blocks]
    assert sum(whole) == 2 and sum(untouched) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tensor_level_freezes_half_of_the_parameters_in_whole_units_anywhere(seed: int) -> None:
    module = LM(tiny_gpt2(4))
    hft = HalfFineTuning(granularity="tensor", seed=seed)
    fit(module, hft, steps=1)
    layout = hft.layout
    assert layout is not None
    frozen = set(hft.frozen_names)
    params = dict(module.named_parameters())
    # units: 4 matrices (with their biases) + 2 norm layers per block, and the final norm layer outside the blocks
    units = [(m, *b.bias_of(m)) for b in layout.blocks for m in (*b.attention, *b.ffn)]
    units += [group for b in layout.blocks for group in b.norm_modules]
    units.append(("model.transformer.ln_f.weight", "model.transformer.ln_f.bias"))
    assert {name for unit in units for name in unit} >= frozen
    assert all(len({name in frozen for name in unit}) == 1 for unit in units)  # whole units
    sizes = [sum(params[name].numel() for name in unit) for unit in units]
    frozen_numel = sum(params[name].numel() for name in frozen)
    # half of the parameters by count, within half of the largest unit (the mix of matrix sizes makes unit counts
    # a poor measure: c_fc holds 4x the entries of the attention c_proj)
    assert abs(frozen_numel - sum(sizes) / 2) <= max(sizes) / 2
    assert hft.history[0]["drawn_frozen_fraction"] == pytest.approx(frozen_numel / sum(sizes))
    assert not frozen & set(layout.embeddings)


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_other_ratios_spread_the_fractional_share_over_blocks(ratio: float) -> None:
    hft = HalfFineTuning(ratio=ratio, seed=0)
    fit(LM(tiny_llama(4)), hft, steps=1)
    counts = block_counts(hft)
    share = 1 - ratio
    assert sum(c["attention"] for c in counts) == round(4 * 4 * share)
    assert sum(c["ffn"] for c in counts) == round(4 * 3 * share)
    assert {c["ffn"] for c in counts} <= {int(3 * share), int(3 * share) + 1}


def test_embeddings_and_head_can_be_frozen_and_patterns_override_the_draw() -> None:
    hft = HalfFineTuning(
        train_embeddings=False,
        train_head=False,
        always_trainable=["norm", r"re:layers\.0\."],
        always_frozen=[r"re:\.norm\."],
        seed=0,
    )
    fit(LM(tiny_llama(4)), hft, steps=1)
    frozen = set(hft.frozen_names)
    assert {"model.model.embed_tokens.weight", "model.lm_head.weight", "model.model.norm.weight"} <= frozen
    assert not any("layernorm" in name or "layers.0." in name for name in frozen)


def test_unknown_blocks_use_the_generic_rule_with_a_warning_naming_what_was_found() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.attn = nn.ModuleDict({"a": nn.Linear(16, 16), "b": nn.Linear(16, 16)})
            self.mix1, self.mix2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x: Tensor) -> Tensor:
            x = x + self.attn["b"](self.attn["a"](self.norm(x)))
            return x + self.mix2(torch.relu(self.mix1(x)))

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(128, 16)
            self.layers = nn.ModuleList(Block() for _ in range(4))
            self.out = nn.Linear(16, 128)

        def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
            x = self.embed(batch[0])
            for layer in self.layers:
                x = layer(x)
            return nn.functional.cross_entropy(self.out(x).flatten(0, 1), batch[0].flatten())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Plain()
    before = snapshot(module)
    hft = HalfFineTuning(seed=0)
    with pytest.warns(UserWarning, match=r"generic rule: 4 blocks \('layers.0', ...\), attention .*\(2 in the first"):
        fit(module, hft, steps=2)
    assert [c["attention"] for c in block_counts(hft)] == [1, 1, 1, 1]
    assert [c["ffn"] for c in block_counts(hft)] == [1, 1, 1, 1]
    assert "out.weight" not in hft.frozen_names  # the head onto the vocabulary trains
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) == (name in hft.frozen_names), name


def test_a_model_without_blocks_gets_a_random_half_of_its_tensors_with_a_warning() -> None:
    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*(nn.Linear(8, 8) for _ in range(6)))

        def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
            return self.net(batch[0].float()[:, :8]).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    hft = HalfFineTuning(seed=0)
    with pytest.warns(UserWarning, match=r"found no transformer blocks .*\(tensor level\)"):
        fit(MLP(), hft, steps=1)
    assert len(hft.frozen_names) == 6  # 3 of the 6 Linear layers, weight and bias
    assert len({name.split(".")[1] for name in hft.frozen_names}) == 3


class UnevenMLP(pl.LightningModule):
    """Three layers of very different sizes: no block stack, so HFT falls back to the tensor level."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 64), nn.Linear(64, 64), nn.Linear(64, 8))

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        return self.net(batch[0].float()[:, :8]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("seed", range(6))
def test_the_fallback_for_a_model_without_blocks_freezes_its_share_of_the_parameters_not_of_the_layers(
    seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    module = UnevenMLP()
    sizes = {f"net.{i}": sum(p.numel() for p in layer.parameters()) for i, layer in enumerate(module.net)}
    hft = HalfFineTuning(seed=seed)
    with pytest.warns(UserWarning, match=r"about 50% of their parameters are frozen \(tensor level\)"):
        with caplog.at_level(logging.INFO):
            fit(module, hft, steps=1)
    frozen_layers = {name.rsplit(".", 1)[0] for name in hft.frozen_names}
    frozen = sum(sizes[layer] for layer in frozen_layers)
    # 72 + 576 + 4160 + 520 entries: the closest whole-layer halves are 4160 alone (78%) or the other three (22%)
    assert abs(frozen - sum(sizes.values()) / 2) <= max(sizes.values()) / 2
    assert hft.trainable_fraction == pytest.approx(1 - frozen / sum(sizes.values()))
    reached = f"{frozen / sum(sizes.values()):.1%} of the parameters it draws from (50% asked)"
    assert any(reached in record.getMessage() for record in caplog.records)  # the summary says what it did


class Seq2Seq(pl.LightningModule):
    """``torch.nn.Transformer``: an encoder stack and a decoder stack of two different block classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.Transformer(
            d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32, batch_first=True
        )

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x = batch[0].float()[:, :, None].expand(-1, -1, 16) / 128
        return self.transformer(x, x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_an_encoder_and_a_decoder_of_different_block_classes_are_both_drawn_from() -> None:
    module = Seq2Seq()
    before = snapshot(module)
    hft = HalfFineTuning(seed=0)
    with pytest.warns(UserWarning, match="generic rule: 4 blocks"):
        fit(module, hft, steps=2)
    assert hft.layout is not None
    assert [block.name for block in hft.layout.blocks] == [
        "transformer.encoder.layers.0",
        "transformer.encoder.layers.1",
        "transformer.decoder.layers.0",
        "transformer.decoder.layers.1",
    ]
    # encoder blocks: 1 of 2 attention matrices (fused in_proj, out_proj), 1 of 2 FFN matrices, 1 of 2 norms;
    # decoder blocks: 2 of 4 attention matrices (self and cross attention), 1 of 2 FFN matrices, 1-2 of 3 norms
    counts = block_counts(hft)
    assert [c["attention"] for c in counts] == [1, 1, 2, 2]
    assert [c["ffn"] for c in counts] == [1, 1, 1, 1]
    assert [c["norm"] for c in counts[:2]] == [1, 1] and sum(c["norm"] for c in counts[2:]) == 3
    encoder_frozen = [name for name in hft.frozen_names if name.startswith("transformer.encoder.layers.")]
    assert len(encoder_frozen) == 2 * (2 + 2 + 2)  # per block a matrix+bias of each category and a norm layer
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) == (name in hft.frozen_names), name


# ---------------------------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("optimizer", ["adamw", "mofo"])
@pytest.mark.parametrize("mode", ["freeze", "mask"])
def test_frozen_tensors_stay_bit_identical_despite_weight_decay_and_the_rest_moves(mode: str, optimizer: str) -> None:
    torch.manual_seed(0)
    module = LM(tiny_llama(2), optimizer=optimizer, weight_decay=0.1)
    before = snapshot(module)
    hft = HalfFineTuning(mode=mode, seed=0)
    recorder = fit(module, hft, steps=3)
    frozen = set(hft.frozen_names)
    assert frozen
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) == (name in frozen), name
    for requires_grad, has_grad in zip(recorder.requires_grad_at_step, recorder.grad_at_step, strict=True):
        assert not any(has_grad[name] for name in frozen)  # no gradient reaches the optimizer
        if mode == "freeze":  # backward computed no weight gradient for them
            assert {name for name, flag in requires_grad.items() if not flag} == frozen
        else:
            assert all(requires_grad.values())
    assert all(p.requires_grad for p in module.parameters()), "flags are restored at the end of fit"


def test_gradients_are_dropped_before_gradient_clipping_sees_them() -> None:
    with_grad_at_clipping: list[set[str]] = []

    class Clip(LM):
        def configure_gradient_clipping(
            self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
        ) -> None:
            with_grad_at_clipping.append({name for name, p in self.named_parameters() if p.grad is not None})
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    hft = HalfFineTuning(mode="mask", seed=0)
    fit(Clip(tiny_llama(2)), hft, steps=2, gradient_clip_val=1.0)
    assert len(with_grad_at_clipping) == 2
    for names in with_grad_at_clipping:
        assert names and not names & set(hft.frozen_names)  # so the clipping norm is that of the trainable half


def test_trainable_fraction_is_logged_and_kept_in_the_callback_state(caplog: pytest.LogCaptureFixture) -> None:
    logger = MemoryLogger()
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2)
    module = LM(tiny_llama(2))
    with caplog.at_level(logging.DEBUG, logger="lit_mofo.callbacks.half_finetuning"):
        fit(module, hft, steps=5, logger=logger, log_every_n_steps=1)
    logged = [(step, m["hft/trainable_fraction"]) for step, m in logger.metrics if "hft/trainable_fraction" in m]
    assert [step for step, _ in logged] == [0, 2, 4]
    assert [entry["trainable_fraction"] for entry in hft.history] == [fraction for _, fraction in logged]
    params = dict(module.named_parameters())
    counted = sum(params[name].numel() for name in hft.trainable_names) / sum(p.numel() for p in params.values())
    assert hft.trainable_fraction == pytest.approx(counted)
    assert 0.45 < hft.trainable_fraction < 0.75  # embeddings and head (tiny vocab) train on top of half the blocks
    assert any("Trainable: ['model.model.embed_tokens.weight'" in record.message for record in caplog.records)


# ---------------------------------------------------------------------------------------------------- re-draws
def test_redraws_every_n_steps_follow_the_schedule_and_repeat_for_a_seed() -> None:
    def run(seed: int) -> tuple[HalfFineTuning, DrawRecorder]:
        hft = HalfFineTuning(seed=seed, redraw_every_n_steps=3)
        return hft, fit(LM(tiny_llama(2)), hft, steps=7)

    hft, recorder = run(5)
    assert [entry["step"] for entry in hft.history] == [0, 3, 6]
    selections = recorder.frozen
    assert [i for i in range(1, 7) if selections[i] != selections[i - 1]] == [3, 6]
    # steps trained under one selection never moved its frozen tensors
    for frozen, changed in zip(recorder.frozen, recorder.changed, strict=True):
        assert not set(frozen) & changed
    _, recorder_again = run(5)
    assert recorder_again.frozen == selections
    _, other = run(6)
    assert other.frozen != selections


@pytest.mark.parametrize("mode", ["freeze", "mask"])
def test_redraws_count_optimizer_steps_under_gradient_accumulation(mode: str) -> None:
    hft = HalfFineTuning(mode=mode, seed=0, redraw_every_n_steps=2)
    recorder = DrawRecorder(hft)
    trainer(5, [hft, recorder], accumulate_grad_batches=2).fit(LM(tiny_llama(2)), loader(batches=10))
    assert [entry["step"] for entry in hft.history] == [0, 2, 4]
    # a selection holds for whole accumulation windows: batches 0-3 under the first draw, 4-7 under the second
    assert recorder.frozen[0] == recorder.frozen[3] != recorder.frozen[4] == recorder.frozen[7] != recorder.frozen[8]
    for frozen, changed in zip(recorder.frozen, recorder.changed, strict=True):
        assert not set(frozen) & changed


def test_redraws_every_n_epochs_happen_at_epoch_starts() -> None:
    hft = HalfFineTuning(seed=0, redraw_every_n_epochs=2)
    recorder = DrawRecorder(hft)
    trainer(-1, [hft, recorder], max_epochs=5).fit(LM(tiny_llama(2)), loader(batches=2))
    assert [(entry["epoch"], entry["step"]) for entry in hft.history] == [(0, 0), (2, 4), (4, 8)]


def test_a_step_redraw_happens_when_the_steps_batch_starts_and_never_after_the_last_step() -> None:
    seen_at_batch_end: list[tuple[str, ...]] = []

    class AtBatchEnd(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            seen_at_batch_end.append(hft.frozen_names)

    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2)
    recorder = DrawRecorder(hft)
    trainer(4, [AtBatchEnd(), hft, recorder]).fit(LM(tiny_llama(2)), loader())
    assert [entry["step"] for entry in hft.history] == [0, 2]
    # what runs at the end of step s, before or after the callback, sees the selection step s trained with
    assert seen_at_batch_end == recorder.frozen


@pytest.mark.parametrize("granularity", ["category", "tensor"])
def test_the_default_seed_is_seed_everythings_whatever_seeds_the_global_rng(
    granularity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def draw(seed: int | None, global_seed: int) -> tuple[str, ...]:
        torch.manual_seed(global_seed)  # what a module's __init__ may do; it must not change the draw
        module = LM(tiny_llama(8))
        hft = HalfFineTuning(seed=seed, granularity=granularity)
        fit(module, hft, steps=1)
        return hft.frozen_names

    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what pl.seed_everything(5) sets
    assert draw(None, 1) == draw(None, 2) == draw(5, 3)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert draw(None, 1) == draw(None, 2) == draw(0, 3)  # without seed_everything: seed 0
    assert draw(0, 3) != draw(5, 3)


def test_each_fit_is_a_stage_that_draws_anew() -> None:
    hft = HalfFineTuning(seed=0)
    module = LM(tiny_llama(4))
    fit(module, hft, steps=1)
    first = hft.frozen_names
    fit(module, hft, steps=1)
    assert hft.frozen_names != first
    assert len(hft.history) == 2


def test_reset_restores_pretrained_values_when_a_redraw_freezes_a_tensor() -> None:
    torch.manual_seed(0)
    module = LM(tiny_llama(4))
    theta0 = snapshot(module)
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2, reset=True, snapshot_dtype="float32")
    recorder = fit(module, hft, steps=7)
    assert [entry["step"] for entry in hft.history] == [0, 2, 4, 6]
    # every tensor frozen now was either frozen since its last reset or reset at the last draw: all equal theta0
    params = dict(module.named_parameters())
    for name in hft.frozen_names:
        assert torch.equal(params[name], theta0[name]), name
    trained = set(recorder.changed[0]) | set(recorder.changed[1])
    refrozen = trained & set(recorder.frozen[2])
    assert refrozen, "the draw at step 2 froze some tensor trained before"
    assert all(torch.equal(params[name], theta0[name]) for name in refrozen & set(hft.frozen_names))


def test_without_reset_a_refrozen_tensor_keeps_its_trained_value() -> None:
    torch.manual_seed(0)
    module = LM(tiny_llama(4))
    theta0 = snapshot(module)
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2)
    recorder = fit(module, hft, steps=4)
    refrozen = (set(recorder.changed[0]) | set(recorder.changed[1])) & set(recorder.frozen[2]) & set(recorder.frozen[3])
    params = dict(module.named_parameters())
    assert refrozen and all(not torch.equal(params[name], theta0[name]) for name in refrozen)


# ---------------------------------------------------------------------------------------------------- optimizer state
def test_keep_leaves_frozen_state_untouched_and_a_returning_tensor_continues_from_it() -> None:
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2, optimizer_state="keep")
    recorder = fit(LM(tiny_llama(4)), hft, steps=6)
    # trained in steps 0-1, frozen in steps 2-3 (draw at step 2), trainable again in steps 4-5
    frozen_then_back = set(recorder.frozen[2]) - set(recorder.frozen[0]) - set(recorder.frozen[4])
    assert frozen_then_back
    for name in frozen_then_back:
        before, during = recorder.state_after[1][name], recorder.state_after[3][name]
        assert all(torch.equal(before[key], during[key]) for key in before), name
        assert recorder.state_after[5][name]["step"].item() == 4  # 2 steps before, 2 after: moments carried on


def test_reset_frees_the_state_of_frozen_tensors_and_restarts_returning_ones() -> None:
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2, optimizer_state="reset")
    module = LM(tiny_llama(4))
    recorder = fit(module, hft, steps=6)
    names = {name for name, _ in module.named_parameters()}
    assert [entry["step"] for entry in hft.history] == [0, 2, 4]  # no draw after the last step
    for step in (2, 4):  # right after each re-draw, when the step's batch starts
        trained = names - set(recorder.frozen[step - 1])
        assert recorder.state_at_start[step] == trained - set(recorder.frozen[step])  # only tensors that train next
    back = set(recorder.frozen[2]) - set(recorder.frozen[0]) - set(recorder.frozen[4])
    assert back
    for name in back:  # trained 2 steps, frozen (state freed), trained again: the moments started over
        assert name not in recorder.state_after[3]
        assert recorder.state_after[4][name]["step"].item() == 1


class Filtered(LM):
    """``configure_optimizers`` takes only the parameters that require grad, as many modules do."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_an_optimizer_over_the_trainable_parameters_only_is_all_the_callback_needs() -> None:
    # Changed on purpose: this used to be refused, because HFT trained the tensors the module froze.
    module = Filtered(tiny_llama(2))
    module.model.model.embed_tokens.weight.requires_grad_(False)
    before = snapshot(module)
    hft = HalfFineTuning(seed=0)
    fit(module, hft, steps=2)
    assert torch.equal(module.model.model.embed_tokens.weight, before["model.model.embed_tokens.weight"])
    assert hft.left_frozen_names == ("model.model.embed_tokens.weight",)


def test_a_trainable_parameter_in_no_optimizer_is_refused_with_the_fixes() -> None:
    class Partial(LM):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for n, p in self.named_parameters() if "embed" not in n], lr=1e-3)

    with pytest.raises(
        MisconfigurationException, match=r"1 of them .*in no optimizer \(e.g. 'model.model.embed_tokens.weight'\)"
    ):
        fit(Partial(tiny_llama(2)), HalfFineTuning(), steps=1)
    # naming it in always_frozen keeps it out of the draw
    hft = HalfFineTuning(always_frozen=["re:embed_tokens"])
    fit(Partial(tiny_llama(2)), hft, steps=1)
    assert "model.model.embed_tokens.weight" in hft.frozen_names


# ---------------------------------------------------------------------------------------------------- user-frozen
class PartlyFrozen(LM):
    """Froze its embeddings and its first block, as a user who fine-tunes only the upper layers does."""

    def __init__(self, layers: int = 4, **kwargs: Any) -> None:
        torch.manual_seed(0)
        super().__init__(tiny_llama(layers), **kwargs)
        self.model.model.embed_tokens.requires_grad_(False)
        self.model.model.layers[0].requires_grad_(False)

    @property
    def user_frozen(self) -> set[str]:
        return {name for name, p in self.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("mode", ["freeze", "mask"])
def test_tensors_the_module_froze_stay_frozen_untouched_and_outside_the_draw(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    module = PartlyFrozen()
    user_frozen = module.user_frozen
    assert len(user_frozen) == 10  # the embedding and block 0's 7 matrices and 2 norms
    before = snapshot(module)
    hft = HalfFineTuning(mode=mode, seed=0, redraw_every_n_steps=2)
    with caplog.at_level(logging.INFO):
        recorder = fit(module, hft, steps=5)
    assert set(hft.left_frozen_names) == user_frozen
    for name in user_frozen:
        assert torch.equal(dict(module.named_parameters())[name], before[name]), name
    for requires_grad in recorder.requires_grad_at_step:  # never unfrozen, not even for a step
        assert not any(requires_grad[name] for name in user_frozen)
    assert all(not set(frozen) & user_frozen for frozen in recorder.frozen)  # the draws pick among the others
    # per block, the paper's shares among the blocks the module left trainable; block 0 is not drawn from
    counts = block_counts(hft)
    assert counts[0] == {"attention": 0, "ffn": 0, "norm": 0}
    assert all(c["attention"] == 2 and c["norm"] == 1 for c in counts[1:])
    assert sum(c["ffn"] for c in counts[1:]) == 5  # 3 blocks x 1.5 FFN matrices, rounded half up
    # honest figures: the share of all parameters that train, the module's frozen ones counting as frozen
    params = dict(module.named_parameters())
    trains = sum(params[name].numel() for name in params if name not in user_frozen | set(hft.frozen_names))
    assert hft.trainable_fraction == pytest.approx(trains / sum(p.numel() for p in params.values()))
    assert set(hft.trainable_names) == set(params) - user_frozen - set(hft.frozen_names)
    messages = [record.getMessage() for record in caplog.records]
    assert any(
        "leaves alone the 10 of 39 parameter tensors" in m
        and "requires_grad=False at the start of fit" in m
        and "embed_tokens" in m
        for m in messages
    ), messages
    assert {name for name, p in module.named_parameters() if not p.requires_grad} == user_frozen  # flags restored


def test_a_module_with_every_parameter_frozen_is_refused_before_training() -> None:
    module = LM(tiny_llama(2))
    module.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match=r"HalfFineTuning: no parameter of LM is trainable: all 21 .*"):
        fit(module, HalfFineTuning(), steps=1)
    assert not any(p.requires_grad for p in module.parameters())  # nothing was unfrozen


def test_always_trainable_never_unfreezes_what_the_module_froze() -> None:
    module = PartlyFrozen(layers=2)
    user_frozen = module.user_frozen
    hft = HalfFineTuning(always_trainable=[r"re:layers\.0\.", "embedding"], seed=0)
    recorder = fit(module, hft, steps=1)
    assert not any(recorder.requires_grad_at_step[0][name] for name in user_frozen)


def test_freezing_the_whole_drawn_part_leaves_nothing_to_draw_with_a_warning() -> None:
    module = LM(tiny_llama(2))
    for layer in module.model.model.layers:
        layer.requires_grad_(False)
    hft = HalfFineTuning(seed=0)
    with pytest.warns(UserWarning, match=r"nothing to draw"):
        fit(module, hft, steps=1)
    assert hft.frozen_names == ()


# ---------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize(
    "options",
    [
        {"mode": "freeze", "reset": True, "optimizer_state": "reset"},
        pytest.param({"mode": "mask", "optimizer_state": "keep"}, marks=pytest.mark.slow),
        pytest.param({"mode": "freeze", "granularity": "layer"}, marks=pytest.mark.slow),
    ],
    ids=["freeze-reset", "mask-keep", "layer"],
)
# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_run_resumed_mid_run_ends_with_the_weights_of_an_uninterrupted_run(
    options: dict[str, Any], tmp_path: Path
) -> None:
    def run(
        steps: int, ckpt_path: str | None = None, save_every: int | None = None
    ) -> tuple[LM, HalfFineTuning, DrawRecorder]:
        torch.manual_seed(0)
        module = LM(tiny_llama(2))
        hft = HalfFineTuning(seed=7, redraw_every_n_steps=3, **options)
        recorder = DrawRecorder(hft)
        callbacks: list[pl.Callback] = [hft, recorder]
        if save_every:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_every, save_top_k=-1))
        trainer(steps, callbacks, enable_checkpointing=bool(save_every)).fit(
            module, loader(batches=20, repeat=True), ckpt_path=ckpt_path
        )
        return module, hft, recorder

    full, full_hft, full_recorder = run(10)  # draws at steps 0, 3, 6, 9
    run(4, save_every=4)  # a checkpoint between two draws
    resumed, resumed_hft, recorder = run(10, ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert resumed_hft.history == full_hft.history
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    # from step 4 on, the resumed run trained with the same selections and the same requires_grad flags
    assert recorder.frozen == full_recorder.frozen[4:]
    assert recorder.requires_grad_at_step == full_recorder.requires_grad_at_step[4:]
    if options["mode"] == "freeze":
        assert {name for name, flag in recorder.requires_grad_at_step[0].items() if not flag} == set(recorder.frozen[0])


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_checkpoint_written_at_a_redraw_step_resumes_into_the_same_draw_and_reset(tmp_path: Path) -> None:
    def run(steps: int, ckpt_path: str | None = None, save_at: int | None = None) -> tuple[LM, HalfFineTuning]:
        torch.manual_seed(0)
        module = LM(tiny_llama(2))
        hft = HalfFineTuning(seed=7, redraw_every_n_steps=3, reset=True)
        callbacks: list[pl.Callback] = [hft]
        if save_at:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=save_at, save_top_k=-1))
        trainer(steps, callbacks, enable_checkpointing=bool(save_at)).fit(
            module, loader(batches=20, repeat=True), ckpt_path=ckpt_path
        )
        return module, hft

    full, full_hft = run(8)  # draws at steps 0, 3, 6
    run(3, save_at=3)  # written at the end of step 3: the draw for step 3 on has not happened yet
    saved = torch.load(tmp_path / "epoch=0-step=3.ckpt", weights_only=False)
    (state,) = [value for key, value in saved["callbacks"].items() if "HalfFineTuning" in key]
    assert state["draws"] == 1
    resumed, resumed_hft = run(8, ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt"))
    assert resumed_hft.history == full_hft.history
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_state_dict_holds_selection_counters_and_generator_state() -> None:
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2)
    fit(LM(tiny_llama(2)), hft, steps=3)
    state = hft.state_dict()
    assert state["frozen"] == list(hft.frozen_names)
    assert (state["draws"], state["last_draw_step"], state["seed"]) == (2, 2, 0)
    clone = HalfFineTuning(seed=0, redraw_every_n_steps=2)
    clone.load_state_dict(state)
    assert clone.frozen_names == hft.frozen_names and clone.history == hft.history
    assert torch.equal(clone.state_dict()["generator"], state["generator"])


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_resuming_with_reset_from_a_checkpoint_without_pretrained_values_is_refused(tmp_path: Path) -> None:
    module = LM(tiny_llama(2))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    trainer(2, [HalfFineTuning(seed=0), checkpoint], enable_checkpointing=True).fit(module, loader())
    hft = HalfFineTuning(seed=0, redraw_every_n_steps=2, reset=True)
    resumed = LM(tiny_llama(2))
    with pytest.raises(MisconfigurationException, match="holds no pre-trained values"):
        trainer(4, [hft]).fit(resumed, loader(), ckpt_path=checkpoint.best_model_path)
    assert PretrainedSnapshot.get(resumed) is None  # the failed fit let go of the snapshot


# ---------------------------------------------------------------------------------------------------- strategies
def ddp_trainer(strategy: str | DDPStrategy) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_progress_bar=False)


def test_freeze_under_ddp_without_find_unused_parameters_names_the_fix() -> None:
    module = LM(tiny_llama(2))
    with pytest.raises(MisconfigurationException, match=r'strategy="ddp_find_unused_parameters_true"'):
        HalfFineTuning(mode="freeze").setup(ddp_trainer("ddp"), module, "fit")
    with pytest.raises(MisconfigurationException, match=r'mode="mask"'):
        HalfFineTuning(mode="freeze").setup(ddp_trainer(DDPStrategy()), module, "fit")
    HalfFineTuning(mode="freeze").setup(ddp_trainer("ddp_find_unused_parameters_true"), module, "fit")
    HalfFineTuning(mode="mask").setup(ddp_trainer("ddp"), module, "fit")


def test_static_graph_with_redraws_in_freeze_mode_is_refused() -> None:
    def strategy() -> DDPStrategy:
        return DDPStrategy(find_unused_parameters=True, static_graph=True)

    with pytest.raises(MisconfigurationException, match="static_graph=True"):
        HalfFineTuning(mode="freeze", redraw_every_n_steps=10).setup(ddp_trainer(strategy()), LM(tiny_llama(2)), "fit")
    HalfFineTuning(mode="freeze").setup(ddp_trainer(strategy()), LM(tiny_llama(2)), "fit")  # one draw: fine
    HalfFineTuning(mode="mask", redraw_every_n_steps=10).setup(ddp_trainer(strategy()), LM(tiny_llama(2)), "fit")


@pytest.mark.parametrize(
    ("strategy_class", "message"),
    [
        (FSDPStrategy, "FSDP1 flattens the parameters"),
        (DeepSpeedStrategy, "DeepSpeed partitions its own flat fp32 buffers"),
    ],
)
def test_flattening_strategies_are_refused_with_the_reason_and_the_fix(strategy_class: type, message: str) -> None:
    # FSDP2 (ModelParallelStrategy without tensor parallelism) is supported: tests/test_fsdp2_callbacks.py.
    stand_in = SimpleTrainer(strategy_class.__new__(strategy_class))  # constructing some needs a GPU or deepspeed
    with pytest.raises(MisconfigurationException, match=rf"{message}.*ModelParallelStrategy\(data_parallel_size=N"):
        HalfFineTuning().setup(stand_in, LM(tiny_llama(2)), "fit")  # type: ignore[arg-type]


class SimpleTrainer:
    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.callbacks: list[pl.Callback] = []


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 0.0}, r"ratio=0.0.*in \(0, 1\)"),
        ({"ratio": 1.0}, r"ratio=1.0.*in \(0, 1\)"),
        ({"ratio": 1.5}, r"ratio=1.5"),
        ({"ratio": -0.5}, r"ratio=-0.5"),
        ({"granularity": "block"}, r"granularity='block'.*\('category', 'layer', 'tensor'\)"),
        ({"mode": "zero"}, r"mode='zero'.*\('freeze', 'mask'\)"),
        ({"optimizer_state": "clear"}, r"optimizer_state='clear'.*\('keep', 'reset'\)"),
        ({"redraw_every_n_steps": 0}, r"redraw_every_n_steps=0.*positive integer"),
        ({"redraw_every_n_epochs": 1.5}, r"redraw_every_n_epochs=1.5.*positive integer"),
        ({"reset": True}, r"reset=True.*neither `redraw_every_n_steps` nor `redraw_every_n_epochs`"),
        ({"always_trainable": ["("]}, r"always_trainable=.*'\('.*regular expression"),
        ({"always_trainable": ["ffn"], "always_frozen": ["ffn"]}, r"\['ffn'\] are in both"),
        ({"snapshot_dtype": "int8"}, r"snapshot_dtype='int8'.*'bfloat16'"),
        ({"seed": "0"}, r"seed='0'"),
        ({"seed": -1}, r"seed=-1 is invalid; the valid range is an integer >= 0"),
        ({"ratio": "0.5"}, r"ratio='0.5' is invalid"),
        ({"ratio": True}, r"ratio=True is invalid"),
        ({"ratio": float("nan")}, r"ratio=nan is invalid"),
        ({"redraw_every_n_steps": "10"}, r"redraw_every_n_steps='10' is invalid.*positive integer"),
        ({"redraw_every_n_steps": True}, r"redraw_every_n_steps=True is invalid"),
        ({"reset": "false", "redraw_every_n_steps": 2}, r"reset='false' is invalid.*without quotes in YAML"),
        ({"train_embeddings": "no"}, r"train_embeddings='no' is invalid; the valid range is True or False"),
        ({"train_head": 0}, r"train_head=0 is invalid"),
        ({"mode": True}, r"mode=True is invalid"),
        ({"always_frozen": [3]}, r"always_frozen=\[3\] is invalid.*Entry 3 is not a string"),
        ({"snapshot_dtype": torch.int64}, r"snapshot_dtype=torch.int64 is invalid"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value_and_the_choices(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        HalfFineTuning(**kwargs)


def test_a_pattern_that_matches_nothing_is_warned_about_with_an_example_name() -> None:
    # One policy for every callback and helper (lit_mofo.params.warn_unmatched): warned about, never an error.
    with pytest.warns(
        UserWarning,
        match=r"always_frozen entries \['re:q_projection'\] match no parameter.*'model\.model\.embed_tokens\.weight'",
    ):
        fit(LM(tiny_llama(2)), HalfFineTuning(always_frozen=["re:q_projection"]), steps=1)
    # A typo of a word is no word: read as a regex (the deprecated spelling), warned about at once with the word it
    # resembles, and again at the start of fit when it matches nothing.
    with pytest.warns(
        FutureWarning,
        match=r"always_trainable entry 'atention' is not a word .*\(did you mean the word 'attention'\?\); .*"
        r"deprecated: write 're:atention'",
    ):
        typo = HalfFineTuning(always_trainable="atention")
    with pytest.warns(UserWarning, match=r"'atention' is not a .* word, did you mean 'attention'\?"):
        fit(LM(tiny_llama(2)), typo, steps=1)


def test_a_single_pattern_string_is_one_pattern() -> None:
    hft = HalfFineTuning(always_frozen="re:embed_tokens", seed=0)
    fit(LM(tiny_llama(2)), hft, steps=1)
    assert "model.model.embed_tokens.weight" in hft.frozen_names


def test_snapshot_dtype_accepts_torch_dtypes_and_names() -> None:
    assert HalfFineTuning(snapshot_dtype=torch.bfloat16).snapshot_dtype is torch.bfloat16
    assert HalfFineTuning(snapshot_dtype="torch.float16").snapshot_dtype is torch.float16
    assert HalfFineTuning(snapshot_dtype="bf16").snapshot_dtype is torch.bfloat16
    assert HalfFineTuning().snapshot_dtype is None


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_config_adds_the_callback_and_trains_a_few_steps(tmp_path: Path) -> None:
    from cli import main

    cli = main(
        [
            "fit",
            "--config", str(ROOT / "configs" / "examples" / "tiny_lm.yaml"),
            "--config", str(ROOT / "configs" / "hft_callback.yaml"),
            "--optimizer", "torch.optim.AdamW",
            "--optimizer.lr", "1e-3",
            "--trainer.max_steps", "3",
            "--trainer.logger", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )  # fmt: skip
    hfts = [cb for cb in cli.trainer.callbacks if isinstance(cb, HalfFineTuning)]
    assert len(hfts) == 1 and cli.trainer.global_step == 3
    assert hfts[0].history[0]["trainable_fraction"] < 0.8
    assert all(p.requires_grad for p in cli.model.parameters())


# ---------------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = ROOT / "tests" / "scripts" / "ddp_hft.py"


def run_ddp(mode: str, out_dir: Path, timeout: float = 300) -> list[dict[str, Any]]:
    return run_ranks(DDP_SCRIPT, out_dir, "--mode", mode, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["freeze", "mask"])
def test_two_process_ddp_ends_with_identical_weights_and_untouched_frozen_tensors_and_draws_as_one_process(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rank0, rank1 = run_ddp(mode, tmp_path)
    assert (rank0["world_size"], rank1["world_size"]) == (2, 2)
    assert rank0["frozen"] == rank1["frozen"] and len(rank0["frozen"]) == rank0["steps"]
    assert len(set(rank0["frozen"])) > 1, "the schedule should have re-drawn"
    for name in rank0["final"]:
        assert torch.equal(rank0["final"][name], rank1["final"][name]), name
    for step, (frozen, changed) in enumerate(zip(rank0["frozen"], rank0["changed"], strict=True)):
        assert frozen and not set(frozen) & set(changed), f"step {step} moved a frozen tensor"
        assert len(changed) > 0
    flags_off = [len(frozen) if mode == "freeze" else 0 for frozen in rank0["frozen"]]
    assert rank0["requires_grad_false"] == rank1["requires_grad_false"] == flags_off

    # The same script in one process draws the same halves: the default seed is seed_everything's, not the global
    # RNG's (the module's __init__ reseeds it, and DDP reseeds it again with seed_everything's seed).
    single_process = one_process_draws(mode, steps=rank0["steps"], monkeypatch=monkeypatch)
    assert rank0["seed"] == rank1["seed"] == 3
    assert single_process == rank0["frozen"]


def one_process_draws(mode: str, steps: int, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # build() calls seed_everything; restored after the test
    monkeypatch.syspath_prepend(str(DDP_SCRIPT.parent))
    from ddp_hft import SyntheticTokenDataModule, build

    module, hft = build(mode, redraw=3)
    recorder = DrawRecorder(hft)
    trainer(steps, [hft, recorder]).fit(module, SyntheticTokenDataModule(num_sequences=8 * steps, batch_size=8))
    return recorder.frozen


# ---------------------------------------------------------------------------------------------------- the zoo
def tiny_mixtral(layers: int = 2, experts: int = 4) -> nn.Module:
    config = transformers.MixtralConfig(
        **SMALL, num_hidden_layers=layers, num_key_value_heads=2, vocab_size=128, num_local_experts=experts,
        num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config)


def tiny_gpt_oss(layers: int = 2) -> nn.Module:
    config = transformers.GptOssConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    return transformers.GptOssForCausalLM(config)


class SliceRecorder(pl.Callback):
    """Listed after HFT: the frozen experts each step trains with."""

    def __init__(self, hft: HalfFineTuning) -> None:
        self.hft = hft
        self.slices: list[dict[str, tuple[int, ...]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.slices.append(self.hft.frozen_slices)


def expert_rows(module: nn.Module, hft: HalfFineTuning) -> dict[str, tuple[set[int], set[int]]]:
    """Fused expert tensor -> (its frozen experts, its other experts)."""
    params = dict(module.named_parameters())
    return {
        name: (set(experts), set(range(params[name].shape[0])) - set(experts))
        for name, experts in hft.frozen_slices.items()
    }


@pytest.mark.parametrize("optimizer_state", ["keep", "reset"])
@pytest.mark.parametrize("mode", ["freeze", "mask"])
@pytest.mark.parametrize("builder", [tiny_mixtral, tiny_gpt_oss], ids=["mixtral", "gpt_oss"])
def test_half_of_each_blocks_experts_freeze_as_slices_that_stay_bit_identical_under_adamw(
    builder: Callable[[], nn.Module], mode: str, optimizer_state: str
) -> None:
    torch.manual_seed(0)
    module = LM(builder(), weight_decay=0.1)
    before = snapshot(module)
    hft = HalfFineTuning(mode=mode, optimizer_state=optimizer_state, seed=0)
    recorder = DrawRecorder(hft)
    trainer(3, [hft, recorder]).fit(module, loader())
    rows = expert_rows(module, hft)
    # Every fused expert tensor of every block (GPT-OSS's 2-D expert biases too) freezes 2 of its 4 experts, the
    # same ones across the tensors of a block: an expert is one unit, its biases with its matrices.
    assert len(rows) == (8 if builder is tiny_gpt_oss else 4)
    for name, (frozen, trainable) in rows.items():
        assert len(frozen) == 2 and len(trainable) == 2, name
        block = name.split(".experts.")[0]
        assert all(rows[other][0] == frozen for other in rows if other.startswith(block + "."))
        now = dict(module.named_parameters())[name].detach()
        for expert in frozen:
            assert torch.equal(now[expert], before[name][expert]), (name, expert)  # decay would have moved them
        for expert in trainable:
            assert not torch.equal(now[expert], before[name][expert]), (name, expert)
        # the expert tensors keep requires_grad (they train in part); their state follows optimizer_state
        assert all(step[name] for step in recorder.requires_grad_at_step)
        state = recorder.state_after[-1][name]
        for key in ("exp_avg", "exp_avg_sq"):
            frozen_rows = state[key][sorted(frozen)]
            if optimizer_state == "reset":
                assert not frozen_rows.any()
            else:  # never frozen rows' gradients were zero: Adam's moments of them stay zero, and are kept so
                assert not frozen_rows.any() and state[key][sorted(trainable)].any()
    # The router trains: tiny, and it is what sends tokens to the trainable experts.
    routers = [name for name in before if ".mlp.router." in name or ".mlp.gate." in name]
    assert routers and not set(routers) & set(hft.frozen_names)
    assert all(name in recorder.changed[-1] for name in routers)
    assert hft.history[0]["frozen_experts"] == sum(len(frozen) for frozen, _ in rows.values())
    assert hft.history[0]["drawn_frozen_fraction"] == pytest.approx(0.5, abs=0.1)


def test_optimizer_state_keep_restores_the_moments_of_experts_frozen_after_training() -> None:
    # Redrawn every step: an expert trained at step 1 (moments non-zero) and frozen at step 2 keeps its moments
    # ("keep") or has them zeroed ("reset") while frozen, whatever Adam does to rows with a zero gradient.
    for optimizer_state in ("keep", "reset"):
        torch.manual_seed(0)
        module = LM(tiny_mixtral(), weight_decay=0.1)
        hft = HalfFineTuning(optimizer_state=optimizer_state, redraw_every_n_steps=1, seed=0)
        slices, recorder = SliceRecorder(hft), DrawRecorder(hft)
        trainer(4, [hft, slices, recorder]).fit(module, loader())
        frozen_at = slices.slices
        checked = 0
        for step in range(1, 4):
            for name, experts in frozen_at[step].items():
                for expert in experts:
                    if expert in frozen_at[step - 1].get(name, ()):
                        continue
                    # trained at the previous step, frozen at this one
                    previous = recorder.state_after[step - 1][name]["exp_avg"][expert]
                    now = recorder.state_after[step][name]["exp_avg"][expert]
                    if optimizer_state == "keep":
                        assert torch.equal(now, previous) and previous.any()
                    else:
                        assert not now.any()
                    checked += 1
        assert checked > 0


def test_reset_restores_newly_frozen_experts_to_their_pretrained_values() -> None:
    torch.manual_seed(0)
    module = LM(tiny_mixtral())
    pretrained = snapshot(module)
    hft = HalfFineTuning(redraw_every_n_steps=2, reset=True, seed=0)
    recorder = DrawRecorder(hft)
    trainer(4, [hft, recorder]).fit(module, loader())
    params = dict(module.named_parameters())
    assert hft.history[-1]["step"] == 2
    for name, experts in hft.frozen_slices.items():
        for expert in experts:  # frozen since step 2: pre-trained if reset then, or never trained
            assert torch.equal(params[name][expert], pretrained[name][expert]), (name, expert)


def test_a_resumed_run_keeps_the_checkpoints_frozen_experts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = LM(tiny_mixtral())
    hft = HalfFineTuning(redraw_every_n_steps=2, seed=0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    trainer(3, [hft, checkpoint], enable_checkpointing=True).fit(module, loader())
    drawn = hft.frozen_slices
    assert drawn and all(part.count("[") == 1 for part in hft.state_dict()["frozen"] if "experts" in part)

    torch.manual_seed(0)
    resumed_module = LM(tiny_mixtral())
    resumed = HalfFineTuning(redraw_every_n_steps=2, seed=0)
    slices = SliceRecorder(resumed)
    # The checkpoint callback of the first fit, restored from the checkpoint (same directory and schedule);
    # save_top_k=0: this fit writes no checkpoint into the directory it resumes from (which Lightning would warn of).
    again = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=0)
    trainer(4, [resumed, slices, again], enable_checkpointing=True).fit(
        resumed_module, loader(), ckpt_path=str(tmp_path / "epoch=0-step=3.ckpt")
    )
    assert slices.slices[0] == drawn  # step 3 trains with the selection the checkpoint holds


def tiny_qwen3(layers: int = 4) -> nn.Module:
    config = transformers.Qwen3Config(**SMALL, num_hidden_layers=layers, num_key_value_heads=2, head_dim=16,
                                      vocab_size=128)  # fmt: skip
    return transformers.Qwen3ForCausalLM(config)


def tiny_gemma3(layers: int = 4) -> nn.Module:
    config = transformers.Gemma3TextConfig(**SMALL, num_hidden_layers=layers, num_key_value_heads=2, head_dim=16,
                                           vocab_size=128)  # fmt: skip
    return transformers.Gemma3ForCausalLM(config)


@pytest.mark.parametrize("builder", [tiny_qwen3, tiny_gemma3], ids=["qwen3", "gemma3"])
def test_one_of_the_two_block_norms_freezes_and_q_k_norms_follow_their_projection(
    builder: Callable[[], nn.Module],
) -> None:
    torch.manual_seed(0)
    module = LM(builder())
    hft = HalfFineTuning(seed=0)
    trainer(1, [hft]).fit(module, loader())
    frozen = set(hft.frozen_names)
    for block in range(4):
        prefix = f"model.model.layers.{block}."
        # q_norm / k_norm freeze exactly with q_proj / k_proj
        for projection in ("q", "k"):
            assert (prefix + f"self_attn.{projection}_norm.weight" in frozen) == (
                prefix + f"self_attn.{projection}_proj.weight" in frozen
            )
        attention_side = {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
        ffn_side = {prefix + "pre_feedforward_layernorm.weight", prefix + "post_feedforward_layernorm.weight"}
        if builder is tiny_qwen3:  # Llama's two norms: one of them
            assert len(attention_side & frozen) == 1
        else:  # Gemma 3's four: the attention side (input, post-attention) or the FFN side (pre/post-FFN), whole
            assert (attention_side <= frozen) != (ffn_side <= frozen)
            assert not (attention_side & frozen and ffn_side & frozen)


def tiny_bart() -> nn.Module:
    config = transformers.BartConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def test_bart_decoders_cross_attention_is_drawn_with_its_self_attention() -> None:
    torch.manual_seed(0)
    module = LM(tiny_bart())
    before = snapshot(module)
    hft = HalfFineTuning(seed=0)
    with warnings_as_list() as caught:
        trainer(2, [hft]).fit(module, loader())
    assert not [w for w in caught if "generic rule" in str(w.message)]  # recognised: no "check what you meant"
    counts = block_counts(hft)
    assert [c["attention"] for c in counts] == [2, 2, 4, 4]  # 4 of the decoder's 8 (self + cross) matrices
    decoder = [n for n in hft.frozen_names if ".decoder.layers." in n and ".encoder_attn." in n]
    assert decoder  # cross-attention matrices are among the drawn ones
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) == (name in hft.frozen_names), name


@contextlib.contextmanager
def warnings_as_list() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def tiny_jamba() -> nn.Module:
    config = transformers.JambaConfig(
        **SMALL, num_hidden_layers=4, num_key_value_heads=2, vocab_size=128, num_experts=4, num_experts_per_tok=2,
        expert_layer_period=2, expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
        mamba_dt_rank=8,
    )  # fmt: skip
    return transformers.JambaForCausalLM(config)


def test_a_hybrid_draws_its_attention_and_mamba_layers_within_their_kind() -> None:
    torch.manual_seed(0)
    module = LM(tiny_jamba())
    before = snapshot(module)
    hft = HalfFineTuning(seed=0)
    trainer(2, [hft]).fit(module, loader())
    assert hft.layout is not None and [block.kind for block in hft.layout.blocks] == ["ssm", "attention"] * 2
    frozen = set(hft.frozen_names)
    for block in hft.layout.blocks:
        if block.kind == "ssm":  # 2 of Mamba's 4 projections; A_log, D, conv1d train
            assert len(set(block.ssm) & frozen) == 2
            assert not {name for name, _ in block.state} & frozen
        else:
            assert len(set(block.attention) & frozen) == 2
            assert {name: len(experts) for name, experts in hft.frozen_slices.items() if block.name + "." in name}
    for name, p in module.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), name


MOE_SCRIPT = ROOT / "tests" / "scripts" / "moe_hft.py"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_keep_frozen_expert_slices_bit_identical_sharded_or_not(tmp_path: Path, strategy: str) -> None:
    # One launch per strategy, two fits each (freeze + keep, mask + reset); about 45 s each on 2 busy CPU cores.
    result = run_script(MOE_SCRIPT, str(tmp_path), "--strategy", strategy, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for mode, optimizer_state in (("freeze", "keep"), ("mask", "reset")):
        rank0, rank1 = (torch.load(tmp_path / f"{mode}.rank{rank}.pt", weights_only=False) for rank in (0, 1))
        # Every rank draws the same experts (and re-draws them at steps 2 and 4)
        draws = [record["frozen_slices"] for record in rank0["records"]]
        assert draws == [record["frozen_slices"] for record in rank1["records"]]
        assert len({str(draw) for draw in draws}) > 1 and all(len(draw) == 4 for draw in draws)
        for records in (rank0["records"], rank1["records"]):
            assert all(record["frozen_kept"] for record in records)  # AdamW's decay and momentum moved nothing
            assert all(record["trainable_moved"] for record in records[1:])  # step 1: the warm-up's lr is 0
            assert all(record["moments_kept"] for record in records)
            if optimizer_state == "reset":
                assert all(record["moments_zero"] for record in records)
        if strategy == "ddp":  # every rank holds the same whole weights
            for name in rank0["final"]:
                assert torch.equal(rank0["final"][name], rank1["final"][name]), name
        else:  # the expert tensors are sharded on their expert dimension: 2 of 4 per rank
            assert any(
                r0["local_rows"] != r1["local_rows"] for r0, r1 in zip(rank0["records"], rank1["records"], strict=True)
            )
