"""Two-process DDP fit with L2ToPretrained on CPU (gloo); run by ``tests/test_l2_to_pretrained.py``.

Usage: ``python tests/scripts/ddp_l2.py OUT_DIR``. Each rank writes ``OUT_DIR/rank{r}.pt`` with its initial and
final parameters and the final penalty.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM

from lit_mofo.callbacks.l2_to_pretrained import L2ToPretrained


class AdamWLM(TinyCausalLM):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main(out_dir: Path) -> None:
    pl.seed_everything(0, workers=True)
    model = AdamWLM()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    callback = L2ToPretrained(strength=0.1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=6,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model, datamodule=SyntheticTokenDataModule(num_sequences=128, batch_size=8))
    final = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.save(
        {"initial": initial, "final": final, "penalty": float(trainer.callback_metrics["l2_to_pretrained/penalty"])},
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
