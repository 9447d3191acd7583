"""Continual fine-tuning (lit_mofo.continual): the accuracy matrix and its figures, the stage list and its refusals,
the stages driven through one fit (fresh optimizer and schedule, stage lr, the stage protocol of every callback), the
report and the files written after every stage, exact resume from any checkpoint, and the YAML config."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from continual_tasks import (
    MODEL_CONFIG,
    STRIDES,
    VOCAB,
    StrideData,
    StrideProbe,
    multi_process_run,
    stage_sequence,
    tiny_module,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from process_launch import run_script
from torch.utils.data import DistributedSampler

from lit_mofo import (
    ForgettingMonitor,
    HalfFineTuning,
    L2ToPretrained,
    MoFOCallback,
    ParameterDrift,
    TaskVectorScaling,
)
from lit_mofo.callbacks.half_finetuning import stage_seed
from lit_mofo.continual import (
    ContinualLearning,
    Stage,
    StageLoader,
    StageSequence,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forgetting,
    forward_transfer,
    stage_steps,
)
from lit_mofo.continual.stages import _train_loader
from lit_mofo.data import ResumableDataLoader
from lit_mofo.modules import CausalLMModule
from lit_mofo.snapshot import StageStartSnapshot

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 4  # optimizer steps per stage in the runs below: 3 stages, 12 steps

pytestmark = [
    # The stride data has no validation set (an empty list of loaders, which Lightning notes), the tiny runs log less
    # often than Lightning's default interval, and most Trainers here leave max_epochs unset (Lightning notes 1000;
    # ContinualLearning stops after the last stage).
    pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero"),
    pytest.mark.filterwarnings("ignore:`max_epochs` was not set"),
    pytest.mark.filterwarnings("ignore:The number of training batches .* is smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and the runs repeat bit for bit
    yield
    torch.set_num_threads(threads)


# ---- the figures of an accuracy matrix (known answers) -----------------------------------------------------------

# Rows: before stage 1, after stages 1..3; columns: tasks 1..3.
ACCURACY = [
    [0.1, 0.2, 0.0],
    [0.9, 0.3, 0.1],
    [0.6, 0.8, 0.2],
    [0.5, 0.4, 0.7],
]
LOSS = [
    [3.0, 3.0, 3.0],
    [1.0, 3.5, 3.0],
    [2.0, 1.0, 3.2],
    [2.5, 2.0, 1.0],
]


def test_overall_performance_is_the_mean_over_the_tasks_trained_so_far() -> None:
    assert average_accuracy(ACCURACY) == pytest.approx((0.5 + 0.4 + 0.7) / 3)  # TRACE's OP after the last stage
    assert average_accuracy(ACCURACY, after=1) == pytest.approx(0.9)
    assert average_accuracy(ACCURACY, after=2) == pytest.approx((0.6 + 0.8) / 2)
    assert average_accuracy(ACCURACY[:3]) == pytest.approx(0.7)  # rows so far: the same as after=2
    assert average_accuracy(LOSS) == pytest.approx((2.5 + 2.0 + 1.0) / 3)  # a plain mean for a loss too


def test_backward_transfer_is_each_earlier_tasks_change_since_its_own_stage() -> None:
    assert backward_transfer(ACCURACY) == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8)) / 2)  # -0.4: forgot
    assert backward_transfer(ACCURACY, after=2) == pytest.approx(0.6 - 0.9)
    assert backward_transfer(ACCURACY, after=1) is None
    # A loss that rose is negative transfer too: the sign follows the direction of the metric.
    assert backward_transfer(LOSS, higher_is_better=False) == pytest.approx(-((2.5 - 1.0) + (2.0 - 1.0)) / 2)


def test_forgetting_is_the_best_earlier_score_minus_the_score_now_per_task() -> None:
    assert forgetting(ACCURACY) == pytest.approx([0.9 - 0.5, 0.8 - 0.4, None])
    assert forgetting(ACCURACY, after=2) == [pytest.approx(0.9 - 0.6), None, None]
    assert forgetting(ACCURACY, after=1) == [None, None, None]
    assert average_forgetting(ACCURACY) == pytest.approx(0.4)
    assert average_forgetting(ACCURACY, after=1) is None
    assert forgetting(LOSS, higher_is_better=False) == pytest.approx([2.5 - 1.0, 2.0 - 1.0, None])
    # The row before stage 1 counts among the earlier rows: a task the pre-trained model did best has forgotten
    # from that level.
    knew = [[0.9, 0.0], [0.5, 0.7], [0.4, 0.9]]
    assert forgetting(knew) == [pytest.approx(0.9 - 0.4), None]


def test_forward_transfer_is_what_earlier_stages_gave_a_task_before_its_own() -> None:
    assert forward_transfer(ACCURACY) == pytest.approx(((0.3 - 0.2) + (0.2 - 0.0)) / 2)
    assert forward_transfer(ACCURACY, after=2) == pytest.approx(0.3 - 0.2)
    assert forward_transfer(ACCURACY, after=1) is None
    assert forward_transfer(LOSS, higher_is_better=False) == pytest.approx(-((3.5 - 3.0) + (3.2 - 3.0)) / 2)


def test_nan_scores_give_nan_figures() -> None:
    broken = [row[:] for row in ACCURACY]
    broken[2][0] = math.nan
    assert math.isnan(backward_transfer(broken, after=2))  # type: ignore[arg-type]
    assert math.isnan(forgetting(broken)[0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("matrix", "after", "message"),
    [
        ([], None, "needs the row before stage 1"),
        ([[0.1, 0.2]], None, r"rows 0\.\.0"),
        ([[0.1], [0.2], [0.3]], None, r"rows 0\.\.2 and 1 task"),
        ([[0.1, 0.2], [0.3]], None, "one score per task"),
        (ACCURACY, 4, r"after=4 is not a stage of the matrix; the valid range is 1\.\.3"),
        (ACCURACY, 0, r"valid range is 1\.\.3"),
    ],
)
def test_a_malformed_matrix_is_refused(matrix: list[list[float]], after: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        average_accuracy(matrix, after=after)


# ---- the stage list: refused at construction (YAML: when parsed), naming the stage and the fix --------------------


def _stage(name: str = "a", **kwargs: Any) -> Stage:
    return Stage(name, StrideData(1), **{"probe": StrideProbe(1), **kwargs})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: StageSequence([]), r"stages=\[\] is empty.*give at least one stage"),
        (lambda: StageSequence([_stage("a"), _stage("b"), _stage("a")]), r"stages 1 and 3 are both named 'a'.*'a_2'"),
        (lambda: StageSequence([_stage("a"), _stage("b", probe=None)]), r"stage 'b' has no task probe.*probes\['b'\]"),
        (
            lambda: StageSequence([_stage("a", probe=None)], probes={"a": StrideProbe(1), "c": StrideProbe(2)}),
            r"`probes` has an entry \['c'\] that names no stage; the stages are \['a'\]",
        ),
        (lambda: StageSequence([_stage("a")], probes={"a": StrideProbe(1)}), r"stage 'a' has two task probes"),
        (lambda: _stage("a", max_steps=0), r"Stage\('a'\): max_steps=0 is invalid; the valid range is an integer >= 1"),
        (lambda: _stage("a", max_steps=-3), r"Stage\('a'\): max_steps=-3"),
        (lambda: _stage("a", max_steps=2.5), r"max_steps=2.5 is invalid"),
        (lambda: _stage("a", max_steps=True), r"max_steps=True is invalid"),
        (lambda: _stage("a", lr=0.0), r"Stage\('a'\): lr=0.0 is invalid; the valid range is a finite number > 0"),
        (lambda: _stage("a", lr=float("inf")), r"lr=inf is invalid"),
        (lambda: _stage("a b"), r"name='a b' is invalid; a stage name is a non-empty string without '/'"),
        (lambda: Stage("a", data="train.jsonl", probe=StrideProbe(1)), r"data='train.jsonl'.*LightningDataModule"),
        (lambda: _stage("a", probe="task"), r"probe='task'.*not a lit_mofo.probes.Probe"),
        (lambda: StageSequence([{"name": "a", "data": StrideData(1)}]), r"stage 'a' has no task probe"),
    ],
)
def test_bad_stage_lists_are_refused_at_construction_naming_the_stage_and_the_fix(build: Any, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        build()


def test_a_bad_stage_list_in_a_config_is_refused_when_the_config_is_parsed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lit_mofo.cli import main

    config = yaml.safe_load((ROOT / "configs/continual.yaml").read_text())
    config["data"]["init_args"]["stages"][1]["max_steps"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    assert "Stage('reverse'): max_steps=0 is invalid; the valid range is an integer >= 1" in capsys.readouterr().err


def test_probes_take_their_stage_names_and_the_sequence_describes_itself() -> None:
    mapped = StrideProbe(3, name="whatever")
    sequence = StageSequence([_stage("a", max_steps=2, lr=1e-3), _stage("b", probe=None)], probes={"b": mapped})
    assert sequence.names == ["a", "b"]
    assert list(sequence.task_probes) == ["a", "b"]
    assert mapped.name == "b"
    description = sequence.describe()
    assert description[0]["max_steps"] == 2 and description[0]["lr"] == 1e-3
    assert description[0]["data"] == {
        "class": "continual_tasks.StrideData",
        "hparams": {"batch_size": 4, "num_sequences": 24, "num_val": 0, "seed": 0, "stride": 1},
    }
    assert description[1]["probe"] == "continual_tasks.StrideProbe"


# ---- the stage loader --------------------------------------------------------------------------------------------


def _numbers(count: int) -> ResumableDataLoader:
    torch.manual_seed(0)  # the loader's shuffling comes from the global RNG (exact across passes on resume)
    return ResumableDataLoader(torch.arange(count).tolist(), batch_size=2, shuffle=True)


def _flat(loader: Any) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def test_a_stage_loader_yields_exactly_its_budget_cycling_a_short_loader_and_cutting_a_long_one() -> None:
    reference = _numbers(6)
    passes = [_flat(reference) for _ in range(3)]  # 3 batches per pass, a new shuffle per pass
    assert _flat(StageLoader(_numbers(6), 7)) == [*passes[0], *passes[1], passes[2][0]]
    assert _flat(StageLoader(_numbers(6), 2)) == passes[0][:2]
    assert len(StageLoader(_numbers(6), 7)) == 7


@pytest.mark.parametrize("taken", [1, 3, 4, 6])  # 3: the end of a pass; 6: the end of the second
def test_a_stage_loader_restored_from_any_position_yields_exactly_the_rest(taken: int) -> None:
    expected = _flat(StageLoader(_numbers(6), 8))
    original = StageLoader(_numbers(6), 8, stage=1)
    iterator = iter(original)
    for _ in range(taken):
        next(iterator)
    state = original.state_dict()
    restored = StageLoader(_numbers(6), 8, stage=1)
    torch.manual_seed(123)  # the resumed process's RNG differs: the checkpoint's state decides
    restored.load_state_dict(state)
    assert _flat(restored) == expected[taken:]
    with pytest.raises(MisconfigurationException, match="state is of stage 2, but it is being restored into stage 3"):
        StageLoader(_numbers(6), 8, stage=2).load_state_dict(state)


def test_a_stage_loader_refuses_an_empty_stage() -> None:
    with pytest.raises(MisconfigurationException, match="The training loader of stage 'x' yielded no batch"):
        list(StageLoader([], 3, name="x"))


def test_the_stage_loaders_are_prepared_for_the_strategy_as_lightning_prepares_a_fits_loader() -> None:
    """The one place lit_mofo uses Lightning internals: a distributed sampler under DDP (unless
    ``use_distributed_sampler=False``), as Lightning injects into the loader of a fit's data module."""
    data = StrideData(1, num_sequences=24, batch_size=4)
    single = _train_loader(pl.Trainer(accelerator="cpu", devices=1, logger=False), data)
    assert isinstance(single, ResumableDataLoader) and len(single) == 6  # type: ignore[arg-type]
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched: no processes
    sharded = _train_loader(ddp, data)
    assert isinstance(sharded, ResumableDataLoader)  # rebuilt as the same class, with the sampler injected
    # (around torchdata's own RandomSampler, which Lightning treats as a custom sampler: in the batch sampler)
    distributed = sharded.batch_sampler.sampler  # type: ignore[union-attr]
    assert isinstance(distributed, DistributedSampler) and distributed.num_replicas == 2
    assert len(sharded) == 3  # half of the batches per process
    same = _train_loader(
        pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False, logger=False), data
    )
    assert not isinstance(same.batch_sampler.sampler, DistributedSampler)  # type: ignore[attr-defined]
    assert len(same) == 6  # type: ignore[arg-type]


