"""The example scripts run as documented (each is a user's first contact with the kit)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.mark.slow
def test_existing_module_example_adds_all_four_callbacks_and_writes_the_report(tmp_path: Path) -> None:
    import existing_module

    trainer = existing_module.main(["--steps", "6", "--eval-every", "3", "--root", str(tmp_path)])
    assert trainer.global_step == 6
    assert type(trainer.optimizers[0]).__name__ == "MoFO"  # the module's AdamW, converted by MoFOCallback
    report = json.loads((Path(trainer.log_dir) / "forgetting_report.json").read_text())
    text = json.dumps(report)
    assert "general" in text and "relative_l2" in text
    assert "forgetting/general/loss" in trainer.callback_metrics
    hft = next(c for c in trainer.callbacks if type(c).__name__ == "HalfFineTuning")
    assert 0.4 < hft.trainable_fraction < 0.7
