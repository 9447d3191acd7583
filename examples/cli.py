"""LightningCLI entry point for the tiny example model; the optimizer comes from the config.

Run from the repository root::

    python examples/cli.py fit --config configs/mofo.yaml --config configs/examples/tiny_lm.yaml
    python examples/cli.py fit --config configs/mofo.yaml --optimizer.lr 1e-3 --trainer.max_steps 20
    python examples/cli.py fit --optimizer lit_mofo.MoFO --optimizer.fraction 0.1 --print_config

:class:`~tiny_lm.TinyCausalLM` defines no ``configure_optimizers``, so LightningCLI's automatic optimizer
(``optimizer: {class_path: lit_mofo.MoFO, ...}``) applies.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningCLI
from tiny_lm import SyntheticTokenDataModule, TinyCausalLM


def main(args: ArgsType = None, run: bool = True) -> LightningCLI:
    return LightningCLI(TinyCausalLM, SyntheticTokenDataModule, args=args, run=run)


if __name__ == "__main__":
    main()
