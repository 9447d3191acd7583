"""A DataLoader that Lightning resumes exactly from any checkpoint: mid-epoch, at an epoch's end, in any epoch, on one
process and under DDP or FSDP2.

Lightning saves the state of a training DataLoader that has ``state_dict``/``load_state_dict`` in every checkpoint
and restores it on ``fit(ckpt_path=...)``; a plain :class:`torch.utils.data.DataLoader` has neither, so a run resumed
from a mid-epoch checkpoint starts that epoch again with a new shuffling order (Lightning warns "your dataloader is
not resumable"). :class:`ResumableDataLoader` is torchdata's
:class:`~torchdata.stateful_dataloader.StatefulDataLoader` — a drop-in ``DataLoader`` whose state is the position in
the epoch and the shuffling generator — with three fixes for Lightning:

- **The end of an epoch.** A checkpoint written on the last batch of an epoch resumes at the start of the next
  epoch. (StatefulDataLoader restores such a state as an iterator with nothing left; Lightning counts that empty
  pass as one more epoch, so ``trainer.current_epoch`` and every per-epoch schedule, e.g.
  ``HalfFineTuning(redraw_every_n_epochs=...)``, would run one epoch ahead.)
- **Distributed runs.** With ``shuffle=True`` the loader's sampler is a ``torch.utils.data.RandomSampler`` (a
  stateful one), so under DDP and FSDP2 Lightning replaces it by a ``DistributedSampler`` (order drawn from
  ``seed_everything``'s seed and the epoch, each rank its share) instead of wrapping it in a
  ``DistributedSamplerWrapper``, whose inner shuffling state no checkpoint holds.
- **The epoch of a sampler with** ``set_epoch`` (a ``DistributedSampler``, Lightning's or your own): every
  checkpoint holds the epoch the sampler was iterating, and the restored loader sets it back before it draws the
  order. Lightning creates the resumed iterator before it calls ``set_epoch``, so a ``DistributedSampler`` would
  otherwise replay epoch 0's order in every later epoch.

Use it in your own LightningDataModule's ``train_dataloader`` exactly like ``DataLoader``::

    from lit_mofo.data import ResumableDataLoader

    def train_dataloader(self):
        return ResumableDataLoader(self.train_set, batch_size=32, shuffle=True, num_workers=2)

With ``shuffle=True`` and no ``generator`` the one-process order is drawn from torch's global RNG when the loader is
built (``seed_everything`` makes it reproducible) and continues from the checkpoint's generator state on resume;
with a ``generator`` it is drawn from a copy of that generator taken when the loader is built (the loader itself
draws each epoch's worker base seed from the generator, which no checkpoint replays);
under DDP/FSDP2 it is the ``DistributedSampler``'s, from the seed and the epoch. A ``sampler=`` of your own resumes
exactly if it is deterministic given its epoch (a ``DistributedSampler``, a fixed order) or has
``state_dict``/``load_state_dict``; a random sampler without state (``RandomSampler(...)`` on one process,
``WeightedRandomSampler``, or any random sampler that Lightning wraps for a distributed run) cannot, and the loader
warns when it starts its first epoch (at the start of fit), naming the fix.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch.utils.data
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import SubsetRandomSampler, WeightedRandomSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler as _StatefulRandomSampler
from torchdata.stateful_dataloader.stateful import Stateful

__all__ = ["ResumableDataLoader"]

# The key of the sampler's epoch in the loader's state (beside torchdata's own keys).
_SAMPLER_EPOCH = "lit_mofo_sampler_epoch"
# Samplers whose order comes from a generator that no checkpoint holds.
_RANDOM_SAMPLERS = (torch.utils.data.RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
_PARAMETERS = list(inspect.signature(StatefulDataLoader.__init__).parameters)[1:]  # after self


class _RandomSampler(_StatefulRandomSampler, torch.utils.data.RandomSampler):
    """torchdata's stateful random sampler (its generator state goes into the loader's state), which is also a
    ``torch.utils.data.RandomSampler``: Lightning then injects a plain ``DistributedSampler`` for a distributed run
    instead of wrapping this sampler."""


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` (same arguments as ``torch.utils.data.DataLoader``) that resumes exactly
    from any checkpoint Lightning writes: mid-epoch, on the last batch of an epoch (the next ``iter()`` starts the
    next epoch, as Lightning's loops expect), in any later epoch and under DDP/FSDP2 (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = {**dict(zip(_PARAMETERS, args, strict=False)), **kwargs}
        if (
            arguments.get("shuffle")
            and arguments.get("sampler") is None
            and arguments.get("batch_sampler") is None
            and not isinstance(arguments.get("dataset"), torch.utils.data.IterableDataset)
        ):
            # The sampler StatefulDataLoader builds for shuffle=True (the same order), recognisable to Lightning.
            generator = arguments.get("generator")
            if generator is not None:
                # DataLoader also draws each epoch's worker base seed from `generator`, and no checkpoint replays those
                # draws: shuffling from the same generator, a resumed fit would deal the next epochs in another order.
                # The sampler shuffles from a copy of it instead (the same stream, as of now).
                generator = _copy_of(generator)
            arguments.update(sampler=_RandomSampler(arguments["dataset"], generator=generator), shuffle=False)
            args, kwargs = (), arguments
        with warnings.catch_warnings():
            # torchdata <= 0.11 calls torch.set_vital, which torch >= 2.13 deprecates with a warning on every loader.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)
        self._epoch_in_progress: int | None = None  # the sampler's epoch when the current iterator started
        self._epoch_to_restore: int | None = None
        self._order_checked = False

    # ------------------------------------------------------------------ the sampler's epoch
    def _epoch_sampler(self) -> Any | None:
        """The sampler Lightning calls ``set_epoch`` on (the loader's, or its batch sampler's), if it has an
        ``epoch``."""
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if callable(getattr(sampler, "set_epoch", None)) and isinstance(getattr(sampler, "epoch", None), int):
                return sampler
        return None

    def _sampler_epoch(self) -> int | None:
        sampler = self._epoch_sampler()
        return None if sampler is None else int(sampler.epoch)

    def _set_sampler_epoch(self, epoch: int) -> None:
        sampler = self._epoch_sampler()
        if sampler is not None:
            sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        starting = self._iterator is None  # torchdata builds the first iterator now, at the sampler's epoch
        state = super().state_dict()
        epoch = self._sampler_epoch() if starting else self._epoch_in_progress
        if epoch is not None:
            state = {**state, _SAMPLER_EPOCH: epoch}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._epoch_to_restore = state.pop(_SAMPLER_EPOCH, None)
        super().load_state_dict(state)

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        self._epoch_in_progress = self._sampler_epoch()  # the epoch whose order the iterator deals out
        return iterator

    def _get_iterator(self) -> Any:
        if not self._order_checked:  # the loader that is iterated: Lightning may have replaced the one built first
            self._order_checked = True
            problem = self._order_problem()
            if problem is not None:
                rank_zero_warn(problem)
        restoring = self.next_iter_state is not None
        epoch, self._epoch_to_restore = self._epoch_to_restore, None
        if restoring and epoch is not None:
            self._set_sampler_epoch(epoch)  # before the restored iterator draws the epoch's order
        iterator = super()._get_iterator()
        if restoring and not iterator._finished and iterator._num_yielded >= self._batches_per_epoch():
            iterator._finished = True  # StatefulDataLoader.__iter__ then starts a fresh epoch from the restored sampler
            if epoch is not None:
                self._set_sampler_epoch(epoch + 1)  # ... in the next epoch's order
        self._epoch_in_progress = self._sampler_epoch()
        return iterator

    def _batches_per_epoch(self) -> float:
        try:
            return len(self)
        except TypeError:  # an IterableDataset without __len__: its end is only known when it is reached
            return float("inf")

    # ------------------------------------------------------------------ what cannot resume exactly
    def _order_problem(self) -> str | None:
        """Why a fit resumed from a checkpoint would see other batches than the uninterrupted fit, or None."""
        for sampler in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if isinstance(sampler, DistributedSamplerWrapper):
                inner = sampler.dataset._sampler
                if _draws_its_own_order(inner):  # materialised by the wrapper each epoch: its state is never saved
                    return (
                        f"ResumableDataLoader: Lightning wrapped the loader's {type(inner).__name__} in a "
                        "DistributedSamplerWrapper for this distributed run, and the wrapper keeps the sampler's "
                        "shuffling state out of every checkpoint, so a fit resumed from a checkpoint would see other "
                        "batches than the uninterrupted fit. Pass `shuffle=True` instead of a sampler (Lightning then "
                        "shards the data with a DistributedSampler whose order resumes exactly), or a "
                        "`torch.utils.data.DistributedSampler` of your own, or set "
                        "`Trainer(use_distributed_sampler=False)` and shard in a sampler with "
                        "`state_dict`/`load_state_dict`."
                    )
            elif _draws_its_own_order(sampler) and not isinstance(sampler, (_StatefulRandomSampler, Stateful)):
                return (
                    f"ResumableDataLoader: its {type(sampler).__name__} draws a new order from a generator that no "
                    "checkpoint holds, so a fit resumed from a checkpoint would see other batches than the "
                    "uninterrupted fit. For a uniform shuffle pass `shuffle=True` instead of a sampler (its generator "
                    "state goes into every checkpoint); otherwise give the sampler `state_dict`/`load_state_dict`."
                )
        return None


def _copy_of(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _draws_its_own_order(sampler: object) -> bool:
    """Whether ``sampler`` shuffles with a generator of its own (rather than from its epoch, or not at all)."""
    return isinstance(sampler, (*_RANDOM_SAMPLERS, _StatefulRandomSampler))
