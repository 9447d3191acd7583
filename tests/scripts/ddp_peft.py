"""Two-process DDP fit of a LoRA model with ParameterDrift and L2ToPretrained on CPU (gloo); run by
``tests/test_peft_callbacks.py``.

Usage: ``python tests/scripts/ddp_peft.py OUT_DIR``. Every rank is fed the same batches (no distributed sampler),
so the fit is the one-process fit on those batches. Each rank writes ``OUT_DIR/rank{r}.pt``: its final parameters,
the drift history and the logged penalty.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_peft_callbacks import callbacks, data, sgd_lora

from lit_mofo.modules import CausalLMModule


def main(out_dir: Path) -> None:
    module = sgd_lora(CausalLMModule)
    drift, l2 = callbacks()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=4,
        callbacks=[drift, l2],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        default_root_dir=out_dir,
    )
    trainer.fit(module, data())
    torch.save(
        {
            "final": {name: p.detach().clone() for name, p in module.named_parameters()},
            "drift": drift.history,
            "penalty": float(trainer.callback_metrics["l2_to_pretrained/penalty"]),
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
