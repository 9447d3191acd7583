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

import warnings
from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

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

    One option beyond LightningCLI's: ``torch_num_threads`` (``torch.set_num_threads`` before anything is built).
    Small models on a CPU are bound by per-op overhead, and on a shared or small machine one thread per process is
    often several times faster than the default of one per core (measured 14 s vs 229 s for the quickstart's fit
    on a loaded 2-core machine); the scenario configs set it to 1.

    The resolved config is saved next to the logs (``config.yaml`` in the run's log dir), overwriting a previous
    one in the same directory.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_num_threads",
            type=PositiveInt | None,
            default=None,
            help="torch.set_num_threads for each process before training (None: torch's default, one per core).",
        )

    @override
    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        threads = config.get("torch_num_threads")
        if threads is not None:
            torch.set_num_threads(threads)


def main(args: ArgsType = None, run: bool = True, **kwargs: Any) -> LitMoFOCLI:
    """Entry point of the ``lit-mofo`` console script; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    # jsonargparse instantiates the LoftQConfig default of every `peft.LoraConfig` it builds, which peft then drops
    # with this warning unless init_lora_weights="loftq": noise for every LoRA config, not a problem in it.
    warnings.filterwarnings("ignore", message="`loftq_config` specified but will be ignored", category=UserWarning)
    return LitMoFOCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        **kwargs,
    )


def console_main() -> int:
    """The ``lit-mofo`` console script: :func:`main` on ``sys.argv``, exit status 0 once the subcommand has run.

    (Installers wrap the entry point in ``sys.exit(...)``; returning the CLI object from there would print it and
    exit with status 1 after a successful fit.) A failing run raises, which exits non-zero.
    """
    main()
    return 0


if __name__ == "__main__":
    raise SystemExit(console_main())
