"""What the ``lit-mofo`` command adds to a run is in the config: ``--print_config`` shows the logger and the options
for any config, the shipped configs name the run's callbacks, a config that names none of them gets them added (or
not, with ``default_callbacks: false``), and the process's warning and logging filters are as before once the
command returns. The parts themselves (the resumable logger, the progress-bar fixes, the checkpoint callbacks) work
in any Trainer."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from process_launch import ROOT
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_mofo.checkpoints import AtomicCheckpoints, CheckpointOnSigterm
from lit_mofo.cli import main
from lit_mofo.loggers import ContinueCSVMetrics, ResumableCSVLogger, run_dir_of
from lit_mofo.progress import ProgressBarFixes, ResumableRichProgressBar, ResumableTQDMProgressBar

RUN_CALLBACKS = {"AtomicCheckpoints", "CheckpointOnSigterm", "ContinueCSVMetrics", "ProgressBarFixes"}
TIPS_LOGGER = "lightning.pytorch.utilities.rank_zero"
APP_CONFIGS = sorted(
    c
    for c in [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "recipes").glob("*.yaml")]
    if c.name not in {"mofo.yaml", "mofo_callback.yaml", "hft_callback.yaml", "forgetting_callbacks.yaml"}
)


def example_cli(args: list[str]) -> Any:
    """``examples/cli.py`` (LitMoFOCLI on the tiny model) with ``args``, built but not run (no subcommand)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from cli import main as example_main

    tiny = ["--config", str(ROOT / "configs/examples/tiny_lm.yaml"), "--optimizer", "torch.optim.AdamW"]
    return example_main([*tiny, *args], run=False)


def test_print_config_shows_the_logger_and_the_commands_options_also_for_a_config_that_names_none(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--model=CausalLMModule",
                "--model.model=scenario:base",
                "--data=ScenarioDataModule",
                "--print_config",
            ]
        )
    printed = capsys.readouterr().out
    assert "class_path: lit_mofo.loggers.ResumableCSVLogger" in printed
    assert "quiet_notices: true" in printed and "default_callbacks: true" in printed


@pytest.mark.parametrize("config", APP_CONFIGS, ids=lambda c: c.name)
def test_every_shipped_app_config_names_the_logger_and_the_run_callbacks_first(config: Path) -> None:
    import yaml

    trainer = yaml.safe_load(config.read_text())["trainer"]
    assert trainer["logger"] == {"class_path": "lit_mofo.loggers.ResumableCSVLogger"}
    first = [entry["class_path"].rpartition(".")[2] for entry in trainer["callbacks"][: len(RUN_CALLBACKS)]]
    assert set(first) == RUN_CALLBACKS  # first: `--trainer.callbacks.<arg>=` still edits the config's last one


