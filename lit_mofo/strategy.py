"""What a lit_mofo callback needs to know about the Trainer's strategy, in one place.

Every callback that touches parameters, the pre-trained snapshot or metrics asks a :class:`StrategyAdapter`
instead of testing strategy classes itself:

.. code-block:: python

    adapter = StrategyAdapter.of(trainer, user="ParameterDrift")  # in setup(): refuses what is unsupported
    local = adapter.local(param)  # the rank's shard of a DTensor parameter, the tensor itself otherwise
    total = adapter.sum_over_shards(torch.stack([sq_diff, sq_ref]))  # a figure over whole tensors
    counts = adapter.sum_over_ranks(counts)  # a figure over data split across the ranks
    values = adapter.run_together("probe 'lm'", evaluate)  # a failure on one rank fails every rank

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

__all__ = ["StrategyAdapter", "StrategyKind", "is_dtensor"]

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

_DTENSOR: type | None = None


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters and their grads)."""
    global _DTENSOR
    if _DTENSOR is None:
        if not dist.is_available():
            return False
        from torch.distributed.tensor import DTensor

        _DTENSOR = DTensor
    return isinstance(tensor, _DTENSOR)


class StrategyAdapter:
    """The strategy facts a callback needs, behind one small interface (see the module docstring).

    Build it with :meth:`of` (which refuses unsupported strategies); the constructor is for tests.

    Args:
        kind: ``"single"``, ``"ddp"`` or ``"fsdp2"``.
        strategy: the Trainer's strategy (None for a bare single process, e.g. a callback used from Python).
    """

    def __init__(self, kind: StrategyKind, strategy: Strategy | None = None) -> None:
        self.kind: StrategyKind = kind
        self.strategy = strategy

    # ------------------------------------------------------------------ construction and refusal
    @classmethod
    def of(cls, trainer: pl.Trainer | None, user: str) -> StrategyAdapter:
        """The adapter of ``trainer``'s strategy; raises a ``MisconfigurationException`` naming ``user`` (the
        callback) and the fix for a strategy lit_mofo does not support.

        ``trainer=None`` (or an object without a ``strategy``, e.g. a probe evaluated from Python outside a fit)
        gives the one-process adapter."""
        strategy = getattr(trainer, "strategy", None)
        if strategy is None:
            return cls("single")
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
        if isinstance(strategy, SingleDeviceStrategy) or trainer.world_size == 1:
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
    def world_size(self) -> int:
        return 1 if self.strategy is None else self.strategy.world_size

    @property
    def rank(self) -> int:
        return 0 if self.strategy is None else self.strategy.global_rank

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether collectives are needed and possible: more than one rank, process group initialised."""
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

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

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def local(tensor: Tensor) -> Tensor:
        """The rank's own part of ``tensor``: a DTensor's local shard (a view that shares its storage, so in-place
        writes reach the parameter), the tensor itself otherwise."""
        return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]

    @staticmethod
    def full(tensor: Tensor) -> Tensor:
        """The whole tensor: a DTensor all-gathered (a collective: call it on every rank), the tensor itself
        otherwise."""
        return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]

    @staticmethod
    def shard_like(full: Tensor, like: Tensor) -> Tensor:
        """This rank's part of the whole tensor ``full``, laid out as the parameter ``like``: its local shard when
        ``like`` is a DTensor (sliced locally, no communication), ``full`` itself otherwise."""
        if not is_dtensor(like):
            return full
        from torch.distributed.tensor import distribute_tensor

        mesh, placements = like.device_mesh, like.placements  # type: ignore[attr-defined]
        return distribute_tensor(full.to(like.device), mesh, placements, src_data_rank=None).to_local()

    # ------------------------------------------------------------------ reductions
    def _all_reduce(self, values: Tensor, op: Any) -> Tensor:
        if not self.distributed:
            return values
        device = self._collective_device()
        reduced = values.detach().to(device=device, copy=True)
        dist.all_reduce(reduced, op=op, group=self._group())
        return reduced.to(values.device)

    def _group(self) -> Any:
        """The process group over the ranks: the data-parallel mesh's (FSDP2), else the default (world) group."""
        return self.mesh.get_group(0) if self.sharded else None  # type: ignore[union-attr]

    def _collective_device(self) -> torch.device:
        backend = dist.get_backend()
        if "nccl" in str(backend) and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

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

    # ------------------------------------------------------------------ FSDP2 modules
    @staticmethod
    def _fsdp_modules(module: nn.Module) -> Iterator[nn.Module]:
        if not dist.is_available():
            return
        from torch.distributed.fsdp import FSDPModule

        yield from (m for m in module.modules() if isinstance(m, FSDPModule))

    @classmethod
    def reshard(cls, module: nn.Module) -> None:
        """Put every FSDP2 unit of ``module`` back in its sharded state (no communication; a no-op without FSDP2).

        FSDP2 keeps the root unit's parameters gathered after a forward, expecting the backward of a training step
        to free them; after a forward without autograd (an evaluation) they would stay gathered, so
        ``module.parameters()`` would yield whole plain tensors instead of the sharded DTensors that the optimizer,
        the callbacks and the checkpoint hold, and the memory of the gathered root would stay in use."""
        for unit in cls._fsdp_modules(module):
            unit.reshard()  # type: ignore[operator]

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
