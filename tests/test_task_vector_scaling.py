"""TaskVectorScaling: the grid measured with the monitor's probes at fit end, exact at the ends, restored bit for bit,
the picked edit in the module, the checkpoint and the export, no fit resumed from an edited checkpoint; rules, Pareto
front, report, LoRA, bad settings (an export directory that is a file among them)."""

from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lit_mofo import ForgettingMonitor, ParameterDrift, TaskVectorScaling
from lit_mofo.blocks import detect_layout
from lit_mofo.callbacks.task_vector_scaling import EditPoint, applied_edit, pareto_front, select_point
from lit_mofo.modules.causal_lm import CausalLMModule
from lit_mofo.probes import CallableProbe
from lit_mofo.scenario.data import ScenarioDataModule
from lit_mofo.scenario.probes import KnowledgeProbe, TaskProbe
from lit_mofo.scenario.vocab import build_tokenizer
from lit_mofo.task_vectors import LiNeS, WiSEFT

VOCAB = len(build_tokenizer())


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reports of fits without a logger land in the current directory: keep them out of the repository."""
    monkeypatch.chdir(tmp_path)


def llama_config(layers: int = 3) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def gpt2_config(layers: int = 3) -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64)


def make_module(config: Any = None, **kwargs: Any) -> CausalLMModule:
    torch.manual_seed(0)
    return CausalLMModule(
        model_config=config or llama_config(), optimizer=partial(torch.optim.AdamW, lr=1e-2), **kwargs
    )


def weights(module: nn.Module) -> dict[str, Tensor]:
    return {name: param.detach().clone() for name, param in module.named_parameters()}


def bits(tensor: Tensor) -> Tensor:
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_bitwise(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        assert torch.equal(bits(actual[name]), bits(expected[name])), name


class WeightRecorder:
    """A probe function that keeps a copy of the weights at every evaluation and returns their distance to θ₀
    (lower is better: 0 for the pre-trained model)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Tensor]] = []
        self.theta0: dict[str, Tensor] | None = None

    def __call__(self, trainer: pl.Trainer | None, module: pl.LightningModule) -> dict[str, float]:
        current = weights(module)
        if self.theta0 is None:
            self.theta0 = current
        self.seen.append(current)
        squares = sum((current[n].double() - self.theta0[n].double()).pow(2).sum() for n in current)
        return {"distance": float(torch.sqrt(torch.as_tensor(squares)))}


def monitor_with(recorder: WeightRecorder, scenario_probes: bool = True) -> ForgettingMonitor:
    probes: dict[str, Any] = {"weights": CallableProbe(recorder, higher_is_better={"distance": False})}
    if scenario_probes:
        probes = {
            "task": TaskProbe(num_examples=16, batch_size=16),
            "knowledge": KnowledgeProbe(limit_batches=1),
            **probes,
        }
    return ForgettingMonitor(probes, every_n_train_steps=None, evaluate_on_validation=False, report=False)


