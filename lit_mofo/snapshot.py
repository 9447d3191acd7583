"""The pre-trained snapshot: the weights a module had before fine-tuning moved them, shared by every callback.

Half Fine-Tuning's resets, parameter drift and the L2-to-pre-trained regulariser all need θ₀, the value of some
parameters at the start of fit. Keeping one copy per callback would multiply the cost, so the copy lives once per
LightningModule in a :class:`PretrainedSnapshot`, and each callback asks it for the tensors it needs:

.. code-block:: python

    snapshot = PretrainedSnapshot.attach(pl_module, owner=self)  # in on_fit_start
    snapshot.capture(trainer, pl_module, names)  # copies the named parameters once
    theta0 = snapshot[name]  # this rank's part of θ₀ (see "Sharded parameters")
    PretrainedSnapshot.detach(pl_module, owner=self)  # in teardown: the last owner frees the copy

Cost: one copy of each requested tensor, by default on the CPU (so no accelerator memory) and in the parameter's
own dtype — e.g. 2 bytes per parameter for a bf16 model, 13.5 GB of host memory for all of Llama-2-7B, per process.
A callback can ask for another ``dtype`` (the widest dtype asked for a tensor wins while it can still be captured).
:attr:`~PretrainedSnapshot.nbytes` is what this process holds; each capture says it in a ``rank_zero_info`` line.

**Sharded parameters** (FSDP2's ``fully_shard``, e.g. under Lightning's ``ModelParallelStrategy``): each rank keeps
only its own shard of each tensor (``param.to_local()``), as a plain CPU tensor, so a rank holds 1/world-size of the
whole copy (:attr:`~PretrainedSnapshot.full_nbytes`); ``snapshot[name]`` is that shard, laid out like the rank's
shard of the parameter, and :meth:`~PretrainedSnapshot.restore` writes it into that shard. Callbacks compute on
local shards and reduce their figures across the mesh (:class:`~lit_mofo.strategy.StrategyAdapter`).

When: the copy is taken at the start of fit, before the first optimizer step, and only for tensors not copied yet,
so two callbacks share it. A new ``trainer.fit`` (the next stage of a multi-stage run) starts a new snapshot once the
previous fit's owners have detached.

Order: the callbacks capture in their ``on_fit_start``, in the order of ``Trainer(callbacks=[...])``, and a later
request for a wider dtype replaces an earlier, narrower copy. So read θ₀ (``snapshot[name]``) only once every
``on_fit_start`` has run - in ``on_train_start`` or later - and the values do not depend on the callback order.

Resume: a checkpoint written by an owning callback carries the snapshot (this adds the snapshot's size to the
checkpoint), and a run resumed from it gets θ₀ from the checkpoint, never from the resumed weights, without
loading the pre-trained model again; asking for a tensor the checkpoint does not hold raises, because its
pre-trained value is gone. How it is stored follows the checkpoint:

- a checkpoint file (single device, DDP, ``ModelParallelStrategy(save_distributed_checkpoint=False)``): whole
  tensors under the top-level key :attr:`~PretrainedSnapshot.CHECKPOINT_KEY` (gathered from the shards when the
  parameters are sharded), so any strategy can resume from it and a sharded run slices its shard out;
- a sharded checkpoint directory (``ModelParallelStrategy``'s default): each rank's shards, as DTensors in
  ``checkpoint["state_dict"]`` under the prefix :attr:`~PretrainedSnapshot.STATE_DICT_PREFIX`, written and read
  by ``torch.distributed.checkpoint`` like the weights (Lightning loads only the model's own keys from there).

Under ``ModelParallelStrategy`` a resumed fit restores the checkpoint after ``on_fit_start``, where nothing tells
yet whether one follows: the capture copies the weights as they are, and ``on_load_checkpoint`` replaces the copies
with the checkpoint's (and refuses a checkpoint that lacks one of them).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from lit_mofo.dtensor import is_dtensor, mesh_size
from lit_mofo.strategy import StrategyAdapter

__all__ = ["PretrainedSnapshot", "StageStartSnapshot"]

_REGISTRY: weakref.WeakKeyDictionary[nn.Module, PretrainedSnapshot] = weakref.WeakKeyDictionary()


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).bits >= torch.finfo(b).bits else b


def _dtype_named(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"The checkpoint's pre-trained snapshot names an unknown dtype {name!r}.")
    return dtype


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


class PretrainedSnapshot:
    """A copy of selected parameters as they were before fine-tuning; one instance per LightningModule.

    Args:
        device: where the copies live. ``"cpu"`` (default) keeps them off the accelerator.
    """

    CHECKPOINT_KEY = "lit_mofo_pretrained_snapshot"
    STATE_DICT_PREFIX = "lit_mofo_pretrained_snapshot."
    WHAT = "θ₀"  # what the copies are, in messages

    @classmethod
    def _registry(cls) -> weakref.WeakKeyDictionary[nn.Module, PretrainedSnapshot]:
        return _REGISTRY

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._tensors: dict[str, Tensor] = {}  # this rank's part: a DTensor parameter's local shard, else the tensor
        self._numel: dict[str, int] = {}  # entries of each whole tensor
        self._world_size = 1  # ranks the sharded tensors are split over
        self._owners: set[int] = set()
        self._from_checkpoint = False
        self._loaded: int | None = None  # id() of the checkpoint dict adopted last (every owner passes the same)

    # ------------------------------------------------------------------ sharing
    @classmethod
    def attach(cls, pl_module: nn.Module, owner: object) -> PretrainedSnapshot:
        """The module's shared snapshot, created on first use; ``owner`` (a callback) keeps it alive."""
        registry = cls._registry()
        snapshot = registry.get(pl_module)
        if snapshot is None:
            snapshot = registry[pl_module] = cls()
        snapshot._owners.add(id(owner))
        return snapshot

    @classmethod
    def detach(cls, pl_module: nn.Module, owner: object) -> None:
        """Release ``owner``'s hold; the last owner frees the copies, so the next fit starts a new snapshot."""
        registry = cls._registry()
        snapshot = registry.get(pl_module)
        if snapshot is None:
            return
        snapshot._owners.discard(id(owner))
        if not snapshot._owners:
            del registry[pl_module]

    @classmethod
    def get(cls, pl_module: nn.Module) -> PretrainedSnapshot | None:
        """The module's snapshot if some callback holds one, else ``None``."""
        return cls._registry().get(pl_module)

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
        A sharded parameter's copy is the rank's own shard. Raises if a name is not a parameter, or if the run
        resumes from a checkpoint without the tensor's θ₀ (when the strategy restores the checkpoint after
        ``on_fit_start``, the copy is replaced, and checked, in :meth:`on_load_checkpoint`).
        """
        params = StrategyAdapter.named_parameters(pl_module)  # FSDP2: the shards
        names = list(dict.fromkeys(names))
        unknown = [name for name in names if name not in params]
        if unknown:
            raise MisconfigurationException(
                f"Cannot snapshot {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: not parameters of "
                f"{type(pl_module).__name__} (names as in `named_parameters()`)."
            )
        missing = [name for name in names if name not in self._tensors]
        # A strategy that restores checkpoints after on_fit_start (ModelParallelStrategy) brings θ₀ later, in
        # on_load_checkpoint, which checks that the checkpoint has every tensor copied here.
        resuming = getattr(trainer, "ckpt_path", None) is not None and not StrategyAdapter.restores_after_fit_start(
            trainer
        )
        if missing and (self._from_checkpoint or resuming):
            raise self._resume_error(str(trainer.ckpt_path), missing)
        if missing and trainer.global_step > 0:
            raise MisconfigurationException(
                f"Cannot snapshot {missing[0]!r} at step {trainer.global_step}: the weights have moved since the "
                "pre-trained model. Capture the snapshot in `on_fit_start`, before the first optimizer step."
            )
        added = 0
        for name in names:
            param = params[name]
            want = param.dtype if dtype is None else dtype
            stored = self._tensors.get(name)
            if stored is not None and (self._from_checkpoint or _wider(stored.dtype, want) == stored.dtype):
                continue
            self._keep(name, StrategyAdapter.local(param.detach()), param, want)
            added += 1
        if added:
            rank_zero_info(f"{type(self).__name__}: copied {self.WHAT} of {added} tensor(s); {self.describe()}.")

    def _keep(self, name: str, local: Tensor, param: Tensor, dtype: torch.dtype | None = None) -> None:
        # copy=True: a tensor of its own, never a view that would keep a larger storage (a whole tensor, FSDP2's
        # padded shard) alive.
        self._tensors[name] = local.to(device=self.device, dtype=dtype or local.dtype, copy=True)
        self._numel[name] = param.numel()
        if is_dtensor(param):
            self._world_size = mesh_size(param)

    @staticmethod
    def _resume_error(ckpt_path: str, missing: list[str]) -> MisconfigurationException:
        return MisconfigurationException(
            f"The run resumes from {ckpt_path!r}, which holds no pre-trained values for {len(missing)} "
            f"tensor(s) (e.g. {missing[0]!r}); the weights now are the resumed ones, not the pre-trained ones. "
            "Resume with the same lit_mofo callbacks that wrote the checkpoint, or start the fit from the "
            "pre-trained model."
        )

    # ------------------------------------------------------------------ access
    def __getitem__(self, name: str) -> Tensor:
        """θ₀ of ``name``: this rank's shard for a sharded parameter, the whole tensor otherwise."""
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
        """Memory the copies take in this process, in bytes (its shards only, when the parameters are sharded)."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    @property
    def full_nbytes(self) -> int:
        """Memory a whole copy of the same tensors takes, in bytes: :attr:`nbytes` times the world size when the
        parameters are sharded, :attr:`nbytes` otherwise."""
        return sum(self._numel[name] * t.element_size() for name, t in self._tensors.items())

    def describe(self) -> str:
        """One line on what the snapshot holds and what it costs, per process."""
        text = f"{len(self)} tensor(s), {_mib(self.nbytes)} ({self.nbytes:,} bytes) in this process"
        if self.full_nbytes != self.nbytes:
            text += f": its shards, 1/{self._world_size} of the whole copy's {_mib(self.full_nbytes)}"
        return text

    def restore(self, pl_module: nn.Module, names: Iterable[str]) -> None:
        """Copy θ₀ back into the named parameters (in place, in the parameter's device and dtype; a sharded
        parameter's own shard)."""
        params = StrategyAdapter.named_parameters(pl_module)  # FSDP2: the shards
        with torch.no_grad():
            for name in names:
                StrategyAdapter.local(params[name]).copy_(self._tensors[name])

    # ------------------------------------------------------------------ checkpointing
    @classmethod
    def save_to(cls, pl_module: nn.Module, checkpoint: dict[str, Any], trainer: pl.Trainer | None = None) -> None:
        """Store ``pl_module``'s snapshot in ``checkpoint`` if a callback holds one (a callback's
        ``on_save_checkpoint``; every owner may call it, the first one stores). ``trainer`` tells how the checkpoint
        is written (see the module docstring); ``None`` is a checkpoint file. Under a sharded strategy it is a
        collective: call it on every rank."""
        snapshot = cls._registry().get(pl_module)
        if snapshot is None or cls.CHECKPOINT_KEY in checkpoint:
            return
        params = StrategyAdapter.named_parameters(pl_module)  # FSDP2: the shards
        dtypes = {name: str(t.dtype).removeprefix("torch.") for name, t in snapshot._tensors.items()}
        adapter = None if trainer is None else StrategyAdapter.of(trainer, user="PretrainedSnapshot")
        if adapter is not None and adapter.sharded_checkpoints:
            state_dict = checkpoint["state_dict"]
            for name, local in snapshot._tensors.items():
                state_dict[cls.STATE_DICT_PREFIX + name] = StrategyAdapter.checkpoint_tensor(local, params[name])
            checkpoint[cls.CHECKPOINT_KEY] = {"layout": "sharded", "dtypes": dtypes}
            return
        tensors = {}
        for name, local in snapshot._tensors.items():
            whole = StrategyAdapter.gather(local, params[name])
            if adapter is None or adapter.is_global_zero:  # only rank zero writes a checkpoint file
                tensors[name] = whole.to(snapshot.device)
        checkpoint[cls.CHECKPOINT_KEY] = {"layout": "full", "dtypes": dtypes, "tensors": tensors}

    @classmethod
    def on_load_checkpoint(
        cls,
        pl_module: nn.Module,
        checkpoint: Mapping[str, Any],
        owner: object,
        trainer: pl.Trainer | None = None,
    ) -> None:
        """Adopt the checkpoint's copies as θ₀ for ``pl_module`` (a callback's ``on_load_checkpoint``; every owner
        may call it, the first one loads). A sharded checkpoint is read from ``trainer.ckpt_path`` (a collective).
        Raises if tensors were asked for (:meth:`capture`) that the checkpoint does not hold."""
        saved = checkpoint.get(cls.CHECKPOINT_KEY)
        snapshot = cls._registry().get(pl_module)
        if snapshot is not None and snapshot._loaded == id(checkpoint):
            return
        # Copied in on_fit_start from the weights before the restore (ModelParallelStrategy): the checkpoint must
        # replace every one of them.
        captured = snapshot.names if snapshot is not None else []
        ckpt_path = str(getattr(trainer, "ckpt_path", None))
        if saved is None:
            if captured:
                raise cls._resume_error(ckpt_path, captured)
            return
        snapshot = cls.attach(pl_module, owner)
        params = StrategyAdapter.named_parameters(pl_module)  # FSDP2: the shards
        layout = saved.get("layout", "full")  # checkpoints written before the layouts were named hold whole tensors
        if layout == "sharded":
            if trainer is None or getattr(trainer, "ckpt_path", None) is None:
                raise ValueError("A sharded checkpoint's pre-trained snapshot is read from `trainer.ckpt_path`.")
            targets = {
                name: (params[name], _dtype_named(dtype)) for name, dtype in saved["dtypes"].items() if name in params
            }
            loaded = StrategyAdapter.load_checkpoint_tensors(trainer.ckpt_path, cls.STATE_DICT_PREFIX, targets)
        else:
            loaded = {
                name: StrategyAdapter.shard_like(whole, params[name]) if name in params else whole
                for name, whole in saved["tensors"].items()
            }
        snapshot._tensors = {}
        for name, local in loaded.items():
            snapshot._keep(name, local, params.get(name, local))
        snapshot._from_checkpoint = True
        snapshot._loaded = id(checkpoint)
        missing = [name for name in captured if name not in snapshot._tensors]
        if missing:
            raise cls._resume_error(ckpt_path, missing)
        rank_zero_info(f"{cls.__name__}: {cls.WHAT} restored from the checkpoint; {snapshot.describe()}.")


_STAGE_REGISTRY: weakref.WeakKeyDictionary[nn.Module, PretrainedSnapshot] = weakref.WeakKeyDictionary()


class StageStartSnapshot(PretrainedSnapshot):
    """The weights at the start of the current stage of a continual run (:mod:`lit_mofo.continual`), shared like
    :class:`PretrainedSnapshot` and separate from it.

    :class:`~lit_mofo.L2ToPretrained` (``anchor="previous_stage"``), :class:`~lit_mofo.ParameterDrift` (drift within
    the stage) and :class:`~lit_mofo.HalfFineTuning` (``reset_to="stage_start"``) ask it for the tensors they need in
    ``on_fit_start``, exactly as they ask :class:`PretrainedSnapshot` (the first stage starts with the fit);
    :class:`~lit_mofo.continual.ContinualLearning` :meth:`retake`\\ s every copy at the start of each later stage,
    before the callbacks hear of the new stage. Outside a continual run it holds the weights of the start of fit, like
    θ₀. It is carried in checkpoints under its own keys (:attr:`CHECKPOINT_KEY`, :attr:`STATE_DICT_PREFIX`), so a run
    resumed in the middle of a stage measures against that stage's start; it costs one more copy of the tensors
    asked for, in memory and in every checkpoint.
    """

    CHECKPOINT_KEY = "lit_mofo_stage_start_snapshot"
    STATE_DICT_PREFIX = "lit_mofo_stage_start_snapshot."
    WHAT = "the stage-start weights"

    @classmethod
    def _registry(cls) -> weakref.WeakKeyDictionary[nn.Module, PretrainedSnapshot]:
        return _STAGE_REGISTRY

    def retake(self, pl_module: nn.Module) -> None:
        """Copy the current value of every tensor held (in place, each in the dtype it was asked in): the start of a
        new stage. A sharded parameter's copy is the rank's own shard, as in :meth:`capture`."""
        params = StrategyAdapter.named_parameters(pl_module)  # FSDP2: the shards
        with torch.no_grad():
            for name, stored in self._tensors.items():
                stored.copy_(StrategyAdapter.local(params[name].detach()))
        self._from_checkpoint = False
