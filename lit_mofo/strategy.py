"""What a lit_mofo callback needs to know about the Trainer's strategy, in one place.

Every callback that touches parameters, the pre-trained snapshot or metrics asks a :class:`StrategyAdapter`
instead of testing strategy classes itself:

.. code-block:: python

    adapter = StrategyAdapter.of(trainer, user="ParameterDrift")  # in setup(): refuses what is unsupported
    local = adapter.local(param)  # the rank's shard of a DTensor parameter, the tensor itself otherwise
    total = adapter.sum_over_shards(torch.stack([sq_diff, sq_ref]))  # a figure over whole tensors
    counts = adapter.sum_over_ranks(counts)  # a figure over data split across the ranks
    values = adapter.run_together("probe 'lm'", evaluate)  # a failure on one rank fails every rank
    mine = adapter.share(len(batches))  # which items of work split across the ranks are this rank's

Three kinds of strategy are supported:

- ``"single"``: one process (``SingleDeviceStrategy``, or any strategy with a world size of 1 that shards nothing);
- ``"ddp"``: Lightning's ``DDPStrategy`` (every variant: ``"ddp"``, ``"ddp_spawn"``,
  ``"ddp_find_unused_parameters_true"``, ``"ddp_notebook"``...): every rank holds whole tensors and the same
  all-reduced gradients;
- ``"fsdp2"``: Lightning's ``ModelParallelStrategy`` with ``tensor_parallel_size=1``, where the module shards itself
  with FSDP2's ``fully_shard`` in ``configure_model``: every parameter is a DTensor sharded on one dimension of the
  1-D data-parallel mesh, each rank holds a slice, and every forward all-gathers (so every rank must run the same
  forwards).

Refused, each with the fix in the message: DeepSpeed (it partitions its own flat buffers), FSDP1 (``strategy="fsdp"``;
flattened 1-D slices of the parameters, and GPU-only in Lightning), ``ModelParallelStrategy`` with tensor
parallelism (a 2-D mesh), the XLA strategies and any other multi-process strategy lit_mofo has not been tested with.

Figures over *whole tensors* (norms, counts, maxima of parameters) are reduced with
:meth:`~StrategyAdapter.sum_over_shards` / :meth:`~StrategyAdapter.max_over_shards`: a no-op unless the parameters
are sharded, since under DDP every rank already holds the whole tensor. Figures over *data split across the ranks*
(a probe's batches) are reduced with :meth:`~StrategyAdapter.sum_over_ranks` on every multi-process strategy.

Work that can fail on some ranks only (reading data, a user's function, checking a batch) is followed by
:meth:`~StrategyAdapter.agree` (or wrapped in :meth:`~StrategyAdapter.run_together`): every rank reports in one
all-reduce whether it failed, and all raise together instead of leaving the others waiting in their next collective.

The facts about a DTensor itself (its local shard, the whole tensor, the device a process group's collectives take)
come from :mod:`lit_mofo.dtensor`, which the optimizer imports too, so both follow one rule. The optimizers the
strategy steps are read and replaced through the adapter as well (:attr:`~StrategyAdapter.optimizers`,
:meth:`~StrategyAdapter.replace_optimizers`, :meth:`~StrategyAdapter.rebuild_optimizers`): no callback touches
``trainer.strategy`` itself.

Checkpoints and hook order also differ per strategy, and the adapter answers for them:

- :meth:`~StrategyAdapter.restores_after_fit_start`: whether a resumed fit restores the checkpoint (weights,
  optimizer states, then the callbacks' ``on_load_checkpoint`` and ``load_state_dict``) only *after* the callbacks'
  ``on_fit_start`` (``ModelParallelStrategy``), instead of before ``setup`` (single device, DDP). A callback that
  decides "am I resuming?" in ``on_fit_start`` must wait for ``on_train_start`` there.
- :attr:`~StrategyAdapter.sharded_checkpoints`: whether checkpoints are ``torch.distributed.checkpoint``
  directories with one shard file per rank (``ModelParallelStrategy(save_distributed_checkpoint=True)``, the
  default), where only ``checkpoint["state_dict"]`` and the optimizer states are sharded and everything else is
  written by rank zero alone; :meth:`~StrategyAdapter.checkpoint_tensor` and
  :meth:`~StrategyAdapter.load_checkpoint_tensors` put a rank's part of a tensor into such a checkpoint and read
  it back.
- :meth:`~StrategyAdapter.guard_optimizer_restore`: let ``ModelParallelStrategy`` restore optimizers that hold no
  state for some trainable parameters (frozen by Half Fine-Tuning, say), which torch's sharded optimizer loading
  refuses otherwise.
- :meth:`~StrategyAdapter.refresh_after_requires_grad_change`: FSDP2 fixes a unit's gradient dtypes at its first
  forward from the parameters that require grad then (pytorch/pytorch#186998); a callback that changes
  ``requires_grad`` calls it afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer

from lit_mofo import dtensor
from lit_mofo.checkpoints import checkpoint_problem, module_hyper_parameters, replacement_checkpoint
from lit_mofo.dtensor import collective_device, is_dtensor

__all__ = ["StrategyAdapter", "StrategyKind", "full_state_dict", "is_dtensor"]

StrategyKind = Literal["single", "ddp", "fsdp2"]
T = TypeVar("T")

_FIX = (
    'Use a single device, `strategy="ddp"` (whole tensors on every rank), or Lightning\'s '
    "`ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with FSDP2's `fully_shard` applied in "
    "the module's `configure_model` (`CausalLMModule` does it itself)."
)
# Strategies refused by class name, so that none of their optional dependencies is imported to recognise them.
_REFUSED: tuple[tuple[str, str], ...] = (
    (
        "DeepSpeedStrategy",
        "DeepSpeed partitions its own flat fp32 buffers, so no parameter tensor (nor its shard) is visible as such",
    ),
    (
        "XLAFSDPStrategy",
        "XLA's FSDP flattens and shards the parameters outside of torch's DTensor",
    ),
    (
        "FSDPStrategy",
        "FSDP1 flattens the parameters into 1-D slices of a flat buffer, so shapes are lost and a tensor's entries "
        "are spread over ranks in a way lit_mofo cannot address (and Lightning runs it on GPUs only)",
    ),
    (
        "XLAStrategy",
        "lit_mofo's callbacks have not been tested with XLA devices",
    ),
)

# A flattened optimizer state entry of a torch.distributed.checkpoint directory written by Lightning.
_OPTIMIZER_STATE_KEY = re.compile(r"optimizer_(?P<index>\d+)\.state\.(?P<name>.+)\.[^.]+")


class StrategyAdapter:
    """The strategy facts a callback needs, behind one small interface (see the module docstring).

    Build it with :meth:`of` (which refuses unsupported strategies); the constructor is for tests.

    Args:
        kind: ``"single"``, ``"ddp"`` or ``"fsdp2"``.
        strategy: the Trainer's strategy (None for a bare single process, e.g. a callback used from Python).
        ranks: ``(world_size, rank)`` without a strategy: the ranks a split of work (:meth:`share`) plans for, with
            no collective run (a script or test that plans one rank's share); ignored with a strategy.
    """

    def __init__(self, kind: StrategyKind, strategy: Strategy | None = None, ranks: tuple[int, int] = (1, 0)) -> None:
        self.kind: StrategyKind = kind
        self.strategy = strategy
        self._ranks = ranks

    # ------------------------------------------------------------------ construction and refusal
    @classmethod
    def of(cls, trainer: pl.Trainer | None, user: str) -> StrategyAdapter:
        """The adapter of ``trainer``'s strategy; raises a ``MisconfigurationException`` naming ``user`` (the
        callback) and the fix for a strategy lit_mofo does not support.

        ``trainer=None`` (e.g. a probe evaluated from Python outside a fit) gives the one-process adapter; an object
        without a ``strategy`` that has a Trainer's ``world_size`` and ``global_rank`` (a stand-in that plans one
        rank's share of some work) an adapter with those ranks that runs no collective."""
        strategy = getattr(trainer, "strategy", None)
        if strategy is None:
            ranks = (int(getattr(trainer, "world_size", 1)), int(getattr(trainer, "global_rank", 0)))
            return cls("single", ranks=ranks)
        name = type(strategy).__name__
        for refused, why in _REFUSED:
            if any(base.__name__ == refused for base in type(strategy).__mro__):
                raise MisconfigurationException(f"{user} does not support `{name}`: {why}. {_FIX}")
        if isinstance(strategy, ModelParallelStrategy):
            tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)
            if tensor_parallel == "auto":  # Lightning resolves it to the processes per node
                tensor_parallel = strategy.num_processes
            if int(tensor_parallel) != 1:
                raise MisconfigurationException(
                    f"{user} does not support `{name}(tensor_parallel_size={tensor_parallel})`: with tensor "
                    "parallelism a parameter is sharded over a 2-D mesh, and lit_mofo agrees figures, thresholds and "
                    "snapshots over a 1-D data-parallel mesh only. Use `tensor_parallel_size=1` (FSDP2 over the "
                    "data-parallel dimension)."
                )
            return cls("fsdp2", strategy)
        if isinstance(strategy, DDPStrategy):
            return cls("ddp", strategy)
        if isinstance(strategy, SingleDeviceStrategy) or getattr(trainer, "world_size", 1) == 1:
            return cls("single", strategy)
        raise MisconfigurationException(
            f"{user} does not support `{name}`: lit_mofo's callbacks are tested with a single device, DDP and "
            f"FSDP2 only. {_FIX}"
        )

    # ------------------------------------------------------------------ facts
    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across ranks (FSDP2): a rank then holds a slice of each tensor."""
        return self.kind == "fsdp2"

    @property
    def name(self) -> str:
        """The strategy's class name, for messages (``"DDPStrategy"``; ``"no strategy"`` without one)."""
        return "no strategy" if self.strategy is None else type(self.strategy).__name__

    @property
    def world_size(self) -> int:
        # As the Trainer's: strategies that run one process need not define a world size.
        return self._ranks[0] if self.strategy is None else getattr(self.strategy, "world_size", 1)

    @property
    def rank(self) -> int:
        return self._ranks[1] if self.strategy is None else getattr(self.strategy, "global_rank", 0)

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives are needed and possible: a strategy with more than one rank, process group
        initialised."""
        return self.strategy is not None and self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def share(self, num_items: int) -> range:
        """Which of ``num_items`` items of work split across the ranks are this rank's: a strided share (``rank``,
        ``rank + world_size``, ...), so that the ranks together cover every item exactly once and their shares
        differ by at most one item. The whole range on one process. lit_mofo's probes split their reference
        batches with it (:func:`~lit_mofo.probes.run_batches`)."""
        return range(self.rank, num_items, self.world_size)

    @property
    def mesh(self) -> Any | None:
        """The 1-D data-parallel ``DeviceMesh`` the parameters are sharded over (FSDP2), else None."""
        if not self.sharded or self.strategy is None:
            return None
        return self.strategy.device_mesh["data_parallel"]  # type: ignore[attr-defined]

    @property
    def ddp_options(self) -> dict[str, Any]:
        """The keyword arguments DDP wraps the model with (``find_unused_parameters``, ``static_graph``...); empty
        for the other kinds."""
        if self.kind != "ddp":
            return {}
        return dict(getattr(self.strategy, "_ddp_kwargs", {}) or {})

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are ``torch.distributed.checkpoint`` directories, one shard file per rank
        (``ModelParallelStrategy(save_distributed_checkpoint=True)``, its default). Then only
        ``checkpoint["state_dict"]`` and the optimizer states are written sharded; every other key goes to the
        directory's ``meta.pt`` from rank zero alone, so a rank's own tensors must go into ``state_dict``."""
        return self.sharded and bool(getattr(self.strategy, "_save_distributed_checkpoint", True))

    @staticmethod
    def restores_after_fit_start(trainer: pl.Trainer) -> bool:
        """Whether the strategy restores a resumed fit's checkpoint only after the callbacks' ``on_fit_start``
        (``ModelParallelStrategy``'s ``restore_checkpoint_after_setup``).

        Lightning's order is then ``setup``, ``configure_model``, the strategy's setup (optimizers built),
        ``on_fit_start``, the weights and optimizer states, the callbacks' ``on_load_checkpoint`` and
        ``load_state_dict``, then ``on_train_start``; with the other strategies everything from the checkpoint is
        restored before ``setup``. In ``on_fit_start`` a callback cannot tell whether a checkpoint will follow
        (``trainer.ckpt_path`` is set only when the restore starts, and keeps a previous fit's value until then), so
        work that depends on it waits for ``on_train_start``.
        """
        return bool(getattr(getattr(trainer, "strategy", None), "restore_checkpoint_after_setup", False))

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def reshard(module: nn.Module) -> None:
        """Register FSDP2's sharded parameters again where a unit left its all-gathered ones (no communication).

        FSDP2 swaps each unit's parameters for whole, all-gathered tensors from its forward until it reshards, and a
        unit that does not reshard after forward (the root) stays that way after a forward without backward (an
        evaluation, a validation step). Its next forward all-gathers again, taking the current ``requires_grad``
        flags with it. A no-op for modules without FSDP2 units."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - torch without FSDP2
            return
        for submodule in module.modules():
            if isinstance(submodule, FSDPModule):
                submodule.reshard()

    @staticmethod
    def named_parameters(module: nn.Module) -> dict[str, Tensor]:
        """``dict(module.named_parameters())`` with the parameters the optimizer holds: under FSDP2 the sharded
        DTensors, also after an evaluation left a unit all-gathered (see :meth:`reshard`)."""
        StrategyAdapter.reshard(module)
        return dict(module.named_parameters())

    local = staticmethod(dtensor.local)
    full = staticmethod(dtensor.full)

    @staticmethod
    def shard_like(full: Tensor, like: Tensor) -> Tensor:
        """This rank's part of the whole tensor ``full``, laid out as the parameter ``like``: its local shard when
        ``like`` is a DTensor (sliced locally, no communication), ``full`` itself otherwise."""
        if not is_dtensor(like):
            return full
        from torch.distributed.tensor import distribute_tensor

        mesh, placements = like.device_mesh, like.placements  # type: ignore[attr-defined]
        return distribute_tensor(full.to(like.device), mesh, placements, src_data_rank=None).to_local()

    @staticmethod
    def checkpoint_tensor(local: Tensor, like: Tensor) -> Tensor:
        """The rank's part ``local`` of a tensor laid out as the parameter ``like``, as a sharded checkpoint stores
        it: a DTensor with ``like``'s mesh, placements, shape and stride (``local`` moved to ``like``'s device);
        ``local`` itself when ``like`` is a plain tensor (stored once, as replicated)."""
        if not is_dtensor(like):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local.to(like.device),
            like.device_mesh,  # type: ignore[attr-defined]
            like.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )

    @staticmethod
    def gather(local: Tensor, like: Tensor) -> Tensor:
        """The whole tensor whose rank's part is ``local``, laid out as the parameter ``like`` (a collective when
        ``like`` is a DTensor: call it on every rank); ``local`` itself otherwise."""
        if not is_dtensor(like):
            return local
        return StrategyAdapter.checkpoint_tensor(local, like).full_tensor()  # type: ignore[attr-defined]

    @staticmethod
    def load_checkpoint_tensors(
        path: str | Path, prefix: str, targets: Mapping[str, tuple[Tensor, torch.dtype]]
    ) -> dict[str, Tensor]:
        """Read tensors stored under ``checkpoint["state_dict"][prefix + name]`` from the sharded checkpoint
        directory ``path``: ``targets`` maps each name to ``(like, dtype)``, the parameter whose layout the tensor
        has and the dtype it was saved in. Returns each rank's part (a local shard for a DTensor ``like``, the
        whole tensor otherwise). A collective: every rank calls it with the same names."""
        import torch.distributed.checkpoint as dcp

        state: dict[str, Tensor] = {}
        for name, (like, dtype) in targets.items():
            local = torch.empty(StrategyAdapter.local(like).shape, dtype=dtype, device=like.device)
            state[prefix + name] = StrategyAdapter.checkpoint_tensor(local, like) if is_dtensor(like) else local
        loaded = {"state_dict": state}
        dcp.load(loaded, checkpoint_id=str(path))
        return {name: StrategyAdapter.local(loaded["state_dict"][prefix + name]) for name in targets}

    # ------------------------------------------------------------------ optimizers and FSDP2 units
    @property
    def optimizers(self) -> list[Optimizer]:
        """The optimizers the strategy steps, in order (none without a strategy)."""
        return [] if self.strategy is None else list(self.strategy.optimizers)

    @property
    def lr_scheduler_configs(self) -> list[Any]:
        """The strategy's learning-rate scheduler configs (Lightning's ``LRSchedulerConfig``), in order."""
        return [] if self.strategy is None else list(self.strategy.lr_scheduler_configs)

    def replace_optimizers(self, optimizers: Sequence[Optimizer]) -> None:
        """Make the strategy step ``optimizers`` from now on (it re-creates the ``LightningOptimizer`` wrappers behind
        the module's ``self.optimizers()``); schedulers keep pointing at the optimizers they were built with."""
        self._required("replace_optimizers()").optimizers = list(optimizers)

    def rebuild_optimizers(self, trainer: pl.Trainer) -> None:
        """Build the optimizers and schedulers again from the module's ``configure_optimizers`` and install them, as
        the strategy does at the start of fit (its ``setup_optimizers``)."""
        self._required("rebuild_optimizers()").setup_optimizers(trainer)

    def _required(self, what: str) -> Strategy:
        if self.strategy is None:
            raise RuntimeError(f"StrategyAdapter.{what} needs a Trainer's strategy; this adapter has none.")
        return self.strategy

    def guard_optimizer_restore(self, trainer: pl.Trainer) -> None:
        """Let a sharded resume restore optimizers that hold no state for some trainable parameters.

        ``ModelParallelStrategy`` restores optimizer states through torch's ``set_optimizer_state_dict``, which first
        gives a state to every parameter that requires grad (one step with zero gradients and lr 0) and then refuses
        a checkpoint without state for one of them ("Missing key in checkpoint state_dict" / "Missing optimizer state
        for parameter"). A parameter whose gradient was dropped at every step since the optimizer was built (Half
        Fine-Tuning's frozen half, one whose state ``optimizer_state="reset"`` removed) rightly has none. While the
        strategy loads a checkpoint, this parks ``requires_grad=False`` on each trainable parameter of its optimizers
        that has no state in that checkpoint, so it gets none, as in the run that wrote it; the flags are given back
        as soon as the load returns. Call it in ``setup`` (it wraps the strategy's ``load_checkpoint`` for this
        fit) and :meth:`release_optimizer_restore_guard` in ``teardown``; a no-op unless the parameters are sharded.
        """
        strategy = trainer.strategy
        if not self.sharded or "load_checkpoint" in vars(strategy):  # not sharded, or guarded already
            return
        load = strategy.load_checkpoint

        def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
            path = Path(str(strategy.broadcast(checkpoint_path)))
            _refuse_incomplete_checkpoint(path, strategy)  # before reading its metadata, as Lightning's load would
            held = _park_parameters_without_optimizer_state(path, strategy)
            try:
                return load(checkpoint_path, *args, **kwargs)
            finally:
                for param in held:
                    param.requires_grad_(True)

        strategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]

    @staticmethod
    def release_optimizer_restore_guard(trainer: pl.Trainer) -> None:
        """Undo :meth:`guard_optimizer_restore` (the strategy's own ``load_checkpoint`` again)."""
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and "load_checkpoint" in vars(strategy):
            del strategy.load_checkpoint

    @staticmethod
    def refresh_after_requires_grad_change(module: nn.Module) -> None:
        """Make FSDP2 follow ``requires_grad`` flags changed after the model's first forward.

        FSDP2 fixes each unit's gradient dtypes (the parameters' original dtype and the reduce dtype of its
        ``MixedPrecisionPolicy``) from the parameters that require grad at the first forward; a unit entirely
        frozen then keeps none, and once unfrozen its gradients are reduced in the compute dtype and fail to be
        assigned to float32 parameters (pytorch/pytorch#186998, torch <= 2.13). This recomputes them from the
        current flags, and reshards every unit so that its next forward gathers the flags too (:meth:`reshard`);
        no communication. A no-op for modules without FSDP2 units.
        """
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # pragma: no cover - torch without FSDP2
            return
        StrategyAdapter.reshard(module)
        for submodule in module.modules():
            if not isinstance(submodule, FSDPModule):
                continue
            group = getattr(submodule._get_fsdp_state(), "_fsdp_param_group", None)
            if group is not None and hasattr(group, "_init_mp_dtypes"):
                group._init_mp_dtypes()

    # ------------------------------------------------------------------ reductions
    def _all_reduce(self, values: Tensor, op: Any) -> Tensor:
        if not self.distributed:
            return values
        group = self._group()
        reduced = values.detach().to(device=collective_device(group, prefer=values.device), copy=True)
        dist.all_reduce(reduced, op=op, group=group)
        return reduced.to(values.device)

    def _group(self) -> Any:
        """The process group over the ranks: the data-parallel mesh's (FSDP2), else the default (world) group."""
        return self.mesh.get_group(0) if self.sharded else None  # type: ignore[union-attr]

    def sum_over_shards(self, values: Tensor) -> Tensor:
        """Sum per-shard figures into whole-tensor figures (FSDP2); unchanged when every rank holds whole tensors."""
        return self._all_reduce(values, dist.ReduceOp.SUM) if self.sharded else values

    def max_over_shards(self, values: Tensor) -> Tensor:
        """The maximum over the shards (FSDP2); unchanged when every rank holds whole tensors."""
        return self._all_reduce(values, dist.ReduceOp.MAX) if self.sharded else values

    def sum_over_ranks(self, values: Tensor) -> Tensor:
        """Sum figures over all ranks (data split across processes, under DDP and FSDP2 alike)."""
        return self._all_reduce(values, dist.ReduceOp.SUM)

    def max_over_ranks(self, values: Tensor) -> Tensor:
        """The maximum over all ranks."""
        return self._all_reduce(values, dist.ReduceOp.MAX)

    def broadcast(self, obj: T, src: int = 0) -> T:
        """``obj`` from rank ``src`` on every rank (a picklable object)."""
        if not self.distributed or self.strategy is None:
            return obj
        return self.strategy.broadcast(obj, src=src)

    def all_gather_object(self, obj: T) -> list[T]:
        """``obj`` of every rank, in rank order (a picklable object; a collective); ``[obj]`` on one process."""
        if not self.distributed:
            return [obj]
        group = self._group()
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, obj, group=group)
        return gathered

    # ------------------------------------------------------------------ failing together
    def agree(self, what: str, error: BaseException | None = None, flags: Sequence[bool] = ()) -> tuple[bool, ...]:
        """A meeting point of all ranks (a collective: every rank calls it at the same point of its work).

        Each rank reports whether it failed since the last meeting (``error``) and a few flags, in one all-reduce.
        If some rank failed, every rank raises: a failing rank its own ``error``, the others a ``RuntimeError``
        naming ``what``, the failing rank (the highest, if several failed) and its error. Otherwise it returns,
        for each of ``flags``, whether it is True on some rank (e.g. "I still have a batch", so that a loop over
        data of uneven length per rank runs as many steps on every rank). On one process it raises ``error``
        if given and returns ``flags``.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return tuple(bool(flag) for flag in flags)
        report = torch.tensor([self.rank if error is not None else -1, *(int(bool(f)) for f in flags)])
        reduced = self.max_over_ranks(report.to(torch.int64)).tolist()
        failing = int(reduced[0])
        if failing < 0:
            return tuple(bool(flag) for flag in reduced[1:])
        message = self.broadcast(f"{type(error).__name__}: {error}" if error is not None else "", src=failing)
        if error is not None:
            raise error
        raise RuntimeError(f"{what} failed on rank {failing}: {message}")

    def run_together(self, what: str, function: Callable[[], T]) -> T:
        """Run ``function`` on every rank; if it raises on any rank, raise on every rank (see :meth:`agree`).

        A rank that fails alone would leave the others waiting in the next collective (an FSDP2 forward, a metric
        sync) until the process group times out. Use it around work that can fail on some ranks only (reading a
        file, a user's function) and whose collectives, if any, are all done on every rank before it can fail
        there: a rank that fails while the others are inside a collective of ``function`` (say, between two
        FSDP2 forwards) cannot be reached by the meeting at its end.
        """
        error: BaseException | None = None
        result: Any = None
        try:
            result = function()
        except Exception as caught:  # re-raised by agree(), on every rank
            error = caught
        self.agree(what, error)
        return result

    @staticmethod
    def sharded_outside(module: nn.Module) -> list[str]:
        """Names of ``module``'s sharded (DTensor) parameters that no FSDP2 unit inside ``module`` (itself
        included) gathers: calling ``module`` on its own would compute with shards. Empty when ``module`` can be
        called alone, e.g. when ``fully_shard`` was applied to it and its blocks rather than to an outer module."""
        if not dist.is_available():
            return []
        from torch.distributed.fsdp import FSDPModule

        names: list[str] = []

        def visit(current: nn.Module, prefix: str, gathered: bool) -> None:
            gathered = gathered or isinstance(current, FSDPModule)
            names.extend(
                prefix + name
                for name, param in current.named_parameters(recurse=False)
                if not gathered and is_dtensor(param)
            )
            for child_name, child in current.named_children():
                visit(child, f"{prefix}{child_name}.", gathered)

        visit(module, "", False)
        return names


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with whole tensors on the CPU: FSDP2's DTensors all-gathered (a collective: call it on
    every rank; rank zero gets the tensors, the other ranks an empty dict), plain tensors as they are."""
    if not any(is_dtensor(param) for param in module.parameters()):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _refuse_incomplete_checkpoint(path: Path, strategy: Strategy) -> None:
    """Raise a ``MisconfigurationException`` naming what is wrong with the local checkpoint ``path`` (cut short while
    written, damaged, not a checkpoint) and the newest complete checkpoint of the same run beside it; a path that
    does not exist (or a remote one) is left to the strategy's own load."""
    if not path.exists():
        return
    problem = checkpoint_problem(path)
    if problem is None:
        return
    module = strategy.lightning_module
    found = replacement_checkpoint(path, None if module is None else module_hyper_parameters(module))
    if found is None:
        fix = f"There is no other complete checkpoint of this run in {path.parent}; start without ckpt_path."
    else:
        fix = f"The {'previous' if found[1] else 'newest'} complete checkpoint of this run there is {found[0]}."
    raise MisconfigurationException(f"Cannot resume from {path}: {problem}. {fix}")


