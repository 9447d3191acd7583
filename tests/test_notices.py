"""Importing lit_mofo changes no process-wide state; ``quiet_known_notices`` hides Lightning's notices that are not
about the run (the ones ``lit-mofo`` hides) from a script's own Trainer, for the script or for a ``with`` block."""

from __future__ import annotations

import subprocess
import sys

import pytest
from process_launch import ROOT

NOTICES = ("tensorboardX", "Tip: For seamless cloud", "LeafSpec")
SCRIPT = """
import logging, sys, warnings
sys.path.insert(0, {examples!r})
import lit_mofo, lit_mofo.data, lit_mofo.modules, lit_mofo.probes, lit_mofo.scenario, lit_mofo.notices

def ours():  # the filters quiet_known_notices installs: none of them after the imports
    patterns = [f[1].pattern for f in warnings.filters if f[1] is not None]
    return [p for p in patterns if any(n in p for n in ("LeafSpec", "tensorboardX", "loftq", "is_gradient_check"))]

tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
assert ours() == [] and tips.filters == []
before = (list(warnings.filters), list(tips.filters))
import lightning.pytorch as pl
from tiny_lm import SyntheticTokenDataModule, TinyCausalLM
from lit_mofo import ParameterDrift
from lit_mofo.notices import quiet_known_notices

class LM(TinyCausalLM):
    def configure_optimizers(self):
        import torch
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

def fit():
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", callbacks=[ParameterDrift(report=False)],
                         default_root_dir=sys.argv[1], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(LM(), SyntheticTokenDataModule(num_sequences=8, seq_len=8, batch_size=4))

if sys.argv[2] == "quiet":
    with quiet_known_notices():
        fit()
    assert (list(warnings.filters), list(tips.filters)) == before  # put back as they were
else:
    fit()
print("done")
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "quiet"])
def test_a_scripts_own_trainer_shows_the_notices_unless_it_asks_and_importing_lit_mofo_changes_nothing(
    mode: str, tmp_path: pytest.TempPathFactory
) -> None:
    script = SCRIPT.format(examples=str(ROOT / "examples"))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), mode], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "done" in result.stdout, result.stderr[-3000:]
    output = result.stdout + result.stderr
    shown = [notice for notice in NOTICES if notice in output]
    assert shown == ([] if mode == "quiet" else list(NOTICES)), output[-3000:]
