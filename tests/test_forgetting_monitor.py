"""ForgettingMonitor: baseline on the pre-trained model, sign conventions, schedule, isolation from training,
logging, the end-of-fit report, resume, and clear errors for bad input."""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from process_launch import run_script
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor, forgetting, isolated_evaluation, retention
from lit_mofo.callbacks.task_vector_scaling import TaskVectorScaling
from lit_mofo.probes import CallableProbe, LanguageModelProbe, Probe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM, synthetic_progressions  # noqa: E402

REFERENCE = synthetic_progressions(8, 16, 128, seed=7).tolist()


class LM(TinyCausalLM):
    """The tiny Llama with AdamW, attention dropout (so training consumes the RNG) and a validation step."""

    def __init__(self, dropout: float = 0.0, lr: float = 1e-2) -> None:
        super().__init__(max_position_embeddings=32)
        self.lr = lr
        for layer in self.model.model.layers:
            layer.self_attn.attention_dropout = dropout

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.log("val_loss", self(batch[0]))


class Data(SyntheticTokenDataModule):
    def __init__(self) -> None:
        super().__init__(num_sequences=96, seq_len=16, batch_size=8, shuffle=True, seed=0)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, ...]]:
        return DataLoader(TensorDataset(synthetic_progressions(8, 16, 128, seed=9)), batch_size=8)


def lm_probe() -> LanguageModelProbe:
    return LanguageModelProbe(token_ids=REFERENCE, batch_size=8)


def fit(
    callbacks: list[pl.Callback],
    root: Path,
    module: LM | None = None,
    max_steps: int = 6,
    logger: Any = False,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> tuple[pl.Trainer, LM]:
    module = module or LM()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        default_root_dir=root,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=kwargs.pop("limit_val_batches", 0),
        num_sanity_val_steps=kwargs.pop("num_sanity_val_steps", 0),
        **kwargs,
    )
    trainer.fit(module, Data(), ckpt_path=ckpt_path)
    return trainer, module


def scripted(values: dict[str, list[float]], directions: dict[str, bool]) -> CallableProbe:
    """A probe returning the next value of each list at every evaluation."""
    iterators = {metric: iter(series) for metric, series in values.items()}
    return CallableProbe(lambda trainer, module: {m: next(it) for m, it in iterators.items()}, directions)


# ---------------------------------------------------------------------- conventions
def test_forgetting_is_positive_when_worse_in_both_directions() -> None:
    assert forgetting(0.6, baseline=0.8, higher_is_better=True) == pytest.approx(0.2)  # accuracy fell
    assert forgetting(2.5, baseline=2.0, higher_is_better=False) == pytest.approx(0.5)  # loss rose
    assert forgetting(0.9, baseline=0.8, higher_is_better=True) == pytest.approx(-0.1)  # improved: negative
    assert forgetting(1.5, baseline=2.0, higher_is_better=False) == pytest.approx(-0.5)


def test_retention_is_the_share_of_pretrained_performance_kept() -> None:
    assert retention(0.6, baseline=0.8, higher_is_better=True) == pytest.approx(0.75)
    assert retention(2.5, baseline=2.0, higher_is_better=False) == pytest.approx(0.8)
    assert retention(0.0, baseline=0.0, higher_is_better=True) == 1.0
    assert math.isnan(retention(0.5, baseline=0.0, higher_is_better=True))
    assert math.isnan(retention(0.0, baseline=2.0, higher_is_better=False))


def test_logged_forgetting_and_retention_follow_each_metrics_direction(tmp_path: Path) -> None:
    probe = scripted({"acc": [0.8, 0.6, 0.5], "loss": [2.0, 2.5, 3.0]}, {"acc": True, "loss": False})
    monitor = ForgettingMonitor({"bench": probe}, every_n_train_steps=2, report=False)
    trainer, _ = fit([monitor], tmp_path, max_steps=4)
    assert monitor.baselines == {"bench": {"acc": 0.8, "loss": 2.0}}
    metrics = trainer.callback_metrics
    assert metrics["probe/bench/acc"].item() == pytest.approx(0.5)  # steps 0, 2, 4
    assert metrics["forgetting/bench/acc"].item() == pytest.approx(0.3)
    assert metrics["retention/bench/acc"].item() == pytest.approx(0.625)
    assert metrics["forgetting/bench/loss"].item() == pytest.approx(1.0)
    assert metrics["retention/bench/loss"].item() == pytest.approx(2.0 / 3.0)


