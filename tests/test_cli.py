"""The `lit-mofo` CLI and every shipped config: each parses (no download, no training), short names resolve; errors
name their cause; ``--ckpt_path`` resumes only from complete checkpoints of the same run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from process_launch import run_script

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


# What the quickstart config's CausalLMModule saves as its hyper-parameters (the entries these tests compare).
QUICKSTART_HPARAMS = {"_class_path": "lit_mofo.modules.CausalLMModule", "model": "scenario:base", "tokenizer": None}


def _write_checkpoint(path: Path, mtime: float, **entries: object) -> Path:
    import os

    import torch

    checkpoint = {
        "pytorch-lightning_version": "2.6.0",
        "state_dict": {"w": torch.zeros(64)},
        "global_step": 1,
        "hyper_parameters": QUICKSTART_HPARAMS,
        **entries,
    }
    torch.save(checkpoint, path)
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
    assert (
        f"The previous complete checkpoint of this run in that directory is {older}: resume from it with "
        f"--ckpt_path {older}"
    ) in first
    assert "weights_only" not in err and "Traceback" not in err
    assert model_loads == []


def test_a_missing_ckpt_path_without_other_checkpoints_says_to_start_without_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused([f"--ckpt_path={tmp_path / 'epoch=0-step=100.ckpt'}"], capsys)
    assert err.splitlines()[0] == (
        f"error: --ckpt_path {tmp_path / 'epoch=0-step=100.ckpt'}: no such file. There is no other complete checkpoint "
        f"of this run in {tmp_path}; start without --ckpt_path."
    )


def test_the_checkpoint_named_instead_of_a_broken_one_is_of_the_same_run_not_another_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    ours = _write_checkpoint(tmp_path / "epoch=0-step=100.ckpt", mtime=1_000_000)
    other_model = {**QUICKSTART_HPARAMS, "model": "scenario:disjoint"}
    _write_checkpoint(tmp_path / "other-epoch=0-step=150.ckpt", mtime=1_500_000, hyper_parameters=other_model)
    _write_checkpoint(tmp_path / "foreign.ckpt", mtime=1_600_000, hyper_parameters={"_class_path": "x.Other"})
    broken = tmp_path / "epoch=0-step=200.ckpt"
    broken.write_bytes(b"")
    first = _refused([f"--ckpt_path={broken}"], capsys).splitlines()[0]
    assert first.endswith(f"is {ours}: resume from it with --ckpt_path {ours}")


def test_an_incomplete_sharded_checkpoint_is_refused_naming_what_is_missing_and_the_previous_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    previous = _write_checkpoint(tmp_path / "epoch=0-step=100.ckpt", mtime=1_000_000)
    torn = tmp_path / "epoch=0-step=200.ckpt"  # killed during the save: shards, no .metadata, no meta.pt
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"\0" * 64)
    first = _refused([f"--ckpt_path={torn}"], capsys).splitlines()[0]
    assert first.startswith(
        f"error: --ckpt_path {torn} is not a valid checkpoint: the sharded checkpoint was cut short"
    )
    assert (
        "`.metadata`" in first
        and f"The previous complete checkpoint of this run in that directory is {previous}" in first
    )
    assert model_loads == []


def test_ckpt_path_last_resumes_from_the_newest_complete_checkpoint_of_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, model_loads: list[str]
) -> None:
    runs = tmp_path / "lightning_logs"
    first = runs / "version_0" / "checkpoints"
    second = runs / "version_1" / "checkpoints"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    _write_checkpoint(first / "epoch=0-step=100.ckpt", mtime=1_000_000)
    newest = _write_checkpoint(second / "epoch=0-step=50.ckpt", mtime=2_000_000)
    torn = _write_checkpoint(second / "epoch=0-step=100.ckpt", mtime=3_000_000)
    torn.write_bytes(torn.read_bytes()[:300])
    other = {**QUICKSTART_HPARAMS, "model": "scenario:disjoint"}
    _write_checkpoint(second / "last.ckpt", mtime=4_000_000, hyper_parameters=other)
    args = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    with caplog.at_level("INFO"), pytest.raises(SystemExit):  # at the model: the checkpoint was chosen before
        main([*args, "--ckpt_path=last"])
    assert f"--ckpt_path last: resuming from the newest complete checkpoint of this run, {newest}" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO"), pytest.raises(SystemExit):
        main([*args[:-1], f"--trainer.default_root_dir={tmp_path / 'elsewhere'}", "--ckpt_path=last"])
    assert "--ckpt_path last: no complete checkpoint of this run in" in caplog.text  # a fresh start
    assert len(model_loads) == 2  # the runs went on to build the model


def test_a_file_that_lightning_did_not_write_is_refused_as_a_ckpt_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    import torch

    weights = tmp_path / "model.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, weights)  # another program's torch.save (used to: KeyError)
    first = _refused([f"--ckpt_path={weights}"], capsys).splitlines()[0]
    assert first.startswith(
        f"error: --ckpt_path {weights} is not a checkpoint written by Lightning (no 'pytorch-lightning_version' "
        "entry; it holds ['model']): it cannot resume a fit."
    )
    assert model_loads == []


def test_a_checkpoint_rewritten_by_task_vector_scaling_is_refused_for_training_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    state = {"applied": "wise_ft_a0.5", "chosen": "wise_ft_a0.5", "points": []}
    last = _write_checkpoint(
        tmp_path / "last.ckpt", mtime=1_000_000, callbacks={"TaskVectorScaling{'edits': ['wise_ft_a0.5']}": state}
    )
    first = _refused([f"--ckpt_path={last}"], capsys).splitlines()[0]
    assert first.startswith(
        f"error: --ckpt_path {last} holds the weights TaskVectorScaling edited at the end of its fit (wise_ft_a0.5"
    )
    assert "resume from a checkpoint written before the edit" in first
    assert model_loads == []


def _error_line(err: str) -> str:
    """The error's line (after the model was built, transformers' loading bar is on stderr before it)."""
    return next(line for line in err.splitlines() if line.startswith("error: "))


def _sharded_checkpoint(path: Path, state_dict: dict[str, object]) -> Path:
    """A sharded checkpoint as ModelParallelStrategy writes it, from this one process."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"state_dict": state_dict}, checkpoint_id=path)
    torch.save(
        {"pytorch-lightning_version": "2.6.0", "global_step": 2, "hyper_parameters": QUICKSTART_HPARAMS},
        path / "meta.pt",
    )
    return path


