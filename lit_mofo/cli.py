"""The ``lit-mofo`` command: a :class:`~lightning.pytorch.cli.LightningCLI` that knows lit_mofo's parts.

Subcommands ``fit``, ``validate``, ``test`` and ``predict``, with ``--help``, ``--print_config`` and
``--config FILE`` as in any LightningCLI. lit_mofo's optimizer, callbacks, probes, modules and datamodules are
imported up front, so configs may name them by short class name (``class_path: MoFO``, ``ForgettingMonitor``,
``CausalLMModule``, ``ScenarioDataModule``, ...) as well as by full path (``lit_mofo.MoFO``).

Example::

    lit-mofo fit --config configs/quickstart.yaml
    lit-mofo fit --config configs/recipes/qwen2.5-0.5b_metamath_mofo.yaml --print_config
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

# Imported for their side effect: jsonargparse resolves short class names among the imported subclasses.
import lit_mofo.callbacks
import lit_mofo.data
import lit_mofo.modules
import lit_mofo.optim
import lit_mofo.probes
import lit_mofo.scenario  # noqa: F401

__all__ = ["LitMoFOCLI", "main"]


class LitMoFOCLI(LightningCLI):
    """LightningCLI with any LightningModule/LightningDataModule subclass selectable by ``class_path``.

    The resolved config is saved next to the logs (``config.yaml`` in the run's log dir), overwriting a previous
    one in the same directory.
    """


def main(args: ArgsType = None, run: bool = True, **kwargs: Any) -> LitMoFOCLI:
    """Entry point of the ``lit-mofo`` console script; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    return LitMoFOCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        **kwargs,
    )


if __name__ == "__main__":
    main()