def fit(module: nn.Module, callbacks: list[pl.Callback], max_steps: int = 3, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(module, ScenarioDataModule(num_train=8 * max_steps, num_val=0, batch_size=8))  # type: ignore[arg-type]
    return trainer


def lerp(theta0: Tensor, theta: Tensor, factor: float) -> Tensor:
    """θ₀ + factor·(θ - θ₀) as the edits define it: exact at 0 and 1, else one float32 lerp."""
    if factor == 0:
        return theta0.clone()
    if factor == 1:
        return theta.clone()
    return torch.lerp(theta0.float(), theta.float(), factor).to(theta.dtype)


# ---- the ends are exact; the default keeps the fine-tune -------------------------------------------------------------


@pytest.mark.parametrize("scaling_first", [False, True], ids=["monitor_first", "scaling_first"])
def test_the_ends_reproduce_theta0_and_the_fine_tune_and_the_default_keeps_the_fine_tune(scaling_first: bool) -> None:
    """alpha = 0 is θ₀ bit for bit and measures the monitor's baselines; alpha = 1 and LiNeS(1, 0) are the fine-tune and
    measure its final values; afterwards the module holds the fine-tuned weights bit for bit - whichever callback
    comes first."""
    recorder = WeightRecorder()
    monitor = monitor_with(recorder)
    scaling = TaskVectorScaling(
        wise_ft=[0.0, 1.0], lines=[(1.0, 0.0), (0.0, 1.0)], task="task/exact_match", report=False
    )
    module = make_module()
    pretrained = weights(module)
    fit(module, [scaling, monitor] if scaling_first else [monitor, scaling])

    finetuned = recorder.seen[1]  # baseline, then the fine-tune (the monitor's end of fit or the sweep's)
    assert any(not torch.equal(finetuned[n], pretrained[n]) for n in pretrained)
    assert_bitwise(weights(module), finetuned)
    assert scaling.applied is None and scaling.chosen is None

    # baseline, fine-tune, the four edits in order; the monitor's own end-of-fit measurement is reused when it ran
    # first, and comes after the sweep (of the restored fine-tune, so the same values) when it runs second.
    assert len(recorder.seen) == (7 if scaling_first else 6)
    edits = recorder.seen[2:6]
    if scaling_first:
        assert_bitwise(recorder.seen[6], finetuned)
    wise0, wise1, lines10, lines01 = edits
    assert_bitwise(wise0, pretrained)
    assert_bitwise(wise1, finetuned)
    assert_bitwise(lines10, finetuned)
    assert not torch.equal(
        lines01["model.model.layers.0.mlp.up_proj.weight"], finetuned["model.model.layers.0.mlp.up_proj.weight"]
    )

    points = {point.key: point for point in scaling.points}
    assert list(points) == ["finetuned", "wise_ft_a0", "wise_ft_a1", "lines_a1_b0", "lines_a0_b1"]
    final = {(r["probe"], r["metric"]): r["value"] for r in monitor.history if r["trigger"] == "fit_end"}
    for probe, metrics in monitor.baselines.items():
        for metric, baseline in metrics.items():
            assert points["wise_ft_a0"].values[probe][metric] == baseline, (probe, metric)
            assert points["wise_ft_a0"].forgetting[probe][metric] == 0.0
            for key in ("finetuned", "wise_ft_a1", "lines_a1_b0"):
                assert points[key].values[probe][metric] == final[(probe, metric)], (key, probe, metric)


def test_the_sweep_reuses_the_shared_snapshot_and_leaves_nothing_behind() -> None:
    recorder = WeightRecorder()
    drift = ParameterDrift(every_n_train_steps=None, report=False)
    scaling = TaskVectorScaling(wise_ft=[0.5], lines=[], report=False)
    module = make_module()
    fit(module, [monitor_with(recorder, scenario_probes=False), drift, scaling])
    overall = [r for r in drift.history if r["scope"] == "overall"]
    assert [r["step"] for r in overall] == [0, 3] and overall[-1]["relative_l2"] > 0  # the fine-tune, not an edit
    from lit_mofo.snapshot import PretrainedSnapshot

    assert PretrainedSnapshot.get(module) is None  # released at teardown by its last owner
    assert scaling.sweep_seconds is not None and scaling.fit_seconds is not None and scaling.fit_seconds > 0


# ---- LiNeS in the callback: the formula per block, on two layouts ---------------------------------------------------


@pytest.mark.parametrize("config", [llama_config(), gpt2_config()], ids=["llama", "gpt2"])
def test_lines_edits_follow_the_formula_per_block_and_give_alpha_outside(config: Any) -> None:
    recorder = WeightRecorder()
    edit = LiNeS(0.2, 0.6)
    scaling = TaskVectorScaling(wise_ft=[0.3], lines=[(edit.alpha, edit.beta)], report=False)
    module = make_module(config)
    pretrained = weights(module)
    fit(module, [monitor_with(recorder, scenario_probes=False), scaling])
    finetuned, wise, lines = recorder.seen[1], recorder.seen[2], recorder.seen[3]
    blocks = detect_layout(module).blocks
    assert len(blocks) == 3
    in_block = {name: index for index, block in enumerate(blocks) for name in block.parameters}
    for name in pretrained:
        assert torch.equal(wise[name], lerp(pretrained[name], finetuned[name], 0.3)), name
        factor = 0.2 + 0.6 * in_block[name] / 2 if name in in_block else 0.2  # alpha + beta·(l-1)/(L-1); alpha outside
        assert torch.equal(lines[name], lerp(pretrained[name], finetuned[name], factor)), name
    assert {in_block[n] for n in in_block} == {0, 1, 2}
    assert any(name not in in_block for name in pretrained)  # embeddings, final norm, head: alpha


# ---- the picked edit: in the module, the checkpoints and the export ------------------------------------------------


# The refused resume leaves out the checkpoint callbacks of the first fit, which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_the_picked_edit_is_in_the_module_the_last_checkpoints_and_the_export(tmp_path: Path) -> None:
    recorder = WeightRecorder()
    newest = ModelCheckpoint(dirpath=tmp_path / "newest", save_last=True)
    ranked = ModelCheckpoint(
        dirpath=tmp_path / "ranked",
        monitor="train_loss",
        mode="min",
        save_top_k=1,
        save_last="link",
        every_n_train_steps=3,
    )
    # The weights' distance to θ₀ grows with alpha and any task score qualifies: the rule picks alpha = 0.3.
    scaling = TaskVectorScaling(
        wise_ft=[0.6, 0.3],
        lines=[],
        task="task/exact_match",
        forgetting="weights/distance",
        apply="least_forgetting",
        max_task_drop=1.0,
        report=False,
    )
    module = make_module(export_dir=str(tmp_path / "export"))
    pretrained = weights(module)
    trainer = fit(module, [monitor_with(recorder), scaling, newest, ranked], default_root_dir=tmp_path)
    finetuned = recorder.seen[1]
    expected = {name: lerp(pretrained[name], finetuned[name], 0.3) for name in pretrained}
    assert scaling.chosen is not None and scaling.chosen.key == "wise_ft_a0.3"
    assert scaling.applied == WiSEFT(0.3)
    assert_bitwise(weights(module), expected)

    def checkpoint_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        checkpoint = torch.load(path, weights_only=False)
        assert checkpoint["global_step"] == trainer.global_step
        return checkpoint["state_dict"], checkpoint

    for path in (newest.last_model_path, newest.best_model_path, ranked.last_model_path):
        state, checkpoint = checkpoint_weights(path)
        assert_bitwise({name: state[name] for name in expected}, expected)
        assert checkpoint["callbacks"][scaling.state_key]["applied"] == "wise_ft_a0.3"
    assert not Path(ranked.last_model_path).is_symlink()
    # The checkpoint ranked by train_loss keeps the weights its score was measured on.
    state, _ = checkpoint_weights(ranked.best_model_path)
    assert_bitwise({name: state[name] for name in finetuned}, finetuned)

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for name, value in exported.state_dict().items():
        assert torch.equal(value, expected[f"model.{name}"]), name

    # The rewritten checkpoints hold the edit with the fine-tune's optimizer state: no fit goes on from them (it used to
    # continue silently from θ₀ + 0.3·Δ). Evaluating them is fine.
    assert applied_edit(torch.load(newest.last_model_path, weights_only=False)) == "wise_ft_a0.3"
    assert applied_edit(torch.load(ranked.best_model_path, weights_only=False)) is None
    resumed = pl.Trainer(
        accelerator="cpu",
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[monitor_with(WeightRecorder()), TaskVectorScaling(wise_ft=[0.5], lines=[], report=False)],
    )
    with pytest.raises(MisconfigurationException, match=r"holds the weights this callback edited .*\(wise_ft_a0\.3"):
        resumed.fit(
            make_module(), ScenarioDataModule(num_train=40, num_val=0, batch_size=8), ckpt_path=newest.last_model_path
        )
    assert resumed.global_step == 0


def test_when_no_edit_qualifies_the_fine_tune_is_kept_with_a_warning() -> None:
    recorder = WeightRecorder()
    scaling = TaskVectorScaling(
        wise_ft=[0.5],
        lines=[],
        task="task/exact_match",
        forgetting="weights/distance",
        apply="best_task",
        max_forgetting=0.0,
        report=False,
    )
    module = make_module()
    with pytest.warns(UserWarning, match=r"no point of the curve qualifies .* the fine-tuned weights are kept"):
        fit(module, [monitor_with(recorder), scaling])
    assert scaling.applied is None
    assert_bitwise(weights(module), recorder.seen[1])


# ---- rules and the Pareto front --------------------------------------------------------------------------------------


def point(edit: Any, task: float, lost: float) -> EditPoint:
    return EditPoint(edit, {"t": {"em": task}}, {"t": {"em": 1.0 - task}, "k": {"acc": lost}}, {}, 0.0)


CURVE = [
    point(None, 1.00, 0.60),
    point(WiSEFT(0.8), 0.995, 0.40),
    point(WiSEFT(0.6), 0.95, 0.20),
    point(LiNeS(0.6, 0.4), 0.99, 0.40),  # ties WiSE-FT 0.8 on forgetting with a worse task score
    point(WiSEFT(0.4), 0.30, 0.25),  # dominated by WiSE-FT 0.6
    point(WiSEFT(0.2), 0.10, float("nan")),  # a failed measurement never qualifies
]


def test_least_forgetting_within_the_task_tolerance_of_the_fine_tune() -> None:
    pick = partial(select_point, CURVE, "least_forgetting", task="t/em", forgetting="k/acc")
    assert pick(max_task_drop=0.01).key == "wise_ft_a0.8"  # 0.99 ties on forgetting, the better task wins
    assert pick(max_task_drop=0.05).key == "wise_ft_a0.6"  # 1.00 - 0.95 = 0.05: the bound is inclusive
    assert pick(max_task_drop=0.0).key == "finetuned"
    # A lower-is-better task metric: every score below the fine-tune's 1.00 is better, the lowest is best.
    lower_is_better = partial(select_point, CURVE, task_higher_is_better=False, task="t/em", forgetting="k/acc")
    assert lower_is_better("least_forgetting", max_task_drop=0.0).key == "wise_ft_a0.6"
    assert lower_is_better("best_task", max_forgetting=1.0).key == "wise_ft_a0.4"


def test_best_task_within_the_forgetting_budget() -> None:
    pick = partial(select_point, CURVE, "best_task", task="t/em", forgetting="k/acc")
    assert pick(max_forgetting=0.45).key == "wise_ft_a0.8"
    assert pick(max_forgetting=0.2).key == "wise_ft_a0.6"
    assert pick(max_forgetting=1.0).key == "finetuned"
    assert pick(max_forgetting=0.1) is None
    assert select_point(CURVE, "none", task=None, forgetting=None) is None


def test_the_pareto_front_keeps_the_undominated_points_by_forgetting() -> None:
    front = pareto_front(CURVE, "t/em", "k/acc")
    assert [p.key for p in front] == ["wise_ft_a0.6", "wise_ft_a0.8", "finetuned"]


# ---- report, logged metrics ------------------------------------------------------------------------------------------


def test_the_curve_is_logged_per_edit_and_reported_as_table_json_and_plot(tmp_path: Path) -> None:
    recorder = WeightRecorder()
    monitor = ForgettingMonitor(
        {
            "task": TaskProbe(num_examples=16, batch_size=16),
            "knowledge": KnowledgeProbe(limit_batches=1),
            "weights": CallableProbe(recorder, higher_is_better={"distance": False}),
        },
        every_n_train_steps=None,
    )
    scaling = TaskVectorScaling(wise_ft=[0.5], lines=[(0.0, 1.0)], task="task/exact_match")
    trainer = fit(
        make_module(),
        [monitor, scaling],
        logger=CSVLogger(tmp_path, name="logs", version=0),
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    for key in ("probe/knowledge/accuracy/wise_ft_a0.5", "forgetting/weights/distance/lines_a0_b1"):
        assert key in trainer.callback_metrics
    header = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"probe/task/exact_match/wise_ft_a0.5", "retention/knowledge/loss/lines_a0_b1"} <= set(header)

    report_dir = tmp_path / "logs" / "version_0"
    report = json.loads((report_dir / "forgetting_report.json").read_text())
    section = report["task_vector_scaling"]
    assert [edit["edit"] for edit in section["edits"]] == ["finetuned", "wise_ft_a0.5", "lines_a0_b1"]
    assert section["task"] == "task/exact_match" and section["picked"] is None
    assert set(section["pareto"]) == {"knowledge/accuracy", "knowledge/loss", "weights/distance"}
    assert section["sweep_seconds"] > 0 and section["sweep_to_fit_ratio"] > 0
    assert len(section["measurements"]) == 3 * 5  # three points, five metrics
    text = (report_dir / "forgetting_report.md").read_text()
    assert "Task-vector edits at step 3" in text and "| lines_a0_b1 |" in text
    assert (report_dir / "forgetting_report_task_vector_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- LoRA -----------------------------------------------------------------------------------------------------------


def test_on_a_lora_fine_tune_the_edits_scale_the_effective_weights() -> None:
    from peft import LoraConfig

    merged: list[dict[str, Tensor]] = []

    def record_merged(trainer: pl.Trainer | None, module: pl.LightningModule) -> float:
        merged.append({n: p.detach().clone() for n, p in module.merged_model().named_parameters()})  # type: ignore[operator]
        return 0.0

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    module = make_module(peft=config)
    monitor = ForgettingMonitor(
        {"merged": CallableProbe(record_merged, higher_is_better=True)}, every_n_train_steps=None, report=False
    )
    scaling = TaskVectorScaling(wise_ft=[0.4], lines=[(0.2, 0.8)], report=False)
    fit(module, [monitor, scaling])
    pretrained, finetuned, wise, lines = merged
    assert any(not torch.equal(pretrained[n], finetuned[n]) for n in pretrained)
    layers = {name: int(name.split(".")[2]) for name in pretrained if name.startswith("model.layers.")}
    for name in pretrained:
        if name in layers and name.endswith("proj.weight"):
            for edited, factor in ((wise, 0.4), (lines, 0.2 + 0.8 * layers[name] / 2)):
                expected = pretrained[name] + factor * (finetuned[name] - pretrained[name])
                torch.testing.assert_close(edited[name], expected, rtol=1e-5, atol=1e-6)
        else:  # not adapted: frozen, untouched
            assert torch.equal(wise[name], pretrained[name]) and torch.equal(lines[name], pretrained[name]), name
    down = [name for name, _ in module.named_parameters() if ".lora_A." in name]
    assert down and all(name not in scaling._names for name in down)  # A keeps its fine-tuned value


def test_dora_is_refused_at_setup_with_the_fix() -> None:
    from peft import LoraConfig

    module = make_module(peft=LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    with pytest.raises(MisconfigurationException, match=r"lora_magnitude_vector.*not linear in one tensor.*merge"):
        fit(module, [monitor_with(WeightRecorder(), scenario_probes=False), TaskVectorScaling(report=False)])


# ---- bad settings fail before training ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"wise_ft": [1.5]}, r"alpha=1.5 is invalid; the valid range is \[0, 1\].*allow_extrapolation"),
        ({"wise_ft": [-0.1], "lines": []}, r"alpha=-0.1 is invalid"),
        ({"lines": [(0.5, 0.6)]}, r"beta=0.6 is invalid; the valid range is \[0, 0.5\]"),
        ({"wise_ft": [], "lines": []}, r"number of edits=0 is invalid.*wise_ft=\[0.5\]"),
        ({"wise_ft": 0.5}, r"wise_ft=0.5 is invalid; the valid range is a list of alpha values"),
        ({"apply": "least_forgetting", "max_task_drop": 0.01}, r"needs `task` and `forgetting`.*'<probe>/<metric>'"),
        (
            {"apply": "best_task", "task": "t/em", "forgetting": "k/acc"},
            r"apply='best_task' needs max_forgetting.*e.g. max_forgetting=0.05",
        ),
        ({"max_task_drop": 0.01}, r"max_task_drop=0.01 is used by apply='least_forgetting' only"),
        (
            {"apply": "best_task", "task": "t/em", "forgetting": "k/acc", "max_forgetting": -0.1},
            r"max_forgetting=-0.1 is invalid; the valid range is a number >= 0",
        ),
        ({"apply": "all"}, r"apply='all' is invalid; the valid range is one of \('none', 'best_task'"),
        ({"task": "exact_match"}, r"task='exact_match' is invalid.*'<probe>/<metric>', e.g. 'task/exact_match'"),
    ],
)
def test_bad_grids_and_rules_are_refused_at_construction_with_the_fix(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        TaskVectorScaling(**kwargs)


def test_extrapolation_is_accepted_only_when_asked_for() -> None:
    scaling = TaskVectorScaling(wise_ft=[1.5], lines=[], allow_extrapolation=True)
    assert scaling.edits == (WiSEFT(1.5, allow_extrapolation=True),)


# Regression has no validation_step, and the scenario data module offers its (empty) validation loaders: Lightning
# notes that it skips them.
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
@pytest.mark.parametrize(
    ("callbacks", "module", "message"),
    [
        (lambda: [TaskVectorScaling()], make_module, r"trainer has none: add one"),
        (
            lambda: [monitor_with(WeightRecorder()), TaskVectorScaling(task="accuracy/exact_match")],
            make_module,
            r"names probe 'accuracy', which the ForgettingMonitor does not have; its probes are "
            r"\['knowledge', 'task', 'weights'\]",
        ),
        (
            lambda: [monitor_with(WeightRecorder()), TaskVectorScaling(task="task/accuracy")],
            make_module,
            r"names metric 'accuracy', which probe 'task' does not declare; its metrics are \[.exact_match., .loss.\]",
        ),
        (
            lambda: [
                ForgettingMonitor({"w": CallableProbe(WeightRecorder(), False)}, report=False),
                TaskVectorScaling(wise_ft=[0.5], lines=[(0.0, 1.0)]),
            ],
            lambda: Regression(),
            r"LiNeS scales the task vector per transformer block.*lines=\[\]",
        ),
    ],
    ids=["no_monitor", "unknown_probe", "unknown_metric", "lines_without_blocks"],
)
def test_a_missing_monitor_probe_or_layout_is_refused_at_setup(callbacks: Any, module: Any, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        fit(module(), callbacks(), max_steps=1)


class Regression(pl.LightningModule):
    """No transformer blocks: WiSE-FT works, LiNeS does not."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.layer(batch["input_ids"][:, :4].float()).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


# Regression has no validation_step, and the scenario data module offers its (empty) validation loaders: Lightning
# notes that it skips them.
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_wise_ft_works_on_a_model_without_blocks() -> None:
    recorder = WeightRecorder()
    module = Regression()
    monitor = ForgettingMonitor({"w": CallableProbe(recorder, False)}, report=False)
    fit(module, [monitor, TaskVectorScaling([0.5], [], report=False)])
    pretrained, finetuned, half = recorder.seen[0], recorder.seen[1], recorder.seen[2]
    for name in pretrained:
        assert torch.equal(half[name], lerp(pretrained[name], finetuned[name], 0.5))


def test_sharded_strategies_are_refused_at_setup() -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        logger=False,
    )
    with pytest.raises(MisconfigurationException, match=r"does not support `ModelParallelStrategy` yet.*'ddp'"):
        TaskVectorScaling().setup(trainer, make_module(), "fit")


def test_the_python_sweep_needs_theta0_and_the_monitors_baselines() -> None:
    module = make_module()
    monitor = monitor_with(WeightRecorder(), scenario_probes=False)
    scaling = TaskVectorScaling(wise_ft=[0.5], lines=[])
    with pytest.raises(ValueError, match=r"needs θ₀ \(theta0=\)"):
        scaling.sweep(module, None, monitor)
    with pytest.raises(ValueError, match="this ForgettingMonitor has none"):
        scaling.sweep(module, weights(module), monitor)


def test_the_python_sweep_measures_a_module_outside_of_a_fit() -> None:
    """After a fit (snapshot released), sweep() with θ₀ kept by the caller gives the in-fit curve."""
    recorder = WeightRecorder()
    monitor = monitor_with(recorder)
    scaling = TaskVectorScaling(wise_ft=[0.5], lines=[(0.0, 1.0)], task="task/exact_match", report=False)
    module = make_module()
    pretrained = weights(module)
    fit(module, [monitor, scaling])
    in_fit = [point.values for point in scaling.points]
    again = TaskVectorScaling(wise_ft=[0.5], lines=[(0.0, 1.0)], task="task/exact_match", report=False)
    points = again.sweep(module, pretrained, monitor)
    assert [p.values for p in points] == in_fit
    assert_bitwise(weights(module), recorder.seen[1])
    assert not math.isnan(points[1].lost("knowledge/accuracy"))


def test_an_export_dir_that_is_an_existing_file_is_refused_at_setup_before_training(tmp_path: Path) -> None:
    taken = tmp_path / "model.bin"
    taken.write_bytes(b"")
    for export_dir, where in ((taken, "is an existing file"), (taken / "export", f"on its path, {taken}")):
        module = make_module(export_dir=str(export_dir))
        with pytest.raises(MisconfigurationException, match=f"export_dir=.* {re.escape(where)}") as caught:
            fit(module, [])
        assert module.trainer.global_step == 0  # refused before the fit, not by the export after it
        assert "Give the path of a directory" in str(caught.value)
