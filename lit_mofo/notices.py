"""The notices every Lightning run prints that are not about the run, and one switch to hide them.

``lit-mofo`` hides them itself. A script that builds its own ``Trainer`` sees them unless it asks, because importing
lit_mofo changes no process-wide state (no warning filter, no logging filter)::

    from lit_mofo.notices import quiet_known_notices

    quiet_known_notices()  # from here on, for the whole script
    with quiet_known_notices():  # or only inside the block: the filters are removed when it ends
        trainer = Trainer(...)  # Lightning prints its tips and the tensorboardX notice while the Trainer is built
        trainer.fit(module)
"""

from __future__ import annotations

import logging
import warnings
from types import TracebackType

__all__ = ["quiet_known_notices"]


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# Lightning's advertisements, printed on every run that does not use its cloud products.
_LIGHTNING_TIPS = _DropMessages(("💡 Tip: For seamless cloud logging", "💡 Tip: For seamless cloud uploads"))
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
_WARNINGS: tuple[dict[str, object], ...] = (
    # torch >= 2.13 deprecates LeafSpec; Lightning's own _pytree.py checks for it in every fit.
    {
        "message": r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "category": FutureWarning,
        "module": r"lightning\.pytorch\.utilities\._pytree",
    },
    # `Trainer(logger=True)` without tensorboard: Lightning says once that it logs to CSV instead.
    {"message": r"Starting from v1\.9\.0, `tensorboardX` has been removed", "module": r"lightning\.pytorch\."},
    # Lightning's model summary cannot size bf16-mixed/16-mixed models and says so in every such fit.
    {"message": r"Precision .* is not supported by the model summary", "module": r"lightning\.pytorch\."},
    # A data module without validation data (InstructionDataModule without val_file or val_split) returns no loader,
    # and Lightning's sanity check asks whether that was meant: it was, the validation loop is skipped.
    {"message": r"Total length of `list` across ranks is zero", "module": r"lightning\.pytorch\."},
    # jsonargparse instantiates the LoftQConfig default of every `peft.LoraConfig` it builds, which peft then drops
    # with this warning unless init_lora_weights="loftq": noise for every LoRA config, not a problem in it.
    {"message": "`loftq_config` specified but will be ignored", "category": UserWarning},
    # peft's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps.
    {"message": "`is_gradient_checkpointing` is deprecated", "category": FutureWarning, "module": r"transformers\."},
)


class quiet_known_notices:  # a class called like a function, so that it also works as a context manager
    """Hide the notices every run prints that are not about the run, each by its exact text and origin.

    - Lightning's install tips for litlogger and litmodels (info messages);
    - Lightning's notice that ``logger=True`` logs to CSV because tensorboard is not installed;
    - Lightning's notice that its model summary cannot size a ``bf16-mixed``/``16-mixed`` model;
    - Lightning's question whether an empty list of validation loaders was meant (a data module without validation
      data returns one, and the validation loop is skipped);
    - torch >= 2.13's ``FutureWarning`` that ``LeafSpec`` is deprecated, raised inside Lightning's own
      ``lightning/pytorch/utilities/_pytree.py`` in every fit (nothing a user can change);
    - peft's "``loftq_config`` specified but will be ignored", which every ``peft.LoraConfig`` built by jsonargparse
      triggers;
    - transformers' ``FutureWarning`` that ``is_gradient_checkpointing`` is deprecated, which peft's
      ``get_peft_model`` triggers on every model it wraps (peft's call, nothing a user can change).

    Every other message and warning stays. Called as a statement, the filters stay for the rest of the process
    (idempotent; the ``lit-mofo`` command does this); used as ``with quiet_known_notices():``, they are removed
    when the block ends, and the warning filters are put back as they were.
    """

    def __init__(self) -> None:
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        for options in _WARNINGS:
            warnings.filterwarnings("ignore", **options)  # type: ignore[arg-type]
        logger = logging.getLogger(_RANK_ZERO_LOGGER)
        self._added_tips_filter = _LIGHTNING_TIPS not in logger.filters
        if self._added_tips_filter:
            logger.addFilter(_LIGHTNING_TIPS)

    def __enter__(self) -> quiet_known_notices:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._warnings.__exit__(kind, error, traceback)
        if self._added_tips_filter:
            logging.getLogger(_RANK_ZERO_LOGGER).removeFilter(_LIGHTNING_TIPS)
