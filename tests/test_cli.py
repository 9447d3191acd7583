"""The `lit-mofo` CLI and every shipped config: each parses (no download, no training), short names resolve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from lit_mofo.cli import main

ROOT = Path(__file__).resolve().parents[1]
APP_CONFIGS = sorted(
    [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "recipes").glob("*.yaml")],
)
# Snippets for examples/cli.py (a model/data config plus an optimizer or callbacks); the rest are whole app configs.
SNIPPETS = {"mofo.yaml", "mofo_callback.yaml", "hft_callback.yaml", "forgetting_callbacks.yaml"}


@pytest.mark.parametrize("config", [c for c in APP_CONFIGS if c.name not in SNIPPETS], ids=lambda c: c.name)
def test_every_app_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lit_mofo" in printed


@pytest.mark.parametrize("snippet", sorted(SNIPPETS), ids=str)
def test_every_snippet_parses_with_the_example_model(snippet: str, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    from cli import main as example_main

    args = ["fit", "--config", str(ROOT / "configs/examples/tiny_lm.yaml"), "--config", str(ROOT / "configs" / snippet)]
    if snippet != "mofo.yaml":
        args += ["--optimizer", "torch.optim.AdamW"]
    with pytest.raises(SystemExit) as exit_info:
        example_main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)


def test_short_class_names_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "fit",
        "--model=CausalLMModule",
        "--model.model=scenario:base",
        "--data=ScenarioDataModule",
        "--trainer.callbacks+=HalfFineTuning",
        "--trainer.callbacks+=ParameterDrift",
        "--print_config",
    ]
    with pytest.raises(SystemExit):
        main(args)
    printed = capsys.readouterr().out
    for path in ("lit_mofo.modules.CausalLMModule", "lit_mofo.scenario.ScenarioDataModule", "HalfFineTuning"):
        assert path in printed


def test_an_unknown_config_key_gets_a_parser_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.no_such_key=1"])
    assert exit_info.value.code == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_config_fine_tunes_and_reports(tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=3",
            "--trainer.callbacks.every_n_train_steps=3",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    try:
        assert torch.get_num_threads() == 1  # torch_num_threads: 1 in the config
    finally:
        torch.set_num_threads(threads)
    trainer = cli.trainer
    assert trainer.global_step == 6
    assert type(trainer.optimizers[0]).__name__ == "MoFO"
    assert "forgetting/knowledge/accuracy" in trainer.callback_metrics
    assert "drift/relative_l2" in trainer.callback_metrics
    assert (Path(trainer.log_dir) / "forgetting_report.json").is_file()


@pytest.mark.slow
def test_task_vector_scaling_config_measures_the_edits_and_applies_the_rules_pick(tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        cli = main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/task_vector_scaling.yaml"),
                "--trainer.max_steps=6",
                "--trainer.val_check_interval=3",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    trainer = cli.trainer
    (scaling,) = [c for c in trainer.callbacks if type(c).__name__ == "TaskVectorScaling"]
    assert len(scaling.points) == 1 + 9
    assert scaling.chosen is not None and scaling.applied == scaling.chosen.edit  # the picked point, applied
    assert "forgetting/knowledge/accuracy/wise_ft_a0.2" in trainer.callback_metrics
    report = Path(trainer.log_dir) / "forgetting_report.json"
    assert json.loads(report.read_text())["task_vector_scaling"]["picked"] == scaling.chosen.key
    (checkpoint,) = Path(trainer.log_dir, "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    for name, param in cli.model.named_parameters():
        assert torch.equal(state[name], param), name


@pytest.mark.slow
def test_ddp_cpu_config_runs_two_processes_end_to_end(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    command = [
        sys.executable,
        "-m",
        "lit_mofo.cli",
        "fit",
        "--config",
        str(ROOT / "configs/ddp_cpu.yaml"),
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("the 2-process run did not finish in 600 s")
    assert process.returncode == 0, output[-3000:]
    assert "world_size=2" in output or "distributed_backend=gloo" in output
    assert output.count("Forgetting at step 4") == 1  # one report, from rank zero
    assert len(list(tmp_path.glob("lightning_logs/*/forgetting_report.json"))) == 1


@pytest.fixture(scope="module")
def console_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One short quickstart fit through the installed ``lit-mofo`` console script, as a user runs it."""
    script = shutil.which("lit-mofo", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the lit-mofo console script is not installed next to this Python (pip install -e .)")
    root = tmp_path_factory.mktemp("console")
    result = subprocess.run(
        [
            script,
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={root}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return root, result


def test_console_script_exits_zero_after_a_successful_fit(
    console_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    root, result = console_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LitMoFOCLI object" not in result.stderr  # what `sys.exit(<the CLI>)` printed before exiting with 1
    assert list(root.glob("lightning_logs/*/forgetting_report.json"))


@pytest.mark.parametrize(
    "notice",
    [
        "tensorboardX",  # Lightning's notice that it logs to CSV (the lit-mofo default logger is CSV)
        "Tip: For seamless cloud",  # Lightning's litlogger and litmodels tips
        "LeafSpec",  # torch 2.13's deprecation warning about Lightning's own code
        "set_vital",  # torch 2.13's deprecation warning about torchdata's own code
        "Epoch 0/-2",  # the progress bar's epoch limit of a step-limited run
    ],
)
def test_a_run_prints_none_of_the_known_notices(
    console_run: tuple[Path, subprocess.CompletedProcess[str]], notice: str
) -> None:
    _, result = console_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert notice not in result.stdout + result.stderr
    assert "Epoch 0" in result.stdout + result.stderr  # the progress bar itself is still there


# ---- arguments checked before anything is built ---------------------------------------------------------------------


@pytest.fixture
def model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every model the CausalLMModule would load (and loads none)."""
    from lit_mofo.modules.causal_lm import CausalLMModule

    loaded: list[str] = []

    def record(source: str, *args: object) -> None:
        loaded.append(source)
        raise RuntimeError("the model was loaded")

    monkeypatch.setattr(CausalLMModule, "_load", staticmethod(record))
    return loaded


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_value_of_the_wrong_type_gives_the_reason_first_and_no_usage(
    capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    err = _refused(["--model.init_args.optimizer.init_args.fraction=abc"], capsys)
    first = err.splitlines()[0]
    assert first == "error: model.optimizer.fraction: invalid value 'abc'; expected float or None."
    assert "usage:" not in err
    assert "lit-mofo fit --help" in err or "--help" in err
    assert model_loads == []


def test_an_unknown_option_names_the_class_that_lacks_it_first(capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(["--trainer.callbacks+=HalfFineTuning", "--trainer.callbacks.nope=1"], capsys)
    assert err.splitlines()[0] == "error: trainer.callbacks: lit_mofo.HalfFineTuning has no option 'nope'."
    assert "usage:" not in err


def test_an_optimizer_argument_out_of_range_is_refused_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    err = _refused(["--model.init_args.optimizer.init_args.fraction=2"], capsys)
    first = err.splitlines()[0]
    assert first.startswith("error: model.init_args.optimizer (lit_mofo.MoFO): MoFO(): fraction=2.0 is invalid")
    assert "(0, 1]" in first
    assert "Traceback" not in err and "usage:" not in err
    assert model_loads == []


def test_a_torch_optimizer_argument_out_of_range_is_refused_too(
    capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    err = _refused(["--model.init_args.optimizer=torch.optim.AdamW", "--model.init_args.optimizer.lr=-1"], capsys)
    assert err.splitlines()[0] == "error: model.init_args.optimizer (torch.optim.AdamW): Invalid learning rate: -1.0"
    assert model_loads == []


def test_a_callback_argument_out_of_range_is_refused_before_the_model_loads(
    capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    err = _refused(["--trainer.callbacks+=HalfFineTuning", "--trainer.callbacks.ratio=2"], capsys)
    first = err.splitlines()[0]
    assert first.startswith("error: HalfFineTuning(): ratio=2.0 is invalid; the valid range is (0, 1)")
    assert "Traceback" not in err and "usage:" not in err
    assert model_loads == []


# ---- --ckpt_path ----------------------------------------------------------------------------------------------------


def _write_checkpoint(path: Path, mtime: float) -> Path:
    import os

    import torch

    torch.save({"state_dict": {"w": torch.zeros(64)}, "global_step": 1}, path)
    os.utime(path, (mtime, mtime))
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "zip-not-checkpoint"])
def test_a_broken_ckpt_path_is_refused_up_front_naming_the_file_and_the_previous_checkpoint(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    import zipfile

    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    older = _write_checkpoint(checkpoints / "epoch=0-step=100.ckpt", mtime=1_000_000)
    _write_checkpoint(checkpoints / "epoch=0-step=50.ckpt", mtime=900_000)
    broken = checkpoints / "epoch=0-step=200.ckpt"
    if damage == "empty":
        broken.write_bytes(b"")
    elif damage == "truncated":  # killed while writing
        _write_checkpoint(broken, mtime=2_000_000)
        broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    elif damage == "garbage":
        broken.write_bytes(bytes(range(256)) * 40)
    else:
        with zipfile.ZipFile(broken, "w") as archive:
            archive.writestr("notes.txt", "not a checkpoint")
    err = _refused([f"--ckpt_path={broken}"], capsys)
    first = err.splitlines()[0]
    assert first.startswith(f"error: --ckpt_path {broken} is not a valid checkpoint: ")
    assert f"The previous checkpoint in that directory is {older}: resume from it with --ckpt_path {older}" in first
    assert "weights_only" not in err and "Traceback" not in err
    assert model_loads == []


def test_a_missing_ckpt_path_without_other_checkpoints_says_to_start_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused([f"--ckpt_path={tmp_path / 'epoch=0-step=100.ckpt'}"], capsys)
    assert err.splitlines()[0] == (
        f"error: --ckpt_path {tmp_path / 'epoch=0-step=100.ckpt'}: no such file. There is no other checkpoint in "
        f"{tmp_path}; start without --ckpt_path."
    )


# ---- the run directory ----------------------------------------------------------------------------------------------


def test_a_fit_that_fails_before_logging_anything_leaves_no_version_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val_check_interval"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/quickstart.yaml"),
                "--trainer.val_check_interval=100000",  # more than the 256 batches of an epoch: fails in fit
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert list(tmp_path.iterdir()) == []


# ---- resume ---------------------------------------------------------------------------------------------------------


class _CrashAtStep(pl.Callback):
    """A run killed mid-epoch (after its step-6 checkpoint, before its end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class _ProgressTotals(pl.Callback):
    def __init__(self) -> None:
        self.totals: list[int | float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        assert trainer.progress_bar_callback is not None
        self.totals.append(trainer.progress_bar_callback.total_train_batches)


def _timeless(report: object) -> object:
    """The report without its wall-clock fields (evaluation times, creation time)."""
    if isinstance(report, dict):
        return {k: _timeless(v) for k, v in report.items() if k not in ("seconds", "evaluation_seconds", "created")}
    if isinstance(report, list):
        return [_timeless(v) for v in report]
    return report


@pytest.mark.slow
def test_quickstart_resumed_from_a_mid_epoch_checkpoint_continues_its_run_bit_identically(tmp_path: Path) -> None:
    import json
    import warnings

    import torch

    short = [
        "fit",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        "--trainer.max_steps=12",  # of an epoch of 256 batches: every checkpoint here is mid-epoch
        "--trainer.val_check_interval=6",  # Lightning's default ModelCheckpoint saves at each validation
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.log_every_n_steps=2",
    ]
    uninterrupted = main([*short, f"--trainer.default_root_dir={tmp_path / 'a'}"])
    with pytest.raises(RuntimeError, match="simulated crash at step 9"):
        main(
            [*short, f"--trainer.default_root_dir={tmp_path / 'b'}"], trainer_defaults={"callbacks": [_CrashAtStep(9)]}
        )
    run = tmp_path / "b" / "lightning_logs" / "version_0"
    checkpoint = run / "checkpoints" / "epoch=0-step=6.ckpt"
    assert [p.name for p in (run / "checkpoints").iterdir()] == [checkpoint.name]

    totals = _ProgressTotals()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = main([*short, f"--ckpt_path={checkpoint}"], trainer_defaults={"callbacks": [totals]})
    assert not [w for w in caught if "not resumable" in str(w.message) or "not empty" in str(w.message)]

    assert resumed.trainer.global_step == 12
    weights = dict(uninterrupted.model.named_parameters())
    resumed_weights = dict(resumed.model.named_parameters())
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[name], resumed_weights[name]) for name in weights)

    # The logs and the report stay with the run the checkpoint belongs to, and read as if it had never stopped.
    assert Path(resumed.trainer.log_dir) == run
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]
    reference = tmp_path / "a" / "lightning_logs" / "version_0"
    assert (run / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    report = json.loads((run / "forgetting_report.json").read_text())
    assert _timeless(report) == _timeless(json.loads((reference / "forgetting_report.json").read_text()))
    assert (run / "forgetting_report.png").is_file()
    # The progress bar counts the epoch's batches from its start: 12 (not the 6 left after the checkpoint).
    assert totals.totals == [12] * 6


def test_a_continued_metrics_file_keeps_the_rows_before_the_checkpoint_and_its_columns(tmp_path: Path) -> None:
    from lit_mofo.cli import _RunLogger

    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("a,step\n0.5,0\n0.25,1\n0.125,2\n")  # the crashed run wrote up to step 2
    logger = _RunLogger(str(tmp_path), version="version_0")
    assert logger.continues and Path(logger.log_dir) == run
    logger.experiment.keep(rows=2)  # the checkpoint was written after 2 rows
    logger.log_metrics({"b": 1.0}, step=2)  # a new column: the header grows, the kept rows stay
    logger.save()
    assert (run / "metrics.csv").read_text().splitlines() == ["a,b,step", "0.5,,0", "0.25,,1", ",1.0,2"]
    assert logger.experiment.rows == 3
    logger.experiment.keep(up_to_step=1)  # a checkpoint without the row count: the rows up to its step
    assert (run / "metrics.csv").read_text().splitlines() == ["a,b,step", "0.5,,0", "0.25,,1"]
