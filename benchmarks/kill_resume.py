"""Kill/resume trial: SIGKILL a 2-process FSDP2 fit at random moments, then resume it with ``--ckpt_path last``.

Usage::

    python benchmarks/kill_resume.py                  # 20 trials (about 20 minutes on 2 busy CPU cores)
    python benchmarks/kill_resume.py --kills 5 --out /tmp/kill_resume.json

The fit: ``lit-mofo fit`` of the embedded scenario's base model (1.1M parameters, so that a sharded checkpoint of
about 18 MB takes a noticeable share of each step) under ``ModelParallelStrategy`` over 2 gloo processes, a
checkpoint after every step (``ModelCheckpoint(every_n_train_steps=1, save_top_k=-1)``), ``--steps`` steps over
two epochs and a half (MoFO, the scenario's data). First an uninterrupted fit gives the reference weights and how
long training takes once the first checkpoint is written; then each trial starts the same fit in a fresh directory,
waits for its first checkpoint, kills the whole process group (``SIGKILL``, both ranks at once) after a delay drawn
uniformly over the rest of the training time (seeded by ``--seed``), and counts:

- the checkpoints under a checkpoint's name (``*.ckpt``) and how many of them are complete
  (:func:`lit_mofo.checkpoints.checkpoint_problem`), and whether the kill hit a save (a ``*.ckpt.partial`` left);
- whether ``lit-mofo fit --ckpt_path last`` resumed (the newest complete checkpoint of the run, or a fresh start
  when none was written) and ended with weights bit-identical to the reference.

A trial whose fit ends before its kill time (the machine ran faster than the reference) is counted as no kill.
Writes a JSON of every trial (``--out``) and prints a summary. Measured (20 trials, 2 CPU cores at a load falling
from 6 to 0.5): 16 kills, 3 of them during a save (a ``.partial`` left, no checkpoint under its name), 154 of 154
checkpoints under a checkpoint's name complete, 20 of 20 resumes bit-identical to the uninterrupted fit; again on
2026-12-07 (8 trials, quiet cores): 8 kills, 3 during a save, 43 of 43 complete, 8 of 8 bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = """
seed_everything: 0
torch_num_threads: 1
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args:
      data_parallel_size: 2
      tensor_parallel_size: 1
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 1
        save_top_k: -1
model:
  class_path: lit_mofo.modules.CausalLMModule
  init_args:
    model: scenario:base
    optimizer:
      class_path: lit_mofo.MoFO
      init_args:
        lr: 1.0e-3
        fraction: 0.15
data:
  class_path: lit_mofo.scenario.ScenarioDataModule
  init_args:
    num_train: {num_train}
    num_val: 0
    batch_size: 8
