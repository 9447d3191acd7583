r"""Half Fine-Tuning (HFT, arXiv 2404.18466) as a callback: train half of the matrices, keep the other half frozen.

Add :class:`HalfFineTuning` to any Trainer; the LightningModule, its model (a transformers model or plain torch) and
its optimizer (MoFO or any torch optimizer) stay as they are. At the start of fit the callback finds the model's
transformer blocks (:mod:`lit_mofo.blocks`), draws which of the matrices the module left trainable stay frozen, and
keeps them frozen until the next draw, if any.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lit_mofo._validation import (
    as_bool,
    as_choice,
    as_dtype,
    as_float,
    as_int,
    as_patterns,
    matches,
    unmatched_patterns_message,
)
from lit_mofo.adapters import is_peft_model
from lit_mofo.blocks import ROLES, ModelLayout, detect_layout
from lit_mofo.params import check_trainable, forget_initial_requires_grad, record_initial_requires_grad
from lit_mofo.snapshot import PretrainedSnapshot
from lit_mofo.strategy import StrategyAdapter

__all__ = ["HalfFineTuning"]

log = logging.getLogger(__name__)

Granularity = Literal["category", "layer", "tensor"]
Mode = Literal["freeze", "mask"]
OptimizerStatePolicy = Literal["keep", "reset"]

GRANULARITIES: tuple[str, ...] = ("category", "layer", "tensor")
MODES: tuple[str, ...] = ("freeze", "mask")
OPTIMIZER_STATE_POLICIES: tuple[str, ...] = ("keep", "reset")
_CATEGORIES = ("attention", "ffn", "norm")

Unit = tuple[str, ...]  # parameter names that are frozen and unfrozen together (a matrix and its bias, a norm layer)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _spread(per_block: Sequence[Sequence[Unit]], share: float, generator: torch.Generator) -> list[Unit]:
    """Freeze ``share`` of the units of one category, whole units per block, in exact total.

    Block ``b`` with ``n`` units freezes ``floor(n * share)`` or one more; the blocks that freeze one more are drawn
    at random so that the total is ``round(sum(n * share))``. With the paper's FFN (3 matrices, share 1/2) a random
    half of the blocks freezes 2 and the other half 1.
    """
    targets = [len(units) * share for units in per_block]
    base = [math.floor(target + 1e-9) for target in targets]
    remainders = [target - floor for target, floor in zip(targets, base, strict=True)]
    candidates = [index for index, remainder in enumerate(remainders) if remainder > 1e-9]
    extra = min(len(candidates), _round_half_up(sum(remainders)))
    counts = list(base)
    for pick in torch.randperm(len(candidates), generator=generator)[:extra].tolist():
        counts[candidates[pick]] += 1
    frozen: list[Unit] = []
    for units, count in zip(per_block, counts, strict=True):
        frozen.extend(units[i] for i in torch.randperm(len(units), generator=generator)[:count].tolist())
    return frozen


def _by_size(units: Sequence[Unit], sizes: Sequence[int], share: float, generator: torch.Generator) -> list[Unit]:
    """Freeze whole units, chosen at random, until about ``share`` of their parameters (by entry count) are frozen.

    The units are visited in a random order and each is frozen if that brings the frozen count closer to
    ``share * total``, so the result misses the target by at most half of the largest unit (on a tie the unit stays
    trainable). Units of one size give ``round(n * share)`` units, rounded down at exactly .5.
    """
    target = share * sum(sizes)
    frozen: list[Unit] = []
    count = 0
    for index in torch.randperm(len(units), generator=generator).tolist():
        if abs(count + sizes[index] - target) < abs(count - target):
            frozen.append(units[index])
            count += sizes[index]
    return frozen


class HalfFineTuning(Callback):
    r"""Half Fine-Tuning: in every round half of the model's matrices train and the other half stay frozen.

    **Which tensors**: only those the module left trainable. A parameter with ``requires_grad=False`` when the fit
    starts (frozen embeddings, a frozen base under an adapter, blocks frozen by the module) is not the callback's
    business: it stays frozen, takes part in no draw and no count below, and a ``rank_zero_info`` at the start of
    fit names how many such tensors there are and which. The callbacks' answer to "which tensors does the user
    train" is :func:`lit_mofo.params.initial_requires_grad`, the flags as they were before this callback changed
    any, so :class:`~lit_mofo.L2ToPretrained`, :class:`~lit_mofo.ParameterDrift` and
    :class:`~lit_mofo.callbacks.mofo_callback.MoFOCallback` see the same set whether they are listed before or
    after this callback. A module with no trainable parameter is refused at the start of fit.

    **Selection** (``granularity``), redrawn at every draw from a seeded generator, among the trainable tensors:

    - ``"category"`` (the paper's): per transformer block, half of the attention matrices, half of the FFN matrices
      and half of the norm layers are frozen. For Llama that is 2 of {q, k, v, o} trainable; of {gate, up, down} 2
      frozen in a random half of the blocks and 1 in the other half; 1 of the 2 norms frozen. For other ratios
      block ``b`` freezes ``floor(n·(1-ratio))`` or one more of its ``n`` matrices, spread so the model-wide total
      is ``round(Σ n·(1-ratio))``. Layouts with other matrix counts get the same rule (see the table):

      ============  ============================================  ===========================  ========
      architecture  attention (trainable at ratio 0.5)            FFN (trainable)              norms
      ============  ============================================  ===========================  ========
      llama         2 of q, k, v, o                               1 or 2 of gate, up, down     1 of 2
      gpt2          1 of ``c_attn`` (fused q/k/v), ``c_proj``     1 of ``c_fc``, ``c_proj``    1 of 2
      gpt_neox      1 of ``query_key_value`` (fused), ``dense``   1 of h_to_4h, 4h_to_h        1 of 2
      opt           2 of q, k, v, out                             1 of ``fc1``, ``fc2``        1 of 2
      bert          2 of query, key, value, attention output      1 of intermediate, output    1 of 2
      generic       half of the matrices under ``*attn*``         half of the other matrices   half
      ============  ============================================  ===========================  ========

      Fused attention freezes whole matrices too, never slices, so in GPT-2 and GPT-NeoX a block trains either
      3/4 or 1/4 of its attention weights. A matrix's bias is frozen with it; a norm layer's weight and bias go
      together. Block parameters that are none of these (an adapter in a known block) stay trainable.
    - ``"layer"``: ``round(B·(1-ratio))`` of the ``B`` blocks are frozen whole.
    - ``"tensor"``: whole units (a matrix with its bias, a norm layer, any other parameter outside the embeddings and
      head), anywhere in the model, chosen at random until about ``1-ratio`` of their parameters (by entry count,
      not by tensor count) are frozen: the share misses the target by at most half of the largest unit, and each
      draw's summary states the share it reached.

    Embeddings and the output head (not tied to the embeddings) are trainable unless ``train_embeddings`` /
    ``train_head`` is False; the rest outside the blocks (final norm, pooler, ...) is trainable. Every block stack
    counts (an encoder and a decoder, see :func:`lit_mofo.blocks.detect_layout`). A model whose blocks are not
    recognised by name gets the generic rule, and one without blocks the tensor level, each with a warning.
    ``always_trainable`` and ``always_frozen`` override the draw for the parameters they name.

    **When**: once at the start of fit (the paper's "per stage": every ``trainer.fit`` draws anew; in
    ``on_fit_start``, or in ``on_train_start`` under ``ModelParallelStrategy``, which restores a checkpoint between
    the two), and again every ``redraw_every_n_steps`` optimizer steps and/or at the start of every
    ``redraw_every_n_epochs``-th epoch. A step re-draw happens when the next step's batch starts
    (``on_train_batch_start``), so whatever runs at the end of a step (:class:`~lit_mofo.ForgettingMonitor`,
    :class:`~lit_mofo.ParameterDrift`, ``ModelCheckpoint``) sees the weights that step produced, before any reset,
    whatever the callback order; no draw follows the last step.

    **How** (``mode``):

    - ``"freeze"``: frozen tensors get ``requires_grad=False``, so backward computes no weight gradient for them -
      HFT's training-time saving. Under DDP this needs ``strategy="ddp_find_unused_parameters_true"``.
    - ``"mask"``: every tensor keeps ``requires_grad``; the frozen ones' gradients are dropped (``grad = None``) in
      ``on_before_optimizer_step``, after DDP's all-reduce and before gradient clipping and the step, so they count
      in no clipping norm and the optimizer neither moves nor decays them nor updates their moments. Works on every
      DDP strategy; saves no compute.

    **Optimizer state** of frozen tensors (``optimizer_state``): ``"keep"`` leaves it untouched while frozen (torch
    optimizers, MoFO included, skip tensors whose ``grad`` is None), and a tensor that trains again continues from
    its old moments; ``"reset"`` deletes it (``optimizer.state.pop(p)``) whenever the tensor is frozen, so the
    optimizer holds state only for the trainable tensors and re-initialises it when one trains again. The optimizer
    must hold every parameter the module left trainable (the draw decides which of them train);
    ``configure_optimizers`` may leave out the frozen ones, e.g. by filtering on ``requires_grad``.

    **Resets** (``reset=True``): a matrix frozen at a re-draw is restored to its pre-trained value (its value at the
    start of fit), as in the paper's pilot experiment. The values come from the shared
    :class:`~lit_mofo.snapshot.PretrainedSnapshot`: one copy, on the CPU, of every tensor that a re-draw may freeze,
    in ``snapshot_dtype`` (default: the parameter's own) - for a bf16 Llama-2-7B about 13 GB of host memory per
    process (its blocks; embeddings and head are not drawn), shared with the other lit_mofo callbacks, and
    carried in the checkpoints that ``ModelCheckpoint`` writes during fit. The copy is freed at the end of fit, so a
    checkpoint written by ``trainer.save_checkpoint`` after ``fit`` returns has no pre-trained values and cannot
    resume a ``reset=True`` run.

    **Seed**: ``seed`` if given; otherwise the seed of Lightning's ``seed_everything`` (the ``PL_GLOBAL_SEED``
    variable it sets), or 0 without one. Nothing else counts - not ``torch.manual_seed`` in the module's
    ``__init__``, not the re-seeding that DDP does - so one script draws the same halves on 1 and on N processes.
    Rank zero's seed is broadcast, and the draws use their own generator, never the global RNG.

    **State**: :attr:`trainable_names`, :attr:`frozen_names` (frozen by this callback), :attr:`left_frozen_names`
    (frozen by the module), :attr:`trainable_fraction` (share of all parameters, by count, that train now) and
    :attr:`history` (one entry per draw); each draw logs ``hft/trainable_fraction`` to the trainer's loggers, a
    summary with ``rank_zero_info`` (the first draw of a fit: how much trains, and which share of the tensors it
    draws from it froze against the ``1-ratio`` asked) and, at every draw, the trainable tensors at debug level
    (logger ``lit_mofo.callbacks.half_finetuning``). ``state_dict()`` holds the selection, the counters and the
    generator state, so a run resumed from a mid-run checkpoint draws the same selections at the same steps and
    restores the ``requires_grad`` flags. At the end of fit every ``requires_grad`` flag is set back to what it was.

    **Strategies**: a single device, DDP, and FSDP2 (Lightning's ``ModelParallelStrategy`` with
    ``tensor_parallel_size=1``, the module applying ``fully_shard`` in ``configure_model`` as
    :class:`~lit_mofo.modules.CausalLMModule` does). Every rank draws the same half (rank zero's seed, the same
    generator). Under FSDP2 ``"freeze"`` sets ``requires_grad=False`` on the sharded (DTensor) parameters and FSDP2
    follows it at the next all-gather, so a frozen tensor gets no gradient, no reduce-scatter and no gradient memory
    even when it shares an FSDP unit with trainable ones; ``"mask"`` drops the frozen shards' gradients after the
    reduce-scatter. Resets copy each rank's shard of θ₀ (the snapshot holds 1/world-size of a whole copy per rank),
    the optimizer state popped by ``optimizer_state="reset"`` is the rank's shard of it, and resuming from a sharded
    checkpoint restores the selection, the flags, the optimizer states (also of tensors that have none) and θ₀.

    .. warning:: DeepSpeed, FSDP1 (``strategy="fsdp"``), tensor parallelism and XLA are refused in ``setup`` with
        the fix: DeepSpeed fixes its trainable set when its engine is built, FSDP1 flattens the tensors into slices
        (and with ``use_orig_params=True`` still allocates gradients for frozen ones). Use
        ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` or DDP.

    .. warning:: Under DDP, ``mode="freeze"`` needs ``find_unused_parameters=True`` (the strategy string
        ``"ddp_find_unused_parameters_true"``), and ``static_graph=True`` cannot follow re-draws in that mode. The
        callback freezes after DDP wrapped the model, so every parameter it may train is registered with DDP.

    Args:
        ratio: share of each category that trains, in (0, 1); the paper uses 0.5 and reports the method holding
            for 0.4-0.6.
        granularity: ``"category"`` (the paper's), ``"layer"`` or ``"tensor"``.
        mode: ``"freeze"`` (``requires_grad=False``, saves compute) or ``"mask"`` (drop gradients, any strategy).
        redraw_every_n_steps: draw anew after every this many optimizer steps; None: never.
        redraw_every_n_epochs: draw anew at the start of every this many epochs; None: never.
        reset: restore tensors frozen at a re-draw to their pre-trained values; needs a re-draw schedule.
        optimizer_state: ``"keep"`` or ``"reset"`` the optimizer state of frozen tensors (see above).
        train_embeddings: keep the embedding layers outside the blocks trainable (the paper); False freezes them.
        train_head: keep the output head trainable (the paper); False freezes it. A head tied to the input
            embeddings is an embedding.
        always_trainable: parameters that never freeze: regular expressions searched in the parameter names (as in
            ``pl_module.named_parameters()``) or role names (``attention``, ``ffn``, ``norm``, ``embedding``,
            ``head``, ``other``, see :func:`lit_mofo.blocks.parameter_roles`).
        always_frozen: parameters frozen for the whole fit, named the same way.
        seed: seeds the draws, an integer >= 0; None takes the seed of ``seed_everything`` (``PL_GLOBAL_SEED``),
            or 0 if it was not called (see **Seed** above).
        snapshot_dtype: dtype of the pre-trained copies for ``reset``: ``"float32"``, ``"bfloat16"``, ``"float16"``,
            ``"float64"`` (also as ``"torch.bfloat16"``, ``"bf16"``, ``"fp16"``, ...), a ``torch.dtype``, or None for
            each parameter's own dtype.

    Example::

        from lit_mofo.callbacks.half_finetuning import HalfFineTuning

        trainer = Trainer(callbacks=[HalfFineTuning()])  # the paper's setting: one category-level draw per fit
        trainer.fit(model)

        # redraw every 500 steps, reset re-frozen matrices to pre-trained, free re-frozen optimizer state:
        HalfFineTuning(redraw_every_n_steps=500, reset=True, optimizer_state="reset")

        # under DDP: freeze needs find_unused_parameters, mask works with plain "ddp"
        Trainer(strategy="ddp_find_unused_parameters_true", callbacks=[HalfFineTuning(mode="freeze")])
        Trainer(strategy="ddp", callbacks=[HalfFineTuning(mode="mask")])

    In a LightningCLI config::

        trainer:
          callbacks:
            - class_path: lit_mofo.HalfFineTuning
              init_args: {ratio: 0.5, mode: freeze}
    """

    def __init__(
        self,
        ratio: float = 0.5,
        granularity: Granularity = "category",
        mode: Mode = "freeze",
        redraw_every_n_steps: int | None = None,
        redraw_every_n_epochs: int | None = None,
        reset: bool = False,
        optimizer_state: OptimizerStatePolicy = "keep",
        train_embeddings: bool = True,
        train_head: bool = True,
        always_trainable: str | Sequence[str] = (),
        always_frozen: str | Sequence[str] = (),
        seed: int | None = None,
        snapshot_dtype: str | torch.dtype | None = None,
    ) -> None:
        where, error = "HalfFineTuning()", MisconfigurationException
        ratio = as_float(
            ratio,
            where=where,
            argument="ratio",
            minimum=0.0,
            maximum=1.0,
            min_inclusive=False,
            max_inclusive=False,
            fix="Give the trainable share as a number in (0, 1), e.g. 0.5 (the paper's; it reports 0.4-0.6 working). "
            "For full fine-tuning remove the callback.",
            error=error,
        )
        self.granularity: Granularity = as_choice(
            granularity, where=where, argument="granularity", choices=GRANULARITIES, error=error
        )
        self.mode: Mode = as_choice(
            mode,
            where=where,
            argument="mode",
            choices=MODES,
            fix="'freeze' sets requires_grad=False (saves compute), 'mask' drops gradients before the optimizer step "
            "(works on every strategy).",
            error=error,
        )
        self.optimizer_state: OptimizerStatePolicy = as_choice(
            optimizer_state, where=where, argument="optimizer_state", choices=OPTIMIZER_STATE_POLICIES, error=error
        )
        self.redraw_every_n_steps = self._every("redraw_every_n_steps", redraw_every_n_steps)
        self.redraw_every_n_epochs = self._every("redraw_every_n_epochs", redraw_every_n_epochs)
        self.reset = as_bool(reset, where=where, argument="reset", error=error)
        self.train_embeddings = as_bool(train_embeddings, where=where, argument="train_embeddings", error=error)
        self.train_head = as_bool(train_head, where=where, argument="train_head", error=error)
        if self.reset and not self._redraws:
            raise MisconfigurationException(
                "`HalfFineTuning(reset=True)` restores matrices to their pre-trained values when a re-draw freezes "
                "them, but neither `redraw_every_n_steps` nor `redraw_every_n_epochs` is set, so nothing would ever "
                "be reset. Set one of them (e.g. `redraw_every_n_steps=500`), or drop `reset=True`."
            )
        self.seed = (
            None
            if seed is None
            else as_int(
                seed,
                where=where,
                argument="seed",
                minimum=0,
                fix="Or None for the seed of `seed_everything` (0 without one).",
                error=error,
            )
        )
        self._always_trainable = self._patterns("always_trainable", always_trainable)
        self._always_frozen = self._patterns("always_frozen", always_frozen)
        both = sorted(set(self._always_trainable) & set(self._always_frozen))
        if both:
            raise MisconfigurationException(
                f"`HalfFineTuning`: {both} are in both `always_trainable` and `always_frozen`; keep each in one."
            )
        self.ratio = ratio
        self.snapshot_dtype = as_dtype(snapshot_dtype, where=where, argument="snapshot_dtype", error=error)

        # Fixed for one fit, rebuilt in on_fit_start.
        self._layout: ModelLayout | None = None
        self._effective_granularity: Granularity = granularity
        self._plan: dict[str, Any] = {}
        self._params: dict[str, nn.Parameter] = {}
        self._numel_total = 0
        self._fixed_frozen: set[str] = set()
        self._fixed_trainable: set[str] = set()
        self._original_requires_grad: dict[str, bool] = {}
        self._managed: tuple[str, ...] = ()  # the tensors the module left trainable: the ones the callback draws among
        self._frozen_params: list[nn.Parameter] = []
        self._snapshot: PretrainedSnapshot | None = None
        # Carried by state_dict().
        self._resolved_seed: int | None = None
        self._generator: torch.Generator | None = None
        self._frozen: tuple[str, ...] = ()
        self._draws = 0
        self._last_draw_step = -1
        self._last_draw_epoch = -1
        self._history: list[dict[str, float | int]] = []
        self._restored = False
        self._adapter = StrategyAdapter("single")
        self._awaiting_checkpoint = False  # the strategy restores checkpoints after on_fit_start: start later

    @staticmethod
    def _every(argument: str, every: int | None) -> int | None:
        if every is None:
            return None
        return as_int(
            every,
            where="HalfFineTuning()",
            argument=argument,
            minimum=1,
            fix="Give a positive integer, or None to never re-draw.",
            error=MisconfigurationException,
        )

    @staticmethod
    def _patterns(argument: str, patterns: str | Sequence[str]) -> tuple[str, ...]:
        checked = as_patterns(
            patterns, where="HalfFineTuning()", argument=argument, vocabulary=ROLES, error=MisconfigurationException
        )
        return checked or ()

    # ------------------------------------------------------------------ public state
    @property
    def frozen_names(self) -> tuple[str, ...]:
        """Names (as in ``pl_module.named_parameters()``) of the tensors this callback keeps frozen now: the draw,
        ``always_frozen`` and ``train_embeddings``/``train_head=False``. The module's own frozen tensors are in
        :attr:`left_frozen_names`."""
        return self._frozen

    @property
    def left_frozen_names(self) -> tuple[str, ...]:
        """Names of the tensors the module had frozen (``requires_grad=False``) at the start of fit: the callback
        leaves them frozen and out of every draw."""
        managed = set(self._managed)
        return tuple(name for name in self._params if name not in managed)

    @property
    def trainable_names(self) -> tuple[str, ...]:
        """Names of the tensors that train now (empty before the first draw)."""
        frozen = set(self._frozen)
        return tuple(name for name in self._managed if name not in frozen)

    @property
    def trainable_fraction(self) -> float:
        """Share of all the module's parameters (by count of entries) that train now; the tensors the module froze
        itself count as not training."""
        if not self._numel_total:
            return 1.0
        return sum(self._params[name].numel() for name in self.trainable_names) / self._numel_total

    @property
    def history(self) -> list[dict[str, float | int]]:
        """One entry per draw: ``draw``, ``step``, ``epoch``, ``trainable_fraction``, ``frozen_tensors`` (frozen by
        this callback) and ``drawn_frozen_fraction`` (the share, by count of entries, of the tensors it draws from
        that this draw froze; the target is ``1 - ratio``)."""
        return [dict(entry) for entry in self._history]

    @property
    def layout(self) -> ModelLayout | None:
        """The layout found at the start of fit (None before)."""
        return self._layout

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._adapter = adapter = StrategyAdapter.of(trainer, user="HalfFineTuning")
        if is_peft_model(pl_module):
            raise MisconfigurationException(
                f"HalfFineTuning does not work on a PEFT model ({type(pl_module).__name__} holds adapter layers): it "
                "freezes half of each block's pre-trained matrices, and under PEFT those are all frozen already, "
                "only the adapters train. Either fine-tune the full model with HalfFineTuning (drop `peft`), or train "
                "the adapters without it (with MoFO, say, whose filter then works over the adapter tensors)."
            )
        # Under FSDP2 a resumed fit must restore optimizers without state for the tensors frozen since the
        # optimizer was built (a no-op for the other strategies).
        adapter.guard_optimizer_restore(trainer)
        name = type(trainer.strategy).__name__
        ddp_options = adapter.ddp_options  # empty unless DDP
        if adapter.kind == "ddp" and self.mode == "freeze":
            if not ddp_options.get("find_unused_parameters", False):
                raise MisconfigurationException(
                    f'HalfFineTuning(mode="freeze") under {name} without `find_unused_parameters=True`: DDP would '
                    "wait for gradients of the frozen tensors and fail. Use "
                    '`Trainer(strategy="ddp_find_unused_parameters_true")` (or `DDPStrategy(find_unused_parameters='
                    'True)`), or `HalfFineTuning(mode="mask")`, which works with plain `strategy="ddp"`.'
                )
            if ddp_options.get("static_graph", False) and self._redraws:
                raise MisconfigurationException(
                    'HalfFineTuning(mode="freeze") re-draws the trainable set, which `static_graph=True` of '
                    f"{name} does not allow. Drop `static_graph`, drop the re-draw schedule, or use "
                    '`HalfFineTuning(mode="mask")`.'
                )
        others = [cb for cb in trainer.callbacks if isinstance(cb, HalfFineTuning) and cb is not self]
        if others:
            raise MisconfigurationException(
                "Two HalfFineTuning callbacks on one Trainer would fight over the same tensors; keep one."
            )

    @property
    def _redraws(self) -> bool:
        return self.redraw_every_n_steps is not None or self.redraw_every_n_epochs is not None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The module's own choice of what trains, recorded before any flag changes; the other lit_mofo callbacks
        # read the same record (lit_mofo.params.initial_requires_grad), whichever runs first.
        check_trainable(pl_module, where="HalfFineTuning", error=MisconfigurationException)
        self._original_requires_grad = record_initial_requires_grad(pl_module)
        self._params = StrategyAdapter.named_parameters(pl_module)  # FSDP2: the sharded parameters
        self._managed = tuple(name for name, trainable in self._original_requires_grad.items() if trainable)
        self._numel_total = sum(p.numel() for p in self._params.values())
        self._build_plan(pl_module)
        self._check_optimizers(trainer)
        self._report_left_frozen()

        if self.reset:
            self._snapshot = PretrainedSnapshot.attach(pl_module, owner=self)
            self._snapshot.capture(trainer, pl_module, self._resettable_names(), dtype=self.snapshot_dtype)

        if self._adapter.restores_after_fit_start(trainer):
            # ModelParallelStrategy restores a checkpoint (optimizer states, then this callback's state) only after
            # on_fit_start, and nothing tells here whether one follows: resume or draw in on_train_start.
            self._awaiting_checkpoint = True
            return
        self._start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._awaiting_checkpoint:
            self._awaiting_checkpoint = False
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Continue the checkpoint's selection if there was one, else make this fit's first draw."""
        if self._restored:
            self._restored = False
            unknown = [name for name in self._frozen if name not in self._params]
            if unknown:
                raise MisconfigurationException(
                    f"The checkpoint's HalfFineTuning selection names {unknown[:3]}, which are not parameters of "
                    f"{type(pl_module).__name__}; resume with the model that wrote the checkpoint."
                )
            left_frozen = set(self.left_frozen_names)
            self._frozen = tuple(name for name in self._frozen if name not in left_frozen)
            self._apply(trainer, newly_frozen=())
            rank_zero_info(
                f"HalfFineTuning: resumed draw {self._draws} (step {self._last_draw_step}); "
                f"{self.trainable_fraction:.1%} of the parameters train."
            )
            return

        if self._generator is None:
            seed = self.seed if self.seed is not None else _default_seed()
            self._resolved_seed = int(trainer.strategy.broadcast(seed, src=0))
            self._generator = torch.Generator().manual_seed(self._resolved_seed)
        self._frozen = ()  # a new fit is a new stage: draw anew, with the generator continuing
        self._draw(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The draw for the steps from `global_step` on, made when their first batch starts: what runs at the end of
        # the previous step (measurements, checkpoints) saw that step's weights in either callback order, and a
        # checkpoint written there resumes into this same draw. The epoch schedule is checked here too, not in
        # on_train_epoch_start: Lightning skips that hook for the epoch after a checkpoint written at the last batch
        # of the previous one, so a resumed run would miss the draw.
        step, epoch = trainer.global_step, trainer.current_epoch
        if step == self._last_draw_step:
            return
        by_steps, by_epochs = self.redraw_every_n_steps, self.redraw_every_n_epochs
        step_due = by_steps is not None and step > 0 and step % by_steps == 0
        epoch_due = by_epochs is not None and epoch > 0 and epoch % by_epochs == 0 and epoch != self._last_draw_epoch
        if not (step_due or epoch_due):
            return
        self._draw(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # After backward and DDP's all-reduce, before gradient clipping and the step. In "freeze" mode the frozen
        # tensors have no gradient already; dropping any left over is free and keeps the optimizer off them.
        for param in self._frozen_params:
            param.grad = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(trainer, pl_module)

    def _release(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End of fit: give back the ``requires_grad`` flags as they were and the hold on the snapshot."""
        for name, requires_grad in self._original_requires_grad.items():
            self._params[name].requires_grad_(requires_grad)
        if self._original_requires_grad:
            forget_initial_requires_grad(pl_module)
            self._adapter.refresh_after_requires_grad_change(pl_module)  # FSDP2 units train as before the fit
        self._original_requires_grad = {}
        self._frozen_params = []
        self._awaiting_checkpoint = False
        self._adapter.release_optimizer_restore_guard(trainer)
        if self._snapshot is not None or PretrainedSnapshot.get(pl_module) is not None:
            PretrainedSnapshot.detach(pl_module, owner=self)
            self._snapshot = None

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._snapshot is not None:
            PretrainedSnapshot.save_to(pl_module, checkpoint, trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.reset:
            PretrainedSnapshot.on_load_checkpoint(pl_module, checkpoint, owner=self, trainer=trainer)
            self._snapshot = PretrainedSnapshot.get(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self._resolved_seed,
            "generator": None if self._generator is None else self._generator.get_state(),
            "frozen": list(self._frozen),
            "draws": self._draws,
            "last_draw_step": self._last_draw_step,
            "last_draw_epoch": self._last_draw_epoch,
            "history": self.history,
            "config": self._config(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["config"] != self._config():
            rank_zero_warn(
                f"HalfFineTuning: the checkpoint's selection was drawn with {state_dict['config']}, this callback "
                f"has {self._config()}; the resumed run keeps the checkpoint's selection and draws the next ones "
                "with this callback's settings."
            )
        self._resolved_seed = state_dict["seed"]
        self._generator = None
        if state_dict["generator"] is not None:
            self._generator = torch.Generator()
            self._generator.set_state(state_dict["generator"])
        self._frozen = tuple(state_dict["frozen"])
        self._draws = state_dict["draws"]
        self._last_draw_step = state_dict["last_draw_step"]
        self._last_draw_epoch = state_dict["last_draw_epoch"]
        self._history = [dict(entry) for entry in state_dict["history"]]
        self._restored = True

    def _config(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "granularity": self.granularity,
            "train_embeddings": self.train_embeddings,
            "train_head": self.train_head,
            "always_trainable": list(self._always_trainable),
            "always_frozen": list(self._always_frozen),
        }

    # ------------------------------------------------------------------ the plan: what can be drawn
    def _build_plan(self, pl_module: pl.LightningModule) -> None:
        layout = self._layout = detect_layout(pl_module)
        granularity = self.granularity
        if layout.architecture == "none":
            granularity = "tensor"
            rank_zero_warn(
                f"HalfFineTuning found no transformer blocks in {type(pl_module).__name__} (no nn.ModuleList of "
                "repeated modules with 2+ weight matrices each), so it freezes whole tensors at random until about "
                f"{1 - self.ratio:.0%} of their parameters are frozen (tensor level) instead of {self.granularity!r} "
                "level; each draw's summary gives the share it reached."
            )
        elif layout.architecture == "generic":
            first = layout.blocks[0]
            rank_zero_warn(
                f"HalfFineTuning did not recognise the blocks of {type(pl_module).__name__} by name, so it uses the "
                f"generic rule: {len(layout.blocks)} blocks ({first.name!r}, ...), attention = matrices under a child "
                f"named *attn*/*attention* ({len(first.attention)} in the first block: {list(first.attention)}), "
                f"FFN = the other matrices ({len(first.ffn)}: {list(first.ffn)}), {len(first.norm_modules)} norm "
                "layers. Check that this is what you meant, or name tensors in always_trainable/always_frozen."
            )
        self._effective_granularity = granularity

        managed = set(self._managed)

        def trainable(names: Iterable[str]) -> Unit:
            return tuple(name for name in names if name in managed)

        block_units: list[dict[str, list[Unit]]] = []
        for block in layout.blocks:
            biases = {bias for _, bias in block.biases}
            units = {
                "attention": [trainable((matrix, *block.bias_of(matrix))) for matrix in block.attention],
                "ffn": [trainable((matrix, *block.bias_of(matrix))) for matrix in block.ffn],
                "norm": [trainable(group) for group in block.norm_modules],
                "rest": [trainable((name,)) for name in block.other if name not in biases],
            }
            # A unit the module froze entirely is not drawn: the shares count the trainable ones.
            block_units.append({key: [unit for unit in values if unit] for key, values in units.items()})
        if granularity == "category":
            self._plan = {category: [units[category] for units in block_units] for category in _CATEGORIES}
        elif granularity == "layer":
            layers = [trainable(block.parameters) for block in layout.blocks]
            self._plan = {"units": [unit for unit in layers if unit]}
        else:
            units = [unit for units in block_units for key in (*_CATEGORIES, "rest") for unit in units[key]]
            by_module: dict[str, list[str]] = {}
            for name in trainable(layout.other):
                by_module.setdefault(name.rpartition(".")[0], []).append(name)
            units.extend(tuple(names) for names in by_module.values())
            self._plan = {"units": units}

        roles = layout.roles()
        self._fixed_trainable = self._match("always_trainable", self._always_trainable, roles) & managed
        self._fixed_frozen = self._match("always_frozen", self._always_frozen, roles) & managed
        if not self.train_embeddings:
            self._fixed_frozen.update(trainable(layout.embeddings))
        if not self.train_head:
            self._fixed_frozen.update(trainable(layout.head))
        self._fixed_trainable -= self._fixed_frozen
        if not self._drawable_names() - self._fixed_trainable - self._fixed_frozen:
            rank_zero_warn(
                f"HalfFineTuning has nothing to draw in {type(pl_module).__name__}: none of the tensors it draws from "
                f"({self._effective_granularity} level) is trainable and outside always_trainable/always_frozen, so "
                "it freezes only what always_frozen / train_embeddings=False / train_head=False name. Unfreeze the "
                "blocks to fine-tune them with HFT, or drop the callback."
            )

    def _match(self, argument: str, patterns: Iterable[str], roles: dict[str, str]) -> set[str]:
        matched: set[str] = set()
        unmatched: list[str] = []
        for pattern in patterns:
            names = {name for name in self._params if matches(pattern, name, roles.get(name, "other"), ROLES)}
            if not names:
                unmatched.append(pattern)
            matched |= names
        if unmatched:
            raise MisconfigurationException(
                unmatched_patterns_message(
                    unmatched, where="HalfFineTuning()", argument=argument, vocabulary=ROLES, names=list(self._params)
                )
                + f" Roles present: {sorted(set(roles.values()))}."
            )
        return matched

    def _drawable_names(self) -> set[str]:
        if self._effective_granularity == "category":
            units = [unit for category in _CATEGORIES for per_block in self._plan[category] for unit in per_block]
        else:
            units = self._plan["units"]
        return {name for unit in units for name in unit}

    def _resettable_names(self) -> list[str]:
        names = self._drawable_names() - self._fixed_trainable - self._fixed_frozen
        if not names:
            raise MisconfigurationException(
                "`HalfFineTuning(reset=True)`: no tensor can be frozen by a re-draw (everything drawable is in "
                "always_trainable/always_frozen or frozen by the module), so there is nothing to reset. Drop "
                "`reset=True`."
            )
        unsnapshotable = [name for name in names if self._params[name].is_meta]
        if unsnapshotable:
            raise MisconfigurationException(
                f"`HalfFineTuning(reset=True)` needs a copy of each tensor it may reset, but {unsnapshotable[0]!r} is "
                "a meta parameter (no values yet). Materialise the model before fit (Lightning's `configure_model`), "
                "or drop `reset=True`."
            )
        return [name for name in self._params if name in names]

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
        in_optimizer = {
            id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]
        }
        missing = [
            name
            for name in self._managed
            if id(self._params[name]) not in in_optimizer and name not in self._fixed_frozen
        ]
        if not missing:
            return
        raise MisconfigurationException(
            f"HalfFineTuning draws among the trainable parameters, but {len(missing)} of them (requires_grad=True at "
            f"the start of fit) are in no optimizer (e.g. {missing[0]!r}), so whichever half it picked would not be "
            "the half that trains. Pass every trainable parameter to the optimizer (`self.parameters()`, or those "
            "with `requires_grad`: frozen tensors get no gradient, so the optimizer leaves them alone); freeze the "
            "ones that should not train (`requires_grad_(False)` before fit: the callback leaves them frozen), or "
            "name them in `always_frozen`."
        )

    def _report_left_frozen(self) -> None:
        left_frozen = self.left_frozen_names
        if not left_frozen:
            return
        numel = sum(self._params[name].numel() for name in left_frozen)
        shown = ", ".join(repr(name) for name in left_frozen[:5]) + (
            f", ... ({len(left_frozen) - 5} more)" if len(left_frozen) > 5 else ""
        )
        rank_zero_info(
            f"HalfFineTuning leaves alone the {len(left_frozen)} of {len(self._params)} parameter tensors "
            f"({numel / self._numel_total:.1%} of the parameters) that had requires_grad=False at the start of fit: "
            f"{shown}. They stay frozen and out of every draw, which picks among the other {len(self._managed)}."
        )

    # ------------------------------------------------------------------ drawing and applying
    def _draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._generator is not None
        share = 1.0 - self.ratio
        if self._effective_granularity == "category":
            drawn = [unit for category in _CATEGORIES for unit in _spread(self._plan[category], share, self._generator)]
        elif self._effective_granularity == "tensor":
            units = self._plan["units"]
            sizes = [sum(self._params[name].numel() for name in unit) for unit in units]
            drawn = _by_size(units, sizes, share, self._generator)
        else:
            units = self._plan["units"]
            count = _round_half_up(len(units) * share)
            drawn = [units[i] for i in torch.randperm(len(units), generator=self._generator)[:count].tolist()]
        frozen = ({name for unit in drawn for name in unit} | self._fixed_frozen) - self._fixed_trainable
        previous = set(self._frozen)
        self._frozen = tuple(name for name in self._managed if name in frozen)
        first = self._draws == 0 or not previous
        self._draws += 1
        self._last_draw_step = trainer.global_step
        self._last_draw_epoch = trainer.current_epoch
        newly_frozen = () if first else tuple(name for name in self._frozen if name not in previous)
        self._apply(trainer, newly_frozen=newly_frozen)

        fraction = self.trainable_fraction
        pool = self._drawable_names() - self._fixed_trainable - self._fixed_frozen
        drawable_numel = sum(self._params[name].numel() for name in pool)
        drawn_frozen = sum(self._params[name].numel() for name in pool & frozen)
        drawn_frozen_fraction = drawn_frozen / drawable_numel if drawable_numel else 0.0
        entry: dict[str, float | int] = {
            "draw": self._draws,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "trainable_fraction": fraction,
            "frozen_tensors": len(self._frozen),
            "drawn_frozen_fraction": drawn_frozen_fraction,
        }
        self._history.append(entry)
        for logger in trainer.loggers:
            logger.log_metrics({"hft/trainable_fraction": fraction, "hft/draw": self._draws}, step=trainer.global_step)
        left_frozen = len(self._params) - len(self._managed)
        summary = (
            f"HalfFineTuning draw {self._draws} at step {trainer.global_step} ({self._effective_granularity} level, "
            f"{self._layout.architecture if self._layout else '?'} layout): {fraction:.1%} of the parameters train; "
            f"it froze {len(self._frozen)} of the {len(self._managed)} trainable tensors"
            + (f" ({left_frozen} more were frozen by the module)" if left_frozen else "")
            + f", {drawn_frozen_fraction:.1%} of the parameters it draws from ({1 - self.ratio:.0%} asked"
            + (", by matrix count per category)." if self._effective_granularity == "category" else ").")
        )
        if first:
            rank_zero_info(summary)
        if trainer.is_global_zero and log.isEnabledFor(logging.DEBUG):
            log.debug("%s Trainable: %s", summary, list(self.trainable_names))

    def _apply(self, trainer: pl.Trainer, newly_frozen: Sequence[str]) -> None:
        """Make the current selection real: reset weights, optimizer state and ``requires_grad`` flags.

        Only the tensors the module left trainable are touched; in ``"mask"`` mode no flag changes at all.
        """
        frozen = set(self._frozen)
        if self.reset and newly_frozen:
            assert self._snapshot is not None
            resettable = [name for name in newly_frozen if name in self._snapshot]
            self._snapshot.restore(self._unwrapped_module(trainer), resettable)
        if self.optimizer_state == "reset":
            for optimizer in trainer.optimizers:
                for name in self._frozen:
                    optimizer.state.pop(self._params[name], None)
        if self.mode == "freeze":
            for name in self._managed:
                self._params[name].requires_grad_(name not in frozen)
            # FSDP2 fixed its units' gradient dtypes at their first forward: let an unfrozen unit have them again.
            self._adapter.refresh_after_requires_grad_change(self._unwrapped_module(trainer))
        self._frozen_params = [self._params[name] for name in self._frozen]

    @staticmethod
    def _unwrapped_module(trainer: pl.Trainer) -> pl.LightningModule:
        return trainer.lightning_module


def _default_seed() -> int:
    """The seed of ``seed_everything`` (Lightning records it in ``PL_GLOBAL_SEED`` for its worker processes), else 0."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", "0")) % 2**63
    except ValueError:
        return 0
