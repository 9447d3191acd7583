"""ParameterDrift: exact figures on a hand-computable example, the grouping by role/module/block, the shared
snapshot, MoFO's sparse updates against AdamW's dense ones, resume, report and bad input.

The 2-process DDP test of ParameterDrift shares its run with ForgettingMonitor's, in ``test_forgetting_monitor.py``
(``test_ddp_parameter_drift_is_identical_on_every_rank_and_grows``)."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lit_mofo import MoFO
from lit_mofo.callbacks.l2_to_pretrained import L2ToPretrained
from lit_mofo.callbacks.parameter_drift import ParameterDrift, top_level_modules
from lit_mofo.snapshot import PretrainedSnapshot

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM  # noqa: E402


class FakeTrainer:
    global_step = 0
    ckpt_path = None
    strategy = None


class Toy(nn.Module):
    """θ₀ chosen by hand: ||θ₀||² = 10 (embed) + 2 (norm) + 25 (out) = 37, 22 entries."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 2)
        self.norm = nn.LayerNorm(2)
        self.out = nn.Linear(2, 4)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[1.0, 2.0], [2.0, 1.0], [0.0, 0.0]]))
            self.norm.weight.fill_(1.0)
            self.norm.bias.zero_()
            self.out.weight.zero_()
            self.out.weight[0, 0] = 3.0
            self.out.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 4.0]))


@pytest.fixture
def moved_toy() -> tuple[ParameterDrift, Toy]:
    toy, drift = Toy(), ParameterDrift(report=False)
    drift.on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]
    with torch.no_grad():
        toy.embed.weight[0, 0] += 2.0  # Δ = 2
        toy.norm.bias[1] = 1.0  # Δ = 1
        toy.out.bias[3] = 2.0  # Δ = -2
    yield drift, toy
    PretrainedSnapshot.detach(toy, owner=drift)


def test_drift_figures_match_a_hand_computation(moved_toy: tuple[ParameterDrift, Toy]) -> None:
    drift, toy = moved_toy
    groups = drift.compute(toy)
    overall = groups["overall"]["all"]
    assert overall.relative_l2 == pytest.approx(3.0 / math.sqrt(37.0), rel=1e-7)  # ||Δ||² = 4 + 1 + 4
    assert overall.fraction_changed == pytest.approx(3 / 22)
    assert overall.max_abs == 2.0
    embedding, other = groups["role"]["embedding"], groups["role"]["other"]
    assert (embedding.relative_l2, embedding.fraction_changed) == (pytest.approx(2 / math.sqrt(10)), 1 / 6)
    assert (other.relative_l2, other.fraction_changed, other.max_abs) == (pytest.approx(math.sqrt(5 / 27)), 2 / 16, 2.0)
    modules = groups["module"]
    assert modules["norm"].relative_l2 == pytest.approx(math.sqrt(1 / 2)) and modules["norm"].max_abs == 1.0
    assert modules["out"].relative_l2 == pytest.approx(2 / 5) and modules["out"].fraction_changed == 1 / 12
    assert groups["block"] == {}  # no transformer blocks in this toy


def test_unchanged_weights_have_zero_drift() -> None:
    toy, drift = Toy(), ParameterDrift(report=False)
    drift.on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]
    overall = drift.compute(toy)["overall"]["all"]
    assert (overall.relative_l2, overall.fraction_changed, overall.max_abs) == (0.0, 0.0, 0.0)
    PretrainedSnapshot.detach(toy, owner=drift)


def test_include_and_exclude_select_by_role_or_name_regex(moved_toy: tuple[ParameterDrift, Toy]) -> None:
    _, toy = moved_toy
    only_embedding = ParameterDrift(include=["embedding"], report=False)
    only_embedding.on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]
    assert only_embedding._names == ["embed.weight"]
    no_bias = ParameterDrift(exclude=[r"re:\.bias$"], report=False)
    no_bias.on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]
    assert no_bias._names == ["embed.weight", "norm.weight", "out.weight"]
    for owner in (only_embedding, no_bias):
        PretrainedSnapshot.detach(toy, owner=owner)


