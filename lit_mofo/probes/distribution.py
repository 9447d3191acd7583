"""How the probes split their reference batches across processes: batch ``i`` to rank ``i % world_size``, as many
forwards on every rank (FSDP2's all-gathers need them), and a failure on one rank raised on every rank.

:func:`run_batches` is the one loop every built-in probe evaluates its batches with; custom probes can use it too.
:func:`rank_share` and :func:`rank_batches` are the plans it follows, for probes that split other work. Which items
are a rank's is the strategy adapter's answer (:meth:`~lit_mofo.strategy.StrategyAdapter.share`), like every other
fact about the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mofo.strategy import StrategyAdapter

__all__ = ["apply_limit", "rank_batches", "rank_share", "run_batches"]


def apply_limit(total: int, limit: int | float | None) -> int:
    """How many of ``total`` batches a limit keeps (a fraction keeps at least one)."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return min(total, max(1, math.floor(total * limit)))
    return min(total, limit)


def rank_share(num_items: int, trainer: pl.Trainer | None) -> range:
    """The indices of ``num_items`` reference items this process evaluates: a strided share (rank, rank + world,
    ...), so the ranks together cover every item exactly once (:meth:`~lit_mofo.strategy.StrategyAdapter.share`).
    The whole range without a trainer or on one process. Shares differ by at most one item; probes that run
    collectives per batch (forwards of a model sharded with FSDP2) must pad to equal counts, as
    :func:`~lit_mofo.probes.run_batches` does."""
    return StrategyAdapter.of(trainer, user="rank_share").share(num_items)


def rank_batches(
    batches: Sequence[Any], trainer: pl.Trainer | None, limit: int | float | None = None
) -> list[tuple[Any, bool]]:
    """This process's share of the first ``limit`` (global) ``batches``, as ``(batch, counts)`` pairs.

    Batch ``i`` goes to rank ``i % world_size``; every rank gets ``ceil(len / world_size)`` pairs: a rank with one
    batch fewer ends with ``(batches[0], False)``, a padding batch whose forward it runs and whose result it
    discards, so that sharded models, where every forward is a collective, never wait on a missing one.
    """
    return _plan(batches, StrategyAdapter.of(trainer, user="rank_batches"), limit)


def _plan(batches: Sequence[Any], adapter: StrategyAdapter, limit: int | float | None) -> list[tuple[Any, bool]]:
    total = apply_limit(len(batches), limit)
    mine = [(batches[index], True) for index in adapter.share(total)]
    padding = math.ceil(total / adapter.world_size) - len(mine)
    return mine + [(batches[0], False)] * padding if padding else mine


class _LoaderShare:
    """This rank's batches of a dataloader that every rank iterates (batch ``i`` to rank ``i % world``), step by
    step; once they run out, the loader's first batch as padding (None if the loader yielded nothing here)."""

    def __init__(self, loader: Iterable[Any], adapter: StrategyAdapter, limit: int | float | None) -> None:
        if isinstance(limit, float):
            try:
                total = len(loader)  # type: ignore[arg-type]
            except TypeError as err:
                raise MisconfigurationException(
                    f"`limit_batches={limit}` is a fraction, but the reference dataloader has no length; give an int."
                ) from err
            limit = apply_limit(total, limit)
        self._batches = self._mine(loader, adapter, limit)
        self._first: Any = None
        self._seen_any = False

    def _mine(self, loader: Iterable[Any], adapter: StrategyAdapter, limit: int | None) -> Iterator[Any]:
        for index, batch in enumerate(loader):
            if limit is not None and index >= limit:
                return
            if index == 0:
                self._first, self._seen_any = batch, True
            if index in adapter.share(index + 1):  # the loader's length is unknown: is item `index` this rank's?
                yield batch

    def next(self) -> tuple[Any, bool] | None:
        """``(batch, True)``, then ``(first batch, False)`` forever; None if there is nothing to pad with."""
        batch = next(self._batches, _DONE)
        if batch is not _DONE:
            return batch, True
        return (self._first, False) if self._seen_any else None


_DONE = object()


def run_batches(
    batches: Iterable[Any],
    trainer: pl.Trainer | None,
    forward: Callable[[Any], Any],
    prepare: Callable[[Any], Any] | None = None,
    consume: Callable[[Any, Any], None] | None = None,
    limit: int | float | None = None,
    where: str = "The probe",
) -> int:
    """Evaluate this process's share of the reference ``batches``: the one way lit_mofo's probes split their data
    across processes. Returns the number of forwards this rank ran.

    For each of its batches a rank calls ``prepare(batch)`` (collating, checking: host-side work), then
    ``forward(inputs)`` (the model call) and ``consume(inputs, output)`` (updating the probe's sums). Batch ``i``
    goes to rank ``i % world_size``, and every rank runs as many forwards: a rank out of batches runs padding
    forwards on the first batch whose output it discards (not passed to ``consume``), since under FSDP2 each
    forward is a collective that all ranks must join. ``batches`` is a sequence (the same on every rank: the
    share is computed locally, see :func:`rank_batches`) or any other iterable, e.g. a ``DataLoader``, iterated by
    every rank, of which only the first ``limit`` batches count (an int, or a float fraction of ``len``); its
    length may even differ between ranks, since the ranks agree at every step whether any of them has a batch left.

    Failing together: an error in ``prepare`` on some rank is reported to every rank before the forward it would
    have run, one in ``forward`` or ``consume`` at the next step (or at the end), through
    :meth:`~lit_mofo.strategy.StrategyAdapter.agree`, and every rank raises. The limit: a forward that fails on one
    rank part-way, after its first FSDP2 all-gather, leaves the others waiting inside that forward, where no meeting
    can reach them; lit_mofo's probes check their inputs in ``prepare`` so that bad data fails before the forward.
    """
    adapter = StrategyAdapter.of(trainer, user=where)
    if isinstance(batches, Sequence):
        plan = iter(_plan(batches, adapter, limit))

        def next_step() -> tuple[Any, bool] | None:
            return next(plan, None)

    else:
        next_step = _LoaderShare(batches, adapter, limit).next
    forwards = 0
    pending: BaseException | None = None  # a failure of the last forward or consume, reported at the next meeting
    while True:
        step: tuple[Any, bool] | None = None
        inputs: Any = None
        error: BaseException | None = None
        try:
            step = next_step()
            if step is not None:
                inputs = step[0] if prepare is None else prepare(step[0])
        except Exception as caught:  # re-raised by agree() on every rank
            error = caught
        counts, unable = step is not None and step[1], step is None
        more, someone_unable = adapter.agree(where, pending or error, flags=(counts, unable))
        pending = None
        if not more:
            break
        if someone_unable:
            raise MisconfigurationException(
                f"{where}: a process has no reference batch left to run while another one has: every process must "
                "iterate the same reference dataloader (a loader that yields nothing on one process cannot be "
                "padded). Give every rank the same batches; they are split across the processes by the probe."
            )
        assert step is not None
        try:
            output = forward(inputs)
            forwards += 1
            if step[1] and consume is not None:
                consume(inputs, output)
        except Exception as caught:  # reported at the next meeting, after the other ranks' forward
            pending = caught
    adapter.agree(where, pending)
    return forwards