@pytest.mark.slow
def test_a_sharded_checkpoint_into_a_one_device_run_is_refused_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    sharded = _sharded_checkpoint(tmp_path / "epoch=0-step=2.ckpt", {"model.lm_head.weight": torch.zeros(2, 2)})
    err = _refused([f"--ckpt_path={sharded}", f"--trainer.default_root_dir={tmp_path}"], capsys)
    first = _error_line(err)
    assert first.startswith(f"error: --ckpt_path {sharded} is a sharded checkpoint")  # used to: IsADirectoryError
    assert "`SingleDeviceStrategy` cannot load" in first
    assert "ModelParallelStrategy(save_distributed_checkpoint=False)" in first and "dcp_to_torch" in first


@pytest.mark.slow
def test_another_models_checkpoint_is_refused_naming_the_tensors_that_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    other = _write_checkpoint(
        tmp_path / "epoch=0-step=2.ckpt", mtime=1_000_000, state_dict={"net.0.weight": torch.zeros(2, 2)}
    )
    err = _refused([f"--ckpt_path={other}", f"--trainer.default_root_dir={tmp_path}"], capsys)
    first = _error_line(err)
    assert first.startswith(f"error: --ckpt_path {other} holds the weights of another model: ")  # used to: missing keys
    assert "1 of its tensors are not in this model (e.g. ['net.0.weight'])" in first
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_sharded_checkpoint_killed_mid_write_is_never_taken_as_complete_and_last_resumes_the_previous_one(
    tmp_path: Path,
) -> None:
    """2 processes under FSDP2, both killed while the checkpoint of step 3 is written (its shards and ``.metadata``
    on disk, not ``meta.pt``), used to leave ``epoch=0-step=3.ckpt`` that looked finished and could not load. Two
    launches of about 20 s each (quiet machine): the killed fit and its resume with ``--ckpt_path last``. (That a
    sharded resume ends bit-identical to the uninterrupted fit is tested in ``tests/test_resume.py``.)"""
    script = ROOT / "tests" / "scripts" / "killed_save.py"
    killed = run_script(script, str(tmp_path), "--kill-at-save", "3", timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt.partial"]
    assert (checkpoints / "epoch=0-step=3.ckpt.partial" / ".metadata").is_file()  # the shards were all written

    resumed = run_script(script, str(tmp_path), "--ckpt_path", "last", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    previous = checkpoints / "epoch=0-step=2.ckpt"
    assert f"--ckpt_path last: resuming from the newest complete checkpoint of this run, {previous}" in resumed.stderr
    assert f"Restored all states from the checkpoint at {previous}" in resumed.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"epoch=0-step={step}.ckpt" for step in (1, 2, 3, 4)]
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # the same run goes on


# ---- errors that name their cause ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "The reference set is empty"),
        (b"\x00\x01\xff\xfe", "not UTF-8"),
        (b'{"foo": 1}\n', "has no 'text'"),
        (None, "does not exist"),
    ],
    ids=["empty", "binary", "wrong-schema", "missing"],
)
def test_a_bad_probe_file_in_yaml_is_reported_with_its_key_file_and_reason_first(
    tmp_path: Path, content: bytes | None, reason: str, capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    """The probe's own error used to hide behind jsonargparse's "Expected an instantiatable class, but
    lit_mofo.probes.Probe is abstract" (the first alternative of the probes' union type)."""
    reference = tmp_path / "reference.jsonl"
    if content is not None:
        reference.write_bytes(content)
    config = tmp_path / "probe.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lit_mofo.ForgettingMonitor\n      init_args:\n        probes:\n"
        "          general:\n            class_path: lit_mofo.probes.LanguageModelProbe\n            init_args:\n"
        f"              files: {reference}\n"
    )
    first = _refused(["--config", str(config)], capsys).splitlines()[0]
    assert first.startswith("error: trainer.callbacks[0].probes.general: LanguageModelProbe")
    assert str(reference) in first and reason in first
    assert "abstract" not in first
    assert model_loads == []