"""


def _command(config: Path, root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lit_mofo.cli",
        "fit",
        "--config",
        str(config),
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def _environment() -> dict[str, str]:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if sys.platform == "linux":
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return environment


def _checkpoints(root: Path) -> Path:
    return root / "lightning_logs" / "version_0" / "checkpoints"


def _final_weights(root: Path, steps: int) -> dict[str, Any]:
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    final = next(_checkpoints(root).glob(f"*-step={steps}.ckpt"))
    return _load_distributed_checkpoint(final)["state_dict"]


def _run(command: list[str], log: Path, timeout: float) -> int:
    with log.open("w") as output:
        return subprocess.run(
            command, cwd=ROOT, env=_environment(), stdout=output, stderr=subprocess.STDOUT, timeout=timeout
        ).returncode


def _killed(command: list[str], log: Path, checkpoints: Path, delay: float, timeout: float) -> float | None:
    """Start ``command``, wait for its first checkpoint, SIGKILL its process group ``delay`` seconds later; the seconds
    after the first checkpoint at which it was killed (None: it finished first)."""
    with (
        log.open("w") as output,
        subprocess.Popen(
            command, cwd=ROOT, env=_environment(), stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        ) as process,
    ):
        deadline = time.monotonic() + timeout
        try:
            while not any(checkpoints.glob("*.ckpt")) and process.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no checkpoint within {timeout} s; see {log}")
                time.sleep(0.05)
            first = time.monotonic()
            while process.poll() is None and time.monotonic() - first < delay:
                time.sleep(0.01)
            if process.poll() is not None:
                return None
            os.killpg(process.pid, signal.SIGKILL)
            return time.monotonic() - first
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of the fit (a checkpoint after each)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/lit_mofo_kill_resume"))
    parser.add_argument("--out", type=Path, default=None, help="JSON of every trial")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for one fit")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.steps < 2:
        parser.error(f"--kills={args.kills} must be >= 1 and --steps={args.steps} >= 2")

    import torch

    from lit_mofo.checkpoints import PARTIAL_SUFFIX, checkpoint_problem
    from lit_mofo.scenario.base_model import base_model_path

    base_model_path()  # built once here, not inside a timed fit
    args.work_dir.mkdir(parents=True, exist_ok=True)
    config = args.work_dir / "config.yaml"
    config.write_text(CONFIG.format(steps=args.steps, num_train=2 * 8 * max(1, args.steps * 2 // 5)))

    reference = args.work_dir / "reference"
    shutil.rmtree(reference, ignore_errors=True)  # an earlier trial's run would be resumed, or read as the reference
    start = time.monotonic()
    code = _run(_command(config, reference), args.work_dir / "reference.log", args.timeout)
    if code != 0:
        raise SystemExit(f"the uninterrupted fit failed ({code}); see {args.work_dir / 'reference.log'}")
    saves = sorted(_checkpoints(reference).glob("*.ckpt"), key=lambda p: (p / "meta.pt").stat().st_mtime)
    training = (saves[-1] / "meta.pt").stat().st_mtime - (saves[0] / "meta.pt").stat().st_mtime
    expected = _final_weights(reference, args.steps)
    print(
        f"reference: {time.monotonic() - start:.0f} s, {training:.1f} s from the first checkpoint to the last",
        flush=True,
    )

    rng = random.Random(args.seed)
    trials = []
    for index in range(args.kills):
        root = args.work_dir / f"trial{index}"
        shutil.rmtree(root, ignore_errors=True)
        delay = rng.uniform(0.0, training)
        killed_at = _killed(
            _command(config, root), args.work_dir / f"trial{index}.log", _checkpoints(root), delay, args.timeout
        )
        entries = sorted(_checkpoints(root).iterdir()) if _checkpoints(root).is_dir() else []
        named = [p for p in entries if p.name.endswith(".ckpt")]
        complete = [p for p in named if checkpoint_problem(p) is None]
        partial = [p.name for p in entries if p.name.endswith(PARTIAL_SUFFIX)]
        resumed = _run(
            _command(config, root, "--ckpt_path", "last"), args.work_dir / f"trial{index}.resume.log", args.timeout
        )
        identical = None
        if resumed == 0:
            weights = _final_weights(root, args.steps)
            identical = weights.keys() == expected.keys() and all(
                torch.equal(weights[k], expected[k]) for k in expected
            )
        trial = {
            "delay_seconds": delay,
            "killed_seconds_after_first_checkpoint": killed_at,
            "checkpoints_named": len(named),
            "checkpoints_complete": len(complete),
            "partial_left": partial,
            "resume_exit_code": resumed,
            "bit_identical": identical,
        }
        trials.append(trial)
        print(f"trial {index}: {json.dumps(trial)}", flush=True)

    killed = [t for t in trials if t["killed_seconds_after_first_checkpoint"] is not None]
    summary = {
        "kills": len(killed),
        "kills_during_a_save": sum(bool(t["partial_left"]) for t in killed),
        "checkpoints_named": sum(t["checkpoints_named"] for t in trials),
        "checkpoints_complete": sum(t["checkpoints_complete"] for t in trials),
        "resumes": sum(t["resume_exit_code"] == 0 for t in trials),
        "bit_identical_resumes": sum(bool(t["bit_identical"]) for t in trials),
        "trials": len(trials),
        "steps": args.steps,
    }
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "trials": trials}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
