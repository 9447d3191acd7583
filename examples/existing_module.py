"""Add lit_mofo to a LightningModule you already have: MoFO, Half Fine-Tuning and forgetting hooks, no code change.

``MyLM`` below stands for your module: it builds its own model and returns AdamW from ``configure_optimizers``.
Nothing in it knows about lit_mofo. Four callbacks turn the run into a forgetting-aware fine-tune:

- :class:`~lit_mofo.MoFOCallback` turns the AdamW into :class:`~lit_mofo.MoFO` (same groups, lr, schedule);
- :class:`~lit_mofo.HalfFineTuning` freezes half of each block's matrices (the paper's category-level draw);
- :class:`~lit_mofo.ForgettingMonitor` measures a held-out "general" set on the pre-trained model, then every
  ``--eval-every`` steps, and writes ``forgetting_report.{json,md}`` in the log dir;
- :class:`~lit_mofo.ParameterDrift` tracks how far the weights moved from the pre-trained ones.

Run from the repository root (about 20 s on 2 CPU cores; logs and report in
``lightning_logs/existing_module/version_N/``)::

    python examples/existing_module.py --steps 40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

from lit_mofo import ForgettingMonitor, HalfFineTuning, MoFOCallback, ParameterDrift
from lit_mofo.notices import quiet_known_notices
from lit_mofo.probes import LanguageModelProbe

VOCAB = 128


class MyLM(pl.LightningModule):
    """An ordinary causal-LM module: a small Llama, next-token loss, AdamW. No lit_mofo inside."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.model = LlamaForCausalLM(config)
        self.lr = lr

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> Tensor:
        (input_ids,) = batch
        loss = self.model(input_ids=input_ids, labels=input_ids).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def sequences(num: int, seed: int, strides: tuple[int, ...]) -> Tensor:
    """Arithmetic progressions mod ``VOCAB`` with the given strides: the "task" and the "general" data differ."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB, (num, 1), generator=generator)
    stride = torch.tensor(strides)[torch.randint(len(strides), (num, 1), generator=generator)]
    return (start + stride * torch.arange(32)) % VOCAB


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--root", type=Path, default=Path("lightning_logs"), help="logs go to ROOT/existing_module/")
    args = parser.parse_args(argv)

    quiet_known_notices()  # Lightning's install tips and a torch deprecation warning about Lightning's own code
    pl.seed_everything(0)
    train = DataLoader(TensorDataset(sequences(512, seed=0, strides=(5, 7))), batch_size=16, shuffle=True)
    general = sequences(64, seed=1, strides=(1, 2, 3)).tolist()  # what the model should not forget

    callbacks = [
        MoFOCallback(fraction=0.15),
        HalfFineTuning(ratio=0.5),
        ForgettingMonitor({"general": LanguageModelProbe(token_ids=general)}, every_n_train_steps=args.eval_every),
        ParameterDrift(every_n_train_steps=args.eval_every),
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=callbacks,
        logger=CSVLogger(args.root, name="existing_module"),
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(MyLM(), train)
    return trainer


if __name__ == "__main__":
    main()