# ---- one continual run, with every callback -------------------------------------------------------------------------


class Trace(Callback):
    """What every step sees: the stage (epoch), the batch, the optimizer and its learning rate, the callbacks' calls
    of the stage protocol."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int, int, float, int]] = []
        self.protocol: list[tuple[str, int, int, bool]] = []
        self.stage_start_weights: dict[int, dict[str, torch.Tensor]] = {}
        self._batch = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._batch = int(batch["input_ids"].sum())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        states = sum(1 for state in optimizer.state.values() if state)
        lr = optimizer.param_groups[0]["lr"]
        self.steps.append((trainer.global_step, trainer.current_epoch, self._batch, id(optimizer), lr, states))

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        self.protocol.append(("start", stage.index, trainer.global_step, stage.resumed))
        self.stage_start_weights[stage.index] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        self.protocol.append(("end", stage.index, trainer.global_step, stage.resumed))


@dataclass
class Run:
    trainer: pl.Trainer
    continual: ContinualLearning
    hft: HalfFineTuning
    monitor: ForgettingMonitor
    drift: ParameterDrift
    l2: L2ToPretrained
    trace: Trace
    weights: dict[str, torch.Tensor]
    directory: Path


def _nan_equal(value: Any) -> Any:
    """``value`` with NaN replaced by a marker, so that records restored from a checkpoint compare equal (a NaN
    equals only itself, the same object)."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {key: _nan_equal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_equal(item) for item in value]
    return value


