"""MoFO under Lightning: LightningCLI's automatic optimizer, the configure_optimizers helper, closures, resume from a
checkpoint, gradient clipping, and the runnable examples (``examples/``, ``configs/``)."""

from __future__ import annotations

import csv
import math
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch import Tensor

from lit_mofo import MoFO

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MOFO_YAML = ROOT / "configs" / "mofo.yaml"
TINY_LM_YAML = ROOT / "configs" / "examples" / "tiny_lm.yaml"
sys.path.insert(0, str(EXAMPLES))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM, TinyCausalLMWithHelper  # noqa: E402

QUIET_TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
QUIET_TRAINER_FLAGS = [f"--trainer.{key}={value}" for key, value in QUIET_TRAINER.items()]


def small_data(**overrides: Any) -> SyntheticTokenDataModule:
    return SyntheticTokenDataModule(**{"num_sequences": 64, "batch_size": 8, "seq_len": 32, **overrides})


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(default_root_dir=tmp_path, **{**QUIET_TRAINER, **kwargs})


def snapshot(module: torch.nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_bit_identical(expected: Mapping[str, Tensor], actual: Mapping[str, Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def changed_share(before: dict[str, Tensor], module: torch.nn.Module, ndim: int) -> float:
    """Share of the entries of ``ndim``-dimensional parameters that differ from ``before``."""
    changed = numel = 0
    for name, p in module.named_parameters():
        if p.dim() == ndim:
            changed += int((p != before[name]).sum())
            numel += p.numel()
    return changed / numel


class MoFOLM(TinyCausalLM):
    """The plain module with MoFO (lr 1e-3, fraction 0.15) and a count of ``training_step`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.training_step_calls = 0
        self.losses: list[float] = []

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        self.training_step_calls += 1
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> MoFO:
        return MoFO(self.parameters(), lr=1e-3, fraction=0.15)


# --- LightningCLI's automatic optimizer -------------------------------------------------------------------------


def test_mofo_yaml_holds_only_optimizer_and_trainer_so_it_composes_with_any_model() -> None:
    config = yaml.safe_load(MOFO_YAML.read_text())
    assert set(config) == {"optimizer", "trainer"}
    assert config["optimizer"]["class_path"] == "lit_mofo.MoFO"
    assert "configure_optimizers" not in vars(TinyCausalLM), "the CLI's optimizer only applies without an override"


def test_cli_with_mofo_yaml_trains_a_module_without_configure_optimizers(tmp_path: Path) -> None:
    initial = snapshot(TinyCausalLM())
    cli = LightningCLI(
        TinyCausalLM,
        SyntheticTokenDataModule,
        args=[
            "fit",
            f"--config={MOFO_YAML}",
            "--seed_everything=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",  # the metrics are read from callback_metrics
            "--trainer.max_steps=3",
            "--trainer.enable_model_summary=false",
            "--data.num_sequences=64",
            "--data.batch_size=8",
        ],
    )

    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is MoFO
    assert [(g["lr"], g["fraction"], g["weight_decay"]) for g in optimizer.param_groups] == [(2e-5, 0.15, 0.0)]
    assert cli.trainer.global_step == 3
    # Norm weights (1-D) take the dense step; each weight matrix moves ~15% of its entries per step, and the
    # selected entries overlap from step to step, so after 3 steps far fewer than all of them have moved.
    assert changed_share(initial, cli.model, ndim=1) == 1.0
    assert 0.15 <= changed_share(initial, cli.model, ndim=2) < 0.35
    assert cli.trainer.callback_metrics["mofo/filtered_update_fraction"].item() == pytest.approx(0.15, abs=2e-3)


def test_cli_optimizer_flags_select_mofo_without_a_config_file(tmp_path: Path) -> None:
    cli = LightningCLI(
        TinyCausalLM,
        SyntheticTokenDataModule,
        args=[
            "fit",
            "--optimizer",
            "lit_mofo.MoFO",
            "--optimizer.lr",
            "0.001",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=2",
            *QUIET_TRAINER_FLAGS,
            "--data.num_sequences=32",
            "--data.batch_size=8",
        ],
    )

    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is MoFO
    assert optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.param_groups[0]["fraction"] == 0.15  # MoFO's default
    assert cli.trainer.global_step == 2


# --- mofo_configure_optimizers inside configure_optimizers ------------------------------------------------------


class LearningRates(pl.Callback):
    """The learning rate each optimizer step is about to use."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.values.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_helper_configures_mofo_with_per_step_warmup_then_cosine(tmp_path: Path) -> None:
    lr, steps, warmup = 1e-3, 10, 2  # warmup = ceil(0.2 * 10)
    lrs = LearningRates()
    module = TinyCausalLMWithHelper(lr=lr, fraction=0.15, warmup_ratio=0.2)
    fit = trainer(tmp_path, max_steps=steps, callbacks=[lrs])
    fit.fit(module, small_data())

    assert type(fit.optimizers[0]) is MoFO
    (scheduler_config,) = fit.lr_scheduler_configs
    assert (scheduler_config.interval, scheduler_config.frequency) == ("step", 1)

    def expected(step: int) -> float:
        if step < warmup:
            return lr * step / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    assert lrs.values == pytest.approx([expected(s) for s in range(steps)], rel=1e-6, abs=1e-12)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    assert fit.callback_metrics["mofo/filtered_update_fraction"].item() == pytest.approx(0.15, abs=2e-3)
    # The dense 1-D tensors (norm weights) lift the overall fraction a little above the filtered one.
    overall = fit.callback_metrics["mofo/update_fraction"].item()
    assert fit.callback_metrics["mofo/filtered_update_fraction"].item() < overall < 0.16


# --- automatic optimization ------------------------------------------------------------------------------------


def test_automatic_optimization_runs_training_step_through_the_closure(tmp_path: Path) -> None:
    module = MoFOLM()
    fit = trainer(tmp_path, max_steps=30)
    fit.fit(module, small_data(num_sequences=480, batch_size=16))

    assert module.training_step_calls == 30 == fit.global_step
    first, last = sum(module.losses[:5]) / 5, sum(module.losses[-5:]) / 5
    assert first == pytest.approx(math.log(128), abs=0.1)  # a fresh model is close to uniform
    assert last < first - 0.4


# --- checkpoints --------------------------------------------------------------------------------------------------


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_resume_from_checkpoint_continues_bit_identically(tmp_path: Path) -> None:
    # Checkpoint at an epoch boundary (a plain DataLoader cannot resume mid-epoch) with ModelCheckpoint's
    # every_n_train_steps: a checkpoint written after fit or at epoch end makes Lightning 2.6 rerun a batch on
    # resume (Lightning-AI/pytorch-lightning#19617).
    steps, steps_per_epoch = 8, 4

    def module() -> TinyCausalLMWithHelper:
        return TinyCausalLMWithHelper(lr=1e-3, warmup_ratio=0.25, num_training_steps=steps)

    def data() -> SyntheticTokenDataModule:
        return small_data(num_sequences=steps_per_epoch * 8, shuffle=False)

    uninterrupted = module()
    straight = trainer(tmp_path / "straight", max_steps=steps)
    straight.fit(uninterrupted, data())

    first_half = module()
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=steps_per_epoch)
    interrupted = trainer(
        tmp_path / "first", max_steps=steps_per_epoch, enable_checkpointing=True, callbacks=[every_epoch]
    )
    interrupted.fit(first_half, data())
    checkpoint = every_epoch.best_model_path  # with no monitor: the latest checkpoint
    assert Path(checkpoint).name == f"epoch=0-step={steps_per_epoch}.ckpt"
    assert not torch.equal(first_half.model.lm_head.weight, uninterrupted.model.lm_head.weight)

    resumed = module()
    second = trainer(tmp_path / "second", max_steps=steps)
    second.fit(resumed, data(), ckpt_path=checkpoint)

    assert second.global_step == straight.global_step == steps
    assert_bit_identical(uninterrupted.state_dict(), resumed.state_dict())
    expected_state = straight.optimizers[0].state_dict()["state"]
    actual_state = second.optimizers[0].state_dict()["state"]
    assert expected_state.keys() == actual_state.keys()
    for index, state in expected_state.items():
        assert_bit_identical(state, actual_state[index])  # step, exp_avg, exp_avg_sq
    assert second.optimizers[0].param_groups[0]["lr"] == straight.optimizers[0].param_groups[0]["lr"]


# --- gradient clipping --------------------------------------------------------------------------------------------


class GradientsBeforeClipping(pl.Callback):
    """Total norm and largest magnitude of the gradients as the backward pass left them (before clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.maxima: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.maxima.append(max(g.abs().max().item() for g in grads))


@pytest.mark.parametrize(("algorithm", "clip"), [("norm", 0.05), ("value", 0.01)])
def test_trainer_gradient_clipping_applies_before_the_mofo_step(tmp_path: Path, algorithm: str, clip: float) -> None:
    module = MoFOLM()
    initial = snapshot(module)
    raw = GradientsBeforeClipping()
    fit = trainer(tmp_path, max_steps=3, gradient_clip_val=clip, gradient_clip_algorithm=algorithm, callbacks=[raw])
    fit.fit(module, small_data())

    # Lightning leaves the last step's (clipped) gradients in place after fit.
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if algorithm == "norm":
        assert min(raw.norms) > 2 * clip
        clipped_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
        assert clipped_norm == pytest.approx(clip, rel=1e-4)
    else:
        assert min(raw.maxima) > 2 * clip
        assert max(g.abs().max().item() for g in grads) == pytest.approx(clip, rel=1e-6)
    assert fit.global_step == 3
    assert 0.15 <= changed_share(initial, module, ndim=2) < 0.35
    assert fit.callback_metrics["mofo/filtered_update_fraction"].item() == pytest.approx(0.15, abs=2e-3)


# --- the example module ---------------------------------------------------------------------------------------


def test_tiny_lm_loads_a_local_pretrained_checkpoint_in_train_mode(tmp_path: Path) -> None:
    source = TinyCausalLM(seed=1)
    source.model.save_pretrained(tmp_path)
    loaded = TinyCausalLM(pretrained=str(tmp_path))

    assert loaded.model.training  # from_pretrained returns eval mode; Lightning would keep it during fit
    assert not torch.equal(loaded.model.lm_head.weight, TinyCausalLM(seed=0).model.lm_head.weight)
    assert_bit_identical(source.model.state_dict(), loaded.model.state_dict())


# --- the runnable examples ----------------------------------------------------------------------------------------

TABLE_ROW = re.compile(
    r"^(?P<name>AdamW|MoFO\(0\.15\))\s+(?P<loss>\S+)\s+(?P<dist>\S+)\s+(?P<changed>\S+)\s+(?P<frac>\S+)$"
)


@pytest.mark.slow
def test_quickstart_prints_adamw_versus_mofo_table() -> None:
    steps = 6
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--max-steps", str(steps)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {m["name"]: m for m in map(TABLE_ROW.match, result.stdout.splitlines()) if m}
    assert rows.keys() == {"AdamW", "MoFO(0.15)"}, result.stdout
    adamw, mofo = rows["AdamW"], rows["MoFO(0.15)"]

    assert adamw["frac"] == "-"
    assert float(mofo["frac"]) == pytest.approx(0.15, abs=0.01)
    assert float(adamw["changed"]) > 0.95
    assert 0.15 <= float(mofo["changed"]) < min(steps * 0.16, 0.9 * float(adamw["changed"]))
    assert 0 < float(mofo["dist"]) < float(adamw["dist"])
    assert float(adamw["loss"]) < math.log(128) and float(mofo["loss"]) < math.log(128)


@pytest.mark.slow
def test_cli_example_fits_from_the_yaml_configs(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "cli.py"),
            "fit",
            "--config",
            str(MOFO_YAML),
            "--config",
            str(TINY_LM_YAML),
            "--trainer.max_steps",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "`max_steps=2` reached" in result.stdout + result.stderr
    run_dir = tmp_path / "lightning_logs" / "version_0"  # the default logger's directory, config saved beside it
    with (run_dir / "metrics.csv").open(newline="") as f:
        fractions = [float(row["mofo/filtered_update_fraction"]) for row in csv.DictReader(f)]
    assert fractions == pytest.approx([0.15, 0.15], abs=2e-3)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optimizer"]["class_path"] == "lit_mofo.MoFO"
    assert saved["optimizer"]["init_args"]["lr"] == 2e-5
    assert saved["model"]["hidden_size"] == 64
