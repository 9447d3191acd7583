"""Two-process DDP fine-tune on CPU (gloo) with ForgettingMonitor, ParameterDrift and TaskVectorScaling; run by the
DDP tests of ``tests/test_forgetting_monitor.py`` (which cover the three callbacks from this one run).

Usage::

    python tests/scripts/ddp_forgetting.py OUT_DIR [--steps 4]

Lightning's ``ddp`` strategy re-launches this very command for rank 1, so it must run as its own process. The
reference set has 10 sequences in 5 batches of 2, so the ranks get unequal shares (3 and 2 batches; rank 1 runs a
padding forward, as under FSDP2). Each rank writes ``OUT_DIR/rank{r}.pt``: the monitor's baselines and history, the
drift history, the reference windows this rank scored and the forwards it ran at each evaluation (TaskVectorScaling's
edits included), the single-process value of the probe on the pre-trained model, computed before the process group
exists, and the error of a second fit whose probe holds a window longer than the model's positions; also the
pre-trained and fine-tuned weights, the monitor's state and the edits' curve, from which the tests compute the
single-process curve. The report goes to ``OUT_DIR/logs/version_0``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor, isolated_evaluation
from lit_mofo.callbacks.parameter_drift import ParameterDrift
from lit_mofo.callbacks.task_vector_scaling import TaskVectorScaling
from lit_mofo.probes import LanguageModelProbe

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM, synthetic_progressions

REFERENCE = synthetic_progressions(10, 12, 128, seed=31).tolist()
SCALING: dict[str, Any] = {"wise_ft": [0.0, 0.5], "lines": [(0.0, 1.0)], "report": True}


class AdamWLM(TinyCausalLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class RecordingProbe(LanguageModelProbe):
    """The LM probe, remembering which reference windows this rank scored in each evaluation, and how many forwards
    it ran (a padding forward is run but not scored)."""

    def __init__(self) -> None:
        super().__init__(token_ids=REFERENCE, batch_size=2, name="general")
        self.seen: list[list[list[int]]] = []
        self.forwards: list[int] = []

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        self.seen.append([])
        self.forwards.append(0)
        return super().evaluate(trainer, pl_module)

    def _prepare(self, batch: Any, device: torch.device) -> Any:
        self.forwards[-1] += 1
        return super()._prepare(batch, device)

    def _consume(self, inputs: Any, logits: torch.Tensor) -> None:
        input_ids, attention_mask, _ = inputs
        self.seen[-1].extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True))
        super()._consume(inputs, logits)


def overlong_outcome(out_dir: Path) -> tuple[str, str]:
    """``(error type, message)`` of a fit whose probe holds a 100-token window, beyond the Llama's 64 positions, in
    the batch dealt to rank 1: every rank must refuse it in setup, before any forward."""
    windows = [REFERENCE[0], REFERENCE[1], synthetic_progressions(1, 100, 128, seed=5)[0].tolist()]
    monitor = ForgettingMonitor({"overlong": LanguageModelProbe(token_ids=windows, batch_size=2, max_length=128)})
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        default_root_dir=out_dir / "overlong",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    try:
        trainer.fit(AdamWLM(), SyntheticTokenDataModule(num_sequences=16, seq_len=16, batch_size=8))
    except Exception as error:  # recorded for the test
        return type(error).__name__, str(error)
    return "", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    module = AdamWLM()
    single = LanguageModelProbe(token_ids=REFERENCE, batch_size=2)
    single.setup(None, module)  # type: ignore[arg-type]
    with isolated_evaluation(module):
        single_process_baseline = single.evaluate(None, module)  # type: ignore[arg-type]

    probe = RecordingProbe()
    monitor = ForgettingMonitor({"general": probe}, every_n_train_steps=2)
    drift = ParameterDrift(every_n_train_steps=2)
    scaling = TaskVectorScaling(**SCALING)
    initial = {name: param.detach().clone() for name, param in module.named_parameters()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=args.steps,
        default_root_dir=args.out_dir,
        logger=CSVLogger(args.out_dir, name="logs", version=0),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, drift, scaling],
    )
    trainer.fit(module, SyntheticTokenDataModule(num_sequences=16 * args.steps, seq_len=16, batch_size=8))
    overlong = overlong_outcome(args.out_dir)

    torch.save(
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "baselines": monitor.baselines,
            "history": monitor.history,
            "drift": drift.history,
            "seen": probe.seen,
            "forwards": probe.forwards,
            "single_process_baseline": single_process_baseline,
            "reference": REFERENCE,
            "initial": initial,
            "final": {name: param.detach().clone() for name, param in module.named_parameters()},
            "monitor_state": monitor.state_dict(),
            "curve": [point.as_dict() for point in scaling.points],
            "overlong": overlong,
        },
        args.out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
