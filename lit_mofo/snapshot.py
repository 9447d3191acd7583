"""The pre-trained snapshot: the weights a module had before fine-tuning moved them, shared by every callback.

Half Fine-Tuning's resets, parameter drift and the L2-to-pre-trained regulariser all need θ₀, the value of some
parameters at the start of fit. Keeping one copy per callback would multiply the cost, so the copy lives once per
LightningModule in a :class:`PretrainedSnapshot`, and each callback asks it for the tensors it needs:

.. code-block:: python

    snapshot = PretrainedSnapshot.attach(pl_module, owner=self)  # in on_fit_start
    snapshot.capture(trainer, pl_module, names)  # copies the named parameters once
    theta0 = snapshot[name]
    PretrainedSnapshot.detach(pl_module, owner=self)  # in teardown: the last owner frees the copy

Cost: one copy of each requested tensor, by default on the CPU (so no accelerator memory) and in the parameter's
own dtype — e.g. 2 bytes per parameter for a bf16 model, 13.5 GB of host memory for all of Llama-2-7B, per process.
A callback can ask for another ``dtype`` (the widest dtype asked for a tensor wins while it can still be captured).

When: the copy is taken at the start of fit, before the first optimizer step, and only for tensors not copied yet,
so two callbacks share it. A new ``trainer.fit`` (the next stage of a multi-stage run) starts a new snapshot once the
previous fit's owners have detached.

Order: the callbacks capture in their ``on_fit_start``, in the order of ``Trainer(callbacks=[...])``, and a later
request for a wider dtype replaces an earlier, narrower copy. So read θ₀ (``snapshot[name]``) only once every
``on_fit_start`` has run - in ``on_train_start`` or later - and the values do not depend on the callback order.

Resume: a checkpoint written by an owning callback carries the snapshot under :attr:`CHECKPOINT_KEY` (this adds the
snapshot's size to the checkpoint). A run resumed from it gets θ₀ from the checkpoint, never from the resumed
weights; asking for a tensor the checkpoint does not hold raises, because its pre-trained value is gone.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

__all__ = ["PretrainedSnapshot"]

_REGISTRY: weakref.WeakKeyDictionary[nn.Module, PretrainedSnapshot] = weakref.WeakKeyDictionary()


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).bits >= torch.finfo(b).bits else b


class PretrainedSnapshot:
    """A copy of selected parameters as they were before fine-tuning; one instance per LightningModule.

    Args:
        device: where the copies live. ``"cpu"`` (default) keeps them off the accelerator.
    """

    CHECKPOINT_KEY = "lit_mofo_pretrained_snapshot"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._tensors: dict[str, Tensor] = {}
        self._owners: set[int] = set()
        self._from_checkpoint = False

    # ------------------------------------------------------------------ sharing
    @classmethod
    def attach(cls, pl_module: nn.Module, owner: object) -> PretrainedSnapshot:
        """The module's shared snapshot, created on first use; ``owner`` (a callback) keeps it alive."""
        snapshot = _REGISTRY.get(pl_module)
        if snapshot is None:
            snapshot = _REGISTRY[pl_module] = cls()
        snapshot._owners.add(id(owner))
        return snapshot

    @classmethod
    def detach(cls, pl_module: nn.Module, owner: object) -> None:
        """Release ``owner``'s hold; the last owner frees the copies, so the next fit starts a new snapshot."""
        snapshot = _REGISTRY.get(pl_module)
        if snapshot is None:
            return
        snapshot._owners.discard(id(owner))
        if not snapshot._owners:
            del _REGISTRY[pl_module]

    @classmethod
    def get(cls, pl_module: nn.Module) -> PretrainedSnapshot | None:
        """The module's snapshot if some callback holds one, else ``None``."""
        return _REGISTRY.get(pl_module)

    # ------------------------------------------------------------------ capture
    def capture(
        self,
        trainer: pl.Trainer,
        pl_module: nn.Module,
        names: Iterable[str],
        dtype: torch.dtype | None = None,
    ) -> None:
        """Copy the named parameters of ``pl_module`` (as in ``named_parameters()``) unless already copied.

        Call it before the first optimizer step (``on_fit_start``). ``dtype=None`` keeps each parameter's dtype.
        Raises if a name is not a parameter, or if the run resumes from a checkpoint without the tensor's θ₀.
        """
        params = dict(pl_module.named_parameters())
        names = list(dict.fromkeys(names))
        unknown = [name for name in names if name not in params]
        if unknown:
            raise MisconfigurationException(
                f"Cannot snapshot {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: not parameters of "
                f"{type(pl_module).__name__} (names as in `named_parameters()`)."
            )
        resuming = getattr(trainer, "ckpt_path", None) is not None and not getattr(
            trainer.strategy, "restore_checkpoint_after_setup", False
        )
        missing = [name for name in names if name not in self._tensors]
        if missing and (self._from_checkpoint or resuming):
            raise MisconfigurationException(
                f"The run resumes from {trainer.ckpt_path!r}, which holds no pre-trained values for {len(missing)} "
                f"tensor(s) (e.g. {missing[0]!r}); the weights now are the resumed ones, not the pre-trained ones. "
                "Resume with the same lit_mofo callbacks that wrote the checkpoint, or start the fit from the "
                "pre-trained model."
            )
        if missing and trainer.global_step > 0:
            raise MisconfigurationException(
                f"Cannot snapshot {missing[0]!r} at step {trainer.global_step}: the weights have moved since the "
                "pre-trained model. Capture the snapshot in `on_fit_start`, before the first optimizer step."
            )
        for name in names:
            param = params[name]
            want = param.dtype if dtype is None else dtype
            stored = self._tensors.get(name)
            if stored is not None and (self._from_checkpoint or _wider(stored.dtype, want) == stored.dtype):
                continue
            self._tensors[name] = param.detach().to(device=self.device, dtype=want, copy=True)

    # ------------------------------------------------------------------ access
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    @property
    def nbytes(self) -> int:
        """Memory the copies take, in bytes."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def restore(self, pl_module: nn.Module, names: Iterable[str]) -> None:
        """Copy θ₀ back into the named parameters (in place, in the parameter's device and dtype)."""
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].copy_(self._tensors[name])

    # ------------------------------------------------------------------ checkpointing
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the copies in ``checkpoint`` (idempotent: every owner may call it)."""
        checkpoint[self.CHECKPOINT_KEY] = {"tensors": dict(self._tensors)}

    @classmethod
    def save_to(cls, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Store ``pl_module``'s snapshot in ``checkpoint`` if a callback holds one (a callback's save hook)."""
        snapshot = _REGISTRY.get(pl_module)
        if snapshot is not None:
            snapshot.on_save_checkpoint(checkpoint)

    @classmethod
    def on_load_checkpoint(cls, pl_module: nn.Module, checkpoint: Mapping[str, Any], owner: object) -> None:
        """Adopt the checkpoint's copies as θ₀ for ``pl_module`` (no-op if the checkpoint has none)."""
        saved = checkpoint.get(cls.CHECKPOINT_KEY)
        if saved is None:
            return
        snapshot = cls.attach(pl_module, owner)
        snapshot._tensors = {name: t.to(snapshot.device) for name, t in saved["tensors"].items()}
        snapshot._from_checkpoint = True