# ---------------------------------------------------------------------- baseline and schedule
def test_baseline_equals_the_pretrained_models_value(tmp_path: Path) -> None:
    pretrained = LM()
    probe = lm_probe()
    probe.setup(None, pretrained)  # type: ignore[arg-type]
    with isolated_evaluation(pretrained):
        expected = probe.evaluate(None, pretrained)  # type: ignore[arg-type]
    monitor = ForgettingMonitor({"ref": lm_probe()}, every_n_train_steps=3, report=False)
    fit([monitor], tmp_path, module=LM())
    assert monitor.baselines["ref"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert monitor.baselines["ref"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    final = [r for r in monitor.history if r["metric"] == "loss"][-1]
    assert final["step"] == 6 and final["value"] < expected["loss"]  # training on progressions helps held-out ones
    assert final["forgetting"] == pytest.approx(final["value"] - expected["loss"])


def test_schedule_is_baseline_every_n_steps_validation_ends_and_fit_end_each_step_once(tmp_path: Path) -> None:
    monitor = ForgettingMonitor({"ref": lm_probe()}, every_n_train_steps=4, report=False)
    fit([monitor], tmp_path, max_steps=10, val_check_interval=5, limit_val_batches=1, num_sanity_val_steps=1)
    loss = [(r["step"], r["trigger"]) for r in monitor.history if r["metric"] == "loss"]
    # 12 batches per epoch; validation after batches 5 and 10; the fit ends at step 10 (already measured).
    assert loss == [(0, "baseline"), (4, "interval"), (5, "validation"), (8, "interval"), (10, "validation")]


def test_without_an_interval_only_the_baseline_and_the_end_are_measured(tmp_path: Path) -> None:
    monitor = ForgettingMonitor({"ref": lm_probe()}, every_n_train_steps=None, report=False)
    fit([monitor], tmp_path, max_steps=3)
    assert [(r["step"], r["trigger"]) for r in monitor.history if r["metric"] == "loss"] == [
        (0, "baseline"),
        (3, "fit_end"),
    ]


# ---------------------------------------------------------------------- isolation
class RandomnessProbe(Probe):
    """A probe that consumes every RNG and flips module modes, as a careless evaluation would."""

    name = "noisy"

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {"draw": True}

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        pl_module.train()
        draw = torch.rand(3).sum().item() + random.random() + float(np.random.rand())
        return {"draw": draw}


class ModeRecorder(pl.Callback):
    """Records every submodule's training flag after each batch (after the monitor's hook)."""

    def __init__(self) -> None:
        self.modes: list[dict[str, bool]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.modes.append({name: module.training for name, module in pl_module.named_modules()})


def deterministic_fit(tmp_path: Path, with_monitor: bool) -> tuple[dict[str, Tensor], list[dict[str, bool]]]:
    pl.seed_everything(123, verbose=False)
    module = LM(dropout=0.3)
    module.model.model.norm.eval()  # a submodule the user keeps in eval mode: must stay so
    recorder = ModeRecorder()
    callbacks: list[pl.Callback] = [recorder]
    if with_monitor:
        probes = {"ref": lm_probe(), "noisy": RandomnessProbe()}
        callbacks.insert(0, ForgettingMonitor(probes, every_n_train_steps=2, report=False))
    fit(callbacks, tmp_path, module=module, max_steps=7, val_check_interval=3, limit_val_batches=1)
    return {name: p.detach().clone() for name, p in module.named_parameters()}, recorder.modes


# The norm kept in eval mode is the point (the monitor must not switch it back); Lightning notes it at fit start.
@pytest.mark.filterwarnings("ignore:Found 1 module.s. in eval mode at the start of training")
def test_a_fit_with_the_monitor_ends_with_exactly_the_weights_of_the_same_fit_without(tmp_path: Path) -> None:
    without, modes_without = deterministic_fit(tmp_path / "a", with_monitor=False)
    with_monitor, modes_with = deterministic_fit(tmp_path / "b", with_monitor=True)
    assert with_monitor.keys() == without.keys()
    moved = [name for name in without if not torch.equal(without[name], LM().state_dict()[name])]
    assert len(moved) == len(without)  # the fit did train every tensor
    for name in without:
        assert torch.equal(with_monitor[name], without[name]), name
    assert modes_with == modes_without
    assert all(modes["model.model.norm"] is False and modes["model"] is True for modes in modes_with)


def test_isolated_evaluation_restores_rng_modes_and_grad_mode() -> None:
    module = LM()
    module.train()
    module.model.lm_head.eval()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    with isolated_evaluation(module):
        assert not torch.is_grad_enabled()
        assert not any(m.training for m in module.modules())
        torch.rand(10), random.random(), np.random.rand()
        module.train()
    assert torch.is_grad_enabled()
    assert module.training and module.model.model.training and not module.model.lm_head.training
    state = (torch.rand(1).item(), random.random(), float(np.random.rand()))
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    assert state == (torch.rand(1).item(), random.random(), float(np.random.rand()))


# ---------------------------------------------------------------------- logging and report
def test_metrics_reach_the_logger_and_can_be_monitored_by_model_checkpoint(tmp_path: Path) -> None:
    monitor = ForgettingMonitor({"ref": lm_probe()}, every_n_train_steps=2, report=False)
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="forgetting/ref/loss", mode="min", every_n_train_steps=2, save_top_k=1
    )
    logger = CSVLogger(tmp_path, name="logs", version=0)
    fit([monitor, checkpoint], tmp_path, max_steps=4, logger=logger, log_every_n_steps=1)
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = [(int(r["step"]), float(r["forgetting/ref/loss"])) for r in rows if r.get("forgetting/ref/loss")]
    assert [step for step, _ in logged] == [0, 2, 4]
    assert logged[0][1] == 0.0
    assert {"probe/ref/loss", "retention/ref/perplexity", "probe/ref/perplexity"} <= set(rows[0])
    expected = [r for r in monitor.history if r["metric"] == "loss" and r["step"] in (2, 4)]
    assert checkpoint.best_model_score is not None
    assert checkpoint.best_model_score.item() == pytest.approx(min(r["forgetting"] for r in expected), rel=1e-5)


def test_report_files_hold_every_measurement_and_the_summary_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monitor = ForgettingMonitor({"ref": lm_probe()}, every_n_train_steps=2)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    fit([monitor], tmp_path, max_steps=5, logger=logger, log_every_n_steps=1)
    directory = Path(logger.log_dir)
    report = json.loads((directory / "forgetting_report.json").read_text())
    records = report["forgetting"]["measurements"]
    assert [(r["step"], r["metric"]) for r in records] == [(s, m) for s in (0, 2, 4, 5) for m in ("loss", "perplexity")]
    assert set(records[0]) >= {"step", "probe", "metric", "value", "baseline", "forgetting", "retention"}
    assert report["forgetting"]["baselines"] == monitor.baselines
    assert report["meta"]["optimizers"].startswith("AdamW(")
    markdown = (directory / "forgetting_report.md").read_text()
    assert "| probe | metric | better | pre-trained | final | forgetting |" in markdown
    if pytest.importorskip("matplotlib"):
        assert (directory / "forgetting_report.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "Forgetting at step 5" in out and out.count("lit_mofo report") == 1


def test_without_a_logger_the_report_goes_to_the_default_root_dir(tmp_path: Path) -> None:
    fit([ForgettingMonitor({"ref": lm_probe()}, every_n_train_steps=None)], tmp_path, max_steps=1)
    assert (tmp_path / "forgetting_report.json").is_file() and (tmp_path / "forgetting_report.md").is_file()


def test_report_dir_overrides_the_log_dir(tmp_path: Path) -> None:
    monitor = ForgettingMonitor({"ref": lm_probe()}, every_n_train_steps=None, report_dir=str(tmp_path / "out"))
    fit([monitor], tmp_path / "root", max_steps=1)
    assert (tmp_path / "out" / "forgetting_report.json").is_file()


def test_a_non_finite_value_is_logged_with_a_warning_and_training_goes_on(tmp_path: Path) -> None:
    probe = scripted({"score": [1.0, math.nan, math.inf]}, {"score": True})
    monitor = ForgettingMonitor({"custom": probe}, every_n_train_steps=2)
    with pytest.warns(UserWarning, match=r"non-finite score = nan at step 2"):
        trainer, _ = fit([monitor], tmp_path, max_steps=4)
    assert trainer.global_step == 4
    assert math.isinf(trainer.callback_metrics["probe/custom/score"].item())
    values = [r["value"] for r in monitor.history]
    assert values[0] == 1.0 and math.isnan(values[1]) and math.isinf(values[2])
    saved = json.loads((tmp_path / "forgetting_report.json").read_text())["forgetting"]["measurements"]
    assert [r["value"] for r in saved] == [1.0, None, None]  # strict JSON


# ---------------------------------------------------------------------- resume
class Counting(CallableProbe):
    def __init__(self) -> None:
        self.calls: list[int] = []
        super().__init__(self._measure, higher_is_better=False, name="norm")

    def _measure(self, trainer: pl.Trainer, module: LM) -> float:
        self.calls.append(trainer.global_step)
        return module.model.lm_head.weight.norm().item()


# The resumed fits of the next two tests leave out the ModelCheckpoint that wrote the checkpoint, which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_resumed_fit_takes_the_baseline_from_the_checkpoint(tmp_path: Path) -> None:
    first = ForgettingMonitor({"norm": Counting()}, every_n_train_steps=2, report=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit([first, checkpoint], tmp_path, max_steps=3)
    pretrained_norm = first.baselines["norm"]["value"]

    probe = Counting()
    resumed = ForgettingMonitor({"norm": probe}, every_n_train_steps=2, report=False)
    ckpt = str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    _, module = fit([resumed], tmp_path, module=LM(), max_steps=6, ckpt_path=ckpt)
    assert resumed.baselines == first.baselines
    assert probe.calls == [4, 6]  # no new baseline on the resumed weights
    steps = [(r["step"], r["trigger"]) for r in resumed.history]
    # the step-3 checkpoint was written before the first fit's end-of-fit evaluation
    assert steps == [(0, "baseline"), (2, "interval"), (4, "interval"), (6, "interval")]
    final = resumed.history[-1]
    assert final["baseline"] == pretrained_norm
    assert final["forgetting"] == pytest.approx(module.model.lm_head.weight.norm().item() - pretrained_norm)


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_resuming_with_probes_the_checkpoint_has_no_baselines_for_is_refused(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit([ForgettingMonitor({"norm": Counting()}, report=False), checkpoint], tmp_path, max_steps=2)
    extended = ForgettingMonitor({"norm": Counting(), "ref": lm_probe()}, report=False)
    with pytest.raises(MisconfigurationException, match=r"holds no pre-trained baselines for .*'norm', 'ref'"):
        fit([extended], tmp_path, max_steps=4, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))


def test_whether_a_fit_resumes_is_decided_after_the_restore_whatever_the_hook_order(tmp_path: Path) -> None:
    # Under ModelParallelStrategy Lightning restores the callbacks' states after on_fit_start, under the other
    # strategies before it; on_train_start comes after the restore under all of them.
    first = ForgettingMonitor({"norm": Counting()}, report=False)
    fit([first], tmp_path, max_steps=1)
    state = first.state_dict()
    trainer = SimpleNamespace(ckpt_path="last.ckpt", global_step=1, callback_metrics={})
    probe = Counting()
    resumed = ForgettingMonitor({"norm": probe}, report=False)
    resumed.setup(trainer, LM(), "fit")  # type: ignore[arg-type]
    resumed.on_fit_start(trainer, LM())  # type: ignore[arg-type]  # not restored yet: no verdict here
    resumed.load_state_dict(state)
    resumed.on_train_start(trainer, LM())  # type: ignore[arg-type]
    assert probe.calls == [] and resumed.baselines == first.baselines
    assert trainer.callback_metrics["probe/norm/value"] == first.history[-1]["value"]
    unrestored = ForgettingMonitor({"norm": Counting()}, report=False)
    unrestored.setup(trainer, LM(), "fit")  # type: ignore[arg-type]
    unrestored.on_fit_start(trainer, LM())  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="holds no pre-trained baselines"):
        unrestored.on_train_start(trainer, LM())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- bad input
def test_two_probes_with_the_same_name_are_refused() -> None:
    with pytest.raises(MisconfigurationException, match=r"Two probes are named 'lm'.*distinct `name=`"):
        ForgettingMonitor([lm_probe(), lm_probe()])


def test_a_dict_key_renames_the_probe() -> None:
    first, second = lm_probe(), lm_probe()
    monitor = ForgettingMonitor({"wiki": first, "code": second})
    assert list(monitor.probes) == ["wiki", "code"] and (first.name, second.name) == ("wiki", "code")


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ([], "`probes` is empty"),
        ({}, "`probes` is empty"),
        (["not a probe"], "not a lit_mofo.probes.Probe"),
        ({"bad name": CallableProbe(lambda t, m: 1.0, True)}, "Invalid probe name 'bad name'"),
    ],
)
def test_bad_probe_collections_are_refused(probes: Any, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        ForgettingMonitor(probes)


@pytest.mark.parametrize("every", [-1, 2.5, True])
def test_a_bad_interval_is_refused(every: Any) -> None:
    with pytest.raises(MisconfigurationException, match="every_n_train_steps"):
        ForgettingMonitor(lm_probe(), every_n_train_steps=every)


def test_a_metric_without_a_direction_is_refused_at_the_baseline(tmp_path: Path) -> None:
    probe = CallableProbe(lambda t, m: {"acc": 1.0, "f1": 0.5}, higher_is_better={"acc": True})
    with pytest.raises(MisconfigurationException, match=r"metric\(s\) \['f1'\] without a higher-is-better flag"):
        fit([ForgettingMonitor({"p": probe}, report=False)], tmp_path, max_steps=1)


def test_a_probe_returning_a_non_number_is_refused(tmp_path: Path) -> None:
    probe = CallableProbe(lambda t, m: {"acc": "high"}, higher_is_better=True)
    with pytest.raises(MisconfigurationException, match="metric values must be numbers"):
        fit([ForgettingMonitor({"p": probe}, report=False)], tmp_path, max_steps=1)


@pytest.mark.parametrize(
    ("strategy", "reason"),
    [
        ("DeepSpeedStrategy", "partitions its own flat fp32 buffers"),
        ("FSDPStrategy", "FSDP1 flattens the parameters"),
        ("XLAStrategy", "XLA devices"),
    ],
)
def test_unsupported_strategies_are_refused_at_setup_with_the_fix(strategy: str, reason: str) -> None:
    trainer = SimpleNamespace(strategy=type(strategy, (), {})(), world_size=2)  # no optional dependency needed
    with pytest.raises(
        MisconfigurationException,
        match=rf"ForgettingMonitor does not support `{strategy}`: .*{reason}.*"
        r"ModelParallelStrategy\(data_parallel_size=N, tensor_parallel_size=1\)",
    ):
        ForgettingMonitor(lm_probe()).setup(trainer, LM(), "fit")  # type: ignore[arg-type]


def test_tensor_parallelism_is_refused_and_fsdp2_over_one_dimension_accepted_at_setup() -> None:
    def trainer(data_parallel: int, tensor_parallel: int) -> pl.Trainer:
        strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel)
        return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)

    with pytest.raises(
        MisconfigurationException, match=r"does not support .*tensor_parallel_size=2.*tensor_parallel_size=1"
    ):
        ForgettingMonitor(lm_probe(), report=False).setup(trainer(1, 2), LM(), "fit")
    ForgettingMonitor(lm_probe(), report=False).setup(trainer(2, 1), LM(), "fit")