def _fit(directory: Path, ckpt_path: Path | None = None, checkpoints: bool = False, **continual: Any) -> Run:
    pl.seed_everything(0)
    trace = Trace()
    run_callbacks: dict[str, Any] = {
        "continual": ContinualLearning(every_n_train_steps=2, **continual),
        "hft": HalfFineTuning(mode="mask", redraw_every_n_steps=3, reset=True, reset_to="stage_start", seed=5),
        "monitor": ForgettingMonitor({"general": StrideProbe(2)}, every_n_train_steps=2),
        "drift": ParameterDrift(every_n_train_steps=2),
        "l2": L2ToPretrained(strength=0.1, anchor="previous_stage"),
    }
    callbacks: list[Callback] = [*run_callbacks.values(), MoFOCallback(fraction=0.5), trace]
    if checkpoints:  # after every step, and at every stage's (epoch's) end, after the stage's end was handled
        callbacks.append(
            ModelCheckpoint(dirpath=directory / "checkpoints", filename="{step}", every_n_train_steps=1, save_top_k=-1)
        )
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory / "checkpoints", filename="end-{step}", save_on_train_epoch_end=True, save_top_k=-1
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=callbacks,
        logger=CSVLogger(directory, name="logs", version=0),
        log_every_n_steps=1,
        enable_checkpointing=checkpoints,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = tiny_module(optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0))
    trainer.fit(module, datamodule=stage_sequence(BUDGET, lrs=[None, 5e-3, None]), ckpt_path=ckpt_path)
    weights = {name: p.detach().clone() for name, p in module.state_dict().items()}
    return Run(trainer, **run_callbacks, trace=trace, weights=weights, directory=directory)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _fit(tmp_path_factory.mktemp("continual"), checkpoints=True)


