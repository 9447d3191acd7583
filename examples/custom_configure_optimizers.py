"""A ``configure_optimizers`` of your own, built from lit_mofo's helpers: groups by category, MoFO, warmup + cosine.

Biases, norms and embeddings get no weight decay; the embeddings and the LM head take the dense Adam step (their
rows are looked up sparsely, so filtering them by momentum would starve rare tokens); every other matrix moves its
15% largest-momentum entries per step. The schedule is stepped every optimizer step. Run (about 10 s on CPU)::

    python examples/custom_configure_optimizers.py --steps 30
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from tiny_lm import SyntheticTokenDataModule, TinyCausalLM

from lit_mofo import MoFO, mofo_param_groups, warmup_lr_scheduler
from lit_mofo.notices import quiet_known_notices


class MyLM(TinyCausalLM):
    def configure_optimizers(self) -> dict[str, Any]:
        groups = mofo_param_groups(self, no_decay=("norm", "embedding"), dense=("embedding", "re:lm_head"))
        optimizer = MoFO(groups, lr=1e-3, fraction=0.15, weight_decay=0.01)
        total = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer, "lr_scheduler": warmup_lr_scheduler(optimizer, total, schedule="cosine")}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers().optimizer
        self.log("mofo/update_fraction", optimizer.update_fraction, prog_bar=True)


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--root", default="lightning_logs", help="logs go to ROOT/custom_configure_optimizers/")
    args = parser.parse_args(argv)
    quiet_known_notices()  # Lightning's install tips and a torch deprecation warning about Lightning's own code
    pl.seed_everything(0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=CSVLogger(args.root, name="custom_configure_optimizers"),
        enable_checkpointing=False,
    )
    trainer.fit(MyLM(), datamodule=SyntheticTokenDataModule())
    for group in trainer.optimizers[0].param_groups:
        print(f"{len(group['params']):3d} tensors  weight_decay={group['weight_decay']}  fraction={group['fraction']}")
    return trainer


if __name__ == "__main__":
    main()