def test_isolated_evaluation_leaves_an_fsdp2_model_sharded() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh, module = init_device_mesh("cpu", (1,)), LM()
        for layer in module.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module.model, mesh=mesh)
        with isolated_evaluation(module):
            module.model(input_ids=torch.tensor([REFERENCE[0]]))
            assert not all(isinstance(p, DTensor) for p in module.parameters())  # FSDP2 keeps the root gathered
        assert all(isinstance(p, DTensor) for p in module.parameters())
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------- LightningCLI
@pytest.fixture
def in_repository_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(ROOT)  # the config's data path is relative to the repository root
    yield


@pytest.mark.slow
def test_the_cli_config_adds_both_callbacks_and_runs(tmp_path: Path, in_repository_root: None) -> None:
    from cli import main

    cli = main(
        [
            "fit",
            "--config=configs/mofo.yaml",
            "--config=configs/examples/tiny_lm.yaml",
            "--config=configs/forgetting_callbacks.yaml",
            "--trainer.max_steps=3",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ]
    )
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, ForgettingMonitor))
    assert isinstance(monitor.probes["general"], LanguageModelProbe)
    assert [r["step"] for r in monitor.history if r["metric"] == "loss"] == [0, 3]
    assert "drift/relative_l2" in cli.trainer.callback_metrics
    report = json.loads((tmp_path / "forgetting_report.json").read_text())
    assert {"forgetting", "drift", "meta"} <= set(report)