def test_one_fit_trains_every_stage_for_exactly_its_budget_on_its_own_data(run: Run) -> None:
    assert [(step, epoch) for step, epoch, *_ in run.trace.steps] == [(s, s // BUDGET) for s in range(3 * BUDGET)]
    assert run.trainer.global_step == 3 * BUDGET and run.trainer.current_epoch == 3
    # Each stage's batches are its own data's (progressions of its stride), cycled past its 6 batches per pass.
    assert run.continual.stage_starts == [(0, "plus1"), (4, "plus3"), (8, "minus2")]


def test_every_stage_gets_a_fresh_optimizer_and_a_schedule_over_its_own_steps(run: Run) -> None:
    by_stage: dict[int, list[tuple[int, int, int, int, float, int]]] = {}
    for step in run.trace.steps:
        by_stage.setdefault(step[1], []).append(step)
    optimizers = [{step[3] for step in steps} for steps in by_stage.values()]
    assert all(len(ids) == 1 for ids in optimizers) and len(set.union(*optimizers)) == 3
    # A fresh optimizer has no state at its stage's first step (the moments start at zero).
    assert [steps[0][5] for steps in by_stage.values()] == [0, 0, 0]
    # Cosine from the stage's peak (no warmup) down over the stage's 4 steps; stage 2's peak is its lr, 5e-3.
    for stage, peak in ((0, 1e-2), (1, 5e-3), (2, 1e-2)):
        lrs = [step[4] for step in by_stage[stage]]
        expected = [peak * 0.5 * (1 + math.cos(math.pi * k / BUDGET)) for k in range(BUDGET)]
        assert lrs == pytest.approx(expected, rel=1e-9)


def test_the_stage_protocol_reaches_every_callback_once_per_stage(run: Run) -> None:
    assert run.trace.protocol == [
        ("start", 0, 0, False),
        ("end", 0, 4, False),
        ("start", 1, 4, False),
        ("end", 1, 8, False),
        ("start", 2, 8, False),
        ("end", 2, 12, False),
    ]


def test_the_matrix_has_the_row_before_stage_1_and_one_row_per_stage_measured_at_the_stage_ends(run: Run) -> None:
    continual = run.continual
    assert continual.metrics == ["accuracy", "loss"] and continual.headline_metric == "accuracy"
    matrix = continual.matrix()
    assert len(matrix) == 4 and all(len(row) == 3 for row in matrix)
    rows = {
        (r["row"], r["task"]): r["value"]
        for r in continual.history
        if r["metric"] == "accuracy" and r["row"] is not None
    }
    assert [[rows[(i, task)] for task in STRIDES] for i in range(4)] == matrix
    steps = sorted({r["step"] for r in continual.history if r["row"] is not None})
    assert steps == [0, 4, 8, 12]
    # Training a stage teaches its task: its score after its stage beats the score before stage 1.
    assert all(matrix[j + 1][j] > matrix[0][j] for j in range(3))
    figures = continual.summary()
    assert figures["op"] == pytest.approx(average_accuracy(matrix))
    assert figures["bwt"] == pytest.approx(backward_transfer(matrix))
    assert figures["fwt"] == pytest.approx(forward_transfer(matrix))
    assert list(figures["forgetting"].values()) == pytest.approx(forgetting(matrix))
    assert figures["bwt"] < 0  # the strides conflict: the sequence forgets


def test_every_logged_metric_name_carries_its_stage(run: Run) -> None:
    with open(run.directory / "logs/version_0/metrics.csv") as file:
        rows = list(csv.DictReader(file))
    columns = set(rows[0])
    continual = {c for c in columns if c.startswith("continual/")}
    assert {
        "continual/stage0_start/R/plus1/accuracy",
        "continual/stage1_plus1/R/plus3/loss",
        "continual/stage3_minus2/R/minus2/accuracy",
        "continual/stage2_plus3/op/accuracy",
        "continual/stage3_minus2/bwt/accuracy",
        "continual/stage3_minus2/fwt/loss",
        "continual/stage3_minus2/forgetting/plus1/accuracy",
        "continual/stage3_minus2/average_forgetting/accuracy",
        "continual/stage",
    } <= continual
    assert not [c for c in continual if c != "continual/stage" and not c.split("/")[1].startswith("stage")]
    # Every row of measurements says its stage: the probes' and the drift's rows as much as the training steps'.
    assert all(r["continual/stage"] for r in rows)  # hft/..., probe/..., drift/..., continual/..., train_loss
    stages = {int(float(r["step"])): float(r["continual/stage"]) for r in rows if r["train_loss"]}
    assert [stages[step] for step in (0, 3, 4, 11)] == [1.0, 1.0, 2.0, 3.0]  # the training steps
    baseline = [r for r in rows if r.get("probe/general/accuracy") and int(float(r["step"])) == 0]
    assert float(baseline[0]["continual/stage"]) == 0.0  # the monitor's baseline: before stage 1
    final = run.trainer.callback_metrics["continual/stage3_minus2/bwt/accuracy"].item()
    assert final == pytest.approx(run.continual.summary()["bwt"])


def test_the_matrix_is_on_disk_after_every_stage_and_in_the_report_with_its_heatmap(run: Run) -> None:
    directory = run.directory / "logs/version_0"
    saved = json.loads((directory / "continual_matrix.json").read_text())
    assert saved["metrics"]["accuracy"]["matrix"] == run.continual.matrix("accuracy")
    assert [stage["name"] for stage in saved["stages"]] == list(STRIDES)
    assert saved["metrics"]["loss"]["higher_is_better"] is False
    after = saved["metrics"]["accuracy"]["after_stage"]
    assert [entry["stage"] for entry in after] == [1, 2, 3]
    assert after[-1]["bwt"] == pytest.approx(run.continual.summary()["bwt"])
    assert "TRACE" in saved["definitions"]["bwt"] and "Avalanche" in saved["definitions"]["forgetting"]
    assert "| after 3 (minus2) |" in (directory / "continual_matrix.md").read_text()
    report = json.loads((directory / "forgetting_report.json").read_text())
    assert report["continual"]["metrics"]["accuracy"]["matrix"] == run.continual.matrix("accuracy")
    assert len(report["continual"]["measurements"]) == len(run.continual.history)
    markdown = (directory / "forgetting_report.md").read_text()
    assert (
        "## Continual fine-tuning: the accuracy matrix" in markdown and "Forgetting per task after stage 3" in markdown
    )
    for image in ("forgetting_report.png", "forgetting_report_continual_matrix.png"):
        assert (directory / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_general_capability_keeps_the_model_before_stage_1_as_its_baseline_and_is_measured_at_every_stage_end(
    run: Run,
) -> None:
    history = run.monitor.history
    baseline = [r for r in history if r["trigger"] == "baseline"]
    assert {r["step"] for r in baseline} == {0} and {r["stage"] for r in baseline} == {0}
    assert run.monitor.baselines["general"]["accuracy"] == baseline[0]["value"]
    assert {r["step"] for r in history if r["trigger"] == "stage_end"} <= {4, 8, 12}
    assert {r["step"] for r in history} >= {0, 4, 8, 12}  # a point at every stage boundary
    assert {(r["step"], r["stage"]) for r in history if r["step"] in (2, 6, 10)} == {(2, 1), (6, 2), (10, 3)}
    assert all(r["baseline"] == run.monitor.baselines["general"][r["metric"]] for r in history)
    section = run.monitor.report_section()
    assert section.curves[0].boundaries == [(0, "plus1"), (4, "plus3"), (8, "minus2")]


def test_parameter_drift_measures_from_the_pretrained_weights_and_from_each_stage_start(run: Run) -> None:
    within = [r for r in run.drift.stage_history if r["scope"] == "overall"]
    starts = [r for r in within if r["step"] in (0, 4, 8) and r["stage"] == r["step"] // BUDGET + 1]
    assert [r["relative_l2"] for r in starts] == [0.0, 0.0, 0.0]  # each stage starts from itself
    ends = {r["stage"]: r for r in within if r["step"] == r["stage"] * BUDGET}
    assert sorted(ends) == [1, 2, 3] and all(r["relative_l2"] > 0 for r in ends.values())
    overall = {r["step"]: r["relative_l2"] for r in run.drift.history if r["scope"] == "overall"}
    # Within stage 1 the stage start is the pre-trained model: the same figure.
    assert ends[1]["relative_l2"] == pytest.approx(overall[4])
    assert overall[12] > ends[3]["relative_l2"]  # from θ₀ the whole sequence's drift adds up
    assert "drift/stage/relative_l2" in run.trainer.callback_metrics


def test_half_finetuning_draws_a_new_half_per_stage_with_a_seed_from_the_run_seed_and_the_stage(run: Run) -> None:
    history = run.hft.history
    stage_draws = {entry["step"]: entry for entry in history if entry["step"] in (0, 4, 8)}
    assert sorted(stage_draws) == [0, 4, 8]
    # Within a stage the step re-draws continue (every 3 steps: step 3 in stage 1, 6 and... the stage draws reset
    # the count's generator, not the schedule).
    assert [entry["step"] for entry in history] == [0, 3, 4, 6, 8, 9]
    assert stage_seed(5, 0) == 5 and stage_seed(5, 1) != stage_seed(5, 2)
    assert stage_seed(5, 1) == stage_seed(5, 1) and 0 <= stage_seed(5, 2) < 2**63


class Halves(Callback):
    """The half HalfFineTuning froze for each stage, read at the stage's start (listed after it)."""

    def __init__(self, hft: HalfFineTuning) -> None:
        self.hft = hft
        self.frozen: list[tuple[str, ...]] = []

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        self.frozen.append(self.hft.frozen_names)


def test_half_finetuning_stage_draws_differ_between_stages_and_repeat_in_a_rerun(tmp_path: Path) -> None:
    def halves(seed: int, redraw_every_stage: bool | None = None) -> list[tuple[str, ...]]:
        hft = HalfFineTuning(seed=seed, redraw_every_stage=redraw_every_stage)
        recorder = Halves(hft)
        sequence = StageSequence([Stage(f"s{i}", StrideData(1), StrideProbe(1), max_steps=1) for i in range(4)])
        trainer = pl.Trainer(
            accelerator="cpu",
            callbacks=[ContinualLearning(report=False), hft, recorder],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(tiny_module(optimizer=partial(torch.optim.SGD, lr=0.0)), datamodule=sequence)
        return recorder.frozen

    first = halves(seed=3)
    assert len(first) == 4 and len(set(first)) == 4  # four stages, four different halves
    assert halves(seed=3) == first  # reproducible
    assert halves(seed=4) != first
    assert len(set(halves(seed=3, redraw_every_stage=False))) == 1  # the first stage's half throughout


def test_half_finetuning_freezes_other_expert_slices_in_every_stage_and_they_stay_bit_identical(tmp_path: Path) -> None:
    """A mixture of experts: each stage's draw freezes half of each block's experts (slices of the fused expert
    tensors), and through the stage's fresh AdamW (weight decay on) those rows do not move."""
    config = {**MODEL_CONFIG, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    torch.manual_seed(0)
    module = CausalLMModule(
        model_config=config, optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1), warmup_ratio=0.0
    )
    hft = HalfFineTuning(mode="mask", seed=1)
    slices: list[dict[str, tuple[int, ...]]] = []
    weights: list[dict[str, torch.Tensor]] = []

    class Record(Callback):
        def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
            slices.append(hft.frozen_slices)
            weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if ".experts." in n})

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if ".experts." in n})

    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning(report=False), hft, Record()],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=stage_sequence(2))
    assert len(slices) == 3 and all(slices) and len({tuple(sorted(s.items())) for s in slices}) > 1
    for stage, frozen in enumerate(slices):
        start, end = weights[stage], weights[stage + 1]
        for name, experts in frozen.items():
            for expert in range(start[name].shape[0]):
                same = torch.equal(start[name][expert], end[name][expert])
                assert same == (expert in experts), (stage, name, expert)


