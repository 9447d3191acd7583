"""What lit_mofo needs to know about torch's DTensor, in one torch-only module.

FSDP2's ``fully_shard`` (Lightning's ``ModelParallelStrategy``) turns every parameter into a
:class:`torch.distributed.tensor.DTensor`: a global tensor whose slices live on the ranks of a device mesh. The
optimizer and the strategy adapter both need the same few facts about such a tensor, and this module states each
once, importing nothing but torch:

- :func:`is_dtensor`: whether a tensor is a DTensor (``False`` on builds without ``torch.distributed``),
  :func:`placements`: how it is laid out on its mesh, and :func:`mesh_size`: how many ranks that mesh spans;
- :func:`local` / :func:`full`: a rank's own part (a view that shares the parameter's storage) and the whole tensor
  (an all-gather: a collective, so every rank of the mesh must call it);
- :func:`shard_layout`: where a rank's part of a tensor sharded along one dimension of a 1-D mesh sits in the
  global tensor, and the process group its collectives run over (``None`` for plain and replicated tensors);
- :func:`collective_device`: the device whose tensors a process group's collectives accept.

The collective device rule: a backend that handles the data's own device gets the data where it is (no copy);
otherwise CPU if the backend handles CPU tensors (gloo, or ``"cpu:gloo,cuda:nccl"``), else the current device of
the backend's one device type (NCCL: the current CUDA device). Testing the backend's *name* gets mixed backends
wrong in one direction or the other (``"nccl" in name`` copies CPU data to the GPU for ``"cpu:gloo,cuda:nccl"``,
``name == "nccl"`` copies GPU data to the host), so the rule asks the process group which devices it supports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ShardLayout",
    "collective_device",
    "full",
    "is_dtensor",
    "local",
    "mesh_size",
    "placements",
    "shard_layout",
]

_DTENSOR: type | None = None


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters and their grads)."""
    global _DTENSOR
    if _DTENSOR is None:
        if not torch.distributed.is_available():
            return False
        from torch.distributed.tensor import DTensor

        _DTENSOR = DTensor
    return isinstance(tensor, _DTENSOR)


def placements(tensor: Tensor) -> tuple[Any, ...]:
    """A DTensor's placements on its mesh (``(Shard(dim=0),)``...), ``()`` for a plain tensor: two tensors are laid
    out alike when these are equal."""
    return tuple(tensor.placements) if is_dtensor(tensor) else ()  # type: ignore[attr-defined]


def mesh_size(tensor: Tensor) -> int:
    """The number of ranks of a DTensor's device mesh (its shards' count when sharded on a 1-D mesh), 1 for a plain
    tensor."""
    return tensor.device_mesh.size() if is_dtensor(tensor) else 1  # type: ignore[attr-defined]


def local(tensor: Tensor) -> Tensor:
    """The rank's own part of ``tensor``: a DTensor's local shard (a view that shares its storage, so in-place writes
    reach the parameter), the tensor itself otherwise."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def full(tensor: Tensor) -> Tensor:
    """The whole tensor: a DTensor all-gathered (a collective: call it on every rank of its mesh), the tensor itself
    otherwise."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ShardLayout:
    """A rank's part of a tensor sharded along ``dim`` over a 1-D mesh, as ``torch.chunk`` splits it.

    Entries of the global tensor, flattened, are addressed by ``(outer, along, inner)``: ``along`` indexes ``dim``
    (``size`` long), ``inner`` the entries after it; this rank holds ``along`` in ``[start, start + length)``.
    """

    numel: int  # entries of the global tensor
    dim: int
    size: int  # the global tensor's extent along dim
    inner: int  # entries per step along dim
    start: int
    length: int
    group: Any  # the mesh's process group: every collective over the shards runs over it
    rank: int
    world: int

    def local_positions(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The local flat positions of global flat positions ``index``, and whether this rank holds each (the
        positions it does not hold are given as 0)."""
        along = (index // self.inner) % self.size
        outer = index // (self.inner * self.size)
        owned = (along >= self.start) & (along < self.start + self.length)
        positions = outer * (self.length * self.inner) + (along - self.start) * self.inner + index % self.inner
        return torch.where(owned, positions, 0), owned


def shard_layout(tensor: Tensor) -> ShardLayout | None:
    """The layout of a DTensor sharded along one dimension of a 1-D device mesh (FSDP2's ``fully_shard``); ``None``
    for a plain tensor and for a DTensor replicated on its mesh (every rank holds the whole tensor).

    Raises ``ValueError`` for the layouts it cannot describe: meshes of more than one dimension (tensor
    parallelism), placements other than ``Shard(dim)``/``Replicate()`` (``_StridedShard``, ``Partial``), and shards
    that are not ``torch.chunk``'s split (the one ``Shard(dim)`` makes).
    """
    if not is_dtensor(tensor):
        return None
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    placements = tuple(tensor.placements)  # type: ignore[attr-defined]
    placement = placements[0]
    if mesh.ndim != 1 or not (placement.is_replicate() or type(placement).__name__ == "Shard"):
        raise ValueError(
            f"a DTensor with placements {placements} on a {mesh.ndim}-D device mesh is not supported (only "
            "Shard(dim) or Replicate() on a 1-D mesh is)"
        )
    if placement.is_replicate():
        return None
    dim = placement.dim
    rank, world = mesh.get_local_rank(0), mesh.size(0)
    shape = tuple(tensor.shape)
    size = shape[dim]
    chunk = -(-size // world)  # torch.chunk's split, which Shard(dim) follows
    start = min(rank * chunk, size)
    local_shape = tuple(tensor.to_local().shape)  # type: ignore[attr-defined]
    length = local_shape[dim] if local_shape else 0
    expected = max(0, min(chunk, size - start))
    if length != expected:
        raise ValueError(
            f"a DTensor shard of global shape {shape} holds {length} entries of dim {dim} on rank {rank}, where "
            f"torch.chunk's split gives {expected}; uneven custom shardings are not supported"
        )
    return ShardLayout(
        numel=math.prod(shape),
        dim=dim,
        size=size,
        inner=math.prod(shape[dim + 1 :]),
        start=start,
        length=length,
        group=mesh.get_group(0),
        rank=rank,
        world=world,
    )


def collective_device(group: Any = None, prefer: torch.device | None = None) -> torch.device:
    """The device whose tensors the collectives of ``group`` (default: the world group) accept: ``prefer`` (the
    data's own device, so nothing is copied) where the group's backend handles its type, else CPU where it handles
    CPU tensors, else the current device of its one device type (see the module docstring)."""
    import torch.distributed as dist

    pg = group if group is not None else dist.group.WORLD
    # The process group registers one backend per device type it handles (pybind property, torch >= 2.2).
    types = [device.type for device in pg._device_types]
    if prefer is not None and prefer.type in types:
        return prefer
    if "cpu" in types or not types:
        return torch.device("cpu")
    module = getattr(torch, types[0], None)
    index = module.current_device() if module is not None and hasattr(module, "current_device") else 0
    return torch.device(types[0], index)