def test_a_selection_of_nothing_is_refused() -> None:
    with (
        pytest.warns(UserWarning, match=r"include entries \['attention'\] match no parameter"),
        pytest.raises(MisconfigurationException, match=r"selects no parameter of Toy.*roles"),
    ):
        ParameterDrift(include=["attention"]).on_fit_start(FakeTrainer(), Toy())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_train_steps": -1}, "every_n_train_steps=-1"),
        ({"exclude": ["("]}, r"exclude=\['\('\] is invalid.*not a valid regular expression"),
        ({"snapshot_dtype": "int8"}, "snapshot_dtype='int8'"),
        ({"every_n_train_steps": True}, r"every_n_train_steps=True is invalid; the valid range is an integer >= 0"),
        ({"every_n_train_steps": "50"}, r"every_n_train_steps='50' is invalid"),
        ({"every_n_train_steps": 2.5}, r"every_n_train_steps=2.5 is invalid"),
        ({"include": [None]}, r"include=\[None\] is invalid.*Entry None is not a string"),
        ({"snapshot_dtype": torch.int64}, r"snapshot_dtype=torch.int64 is invalid.*'float16'"),
        ({"device": "gpu0"}, r"device='gpu0' is invalid.*torch cannot parse it"),
        ({"report": "false"}, r"report='false' is invalid; the valid range is True or False"),
        ({"report_dir": 3}, r"report_dir=3 is invalid; the valid range is a directory path"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        ParameterDrift(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_device_this_machine_lacks_is_refused_at_construction() -> None:
    with pytest.raises(MisconfigurationException, match=r"ParameterDrift\(\): device='cuda' is invalid.*'cpu' or None"):
        ParameterDrift(device="cuda")


@pytest.mark.parametrize("value", ["float16", "torch.float16", "fp16", torch.float16])
def test_snapshot_dtype_takes_the_same_forms_as_the_other_callbacks(value: Any) -> None:
    assert ParameterDrift(snapshot_dtype=value).snapshot_dtype is torch.float16


def test_a_single_pattern_string_is_one_pattern(moved_toy: tuple[ParameterDrift, Toy]) -> None:
    _, toy = moved_toy
    drift = ParameterDrift(include="embedding", exclude=r"re:\.bias$", report=False)
    drift.on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]
    assert drift._names == ["embed.weight"]
    PretrainedSnapshot.detach(toy, owner=drift)


def test_a_pattern_that_matches_nothing_is_warned_about_with_the_near_role(
    moved_toy: tuple[ParameterDrift, Toy],
) -> None:
    _, toy = moved_toy
    # A typo of a word is no word: read as a regex (the deprecated spelling, warned about at once with the word it
    # resembles), which matches nothing.
    with pytest.warns(
        FutureWarning,
        match=r"include entry 'embeddings' is not a word .*\(did you mean the word 'embedding'\?\); .*"
        r"write 're:embeddings'",
    ):
        drift = ParameterDrift(include=["embeddings", "other"], report=False)
    with pytest.warns(
        UserWarning, match=r"include entries \['embeddings'\] match no parameter.*did you mean 'embedding'"
    ):
        drift.on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]
    PretrainedSnapshot.detach(toy, owner=drift)


def test_tensors_the_module_froze_are_measured_with_zero_drift(moved_toy: tuple[ParameterDrift, Toy]) -> None:
    toy = Toy()
    toy.embed.requires_grad_(False)
    drift = ParameterDrift(report=False)
    drift.on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]
    with torch.no_grad():
        toy.out.bias[3] = 2.0  # Δ = -2 on a trainable tensor; the frozen embedding stays put
    groups = drift.compute(toy)
    assert "embed.weight" in drift._names
    assert groups["role"]["embedding"].relative_l2 == 0.0 and groups["role"]["embedding"].numel == 6
    assert groups["overall"]["all"].relative_l2 == pytest.approx(2 / math.sqrt(37.0))  # θ₀ of all 22 entries
    PretrainedSnapshot.detach(toy, owner=drift)


def test_a_module_without_trainable_parameters_is_refused_before_training() -> None:
    toy = Toy()
    toy.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match=r"ParameterDrift: no parameter of Toy is trainable.*element 0"):
        ParameterDrift(report=False).on_fit_start(FakeTrainer(), toy)  # type: ignore[arg-type]


def test_top_level_modules_look_through_wrappers() -> None:
    module = TinyCausalLM()
    mapping = top_level_modules(module, [name for name, _ in module.named_parameters()])
    assert set(mapping.values()) == {"model.model", "model.lm_head"}
    assert mapping["model.model.layers.0.mlp.up_proj.weight"] == "model.model"


# ---------------------------------------------------------------------- during fit
class LM(TinyCausalLM):
    def __init__(self, optimizer: str = "adamw") -> None:
        super().__init__()
        self.optimizer_name = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "mofo":
            return MoFO(self.parameters(), lr=1e-3, fraction=0.1)
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.0)