def test_l2_to_the_previous_stage_pulls_towards_the_weights_the_stage_started_from(run: Run) -> None:
    """The logged penalty is at the weights each step starts from: 0 at every stage's first step, when the weights
    are the anchor, and above 0 within the stages (against θ₀ it would grow over the whole sequence)."""
    with open(run.directory / "logs/version_0/metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("l2_to_pretrained/penalty")]
    penalty = {int(float(r["step"])): float(r["l2_to_pretrained/penalty"]) for r in rows}
    assert sorted(penalty) == list(range(3 * BUDGET))  # logged at every step (log_every_n_steps=1)
    assert [penalty[s] for s in (0, 4, 8)] == [0.0, 0.0, 0.0]
    assert all(penalty[s] > 0 for s in penalty if s % BUDGET)


def test_resuming_from_any_checkpoint_ends_with_the_same_weights_matrix_and_histories(run: Run, tmp_path: Path) -> None:
    # 2: mid stage 1; 4: stage 1's last step (its end not handled yet), and its end (handled); 6: mid stage 2; 9:
    # first step of stage 3; 12: the last step of the run (the last stage's end not handled yet).
    for name in ("step=2", "step=4", "end-step=4", "step=6", "step=9", "step=12"):
        step = int(name.rpartition("=")[2])
        resumed = _fit(tmp_path / name, ckpt_path=run.directory / "checkpoints" / f"{name}.ckpt")
        where = f"resumed from {name}"
        assert resumed.trainer.global_step == 12, where
        assert all(torch.equal(run.weights[name], resumed.weights[name]) for name in run.weights), where
        assert resumed.continual.rows == run.continual.rows, where
        assert resumed.continual.history == run.continual.history, where
        assert resumed.continual.stage_starts == run.continual.stage_starts, where
        assert resumed.hft.history == run.hft.history, where

        def without_seconds(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return _nan_equal([{k: v for k, v in r.items() if k != "seconds"} for r in records])

        assert without_seconds(resumed.monitor.history) == without_seconds(run.monitor.history), where
        assert resumed.drift.history == run.drift.history, where
        assert resumed.drift.stage_history == run.drift.stage_history, where
        # The steps after the checkpoint: same stage, batch and learning rate as the uninterrupted run.
        assert [s[:3] + s[4:5] for s in resumed.trace.steps] == [s[:3] + s[4:5] for s in run.trace.steps[step:]], where


def test_resuming_with_a_changed_stage_list_is_refused_naming_the_difference(run: Run, tmp_path: Path) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning()],
        logger=False,
        enable_progress_bar=False,
        max_epochs=3,
        default_root_dir=tmp_path,
    )
    changed = stage_sequence([BUDGET, BUDGET + 2, BUDGET])
    with pytest.raises(MisconfigurationException, match=r"another stage list: stage 2 \('plus3'\) has max_steps=6, "):
        trainer.fit(tiny_module(), datamodule=changed, ckpt_path=run.directory / "checkpoints" / "step=6.ckpt")
    renamed = StageSequence([Stage(n if n != "minus2" else "minus3", s.data, StrideProbe(1), max_steps=BUDGET)
                             for n, s in zip(STRIDES, stage_sequence(BUDGET).stages, strict=True)])  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning()],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match=r"stages are \['plus1', 'plus3', 'minus2'\], now they are"):
        trainer.fit(tiny_module(), datamodule=renamed, ckpt_path=run.directory / "checkpoints" / "step=6.ckpt")


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("crash")


