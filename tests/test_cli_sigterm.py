"""A ``lit-mofo fit`` stopped by SIGTERM (what schedulers send before preemption) saves its step's checkpoint, says
where it stopped and how to resume, exits non-zero, and resumes from that checkpoint to the uninterrupted run's
weights; the progress bar's version number reads as one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from process_launch import ROOT

from lit_mofo.cli import main
from lit_mofo.loggers import ResumableCSVLogger
from lit_mofo.progress import ResumableTQDMProgressBar

QUICKSTART = str(ROOT / "configs/quickstart.yaml")


class SigtermAtStep(pl.Callback):
    """Sends this process a real SIGTERM once the fit has taken ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_sigtermed_fit_exits_143_naming_its_checkpoint_and_the_resume_command(tmp_path: Path) -> None:
    marker = tmp_path / "training"
    command = [
        sys.executable,
        "-m",
        "lit_mofo.cli",
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_steps=100000",  # it would run for an hour: only the signal ends it
        "--trainer.callbacks+=run_markers.TouchAtStep",
        f"--trainer.callbacks.path={marker}",
    ]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "tests" / "scripts"), os.environ.get("PYTHONPATH", "")]
    )
    with subprocess.Popen(
        command,
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            deadline = time.monotonic() + 600
            while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert marker.exists(), f"training never started:\n{process.communicate(timeout=60)[1][-3000:]}"
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=600)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]  # not 0: the job reads as interrupted
    stopped = re.search(
        r"lit-mofo: stopped by SIGTERM at step (\d+); its checkpoint is (\S+)\. Resume with:\n  (.+)", stderr
    )
    assert stopped, stderr[-3000:]
    step, checkpoint, resume = int(stopped.group(1)), Path(stopped.group(2)), stopped.group(3)
    assert step >= 3
    assert checkpoint == tmp_path / "lightning_logs" / "version_0" / "checkpoints" / f"epoch=0-step={step}.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == step
    assert resume.startswith("lit-mofo fit --config ") and resume.endswith(f"--ckpt_path={checkpoint}")
    assert "--trainer.max_steps=100000" in resume


@pytest.mark.slow
def test_a_fit_resumed_from_its_sigterm_checkpoint_ends_with_the_uninterrupted_weights_and_logs(tmp_path: Path) -> None:
    short = [
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_steps=12",
        "--trainer.val_check_interval=6",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.log_every_n_steps=2",
    ]
    threads = torch.get_num_threads()
    try:
        uninterrupted = main([*short, f"--trainer.default_root_dir={tmp_path / 'a'}"])
        with pytest.raises(SystemExit) as stopped:
            main(
                [*short, f"--trainer.default_root_dir={tmp_path / 'b'}"],
                trainer_defaults={"callbacks": [SigtermAtStep(8)]},
            )
        assert stopped.value.code == 128 + signal.SIGTERM
        run = tmp_path / "b" / "lightning_logs" / "version_0"
        checkpoint = run / "checkpoints" / "epoch=0-step=8.ckpt"
        assert checkpoint.is_file()  # besides the validation's epoch=0-step=6.ckpt
        resumed = main([*short, f"--ckpt_path={checkpoint}"])
    finally:
        torch.set_num_threads(threads)
    assert resumed.trainer.global_step == 12
    weights = dict(uninterrupted.model.named_parameters())
    assert all(torch.equal(weights[name], p) for name, p in resumed.model.named_parameters())
    reference = tmp_path / "a" / "lightning_logs" / "version_0"
    assert (run / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()


def test_the_progress_bar_shows_the_version_number_also_after_a_resume(tmp_path: Path) -> None:
    bar = ResumableTQDMProgressBar()
    for logger, shown in (
        (ResumableCSVLogger(str(tmp_path)), "0"),
        (ResumableCSVLogger(str(tmp_path), version="version_2"), "2"),
    ):
        trainer = pl.Trainer(logger=logger, callbacks=[bar], enable_checkpointing=False)
        assert bar.get_metrics(trainer, pl.LightningModule())["v_num"] == shown  # not 0.000, nor "on_2"
