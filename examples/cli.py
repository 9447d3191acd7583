"""LightningCLI entry point for the tiny example model; the optimizer comes from the config.

Run from the repository root (``configs/examples/tiny_lm.yaml`` stops after 100 steps, about 20 s on 2 CPU cores)::

    python examples/cli.py fit --config configs/mofo.yaml --config configs/examples/tiny_lm.yaml
    python examples/cli.py fit --config configs/mofo.yaml --optimizer.lr 1e-3 --trainer.max_steps 20
    python examples/cli.py fit --optimizer lit_mofo.MoFO --optimizer.fraction 0.1 --print_config

:class:`~tiny_lm.TinyCausalLM` defines no ``configure_optimizers``, so LightningCLI's automatic optimizer
(``optimizer: {class_path: lit_mofo.MoFO, ...}``) applies. The CLI is :class:`lit_mofo.cli.LitMoFOCLI` with this
model and data: arguments checked before anything is built, and ``--ckpt_path`` resuming into the run's own logs.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType
from tiny_lm import SyntheticTokenDataModule, TinyCausalLM

from lit_mofo.cli import LitMoFOCLI


def main(args: ArgsType = None, run: bool = True) -> LitMoFOCLI:
    return LitMoFOCLI(TinyCausalLM, SyntheticTokenDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