def test_a_crash_in_stage_k_leaves_the_rows_before_it_on_disk(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning(), CrashAt(6)],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    with pytest.raises(RuntimeError, match="crash"):
        trainer.fit(tiny_module(), datamodule=stage_sequence(BUDGET))
    saved = json.loads((tmp_path / "continual_matrix.json").read_text())
    assert [row["label"] for row in saved["rows"]] == ["before stage 1", "after 1 (plus1)"]
    assert len(saved["metrics"]["accuracy"]["matrix"]) == 2


def test_stage_steps_is_the_current_stages_budget_and_a_stage_without_max_steps_makes_one_pass(tmp_path: Path) -> None:
    seen: list[tuple[int, int | float]] = []
    validated: list[tuple[int, int]] = []  # (epoch, stride of the batch)

    class Budget(Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append((trainer.current_epoch, stage_steps(trainer)))

        def on_validation_batch_start(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int, dataloader_idx: int = 0
        ) -> None:
            tokens = batch["input_ids"]
            stride = int((tokens[0, 1] - tokens[0, 0]) % VOCAB)
            validated.append((trainer.current_epoch, stride))

    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning(report=False), Budget()],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accumulate_grad_batches=2,
    )
    sequence = stage_sequence([2, None, 1])  # stage 2: 24 sequences in batches of 4, 2 batches per step
    for stage in sequence.stages:
        stage.data.num_val = 4  # one validation batch per stage, at its end: the stage's own data
    trainer.fit(tiny_module(), datamodule=sequence)
    assert seen == [(0, 2), (1, 3), (2, 1)]
    assert trainer.global_step == 6
    strides = [stride % VOCAB for stride in STRIDES.values()]
    assert sorted(set(validated)) == [(0, strides[0]), (1, strides[1]), (2, strides[2])]  # sanity check included
    plain = pl.Trainer(accelerator="cpu", max_steps=5, logger=False)
    plain.fit_loop  # noqa: B018 - a Trainer outside a continual run: the whole fit's steps
    assert stage_steps(plain) == 5


