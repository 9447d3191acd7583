"""The `lit-mofo` CLI and every shipped config: each parses (no download, no training), short names resolve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def test_console_script_exits_zero_after_a_successful_fit(tmp_path: Path) -> None:
    import shutil
    import subprocess

    script = shutil.which("lit-mofo", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the lit-mofo console script is not installed next to this Python (pip install -e .)")
    result = subprocess.run(
        [
            script,
            "fit",
            "--config",
            str(ROOT / "configs/quickstart.yaml"),
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LitMoFOCLI object" not in result.stderr  # what `sys.exit(<the CLI>)` printed before exiting with 1
    assert list(tmp_path.glob("lightning_logs/*/forgetting_report.json"))
