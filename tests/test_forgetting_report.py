"""ForgettingMonitor's end-of-fit report and arguments: the worst forgetting for every non-finite case and
direction, the epoch as checkpoints number it, where the report goes without a logger, the plot's title and
distinguishable lines, no repeated messages, and the monitor's own arguments checked with the valid range."""

from __future__ import annotations

import builtins
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor, forgetting, retention
from lit_mofo.probes import CallableProbe
from lit_mofo.report import Curve, ReportSection, write_report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM  # noqa: E402

INF, NAN = math.inf, math.nan


class AdamWLM(TinyCausalLM):
    def __init__(self) -> None:
        super().__init__(hidden_size=32, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=32)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def fit(callbacks: list[pl.Callback], root: Path | None, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=kwargs.pop("logger", False),
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
    trainer.fit(AdamWLM(), SyntheticTokenDataModule(num_sequences=96, seq_len=16, batch_size=8, seed=0))
    return trainer


def scripted(values: list[float], higher_is_better: bool) -> CallableProbe:
    """A probe returning the next value of ``values`` at every evaluation."""
    series = iter(values)
    return CallableProbe(lambda trainer, module: next(series), higher_is_better)


def summary_row(values: list[float], higher_is_better: bool) -> dict[str, Any]:
    """The report's summary row of a metric measured at steps 0, 10, 20, ... (the first is the baseline)."""
    baseline = values[0]
    history = [
        {
            "step": 10 * index,
            "epoch": 0,
            "trigger": "baseline" if index == 0 else "interval",
            "probe": "p",
            "metric": "value",
            "value": value,
            "baseline": baseline,
            "forgetting": forgetting(value, baseline, higher_is_better),
            "retention": retention(value, baseline, higher_is_better),
            "higher_is_better": higher_is_better,
            "seconds": 0.0,
        }
        for index, value in enumerate(values)
    ]
    monitor = ForgettingMonitor({"p": scripted([], higher_is_better)}, report=False)
    monitor.load_state_dict({"baselines": {"p": {"value": baseline}}, "history": history, "last_step": None})
    table = monitor.report_section().summary[0]
    return dict(zip(table.headers, table.rows[0], strict=True))


# ---------------------------------------------------------------------- the monitor's own arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_train_steps": "100"}, r"every_n_train_steps='100' is invalid; the valid range is an integer >= 0"),
        ({"every_n_train_steps": True}, r"every_n_train_steps=True is invalid"),
        ({"every_n_train_steps": 2.0}, r"every_n_train_steps=2\.0 is invalid"),
        ({"evaluate_on_validation": "false"}, r"evaluate_on_validation='false' is invalid.*True or False"),
        ({"report": 1}, r"report=1 is invalid; the valid range is True or False"),
        ({"report_dir": 3}, r"report_dir=3 is invalid; the valid range is a directory path"),
    ],
)
def test_forgetting_monitor_arguments_are_checked_with_the_valid_range(kwargs: dict[str, Any], message: str) -> None:
    probe = CallableProbe(lambda t, m: 1.0, higher_is_better=True)
    with pytest.raises(MisconfigurationException, match=message):
        ForgettingMonitor(probe, **kwargs)


def test_a_report_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    existing = tmp_path / "report"
    existing.write_text("")
    with pytest.raises(MisconfigurationException, match=r"report_dir=.* is invalid.*It is an existing file"):
        ForgettingMonitor(CallableProbe(lambda t, m: 1.0, higher_is_better=True), report_dir=str(existing))


# ---------------------------------------------------------------------- worst forgetting
@pytest.mark.parametrize(
    ("higher_is_better", "values", "worst", "step"),
    [
        # an infinitely better value is never the worst: the worst is the baseline's 0 (issue 16, item 6)
        (True, [0.5, INF, 0.7], 0.0, 0),
        (False, [2.0, -INF, 1.0], 0.0, 0),
        (True, [0.5, INF, 0.3], 0.2, 20),
        # an infinitely worse value is the worst
        (True, [0.5, 0.4, -INF], INF, 20),
        (False, [2.0, 2.5, INF], INF, 20),
        # a NaN measurement (the model or the probe failed) is the worst: how much was lost is unknown
        (True, [0.5, NAN, 0.1], NAN, 10),
        (False, [2.0, INF, NAN], NAN, 20),
        # a value equal to an infinite baseline forgot nothing; a finite one is an infinite improvement
        (False, [INF, INF, 3.0], 0.0, 0),
        (True, [-INF, -INF, 0.5], 0.0, 0),
        # any finite value is infinitely worse than a baseline of +inf (higher is better)
        (True, [INF, 5.0, INF], INF, 10),
        # ties go to the earliest step
        (True, [0.5, 0.3, 0.3], pytest.approx(0.2), 10),
        # a NaN baseline makes every forgetting unknown: the first measurement is reported
        (False, [NAN, 1.0, 2.0], NAN, 0),
    ],
)
def test_the_worst_column_is_the_largest_forgetting_for_every_non_finite_case(
    higher_is_better: bool, values: list[float], worst: Any, step: int
) -> None:
    row = summary_row(values, higher_is_better)
    if isinstance(worst, float) and math.isnan(worst):
        assert math.isnan(row["worst"])
    else:
        assert row["worst"] == worst
    assert row["at step"] == step