@pytest.mark.parametrize(
    ("options", "datamodule", "message"),
    [
        ({}, lambda: StrideData(1), r"needs the fit's data to be a lit_mofo.continual.StageSequence.*got StrideData"),
        (
            {"max_steps": 8},
            stage_sequence,
            r"Trainer\(max_steps=8\) would stop the sequence part-way.*Remove max_steps",
        ),
        ({"max_epochs": 2}, stage_sequence, r"max_epochs=2\) would stop the fit before the last of the 3 stages"),
        ({"limit_train_batches": 0.5}, stage_sequence, r"limit_train_batches=0.5\) would cut the stages"),
        ({"reload_dataloaders_every_n_epochs": 2}, stage_sequence, r"reload_dataloaders_every_n_epochs=2\)"),
    ],
)
def test_a_trainer_that_cannot_run_the_stages_is_refused_at_setup(
    options: dict[str, Any], datamodule: Any, message: str, tmp_path: Path
) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", callbacks=[ContinualLearning()], logger=False, default_root_dir=tmp_path, **options
    )
    with pytest.raises(MisconfigurationException, match=message):
        trainer.fit(tiny_module(), datamodule=datamodule())


def test_a_stage_sequence_without_the_callback_is_refused_at_setup(tmp_path: Path) -> None:
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, max_epochs=3)
    with pytest.raises(MisconfigurationException, match=r"the Trainer has none\. Add lit_mofo.continual.Continual"):
        trainer.fit(tiny_module(), datamodule=stage_sequence())


def test_continual_learning_arguments_are_checked() -> None:
    with pytest.raises(MisconfigurationException, match=r"every_n_train_steps=-1 is invalid"):
        ContinualLearning(every_n_train_steps=-1)
    with pytest.raises(MisconfigurationException, match=r"optimizer_state='reset' is invalid.*'fresh', 'keep'"):
        ContinualLearning(optimizer_state="reset")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"metric='' is invalid"):
        ContinualLearning(metric="")


def test_optimizer_state_keep_carries_the_moments_into_the_next_stage(tmp_path: Path) -> None:
    trace = Trace()
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning(optimizer_state="keep", report=False), trace],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(tiny_module(), datamodule=stage_sequence(2))
    first_steps = [step for step in trace.steps if step[0] in (0, 2, 4)]
    assert first_steps[0][5] == 0 and all(step[5] > 0 for step in first_steps[1:])
    assert len({step[3] for step in first_steps}) == 3  # still a new optimizer (and schedule) per stage


def test_half_finetuning_resets_at_stage_starts_only_in_a_continual_run(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match=r"reset=True.*neither `redraw_every_n_steps`"):
        HalfFineTuning(reset=True)
    hft = HalfFineTuning(reset=True, redraw_every_stage=True)
    trainer = pl.Trainer(accelerator="cpu", callbacks=[hft], logger=False, max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(MisconfigurationException, match=r"no lit_mofo.continual.ContinualLearning callback"):
        trainer.fit(tiny_module(), datamodule=StrideData(1))


def test_stage_start_snapshot_is_retaken_in_place_at_every_stage_start(run: Run) -> None:
    assert StageStartSnapshot.CHECKPOINT_KEY != "lit_mofo_pretrained_snapshot"
    checkpoint = torch.load(run.directory / "checkpoints" / "step=6.ckpt", weights_only=False)
    saved = checkpoint[StageStartSnapshot.CHECKPOINT_KEY]["tensors"]
    start = run.trace.stage_start_weights[1]
    assert saved and all(torch.equal(tensor, start[name]) for name, tensor in saved.items())


def test_task_vector_scaling_edits_the_whole_sequences_task_vector_after_the_last_stage(tmp_path: Path) -> None:
    monitor = ForgettingMonitor({"general": StrideProbe(2), "plus1": StrideProbe(1)}, every_n_train_steps=None)
    scaling = TaskVectorScaling(wise_ft=[0.0, 1.0], lines=[], report=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning(report=False), monitor, scaling],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(tiny_module(), datamodule=stage_sequence(2))
    points = {point.key: point for point in scaling.points}
    # alpha 0 is θ₀ of the whole sequence: the model before stage 1, the monitor's baseline; alpha 1 the final model.
    assert points["wise_ft_a0"].values == monitor.baselines
    final = {r["probe"]: {} for r in monitor.history}
    for record in monitor.history:
        if record["step"] == trainer.global_step:
            final[record["probe"]][record["metric"]] = record["value"]
    assert points["wise_ft_a1"].values == final


def test_lora_adapters_are_kept_across_the_stages_with_a_fresh_optimizer_over_them(tmp_path: Path) -> None:
    from peft import LoraConfig

    module = tiny_module(peft=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    base = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    adapters = {n: p for n, p in module.named_parameters() if p.requires_grad}
    optimized: list[set[int]] = []

    class Params(Callback):
        def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
            optimized.append({id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]})

    trainer = pl.Trainer(
        accelerator="cpu",
        callbacks=[ContinualLearning(report=False), Params()],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=stage_sequence(2))
    assert optimized == [{id(p) for p in adapters.values()}] * 3  # the same adapters, not merged nor re-created
    assert all(torch.equal(p, base[n]) for n, p in module.named_parameters() if n in base)  # the base stays frozen
    assert all(module.get_parameter(n) is p for n, p in adapters.items())


# ---- two processes: DDP and FSDP2 give the one-process run ---------------------------------------------------------

SCRIPT = ROOT / "tests/scripts/continual.py"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return multi_process_run(tmp_path_factory.mktemp("one_process"))


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def two_processes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Any]]:
    out = tmp_path_factory.mktemp(request.param)
    result = run_script(SCRIPT, str(out), request.param, timeout=900)  # about 20 s each on 2 shared CPU cores
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, [torch.load(out / f"{request.param}.rank{r}.pt", weights_only=False) for r in (0, 1)]