def test_a_config_naming_no_run_callback_gets_them_unless_it_asks_not_to(tmp_path: Path) -> None:
    root = f"--trainer.default_root_dir={tmp_path}"
    cli = example_cli([root])
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert RUN_CALLBACKS <= set(names) and names.index("AtomicCheckpoints") == 0
    assert isinstance(cli.trainer.logger, ResumableCSVLogger) and Path(cli.trainer.logger.save_dir) == tmp_path
    bare = example_cli([root, "--default_callbacks=false"])
    assert not RUN_CALLBACKS & {type(c).__name__ for c in bare.trainer.callbacks}
    named = example_cli([root, "--trainer.callbacks+=lit_mofo.checkpoints.CheckpointOnSigterm"])
    assert [type(c).__name__ for c in named.trainer.callbacks].count("CheckpointOnSigterm") == 1  # not twice
    other = example_cli(
        [root, "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    )
    assert "ContinueCSVMetrics" not in {type(c).__name__ for c in other.trainer.callbacks}  # nothing to continue


SEEN: list[list[logging.Filter | Any]] = []


class RecordTipsFilters(pl.Callback):
    """Records the filters on Lightning's tips logger while a fit runs inside the command."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        SEEN.append(list(logging.getLogger(TIPS_LOGGER).filters))


def test_the_notices_are_hidden_while_the_command_runs_and_the_process_is_left_as_it_was(tmp_path: Path) -> None:
    from lit_mofo import notices

    sys.path.insert(0, str(ROOT / "examples"))
    from cli import main as example_main

    tips = logging.getLogger(TIPS_LOGGER)
    before = (list(warnings.filters), list(tips.filters))
    SEEN.clear()
    for quiet in ("true", "false"):
        example_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/examples/tiny_lm.yaml"),
                "--optimizer=torch.optim.AdamW",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path / quiet}",
                f"--quiet_notices={quiet}",
                f"--trainer.callbacks+={__name__}.RecordTipsFilters",
            ]
        )
        assert (list(warnings.filters), list(tips.filters)) == before  # as it was, once the command returned
    quiet_run, loud_run = SEEN
    assert notices._LIGHTNING_TIPS in quiet_run and loud_run == before[1]


IMPORT_SCRIPT = """
import logging, traceback, warnings, torch
from pathlib import Path

package = str(Path("lit_mofo").resolve())
stdlib = {warnings.__file__, logging.__file__}
changes = []


def recording(name, original):
    def record(*args, **kwargs):
        # The code that asked: the innermost frame outside the warnings and logging modules.
        caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if f.filename not in stdlib)
        if caller.filename.startswith(package):
            changes.append(f"{name}{args!r} from {caller.filename}:{caller.lineno}")
        return original(*args, **kwargs)

    return record


warnings._add_filter = recording("warning filter", warnings._add_filter)
logging.Filterer.addFilter = recording("logging filter", logging.Filterer.addFilter)
threads = torch.get_num_threads()
import lit_mofo.cli
assert lit_mofo.cli.__file__.startswith(package), lit_mofo.cli.__file__
assert not changes and torch.get_num_threads() == threads, (changes, threads, torch.get_num_threads())
print("unchanged")
"""


def test_importing_the_cli_changes_no_process_wide_state() -> None:
    # Lightning, scipy and sympy add warning filters of their own when imported; none may come from lit_mofo.
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stderr[-2000:]


# ---- the parts, in any Trainer ---------------------------------------------------------------------------------------


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)


def test_a_logger_without_save_dir_goes_under_the_trainers_root_and_a_runs_checkpoint_takes_it_back_there(
    tmp_path: Path,
) -> None:
    placed = ResumableCSVLogger(name="runs", prefix="p").for_run(default_root_dir=str(tmp_path / "root"))
    assert Path(placed.save_dir) == tmp_path / "root" and placed.name == "runs" and not placed.continues
    given = ResumableCSVLogger(str(tmp_path / "mine"))
    assert given.for_run(default_root_dir=str(tmp_path / "root")) is given  # its own save_dir stays
    run = tmp_path / "elsewhere" / "lightning_logs" / "version_3"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.csv").write_text("loss,step\n1.0,0\n")
    checkpoint = run / "checkpoints" / "epoch=0-step=1.ckpt"
    assert run_dir_of(checkpoint) == run.resolve() and run_dir_of("last") is None
    resumed = given.for_run(default_root_dir=str(tmp_path / "root"), ckpt_path=str(checkpoint))
    assert Path(resumed.log_dir) == run.resolve() and resumed.continues


def test_every_checkpoint_records_the_metrics_rows_so_far(tmp_path: Path) -> None:
    logger = ResumableCSVLogger(str(tmp_path), flush_logs_every_n_steps=100)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=4,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[ContinueCSVMetrics(), AtomicCheckpoints(), saver],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(_Tiny())
    rows = [torch.load(tmp_path / "ckpt" / f"epoch=0-step={s}.ckpt", weights_only=False) for s in (2, 4)]
    # ModelCheckpoint saves in on_train_batch_end, before Lightning logs that step's row: 1 and 3 rows so far,
    # written out at each save (flush_logs_every_n_steps alone would write none of them before step 100).
    assert [r["callbacks"]["ContinueCSVMetrics"]["metrics_rows"] for r in rows] == [1, 3]
    written = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    assert len(written) == 1 + 4  # the header and the 4 steps' rows, none twice
    assert not list((tmp_path / "ckpt").glob("*.partial"))


def test_the_fixes_go_to_lightnings_own_bar_and_leave_other_bars_alone() -> None:
    def setup(callbacks: list[pl.Callback], **options: Any) -> pl.Trainer:
        trainer = pl.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False, **options)
        ProgressBarFixes().setup(trainer, pl.LightningModule(), "fit")
        return trainer

    default = setup([])  # Lightning's default bar (rich where installed), fixed
    expected = ResumableRichProgressBar if _RICH_AVAILABLE else ResumableTQDMProgressBar
    assert type(default.progress_bar_callback) is expected
    configured = TQDMProgressBar(refresh_rate=7)
    assert type(setup([configured]).progress_bar_callback) is ResumableTQDMProgressBar
    assert configured.refresh_rate == 7  # the same bar, its settings kept

    class Custom(TQDMProgressBar):
        pass

    assert type(setup([Custom()]).progress_bar_callback) is Custom
    assert setup([], enable_progress_bar=False).progress_bar_callback is None


def test_a_step_limited_bar_counts_a_resumed_epoch_from_its_start_and_accumulation() -> None:
    bar = ResumableTQDMProgressBar()
    progress = SimpleNamespace(current=SimpleNamespace(ready=150))
    bar._trainer = SimpleNamespace(  # type: ignore[assignment]
        max_epochs=-1,
        max_steps=50,
        global_step=40,
        accumulate_grad_batches=2,
        num_training_batches=200,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )
    assert bar.total_train_batches == 150 + (50 - 40) * 2  # not the batches left alone (Lightning's 99)
    bar._trainer.max_steps = 1000  # type: ignore[attr-defined]
    assert bar.total_train_batches == 200  # the epoch ends first


def test_a_sigterm_checkpoint_is_written_beside_the_model_checkpoints_only_for_sigterm(tmp_path: Path) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    saver = CheckpointOnSigterm()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=3, logger=False, callbacks=[saver, checkpoint], enable_progress_bar=False, accelerator="cpu"
    )
    trainer.fit(_Tiny())
    saver.on_exception(trainer, trainer.lightning_module, RuntimeError("not a signal"))
    assert saver.path is None
    trainer.state.fn = "fit"  # type: ignore[assignment]
    saver.on_exception(trainer, trainer.lightning_module, SIGTERMException())
    assert saver.step == 3 and saver.path is not None and saver.path.is_file()
    assert saver.path.parent == tmp_path and saver.path.name.endswith("-step=3.ckpt")  # ModelCheckpoint's naming