# ---------------------------------------------------------------------- DDP (both callbacks, one run)
DDP_SCRIPT = ROOT / "tests" / "scripts" / "ddp_forgetting.py"
DDP_STEPS = 4


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the 2-process script in its own session (a hang kills rank 1 too) and load what each rank saved."""
    out_dir = tmp_path_factory.mktemp("ddp_forgetting")
    result = run_script(DDP_SCRIPT, str(out_dir), "--steps", str(DDP_STEPS), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    stdout = result.stdout
    return {"ranks": ranks, "stdout": stdout, "log_dir": out_dir / "logs" / "version_0", "out_dir": out_dir}


@pytest.mark.slow
def test_ddp_every_rank_reports_the_same_synced_values_and_the_single_process_baseline(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert [rank0["world_size"], rank1["world_size"]] == [2, 2]
    values0 = [(r["step"], r["metric"], r["value"], r["forgetting"]) for r in rank0["history"]]
    values1 = [(r["step"], r["metric"], r["value"], r["forgetting"]) for r in rank1["history"]]
    assert values0 == values1
    assert [step for step, metric, *_ in values0 if metric == "loss"] == [0, 2, 4]
    expected = rank0["single_process_baseline"]
    assert rank0["baselines"]["general"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert rank1["baselines"] == rank0["baselines"]


@pytest.mark.slow
def test_ddp_ranks_split_the_reference_set_and_together_score_all_of_it(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = ddp_run["ranks"]
    reference = sorted(map(tuple, rank0["reference"]))
    # baseline, step 2, step 4, then TaskVectorScaling's three edits (the fine-tune is the monitor's step 4)
    assert len(rank0["seen"]) == len(rank1["seen"]) == 3 + 3
    assert rank0["forwards"] == rank1["forwards"] == [3] * 6  # rank 1 pads its share with a discarded forward
    for seen0, seen1 in zip(rank0["seen"], rank1["seen"], strict=True):
        assert len(seen0) == 6 and len(seen1) == 4  # batches 0, 2, 4 and 1, 3 of two sequences
        assert not set(map(tuple, seen0)) & set(map(tuple, seen1))
        assert sorted(map(tuple, seen0 + seen1)) == reference


@pytest.mark.slow
def test_ddp_logs_and_reports_once_from_rank_zero(ddp_run: dict[str, Any]) -> None:
    log_dir: Path = ddp_run["log_dir"]
    assert sorted(p.name for p in log_dir.glob("forgetting_report.*"))[:2] == [
        "forgetting_report.json",
        "forgetting_report.md",
    ]
    assert ddp_run["stdout"].count("lit_mofo report") == 1
    assert [p.name for p in (ddp_run["out_dir"] / "logs").iterdir()] == ["version_0"]
    with open(log_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows if r.get("forgetting/general/loss")] == [0, 2, 4]
    assert [int(r["step"]) for r in rows if r.get("drift/relative_l2")] == [0, 2, 4]
    report = json.loads((log_dir / "forgetting_report.json").read_text())
    assert report["meta"]["world_size"] == 2
    assert len(report["forgetting"]["measurements"]) == 6


@pytest.mark.slow
def test_ddp_task_vector_scaling_gives_the_single_process_curve(ddp_run: dict[str, Any]) -> None:
    """Both ranks measure the same curve, the fine-tune is left in place, and one process sweeping the same
    fine-tune from the same θ₀ with the same probe finds the same values."""
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from ddp_forgetting import SCALING

    rank0, rank1 = ddp_run["ranks"]

    def measured(curve: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        return [(point["edit"], point["values"], point["forgetting"]) for point in curve]

    assert measured(rank0["curve"]) == measured(rank1["curve"])
    assert [point["edit"] for point in rank0["curve"]] == ["finetuned", "wise_ft_a0", "wise_ft_a0.5", "lines_a0_b1"]
    for name, value in rank0["final"].items():  # the default keeps the fine-tune
        assert torch.equal(value, rank1["final"][name]) and not torch.equal(value, rank0["initial"][name]), name

    module = TinyCausalLM()
    module.load_state_dict(rank0["final"])
    monitor = ForgettingMonitor(
        {"general": LanguageModelProbe(token_ids=rank0["reference"], batch_size=2, name="general")}, report=False
    )
    monitor.load_state_dict(rank0["monitor_state"])
    single = TaskVectorScaling(**SCALING).sweep(module, rank0["initial"], monitor)
    assert [point.key for point in single] == [point["edit"] for point in rank0["curve"]]
    for point, ddp in zip(single, rank0["curve"], strict=True):
        for metric, value in point.values["general"].items():
            assert value == pytest.approx(ddp["values"]["general"][metric], rel=1e-6), (point.key, metric)
            lost = point.forgetting["general"][metric]
            assert lost == pytest.approx(ddp["forgetting"]["general"][metric], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_ddp_parameter_drift_is_identical_on_every_rank_and_grows(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = ddp_run["ranks"]
    assert rank0["drift"] == rank1["drift"]
    overall = [r for r in rank0["drift"] if r["scope"] == "overall"]
    assert [r["step"] for r in overall] == [0, 2, 4]
    assert overall[0]["relative_l2"] == 0.0 < overall[1]["relative_l2"] < overall[2]["relative_l2"]
    assert overall[2]["fraction_changed"] == pytest.approx(1.0, abs=0.01)  # AdamW moves (almost) every entry


@pytest.mark.slow
def test_ddp_a_window_longer_than_the_models_positions_fails_every_rank_in_setup(ddp_run: dict[str, Any]) -> None:
    for rank in ddp_run["ranks"]:  # each refuses it itself, before any forward (the window is in rank 1's batch)
        error, message = rank["overlong"]
        assert error == "MisconfigurationException"
        assert message.startswith("LanguageModelProbe(name='overlong'): max_length=128 is invalid")
        assert "at most 64 tokens (the model's maximum positions: LlamaConfig.max_position_embeddings = 64)" in message
        assert "(token_ids[2]) has 100 tokens. Set `max_length=64`" in message
        assert "allow_beyond_max_positions=True" in message


def test_early_stopping_can_stop_a_fit_once_forgetting_passes_a_threshold(tmp_path: Path) -> None:
    probe = scripted({"loss": [2.0, 2.1, 3.0, 3.5]}, {"loss": False})
    monitor = ForgettingMonitor({"p": probe}, every_n_train_steps=None, report=False)
    stop = EarlyStopping(monitor="forgetting/p/loss", mode="min", divergence_threshold=0.5, patience=100)
    trainer, _ = fit([monitor, stop], tmp_path, max_steps=10, val_check_interval=2, limit_val_batches=1)
    assert trainer.global_step == 4  # forgetting 0.1 at step 2, 1.0 > 0.5 at step 4
    assert [r["step"] for r in monitor.history] == [0, 2, 4]