def _close(records: list[dict[str, Any]], expected: list[dict[str, Any]], tolerance: float) -> bool:
    """Equal records, floats within ``tolerance`` relative (the FSDP2 drift sums shards in float32 first)."""
    if len(records) != len(expected):
        return False
    for record, reference in zip(records, expected, strict=True):
        if record.keys() != reference.keys():
            return False
        for key, value in record.items():
            if isinstance(value, float) and isinstance(reference[key], float):
                if not math.isclose(value, reference[key], rel_tol=tolerance, abs_tol=tolerance):
                    return False
            elif value != reference[key]:
                return False
    return True


@pytest.mark.slow
def test_two_processes_give_the_one_process_matrix_weights_and_stage_transitions(
    two_processes: tuple[str, list[Any]], one_process: dict[str, Any]
) -> None:
    """Every rank fed the same batches (``use_distributed_sampler=False``): the gradient is the one-process gradient,
    so DDP and FSDP2 give the one-process accuracy matrix exactly (the task probes run the same forwards on every
    rank), the same weights bit for bit, the same Half Fine-Tuning draws and stage transitions on every rank; the drift
    equals it to float32 summation order under FSDP2 (shards summed first, relative 1e-6) and exactly under DDP."""
    strategy, ranks = two_processes
    for rank in ranks:
        for fit in ("full", "resumed"):  # the run, and the run resumed from step 6 (mid stage 2)
            run, where = rank[fit], f"{strategy}, {fit}, rank {rank['full']['rank']}"
            assert run["world_size"] == 2, where
            assert run["rows"] == one_process["rows"], where
            assert run["history"] == one_process["history"], where
            assert run["stage_starts"] == one_process["stage_starts"] == [(0, "plus1"), (4, "plus3"), (8, "minus2")]
            assert run["hft"] == one_process["hft"], where
            assert _nan_equal(run["monitor"]) == _nan_equal(one_process["monitor"]), where
            tolerance = 1e-6 if strategy == "fsdp2" else 0.0
            assert _close(run["drift"], one_process["drift"], tolerance), where
            assert _close(run["stage_drift"], one_process["stage_drift"], tolerance), where
            start = 0 if fit == "full" else 6
            assert run["batches"] == [b for b in one_process["batches"] if b[0] >= start], where
        assert [p for p in rank["full"]["protocol"]] == one_process["protocol"]
    weights = one_process["weights"]
    for fit in ("full", "resumed"):
        gathered = ranks[0][fit]["weights"]
        assert all(torch.equal(gathered[name], weights[name]) for name in weights), f"{strategy}, {fit}"
    # Resumed in stage 2: ModelParallelStrategy built the optimizers for stage 1 before the checkpoint said stage 2,
    # so they were rebuilt for it (and MoFOCallback converted them again) during the restore, before the loops (the
    # global step) were restored; DDP restored the stage before building them.
    resumed_protocol = ranks[0]["resumed"]["protocol"]
    assert (resumed_protocol[0] == ("start", 1, 0, 4, True)) == (strategy == "fsdp2")
    assert [p for p in resumed_protocol if not p[4]] == [p for p in one_process["protocol"] if p[2] >= 8]


# ---- the config ------------------------------------------------------------------------------------------------------


def test_the_continual_config_runs_end_to_end_shortened_and_writes_the_heatmap(tmp_path: Path) -> None:
    from lit_mofo.cli import main
    from lit_mofo.scenario import TASK_SEQUENCE, TaskSpec, task_arguments

    config = yaml.safe_load((ROOT / "configs/continual.yaml").read_text())
    # The config runs the embedded task sequence: its stages are TASK_SEQUENCE's, data and probe on the same problems.
    assert [stage["name"] for stage in config["data"]["init_args"]["stages"]] == list(TASK_SEQUENCE)
    for stage in config["data"]["init_args"]["stages"]:
        spec = task_arguments(TASK_SEQUENCE[stage["name"]])
        del spec["scenario"]  # the default, overlap
        defaults = {key: getattr(TaskSpec(), key) for key in spec}
        for part in ("data", "probe"):
            given = {key: value for key, value in stage[part]["init_args"].items() if key in spec}
            assert {**defaults, **given} == spec, (stage["name"], part)
    for stage in config["data"]["init_args"]["stages"]:
        stage["max_steps"] = 3
        stage["data"]["init_args"]["num_train"] = 96
        stage["probe"]["init_args"]["num_examples"] = 32
    for callback in config["trainer"]["callbacks"]:
        if "every_n_train_steps" in callback.get("init_args", {}):
            callback["init_args"]["every_n_train_steps"] = 2
    path = tmp_path / "continual.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 12 and cli.trainer.current_epoch == 4
    directory = tmp_path / "lightning_logs/version_0"
    saved = json.loads((directory / "continual_matrix.json").read_text())
    assert [stage["name"] for stage in saved["stages"]] == ["cipher", "reverse", "value_cipher", "reverse_cipher"]
    assert len(saved["metrics"]["exact_match"]["matrix"]) == 5
    assert (directory / "forgetting_report_continual_matrix.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((directory / "forgetting_report.json").read_text())
    assert {"continual", "forgetting", "drift"} <= set(report)
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == [
        "epoch=0-step=3.ckpt",
        "epoch=1-step=6.ckpt",
        "epoch=2-step=9.ckpt",
        "epoch=3-step=12.ckpt",
    ]