@pytest.mark.parametrize("given", ["yaml", "flag"])
def test_a_typo_in_a_callbacks_choice_names_the_choices(
    tmp_path: Path, given: str, capsys: pytest.CaptureFixture[str], model_loads: list[str]
) -> None:
    if given == "yaml":
        config = tmp_path / "hft.yaml"
        config.write_text(
            "trainer:\n  callbacks:\n    - class_path: lit_mofo.HalfFineTuning\n      init_args:\n        mode: freez\n"
        )
        args = ["--config", str(config)]
    else:
        args = ["--trainer.callbacks+=HalfFineTuning", "--trainer.callbacks.mode=freez"]
    first = _refused(args, capsys).splitlines()[0]
    # It used to blame the base class: "lightning.Callback has no option 'mode'".
    assert first == "error: trainer.callbacks.mode: invalid value 'freez'; expected one of 'freeze', 'mask'."


def test_the_debug_tip_names_a_value_jsonargparse_accepts_and_it_raises_the_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    err = _refused(["--trainer.callbacks+=HalfFineTuning", "--trainer.callbacks.ratio=2"], capsys)
    assert "JSONARGPARSE_DEBUG=true shows the traceback" in err
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")  # "1" made jsonargparse 4.53 fail: "Invalid boolean value"
    with pytest.raises(ValueError, match=r"ratio=2\.0 is invalid"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/quickstart.yaml"),
                "--trainer.callbacks+=HalfFineTuning",
                "--trainer.callbacks.ratio=2",
            ]
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
    from lit_mofo.loggers import ResumableCSVLogger

    run = tmp_path / "lightning_logs" / "version_0"
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("a,step\n0.5,0\n0.25,1\n0.125,2\n")  # the crashed run wrote up to step 2
    logger = ResumableCSVLogger(str(tmp_path), version="version_0")
    assert logger.continues and Path(logger.log_dir) == run
    logger.experiment.keep(rows=2)  # the checkpoint was written after 2 rows
    logger.log_metrics({"b": 1.0}, step=2)  # a new column: the header grows, the kept rows stay
    logger.save()
    assert (run / "metrics.csv").read_text().splitlines() == ["a,b,step", "0.5,,0", "0.25,,1", ",1.0,2"]
    assert logger.experiment.rows == 3
    logger.experiment.keep(up_to_step=1)  # a checkpoint without the row count: the rows up to its step
    assert (run / "metrics.csv").read_text().splitlines() == ["a,b,step", "0.5,,0", "0.25,,1"]