def test_forgetting_and_retention_of_a_value_equal_to_an_infinite_baseline() -> None:
    for higher in (True, False):
        for infinity in (INF, -INF):
            assert forgetting(infinity, infinity, higher) == 0.0
            assert retention(infinity, infinity, higher) == 1.0
    assert forgetting(INF, 0.5, higher_is_better=True) == -INF  # infinitely better
    assert forgetting(INF, 0.5, higher_is_better=False) == INF  # infinitely worse
    assert math.isnan(forgetting(NAN, NAN, higher_is_better=True))


def test_a_higher_is_better_probe_returning_inf_is_reported_with_worst_zero_at_the_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monitor = ForgettingMonitor({"score": scripted([0.5, INF, INF], True)}, every_n_train_steps=2)
    with pytest.warns(UserWarning, match="non-finite value = inf at step 2"):
        fit([monitor], tmp_path, max_steps=4)
    markdown = (tmp_path / "forgetting_report.md").read_text()
    assert "| score | value | higher | 0.5 | inf | -inf | inf | 0 | 0 |" in markdown
    printed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("score"))
    assert printed.split() == ["score", "value", "higher", "0.5", "inf", "-inf", "inf", "0", "0"]


def test_a_non_finite_value_warns_once_per_metric_not_at_every_evaluation(tmp_path: Path) -> None:
    monitor = ForgettingMonitor({"score": scripted([0.5, NAN, NAN, INF], True)}, every_n_train_steps=2, report=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([monitor], tmp_path, max_steps=6)
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(messages) == 1 and "non-finite value = nan at step 2" in messages[0]
    assert [r["value"] for r in monitor.history][1:] == [pytest.approx(NAN, nan_ok=True)] * 2 + [INF]


# ---------------------------------------------------------------------- epochs as checkpoints number them
def test_the_report_epoch_agrees_with_the_checkpoint_of_a_fit_stopped_mid_epoch(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")  # saves at the end of the (interrupted) epoch
    monitor = ForgettingMonitor({"p": scripted([1.0, 1.0], True)}, every_n_train_steps=None)
    trainer = fit([monitor, checkpoint], tmp_path, max_steps=5)  # 12 batches per epoch: stops in epoch 0
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch=0-step=5.ckpt"]
    assert torch.load(checkpoint.best_model_path, weights_only=False)["epoch"] == 0
    assert trainer.current_epoch == 1  # Lightning's count of completed epochs, not the epoch the step ran in
    report = json.loads((tmp_path / "forgetting_report.json").read_text())
    assert report["meta"]["epoch"] == 0
    assert [(r["step"], r["trigger"], r["epoch"]) for r in report["forgetting"]["measurements"]] == [
        (0, "baseline", 0),
        (5, "fit_end", 0),
    ]


def test_the_report_epoch_agrees_with_the_checkpoint_after_whole_epochs(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    monitor = ForgettingMonitor({"p": scripted([1.0, 1.0], True)}, every_n_train_steps=None)
    fit([monitor, checkpoint], tmp_path, max_epochs=2, limit_train_batches=3)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch=1-step=6.ckpt"]
    report = json.loads((tmp_path / "forgetting_report.json").read_text())
    assert report["meta"]["epoch"] == 1
    assert report["forgetting"]["measurements"][-1]["epoch"] == 1


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_fit_resumed_from_an_epochs_last_step_numbers_the_epochs_as_the_uninterrupted_fit(tmp_path: Path) -> None:
    # A checkpoint written at the last step of an epoch, before the epoch ended (every_n_train_steps): on resume,
    # Lightning's count of started epochs lags one behind for the rest of the fit.
    def run(root: Path, ckpt_path: Path | None = None) -> list[tuple[int, str, int]]:
        monitor = ForgettingMonitor({"p": CallableProbe(lambda t, m: 1.0, True)}, every_n_train_steps=2)
        callbacks: list[pl.Callback] = [monitor]
        if ckpt_path is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1))
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=7,
            limit_train_batches=2,  # steps 1-2 in epoch 0, 3-4 in epoch 1, 5-6 in epoch 2, 7 in epoch 3
            default_root_dir=root,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=ckpt_path is None,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(
            AdamWLM(), SyntheticTokenDataModule(num_sequences=96, seq_len=16, batch_size=8), ckpt_path=ckpt_path
        )
        report = json.loads((root / "forgetting_report.json").read_text())
        assert report["meta"]["epoch"] == 3
        return [(r["step"], r["trigger"], r["epoch"]) for r in report["forgetting"]["measurements"]]

    uninterrupted = run(tmp_path / "uninterrupted")
    assert uninterrupted == [
        (0, "baseline", 0),
        (2, "interval", 0),
        (4, "interval", 1),
        (6, "interval", 2),
        (7, "fit_end", 3),
    ]
    assert run(tmp_path / "resumed", tmp_path / "ckpt" / "epoch=0-step=2.ckpt") == uninterrupted


# ---------------------------------------------------------------------- where the report goes
def test_without_logger_or_root_dir_the_current_directory_is_announced_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monitor = ForgettingMonitor({"p": scripted([1.0, 1.0], True)}, every_n_train_steps=None)
    with pytest.warns(UserWarning, match=r"report will be written to the current directory \(.*\)\. Pass `Trainer"):
        fit([monitor], None, max_steps=1)
    assert (tmp_path / "forgetting_report.json").is_file()


def test_a_chosen_directory_is_not_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for root, report_dir in ((tmp_path / "root", None), (None, str(tmp_path / "out"))):
        monitor = ForgettingMonitor({"p": scripted([1.0, 1.0], True)}, every_n_train_steps=None, report_dir=report_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit([monitor], root, max_steps=1)
        assert not [w for w in caught if "current directory" in str(w.message)]
    assert (tmp_path / "root" / "forgetting_report.json").is_file()
    assert (tmp_path / "out" / "forgetting_report.json").is_file()
    assert not (tmp_path / "forgetting_report.json").exists()


# ---------------------------------------------------------------------- the plot
def test_the_report_names_the_method_the_optimizer_and_the_model(tmp_path: Path) -> None:
    from lit_mofo.callbacks.l2_to_pretrained import L2ToPretrained

    monitor = ForgettingMonitor({"p": scripted([1.0, 1.0], True)}, every_n_train_steps=None)
    fit([monitor, L2ToPretrained(strength=0.01)], tmp_path, max_steps=1)
    meta = json.loads((tmp_path / "forgetting_report.json").read_text())["meta"]
    assert meta["method"] == "L2ToPretrained(strength=0.01, norm=l2)"
    assert meta["optimizers"] == "AdamW(lr=0.001, weight_decay=0.01)"
    assert meta["model"] == "LlamaForCausalLM"
    markdown = (tmp_path / "forgetting_report.md").read_text()
    assert "- **method**: L2ToPretrained(strength=0.01, norm=l2)" in markdown


def test_without_a_method_callback_the_method_is_full_fine_tuning_or_the_trained_share(tmp_path: Path) -> None:
    from lit_mofo.report import run_metadata

    trainer = fit([ForgettingMonitor(scripted([1.0, 1.0], True), every_n_train_steps=None)], tmp_path, max_steps=1)
    assert run_metadata(trainer)["method"] == "full fine-tuning"
    module = trainer.lightning_module
    module.model.lm_head.weight.requires_grad_(False)
    share = 100 * (1 - module.model.lm_head.weight.numel() / sum(p.numel() for p in module.parameters()))
    assert run_metadata(trainer)["method"] == f"fine-tuning {share:.3g}% of the parameters"


def metadata_of(module: pl.LightningModule, optimizer: torch.optim.Optimizer, callbacks: list[pl.Callback]) -> Any:
    """``run_metadata`` of a trainer holding ``module``, ``optimizer`` and ``callbacks`` (no fit needed)."""
    from lit_mofo.report import run_metadata

    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=callbacks)
    trainer.strategy.connect(module)
    trainer.strategy.optimizers = [optimizer]
    return run_metadata(trainer)


def test_the_method_names_mofo_with_its_fraction_and_never_the_clis_own_callbacks() -> None:
    from lit_mofo import HalfFineTuning, MoFO, ParameterDrift
    from lit_mofo.checkpoints import AtomicCheckpoints, CheckpointOnSigterm
    from lit_mofo.loggers import ContinueCSVMetrics
    from lit_mofo.progress import ProgressBarFixes, ResumableTQDMProgressBar

    module = AdamWLM()
    internals: list[pl.Callback] = [  # what `lit-mofo` adds to every fit
        AtomicCheckpoints(),
        CheckpointOnSigterm(),
        ContinueCSVMetrics(),
        ProgressBarFixes(),
        ResumableTQDMProgressBar(),
    ]
    meta = metadata_of(module, MoFO(module.parameters(), fraction=0.1), [*internals, ParameterDrift()])
    assert meta["method"] == "MoFO(fraction=0.1)"
    hft = metadata_of(module, MoFO(module.parameters()), [HalfFineTuning(), *internals])
    assert hft["method"] == "MoFO(fraction=0.15) + HalfFineTuning(ratio=0.5)"
    plain = metadata_of(module, torch.optim.AdamW(module.parameters()), internals)
    assert plain["method"] == "full fine-tuning"
    assert "_" not in meta["method"] + hft["method"] + plain["method"]


def test_a_lora_run_is_named_lora_with_its_rank() -> None:
    peft = pytest.importorskip("peft")
    from lit_mofo import MoFO
    from lit_mofo.modules import CausalLMModule

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32}
    config |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    module = CausalLMModule(model_config=config, peft=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trained = [p for p in module.parameters() if p.requires_grad]
    assert metadata_of(module, MoFO(trained), [])["method"] == "MoFO(fraction=0.15) + LoRA(r=4, alpha=8)"
    assert metadata_of(module, torch.optim.AdamW(trained), [])["method"] == "LoRA(r=4, alpha=8)"


def drawn_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meta: dict[str, Any]) -> Any:
    """Write a report with two panels whose lines overlap exactly; return the matplotlib figure it saved."""
    from matplotlib.figure import Figure

    saved: list[Figure] = []
    real_savefig = Figure.savefig

    def record(self: Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    same = [(0, 0.0), (10, 1.0), (20, 1.0)]
    section = ReportSection(
        key="drift",
        title="Drift",
        records=[],
        curves=[
            Curve("drift", {"all": same, "attention": same, "ffn": same, "norm": same, "head": same}, baseline=0.0),
            Curve("knowledge/accuracy", {"accuracy": [(0, 1.0), (10, 0.9)]}, baseline=1.0),
        ],
    )
    paths = write_report(tmp_path, [section], meta=meta)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    return saved[0]


def test_the_plot_is_titled_with_method_optimizer_and_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    meta = {"method": "HalfFineTuning(ratio=0.5)", "optimizers": "MoFO(lr=0.001, fraction=0.15)", "model": "Llama"}
    figure = drawn_figure(tmp_path, monkeypatch, meta)
    assert figure.get_suptitle() == (
        "Forgetting while fine-tuning with HalfFineTuning(ratio=0.5)\n"
        "optimizer: MoFO(lr=0.001, fraction=0.15)  ·  model: Llama"
    )


def test_overlapping_lines_stay_distinguishable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    figure = drawn_figure(tmp_path, monkeypatch, meta={})
    drift_axes = figure.axes[0]
    lines = [line for line in drift_axes.get_lines() if line.get_label() != "pre-trained"]
    assert [line.get_label() for line in lines] == ["all", "attention", "ffn", "norm", "head"]
    styles = {(line.get_marker(), line.get_linestyle(), line.get_color()) for line in lines}
    assert len(styles) == len(lines)  # every line its own marker, dash and colour
    assert len({line.get_marker() for line in lines}) == len(lines)
    widths = [line.get_linewidth() for line in lines]
    orders = [line.get_zorder() for line in lines]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)  # later lines thinner...
    assert orders == sorted(orders) and len(set(orders)) == len(orders)  # ...and on top, so both stay visible
    baseline = next(line for line in drift_axes.get_lines() if line.get_label() == "pre-trained")
    assert baseline.get_zorder() > max(orders) and baseline.get_linewidth() <= min(widths)  # visible on a line


def test_the_missing_matplotlib_note_is_given_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_mofo.report as report

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    notes: list[str] = []
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(report, "rank_zero_info", notes.append)
    monkeypatch.setattr(report, "_NO_MATPLOTLIB_NOTED", False)
    section = ReportSection(key="k", title="t", records=[], curves=[Curve("c", {"v": [(0, 1.0)]})])
    for run in ("a", "b", "c"):
        assert sorted(write_report(tmp_path / run, [section])) == ["json", "md"]
    assert len(notes) == 1 and "`pip install matplotlib`" in notes[0]
