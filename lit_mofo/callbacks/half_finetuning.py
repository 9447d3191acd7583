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
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lit_mofo._validation import as_bool, as_choice, as_dtype, as_float, as_int
from lit_mofo.adapters import is_peft_model
from lit_mofo.blocks import UNIT_CATEGORIES, ModelLayout, detect_layout, split_part
from lit_mofo.params import (
    check_patterns,
    check_trainable,
    forget_initial_requires_grad,
    matching_patterns,
    parameter_words,
    record_initial_requires_grad,
    warn_unmatched,
)
from lit_mofo.snapshot import PretrainedSnapshot, StageStartSnapshot
from lit_mofo.strategy import StrategyAdapter

__all__ = ["HalfFineTuning", "stage_seed"]

log = logging.getLogger(__name__)

Granularity = Literal["category", "layer", "tensor"]
Mode = Literal["freeze", "mask"]
OptimizerStatePolicy = Literal["keep", "reset"]
ResetTarget = Literal["pretrained", "stage_start"]

GRANULARITIES: tuple[str, ...] = ("category", "layer", "tensor")
MODES: tuple[str, ...] = ("freeze", "mask")
OPTIMIZER_STATE_POLICIES: tuple[str, ...] = ("keep", "reset")
RESET_TARGETS: tuple[str, ...] = ("pretrained", "stage_start")
_CATEGORIES = UNIT_CATEGORIES  # attention, ffn, experts, ssm, norm

