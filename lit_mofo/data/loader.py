"""A DataLoader that Lightning resumes exactly from any checkpoint, mid-epoch included.

Lightning saves the state of a training DataLoader that has ``state_dict``/``load_state_dict`` in every checkpoint
and restores it on ``fit(ckpt_path=...)``; a plain :class:`torch.utils.data.DataLoader` has neither, so a run resumed
from a mid-epoch checkpoint starts that epoch again with a new shuffling order (Lightning warns "your dataloader is
not resumable"). :class:`ResumableDataLoader` is torchdata's
:class:`~torchdata.stateful_dataloader.StatefulDataLoader` — a drop-in ``DataLoader`` whose state is the position in
the epoch and the shuffling generator — with one fix for Lightning: a checkpoint written on the last batch of an
epoch resumes at the start of the next epoch. (StatefulDataLoader restores such a state as an iterator with nothing
left; Lightning counts that empty pass as one more epoch, so ``trainer.current_epoch`` and every per-epoch schedule,
e.g. ``HalfFineTuning(redraw_every_n_epochs=...)``, would run one epoch ahead.)

Use it in your own LightningDataModule's ``train_dataloader`` exactly like ``DataLoader``::

    from lit_mofo.data import ResumableDataLoader

    def train_dataloader(self):
        return ResumableDataLoader(self.train_set, batch_size=32, shuffle=True, num_workers=2)

With ``shuffle=True`` and no ``generator`` the order is drawn from torch's global RNG when the loader is built
(``seed_everything`` makes it reproducible) and continues from the checkpoint's generator state on resume.
"""

from __future__ import annotations

import warnings
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = ["ResumableDataLoader"]


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` (same arguments as ``torch.utils.data.DataLoader``) that also resumes
    exactly from a checkpoint written on the last batch of an epoch: the restored iterator counts as finished, so
    the next ``iter()`` starts the next epoch, as Lightning's loops expect (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # torchdata <= 0.11 calls torch.set_vital, which torch >= 2.13 deprecates with a warning on every loader.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)

    def _get_iterator(self) -> Any:
        restoring = self.next_iter_state is not None
        iterator = super()._get_iterator()
        if restoring and not iterator._finished and iterator._num_yielded >= self._batches_per_epoch():
            iterator._finished = True  # StatefulDataLoader.__iter__ then starts a fresh epoch from the restored sampler
        return iterator

    def _batches_per_epoch(self) -> float:
        try:
            return len(self)
        except TypeError:  # an IterableDataset without __len__: its end is only known when it is reached
            return float("inf")