def _park_parameters_without_optimizer_state(path: Path, strategy: Strategy) -> list[Tensor]:
    """Set ``requires_grad=False`` on each trainable parameter of ``strategy``'s optimizers that has no state in the
    checkpoint at ``path``; returns them."""
    module = strategy.lightning_module
    if module is None or not path.exists():  # nothing to read here (a remote path): the strategy's load decides
        return []
    saved = _optimizer_state_names(path, module)
    names = {id(param): name for name, param in StrategyAdapter.named_parameters(module).items()}
    held: list[Tensor] = []
    for index, optimizer in enumerate(strategy.optimizers):
        with_state = saved[index] if index < len(saved) else set()
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad and names.get(id(param)) not in with_state:
                    param.requires_grad_(False)
                    held.append(param)
    return held


def _optimizer_state_names(path: Path, module: nn.Module) -> list[set[str]]:
    """Per optimizer (in order), the names of ``module``'s parameters that have a state in the checkpoint at
    ``path`` - a ``torch.distributed.checkpoint`` directory (keys ``optimizer_<i>.state.<name>.<key>``) or a full
    checkpoint file (Lightning's ``optimizer_states`` list, keyed by parameter name or by position in
    ``module.parameters()``)."""
    names = [name for name, _ in module.named_parameters()]
    found: dict[int, set[str]] = {}
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        for key in FileSystemReader(str(path)).read_metadata().state_dict_metadata:
            match = _OPTIMIZER_STATE_KEY.fullmatch(key)
            if match is not None:
                found.setdefault(int(match["index"]), set()).add(match["name"])
        return [found.get(index, set()) for index in range(max(found, default=-1) + 1)]
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    states = checkpoint.get("optimizer_states", [])
    return [
        {names[key] if isinstance(key, int) and key < len(names) else str(key) for key in state.get("state", {})}
        for state in states
    ]