# Parameter names (or expert slices "name[e]", lit_mofo.blocks.split_part) frozen and unfrozen together: a matrix
# and its bias, a norm group, one expert of a fused expert tensor.
Unit = tuple[str, ...]


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
      block ``b`` freezes ``floor(n·(1-ratio))`` or one more of its ``n`` units, spread so the model-wide total
      is ``round(Σ n·(1-ratio))``. The units and categories come from :meth:`lit_mofo.blocks.Block.units`, one rule
      for every layout (the table of :data:`lit_mofo.blocks.LAYOUT_TABLE`, rendered in the README):

      - **attention**: each attention matrix with its bias - self- and cross-attention together (a BART or T5
        decoder block trains 4 of its 8), fused ones whole (GPT-2's ``c_attn``, NeoX/Falcon/Bloom's
        ``query_key_value``, Phi-3's ``qkv_proj``, MPT's ``Wqkv``: 1 of 2, so such a block trains 3/4 or 1/4 of
        its attention weights), DeepSeek's MLA projections (2 or 3 of 5);
      - **FFN**: each dense FFN matrix with its bias (Llama's gate/up/down, shared experts included);
      - **experts** (fused 3-D expert tensors of transformers >= 5, ``experts.gate_up_proj`` ``[E, 2F, H]`` and
        ``experts.down_proj`` ``[E, H, F]``): one unit per expert - its slice of every tensor of the ``experts``
        module, 2-D biases (GPT-OSS) included - so half of each block's experts are frozen, whole, and with them
        exactly half of its expert parameters; see **Mixture of experts** below;
      - **SSM**: each projection of a state-space layer (Mamba's ``in_proj``, ``x_proj``, ``dt_proj``,
        ``out_proj``; Mamba-2's ``in_proj``, ``out_proj``; RecurrentGemma's ``linear_x/y/out``), so a hybrid
        (Jamba, Zamba2) draws its attention layers among attention matrices and its Mamba layers among SSM ones;
      - **norms**: the block norms grouped by side - the attention side (self- and cross-attention) and the FFN
        side - and one group frozen per block ("1 of the 2 norms": Gemma 2/3's ``input`` and
        ``post_attention_layernorm`` freeze together, their ``pre``/``post_feedforward_layernorm`` together).
        Extra norms follow the matrix they normalise: Qwen3/OLMo 2/Gemma 3's ``q_norm``/``k_norm`` freeze with
        ``q_proj``/``k_proj``, MLA's ``q_a_layernorm``/``kv_a_layernorm`` with ``q_a_proj``/``kv_a_proj_with_mqa``,
        Mamba-2's gated norm with ``out_proj``.

      Routers (and a shared-expert gate), the state-space core (``A_log``, ``D``, ``dt_bias``, ``conv1d``), attention
      sinks and anything else a block holds that is in no unit (an adapter) stay trainable; T5's relative position
      bias is an embedding. A block whose matrices no row of the table names gets the generic rule (attention =
      matrices under a child named ``*attn*``/``*attention*``, FFN = the rest) with a warning.
    - ``"layer"``: ``round(B·(1-ratio))`` of the ``B`` blocks are frozen whole.
    - ``"tensor"``: whole units (a matrix with its bias, a norm group, an expert's slices, any other parameter
      outside the embeddings and head), anywhere in the model, chosen at random until about ``1-ratio`` of their
      parameters (by entry count, not by tensor count) are frozen: the share misses the target by at most half of
      the largest unit, and each draw's summary states the share it reached.

    Embeddings and the output head (not tied to the embeddings) are trainable unless ``train_embeddings`` /
    ``train_head`` is False; the rest outside the blocks (final norm, pooler, ...) is trainable. Every block stack
    counts (an encoder and a decoder, see :func:`lit_mofo.blocks.detect_layout`), and so does every layer of a
    hybrid's mixed layer list. A model whose blocks are not recognised by name gets the generic rule, and one without
    blocks the tensor level, each with a warning. ``always_trainable`` and ``always_frozen`` override the draw for
    the parameters they name (whole tensors: naming a fused expert tensor freezes or trains all of its experts).

    **Mixture of experts.** ``requires_grad`` is per tensor, so a frozen expert is a slice of a tensor that trains. In
    both modes its rows of the gradient are zeroed in ``on_before_optimizer_step`` (so no clipping norm counts them),
    its rows of the weights are copied there and written back right after ``optimizer.step()`` (an optimizer
    step post-hook): weight decay, momentum or any other rule of any optimizer cannot move them, and a frozen slice
    stays bit-identical like a frozen matrix, on one device, under DDP and under FSDP2 (where each rank handles the
    rows of its shard). The cost: the gradient of the whole tensor is computed (``"freeze"`` saves nothing on it),
    and every step copies the frozen rows twice (transient memory: the frozen experts' weights, plus their
    optimizer state under ``optimizer_state="keep"``). ``optimizer_state="keep"`` puts the frozen rows of every
    optimizer state tensor shaped like the parameter (Adam's moments) back after each step as well, so they do not
    decay while frozen; ``"reset"`` zeroes them when the expert is frozen and after every step (the state of a fresh
    optimizer; the tensor's step count, which Adam's bias correction uses, is shared by its experts).
    ``reset=True`` restores a newly frozen expert's slices to their pre-trained values. The router trains: it is a
    tiny part of the layer and decides which experts a token uses, so it can route around the frozen half. With
    MoFO, whose filter ranks a whole tensor, a frozen expert's kept moments (``"keep"``) count in its top-k;
    ``"reset"`` leaves them out.

    **When**: once at the start of fit (the paper's "per stage": every ``trainer.fit`` draws anew; in
    ``on_fit_start``, or in ``on_train_start`` under ``ModelParallelStrategy``, which restores a checkpoint between
    the two), and again every ``redraw_every_n_steps`` optimizer steps and/or at the start of every
    ``redraw_every_n_epochs``-th epoch. A step re-draw happens when the next step's batch starts
    (``on_train_batch_start``), so whatever runs at the end of a step (:class:`~lit_mofo.ForgettingMonitor`,
    :class:`~lit_mofo.ParameterDrift`, ``ModelCheckpoint``) sees the weights that step produced, before any reset,
    whatever the callback order; no draw follows the last step.

    **Continual runs** (:mod:`lit_mofo.continual`: the stages of one fit): a new category-level draw at the start of
    every stage, as the paper draws anew for every stage of a sequence (``redraw_every_stage``; False keeps the
    previous stage's half). Stage 1 draws with the seed itself, exactly as a plain fit does; stage ``k >= 2`` with a
    generator seeded by a hash of (seed, ``k``) — the same halves on every rerun and every process, and each stage's
    draw independent of how many re-draws earlier stages made. The step/epoch re-draws within a stage continue that
    stage's generator. ``reset=True`` restores the tensors a stage's draw newly freezes (the stage boundary counts as a
    re-draw) to ``reset_to``: ``"pretrained"`` (θ₀, the weights before stage 1: the paper's reset to the pre-trained
    model) or ``"stage_start"`` (the weights the current stage started from, the
    :class:`~lit_mofo.snapshot.StageStartSnapshot`: a re-draw within a stage undoes only that stage's update of the
    tensors it freezes; at the boundary itself nothing changes).

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

    **State**: :attr:`trainable_names`, :attr:`frozen_names` (frozen by this callback), :attr:`frozen_slices` (frozen
    experts of fused expert tensors), :attr:`left_frozen_names`
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
        reset: restore tensors frozen at a re-draw to their ``reset_to`` values; needs a re-draw schedule (or, in a
            continual run, ``redraw_every_stage=True``).
        reset_to: what ``reset`` restores: ``"pretrained"`` (θ₀, the paper's; in a continual run the weights before
            stage 1) or ``"stage_start"`` (the weights at the start of the current stage of a continual run; at the
            start of fit otherwise).
        redraw_every_stage: in a continual run, draw a new half at the start of every stage (None or True, the
            paper's) or keep the previous stage's half (False). Ignored outside a continual run.
        optimizer_state: ``"keep"`` or ``"reset"`` the optimizer state of frozen tensors (see above).
        train_embeddings: keep the embeddings trainable (the paper; those outside the blocks and T5's relative
            position bias); False freezes them.
        train_head: keep the output head trainable (the paper); False freezes it. A head tied to the input
            embeddings is an embedding.
        always_trainable: parameters that never freeze: a pattern or a list of them, each a word of
            :data:`lit_mofo.params.WORDS` - a role (``attention``, ``ffn``, ``router``, ``ssm``, ``norm``,
            ``embedding``, ``head``, ``other``, see :func:`lit_mofo.blocks.parameter_roles`) or a kind (``weight``,
            ``bias``) - or a regular expression written ``"re:<regex>"``, searched in the parameter names (as in
            ``pl_module.named_parameters()``); see :mod:`lit_mofo.params`. A pattern that names no parameter is
            warned about.
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
        reset_to: ResetTarget = "pretrained",
        redraw_every_stage: bool | None = None,
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
        self.reset_to: ResetTarget = as_choice(
            reset_to,
            where=where,
            argument="reset_to",
            choices=RESET_TARGETS,
            fix="'pretrained' restores θ₀ (the paper's), 'stage_start' the weights the current stage started from.",
            error=error,
        )
        self.redraw_every_stage = (
            None
            if redraw_every_stage is None
            else as_bool(redraw_every_stage, where=where, argument="redraw_every_stage", error=error)
        )
        if self.reset and not self._redraws and self.redraw_every_stage is not True:
            raise MisconfigurationException(
                "`HalfFineTuning(reset=True)` restores matrices to their pre-trained values when a re-draw freezes "
                "them, but neither `redraw_every_n_steps` nor `redraw_every_n_epochs` is set, so nothing would ever "
                "be reset. Set one of them (e.g. `redraw_every_n_steps=500`), or in a continual run (lit_mofo."
                "continual) `redraw_every_stage=True` to reset at every stage start, or drop `reset=True`."
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
        self._sliced: list[tuple[nn.Parameter, Tensor]] = []  # partially frozen tensors: (parameter, its local rows)
        self._pending: RemovableHandle | None = None  # the step post-hook that restores the frozen slices
        self._saved: list[tuple[Tensor, Tensor, Tensor]] = []  # (local tensor, rows, their values before the step)
        self._snapshot: PretrainedSnapshot | None = None
        self._snapshot_class: type[PretrainedSnapshot] = (
            StageStartSnapshot if self.reset_to == "stage_start" else PretrainedSnapshot
        )
        self._continual = False  # a lit_mofo.continual run: stage starts are draws
        self._stage = 0  # the stage the current selection was drawn for
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
        checked = check_patterns(patterns, where="HalfFineTuning()", argument=argument, error=MisconfigurationException)
        return checked or ()

    # ------------------------------------------------------------------ public state
    @property
    def frozen_names(self) -> tuple[str, ...]:
        """Names (as in ``pl_module.named_parameters()``) of the tensors this callback keeps frozen now, whole: the
        draw, ``always_frozen`` and ``train_embeddings``/``train_head=False``. The module's own frozen tensors are in
        :attr:`left_frozen_names`, frozen experts of fused expert tensors in :attr:`frozen_slices`."""
        return tuple(part for part in self._frozen if split_part(part)[1] is None)

    @property
    def frozen_slices(self) -> dict[str, tuple[int, ...]]:
        """Fused expert tensors with frozen experts: name -> the frozen experts (indices along dimension 0). The
        tensor trains; those slices of it stay exactly as they are (see **Mixture of experts** above)."""
        slices: dict[str, list[int]] = {}
        for part in self._frozen:
            name, index = split_part(part)
            if index is not None:
                slices.setdefault(name, []).append(index)
        return {name: tuple(indices) for name, indices in slices.items()}

    @property
    def left_frozen_names(self) -> tuple[str, ...]:
        """Names of the tensors the module had frozen (``requires_grad=False``) at the start of fit: the callback
        leaves them frozen and out of every draw."""
        managed = set(self._managed)
        return tuple(name for name in self._params if name not in managed)

    @property
    def trainable_names(self) -> tuple[str, ...]:
        """Names of the tensors that train now, in whole or in part (a fused expert tensor with frozen experts
        trains its other experts); empty before the first draw."""
        frozen = set(self._frozen)
        return tuple(name for name in self._managed if name not in frozen)

    @property
    def resettable_names(self) -> tuple[str, ...]:
        """Names of the tensors a draw decides about (the drawable tensors outside ``always_trainable`` and
        ``always_frozen``): the ones a re-draw can freeze, so the ones whose values ``reset=True`` keeps a copy of
        and restores. Known from the start of fit (empty before), with or without ``reset``."""
        if not self._plan:
            return ()
        names = {split_part(part)[0] for part in self._pool()}
        return tuple(name for name in self._params if name in names)

    @property
    def trainable_fraction(self) -> float:
        """Share of all the module's parameters (by count of entries) that train now; the tensors the module froze
        itself count as not training, a frozen expert's slice as frozen."""
        if not self._numel_total:
            return 1.0
        managed = sum(self._params[name].numel() for name in self._managed)
        return (managed - self._numel(self._frozen)) / self._numel_total

    def _numel(self, parts: Iterable[str]) -> int:
        """Entries of whole tensors and expert slices (a slice: the tensor's entries over its number of experts)."""
        total = 0
        for part in parts:
            name, index = split_part(part)
            param = self._params[name]
            total += param.numel() if index is None else param.numel() // param.shape[0]
        return total

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
        name = adapter.name
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
        from lit_mofo.continual.callback import continual_learning  # here: lit_mofo.continual imports this module

        self._continual = continual_learning(trainer) is not None
        if self.reset and not self._redraws and not self._continual:
            raise MisconfigurationException(
                "`HalfFineTuning(reset=True, redraw_every_stage=True)` resets at the stage starts of a continual run, "
                "but this fit has no lit_mofo.continual.ContinualLearning callback and neither `redraw_every_n_steps` "
                "nor `redraw_every_n_epochs` is set, so nothing would ever be reset. Add the callback (and a "
                "StageSequence), set a re-draw schedule, or drop `reset=True`."
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
            self._snapshot = self._snapshot_class.attach(pl_module, owner=self)
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
            unknown = [part for part in self._frozen if split_part(part)[0] not in self._params]
            if unknown:
                raise MisconfigurationException(
                    f"The checkpoint's HalfFineTuning selection names {unknown[:3]}, which are not parameters of "
                    f"{type(pl_module).__name__}; resume with the model that wrote the checkpoint."
                )
            left_frozen = set(self.left_frozen_names)
            self._frozen = tuple(part for part in self._frozen if split_part(part)[0] not in left_frozen)
            self._apply(trainer, newly_frozen=())
            rank_zero_info(
                f"HalfFineTuning: resumed draw {self._draws} (step {self._last_draw_step}); "
                f"{self.trainable_fraction:.1%} of the parameters train."
            )
            return

        if self._generator is None:
            seed = self.seed if self.seed is not None else _default_seed()
            self._resolved_seed = int(self._adapter.broadcast(seed, src=0))
            self._generator = torch.Generator().manual_seed(self._resolved_seed)
        self._frozen = ()  # a new fit is a new stage: draw anew, with the generator continuing
        self._stage = 0  # a continual run's first stage
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

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        """The stage protocol (:class:`lit_mofo.continual.StageCallback`): a new stage's draw, with its own seed.

        The stage's fresh optimizers hold every tensor the module left trainable; the draw (or, with
        ``redraw_every_stage=False``, the previous selection) is applied to them. Nothing happens for the stage the
        selection belongs to already (the first stage, drawn at the start of fit) nor for a resumed run's call.
        """
        if stage.resumed or stage.index == self._stage:
            return
        self._stage = stage.index
        self._check_optimizers(trainer)
        if self.redraw_every_stage is False:
            self._apply(trainer, newly_frozen=())
            return
        assert self._resolved_seed is not None
        self._generator = torch.Generator().manual_seed(stage_seed(self._resolved_seed, stage.index))
        self._draw(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # After backward and DDP's all-reduce, before gradient clipping and the step. In "freeze" mode the frozen
        # tensors have no gradient already; dropping any left over is free and keeps the optimizer off them.
        for param in self._frozen_params:
            param.grad = None
        if self._sliced:
            self._mask_slices(optimizer)

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
        self._sliced = []
        self._drop_pending()
        self._awaiting_checkpoint = False
        self._adapter.release_optimizer_restore_guard(trainer)
        if self._snapshot is not None or self._snapshot_class.get(pl_module) is not None:
            self._snapshot_class.detach(pl_module, owner=self)
            self._snapshot = None

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._snapshot is not None:
            self._snapshot_class.save_to(pl_module, checkpoint, trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.reset:
            self._snapshot_class.on_load_checkpoint(pl_module, checkpoint, owner=self, trainer=trainer)
            self._snapshot = self._snapshot_class.get(pl_module)

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
            "stage": self._stage,
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
        self._stage = int(state_dict.get("stage", 0))
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
                "modules with 2+ weight matrices each), so it freezes whole tensors at random until about "
                f"{1 - self.ratio:.0%} of their parameters are frozen (tensor level) instead of {self.granularity!r} "
                "level; each draw's summary gives the share it reached."
            )
        elif layout.unrecognised:
            first, count = layout.unrecognised[0], len(layout.unrecognised)
            some = f"{count} of the {len(layout.blocks)} blocks" if count < len(layout.blocks) else "the blocks"
            rank_zero_warn(
                f"HalfFineTuning did not recognise {some} of {type(pl_module).__name__} by name (no row of "
                "lit_mofo.blocks.LAYOUT_TABLE names all of their matrices), so it uses the generic rule: "
                f"{count} blocks ({first.name!r}, ...), attention = matrices under a child named *attn*/*attention* "
                f"({len(first.attention)} in the first: {list(first.attention)}), FFN = the other matrices "
                f"({len(first.ffn)}: {list(first.ffn)}), {len(first.norm_groups)} norm units. Check that this is what "
                "you meant, or name tensors in always_trainable/always_frozen."
            )
        self._effective_granularity = granularity

        managed = set(self._managed)

        def trainable(parts: Iterable[str]) -> Unit:
            return tuple(part for part in parts if split_part(part)[0] in managed)

        block_units: list[dict[str, list[Unit]]] = []
        for block in layout.blocks:
            units = {category: [trainable(unit) for unit in units] for category, units in block.units().items()}
            units["rest"] = [trainable((name,)) for name in block.fixed]
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

        words = parameter_words(pl_module, layout.roles())
        self._fixed_trainable = self._match("always_trainable", self._always_trainable, words) & managed
        self._fixed_frozen = self._match("always_frozen", self._always_frozen, words) & managed
        if not self.train_embeddings:
            self._fixed_frozen.update(trainable(layout.embeddings))
            self._fixed_frozen.update(
                name for block in layout.blocks for name, role in block.state if role == "embedding" and name in managed
            )
        if not self.train_head:
            self._fixed_frozen.update(trainable(layout.head))
        self._fixed_trainable -= self._fixed_frozen
        if not self._pool():
            rank_zero_warn(
                f"HalfFineTuning has nothing to draw in {type(pl_module).__name__}: none of the tensors it draws from "
                f"({self._effective_granularity} level) is trainable and outside always_trainable/always_frozen, so "
                "it freezes only what always_frozen / train_embeddings=False / train_head=False name. Unfreeze the "
                "blocks to fine-tune them with HFT, or drop the callback."
            )

    def _match(self, argument: str, patterns: Sequence[str], words: dict[str, frozenset[str]]) -> set[str]:
        warn_unmatched(argument, patterns, words, where="HalfFineTuning()")
        return {name for name in self._params if matching_patterns(patterns, name, words[name])}

    def _drawable_parts(self) -> set[str]:
        if self._effective_granularity == "category":
            units = [unit for category in _CATEGORIES for per_block in self._plan[category] for unit in per_block]
        else:
            units = self._plan["units"]
        return {part for unit in units for part in unit}

    def _pool(self) -> set[str]:
        """The drawable parts outside ``always_trainable``/``always_frozen``: what the draw decides."""
        fixed = self._fixed_trainable | self._fixed_frozen
        return {part for part in self._drawable_parts() if split_part(part)[0] not in fixed}

    def _resettable_names(self) -> list[str]:
        names = self.resettable_names
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
        return list(names)

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
            sizes = [self._numel(unit) for unit in units]
            drawn = _by_size(units, sizes, share, self._generator)
        else:
            units = self._plan["units"]
            count = _round_half_up(len(units) * share)
            drawn = [units[i] for i in torch.randperm(len(units), generator=self._generator)[:count].tolist()]
        drawn_parts = {part for unit in drawn for part in unit}
        whole = {part for part in drawn_parts if split_part(part)[1] is None} | self._fixed_frozen
        whole -= self._fixed_trainable
        slices: dict[str, list[str]] = {}
        for part in sorted(drawn_parts, key=lambda part: split_part(part)[1] or 0):
            name, index = split_part(part)
            if index is not None and name not in whole and name not in self._fixed_trainable:
                slices.setdefault(name, []).append(part)
        previous = set(self._frozen)
        self._frozen = tuple(
            part for name in self._managed for part in ((name,) if name in whole else slices.get(name, ()))
        )
        first = self._draws == 0 or not previous
        self._draws += 1
        self._last_draw_step = trainer.global_step
        self._last_draw_epoch = trainer.current_epoch
        newly_frozen = () if first else tuple(part for part in self._frozen if part not in previous)
        self._apply(trainer, newly_frozen=newly_frozen)

        fraction = self.trainable_fraction
        pool = self._pool()
        drawable_numel = self._numel(pool)
        drawn_frozen_fraction = self._numel(pool & set(self._frozen)) / drawable_numel if drawable_numel else 0.0
        frozen_tensors = len(self.frozen_names)
        entry: dict[str, float | int] = {
            "draw": self._draws,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "trainable_fraction": fraction,
            "frozen_tensors": frozen_tensors,
            "drawn_frozen_fraction": drawn_frozen_fraction,
        }
        sliced = self.frozen_slices
        if sliced:
            entry["frozen_experts"] = sum(len(indices) for indices in sliced.values())
        self._history.append(entry)
        logged = {"hft/trainable_fraction": fraction, "hft/draw": self._draws}
        if self._continual:  # the logged row says which stage it belongs to
            logged["continual/stage"] = float(self._stage + 1)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        left_frozen = len(self._params) - len(self._managed)
        experts = (
            f" and {entry['frozen_experts']} expert slices of {len(sliced)} fused expert tensors" if sliced else ""
        )
        summary = (
            f"HalfFineTuning draw {self._draws} at step {trainer.global_step} ({self._effective_granularity} level, "
            f"{self._layout.architecture if self._layout else '?'} layout): {fraction:.1%} of the parameters train; "
            f"it froze {frozen_tensors} of the {len(self._managed)} trainable tensors{experts}"
            + (f" ({left_frozen} more were frozen by the module)" if left_frozen else "")
            + f", {drawn_frozen_fraction:.1%} of the parameters it draws from ({1 - self.ratio:.0%} asked"
            + (", by unit count per category)." if self._effective_granularity == "category" else ").")
        )
        if first:
            rank_zero_info(summary)
        if trainer.is_global_zero and log.isEnabledFor(logging.DEBUG):
            log.debug("%s Trainable: %s; frozen experts: %s", summary, list(self.trainable_names), sliced)

    def _apply(self, trainer: pl.Trainer, newly_frozen: Sequence[str]) -> None:
        """Make the current selection real: reset weights, optimizer state and ``requires_grad`` flags.

        Only the tensors the module left trainable are touched; in ``"mask"`` mode no flag changes at all. Expert
        slices keep their tensor's flag (it trains); their gradients, values and optimizer state are handled around
        every optimizer step (:meth:`_mask_slices`).
        """
        whole = set(self.frozen_names)
        sliced = self.frozen_slices
        self._sliced = [
            (self._params[name], self._local_rows(self._params[name], indices)) for name, indices in sliced.items()
        ]
        self._sliced = [(param, rows) for param, rows in self._sliced if rows.numel()]
        local = self._adapter.local
        if self.reset and newly_frozen:
            assert self._snapshot is not None
            snapshot = self._snapshot
            resettable = [part for part in newly_frozen if split_part(part)[0] in snapshot]
            snapshot.restore(self._unwrapped_module(trainer), [part for part in resettable if part in whole])
            new_slices: dict[str, list[int]] = {}
            for part in resettable:
                name, index = split_part(part)
                if index is not None:
                    new_slices.setdefault(name, []).append(index)
            with torch.no_grad():
                for name, indices in new_slices.items():
                    rows = self._local_rows(self._params[name], indices)
                    theta0 = snapshot[name].to(rows.device).index_select(0, rows)
                    local(self._params[name]).index_copy_(0, rows, theta0.to(local(self._params[name]).dtype))
        if self.optimizer_state == "reset":
            for optimizer in trainer.optimizers:
                for name in whole:
                    optimizer.state.pop(self._params[name], None)
                self._zero_slice_states(optimizer)
        if self.mode == "freeze":
            for name in self._managed:
                self._params[name].requires_grad_(name not in whole)
            # FSDP2 fixed its units' gradient dtypes at their first forward: let an unfrozen unit have them again.
            self._adapter.refresh_after_requires_grad_change(self._unwrapped_module(trainer))
        self._frozen_params = [self._params[name] for name in self._frozen if name in whole]

    def _local_rows(self, param: Tensor, indices: Sequence[int]) -> Tensor:
        """The rows of this rank's part of ``param`` (its shard under FSDP2, sharded on dimension 0 = the experts)
        that hold the experts ``indices``, on the parameter's device."""
        mask = torch.zeros(param.shape[0], dtype=torch.bool)
        mask[list(indices)] = True
        local_mask = self._adapter.shard_like(mask, param)
        return local_mask.to(self._adapter.local(param).device).nonzero().flatten()

    def _state_rows(self, optimizer: Optimizer) -> list[tuple[Tensor, Tensor]]:
        """(local optimizer state tensor, rows) for every state tensor shaped like a partially frozen parameter
        (Adam's ``exp_avg``/``exp_avg_sq``, MoFO's, SGD's ``momentum_buffer``, ...)."""
        found: list[tuple[Tensor, Tensor]] = []
        for param, rows in self._sliced:
            shape = self._adapter.local(param).shape
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and self._adapter.local(value).shape == shape:
                    found.append((self._adapter.local(value), rows))
        return found

    def _zero_slice_states(self, optimizer: Optimizer) -> None:
        with torch.no_grad():
            for value, rows in self._state_rows(optimizer):
                value.index_fill_(0, rows.to(value.device), 0)

    def _mask_slices(self, optimizer: Optimizer) -> None:
        """Before the step (after backward and DDP's all-reduce / FSDP2's reduce-scatter, before clipping): zero the
        frozen experts' gradient rows, keep their values (and, with ``optimizer_state="keep"``, their optimizer
        state) and restore them right after ``optimizer.step()``, which decay, momentum or any other optimizer
        would otherwise move."""
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        local = self._adapter.local
        with torch.no_grad():
            for param, rows in self._sliced:
                if param.grad is not None:
                    local(param.grad).index_fill_(0, rows, 0)
            if self._pending is not None:  # the closure ran again within one step (LBFGS): keep the first copy
                return
            self._saved = [
                (local(param), rows, local(param).index_select(0, rows))
                for param, rows in self._sliced
                if id(param) in in_optimizer
            ]
            if self.optimizer_state == "keep":
                self._saved += [
                    (value, rows, value.index_select(0, rows)) for value, rows in self._state_rows(optimizer)
                ]
        self._pending = optimizer.register_step_post_hook(self._restore_slices)

    def _restore_slices(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for tensor, rows, values in self._saved:
                tensor.index_copy_(0, rows, values)
        if self.optimizer_state == "reset":
            self._zero_slice_states(optimizer)  # the state a fresh optimizer would give them, after every step
        self._drop_pending()

    def _drop_pending(self) -> None:
        if self._pending is not None:
            self._pending.remove()
        self._pending = None
        self._saved = []

    @staticmethod
    def _unwrapped_module(trainer: pl.Trainer) -> pl.LightningModule:
        return trainer.lightning_module


def stage_seed(seed: int, stage: int) -> int:
    """The seed of stage ``stage``'s draws (0-based) in a continual run: ``seed`` itself for the first stage (as a plain
    fit draws), else :func:`lit_mofo.continual.stages.derived_seed` of ``(seed, stage)``: the first 8 bytes of BLAKE2b
    of ``"<seed>/<stage>"`` (little-endian, below 2**63)."""
    if stage == 0:
        return seed
    from lit_mofo.continual.stages import derived_seed  # here: lit_mofo.continual imports this module

    return derived_seed(seed, stage)


def _default_seed() -> int:
    """The seed of ``seed_everything`` (Lightning records it in ``PL_GLOBAL_SEED`` for its worker processes), else 0."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", "0")) % 2**63
    except ValueError:
        return 0