def fit(callbacks: list[pl.Callback], root: Path, module: LM, max_steps: int, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=root,
        logger=kwargs.pop("logger", False),
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(module, SyntheticTokenDataModule(num_sequences=64, seq_len=16, batch_size=8), ckpt_path=None)
    return trainer


def test_mofo_moves_its_fraction_of_each_matrix_while_adamw_moves_every_entry(tmp_path: Path) -> None:
    figures = {}
    for name in ("mofo", "adamw"):
        trainer = fit([ParameterDrift(report=False)], tmp_path / name, LM(name), max_steps=1)
        figures[name] = {
            key: value.item() for key, value in trainer.callback_metrics.items() if key.startswith("drift")
        }
    for role in ("attention", "ffn"):
        assert figures["mofo"][f"drift/fraction_changed/{role}"] == pytest.approx(0.1, abs=2e-3)
        assert figures["adamw"][f"drift/fraction_changed/{role}"] == 1.0
    assert figures["mofo"]["drift/relative_l2"] < figures["adamw"]["drift/relative_l2"]
    assert (
        figures["mofo"]["drift/relative_l2/block/0"] > 0 and "drift/relative_l2/module/model.lm_head" in figures["mofo"]
    )


def test_drift_starts_at_zero_and_is_logged_every_n_steps_and_at_the_end(tmp_path: Path) -> None:
    drift = ParameterDrift(every_n_train_steps=2)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    fit([drift], tmp_path, LM(), max_steps=5, logger=logger, log_every_n_steps=1)
    overall = [r for r in drift.history if r["scope"] == "overall"]
    assert [r["step"] for r in overall] == [0, 2, 4, 5]
    assert overall[0]["relative_l2"] == overall[0]["fraction_changed"] == overall[0]["max_abs_change"] == 0.0
    assert 0 < overall[1]["relative_l2"] < overall[3]["relative_l2"]
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("drift/relative_l2")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]
    assert float(rows[-1]["drift/relative_l2"]) == pytest.approx(overall[-1]["relative_l2"])
    report = json.loads((Path(logger.log_dir) / "forgetting_report.json").read_text())
    assert len(report["drift"]["measurements"]) == len(drift.history)
    assert (
        "Parameter drift from the pre-trained model at step 5"
        in (Path(logger.log_dir) / "forgetting_report.md").read_text()
    )


class SnapshotSpy(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.snapshot = PretrainedSnapshot.get(pl_module)
        self.nbytes = self.snapshot.nbytes if self.snapshot is not None else 0


def test_drift_and_l2_to_pretrained_share_one_snapshot(tmp_path: Path) -> None:
    spy = SnapshotSpy()
    module = LM()
    fit([ParameterDrift(report=False), L2ToPretrained(strength=1e-12), spy], tmp_path, module, max_steps=1)
    assert spy.nbytes == sum(p.numel() * p.element_size() for p in module.parameters())  # one copy, not two
    assert PretrainedSnapshot.get(module) is None  # freed at teardown


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_resumed_fit_measures_against_the_pretrained_weights_from_the_checkpoint(tmp_path: Path) -> None:
    module = LM()
    pretrained = {name: p.detach().clone() for name, p in module.named_parameters()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit([ParameterDrift(report=False), checkpoint], tmp_path, module, max_steps=3)
    resumed_drift = ParameterDrift(report=False)
    resumed = LM()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        default_root_dir=tmp_path,
        logger=False,
        callbacks=[resumed_drift],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = SyntheticTokenDataModule(num_sequences=64, seq_len=16, batch_size=8)
    trainer.fit(resumed, data, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    diff = sum((p.detach() - pretrained[n]).pow(2).sum().item() for n, p in resumed.named_parameters())
    norm = sum(t.pow(2).sum().item() for t in pretrained.values())
    final = [r for r in resumed_drift.history if r["scope"] == "overall"][-1]
    assert final["step"] == 6
    assert final["relative_l2"] == pytest.approx(math.sqrt(diff / norm), rel=1e-5)
    assert resumed_drift.history[0]["step"] == 0  # the history came with the checkpoint


def test_roles_and_blocks_follow_the_layout_table_on_a_mixture_of_experts_model() -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(
        transformers.MixtralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            num_local_experts=4,
        )
    )
    drift = ParameterDrift(include=["ffn", "router"], report=False)
    drift.on_fit_start(FakeTrainer(), model)  # type: ignore[arg-type]
    groups = drift.compute(model)
    assert set(groups["role"]) == {"ffn", "router"}
    assert groups["role"]["ffn"].numel == 2 * sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("model.layers.0.mlp.experts.")
    )
    assert set(groups["block"]) == {"0", "1"}  # the fused experts and routers are in their blocks
