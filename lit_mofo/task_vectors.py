r"""Post-hoc edits of the task vector: move a fine-tuned model back towards its pre-trained weights, per layer or not.

With θ₀ the pre-trained weights and Δ = θ - θ₀ the fine-tune's task vector, an edit sets every parameter to

.. math::

    \theta_{\text{edit}} = \theta_0 + \lambda \cdot (\theta - \theta_0)

with a factor λ per tensor:

- **WiSE-FT** (weight-space ensembling, Wortsman et al., CVPR 2022), :class:`WiSEFT`: λ = alpha for every tensor;
  alpha = 1 is the fine-tune, alpha = 0 the pre-trained model.
- **LiNeS** (Layer-increasing Network Scaling, Wang et al., ICLR 2025, arXiv 2410.17146), :class:`LiNeS`: the
  tensors of transformer block l = 1..L get λ(l) = alpha + beta·(l - 1)/(L - 1), so shallow blocks stay near θ₀ and deep
  blocks keep the task update; every tensor outside the blocks gets alpha.

Both need only θ₀ (e.g. the tensors of :class:`~lit_mofo.snapshot.PretrainedSnapshot`) and the fine-tuned model.

**The LiNeS reference code** (``github.com/wang-kee/LiNeS``, read at commit 43a7bdd: ``src/eval/eval.py``,
``LiNeS_scaling`` and ``evaluate_task_vector``; ``LiNeS_example.ipynb``; ``config/method/single_task.yaml``;
``src/models/task_vectors.py``; ``src/utils/utils.py``, ``find_optimal_coef_tradeoff``) works on CLIP ViT image
encoders:

- the task vector is the difference of the two state dicts over every floating-point tensor of the image encoder
  (int64/uint8 buffers are skipped); the classification heads are not part of it (they are fixed zero-shot heads
  built from text prompts), so the reference never scales a head;
- a tensor's block is found by its name: the first ``i`` in ``0..num_blocks-1`` with ``f".{i}."`` (the notebook:
  ``f".resblocks.{i}."``) in the key, with ``num_blocks`` hard-coded (12 for ViT-B/32 and B/16, 24 for ViT-L/14);
  its factor is ``alpha + beta * i / (num_blocks - 1)``. Every tensor of the block gets it, the block's layer norms
  included;
- every tensor outside the residual blocks gets ``alpha``: the patch embedding, class token, positional embedding,
  the pre- and post-transformer layer norms and the output projection;
- **single-task editing** (the forgetting setting): ``alpha = λ``, ``beta = 1 - λ`` (so the last block keeps the
  whole update) for λ in ``np.arange(0.0, 1.1, 0.1)[::-1]`` (1.0, 0.9, ..., 0.0); the λ kept maximises
  ``2 * target_acc / finetuned_acc + mean(control_acc / zeroshot_acc)`` on validation splits
  (``tradeoff_target_weight: 2.0``), then is reported on test splits; the notebook's example uses ``alpha = 0.1``;
- **multi-task merging**: ``alpha = (‖Σ_t τ_t‖ / ‖τ_merged‖) / T`` and ``beta`` from the grid.

Here the block index comes from :func:`lit_mofo.blocks.detect_layout` (module structure, not name matching, so no
hard-coded block count), and the reference's rule for everything outside the blocks is kept: embeddings, the
final norm and the language-model head get alpha. Unlike the reference's classifier, an LM head is fine-tuned and is
part of Δ, so under LiNeS it moves back towards θ₀ with the embeddings.

**Exact at the ends.** A factor of 0 copies θ₀ and a factor of 1 leaves θ as it is, so alpha = 0 reproduces θ₀ and
alpha = 1 (or LiNeS alpha = 1, beta = 0) the fine-tuned weights bit for bit, in every dtype; other factors are
computed in float32 (float64 for float64 tensors) with ``torch.lerp`` and rounded once to the parameter's dtype.
LiNeS factors are rounded to 12 decimals, so a last block meant to keep the whole update (alpha + beta = 1, however
the two were computed) gets exactly 1 and keeps its fine-tuned weights. A tensor whose fine-tuned value equals θ₀
bit for bit (frozen, or never reached by the fine-tune) is left alone by every edit.

**Adapters (PEFT).** On a PEFT model the task vector is the change of the *effective* weights, and
:func:`task_vector_names` picks the tensors an edit scales so that the effective weights follow θ₀ + λ·Δ: a LoRA
layer's ΔW = scaling·B·A is bilinear, so scaling both A and B would scale it by λ²; only the up-projection B (and
its bias) is edited, from its θ₀ of zero (peft's default initialisation), which gives exactly λ·ΔW per layer - the
same edit as on the merged weights. The down-projection A keeps its fine-tuned value, the frozen base weights are
not part of the task vector, and tensors that train as such (``modules_to_save``, biases) and IA³'s scaling vectors
(the effective weight is linear in them) are edited like any tensor. Adapters whose effect is not linear in one
tensor (DoRA's magnitude, LoHa, LoKr, OFT, ...) and LoRA layers whose B did not start at zero (PiSSA, OLoRA, LoftQ
initialisations) are refused: merge the adapters (``CausalLMModule.merged_model()``) and edit the merged weights
against the base model's instead.

**Several edits, then back.** :class:`TaskVectorEditor` applies edits one after another, each from θ (not from the
previous edit), and :meth:`~TaskVectorEditor.restore` puts the fine-tuned weights back bit for bit. A bit-exact
restore needs θ itself (θ₀ + λΔ has lost bits of θ, and nothing at all of it at λ = 0), so the editor keeps a copy
of every tensor an edit has changed, taken when the first edit changes it, on ``stash_device`` (the CPU by
default, so no accelerator memory): at most one copy of the parameters in θ₀, in their own dtype (for full
fine-tuning, as large as the snapshot), and nothing for tensors the fine-tune did not move or that the applied
edits kept at factor 1. Peak accelerator memory beyond that: one tensor's θ₀ and float32 temporaries.

Example::

    from lit_mofo.snapshot import PretrainedSnapshot
    from lit_mofo.task_vectors import LiNeS, TaskVectorEditor, WiSEFT

    snapshot = PretrainedSnapshot.get(module)  # θ₀, captured at the start of fit
    theta0 = {name: snapshot[name] for name in snapshot}
    with TaskVectorEditor(module, theta0) as editor:
        for edit in (WiSEFT(0.5), LiNeS.single_task(0.2)):
            editor.apply(edit)
            print(edit.label, evaluate(module))
    # here the module holds the fine-tuned weights again, bit for bit
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_mofo._validation import as_float, as_int
from lit_mofo.adapters import LORA_DOWN, LORA_UP, adapter_tensors
from lit_mofo.blocks import detect_layout

__all__ = [
    "FINETUNED",
    "RULES",
    "EditPoint",
    "EditSweep",
    "LiNeS",
    "Rule",
    "TaskVectorEdit",
    "TaskVectorEditor",
    "WiSEFT",
    "applied_edit",
    "apply_edit",
    "edit_factors",
    "edit_grid",
    "interpolate_",
    "mark_pareto",
    "pareto_front",
    "select_point",
    "split_metric",
    "task_vector_names",
]

_FACTOR_DECIMALS = 12


def _factor(alpha: float, allow_extrapolation: bool, where: str, argument: str = "alpha") -> float:
    if allow_extrapolation:
        return as_float(alpha, where=where, argument=argument)
    return as_float(
        alpha,
        where=where,
        argument=argument,
        minimum=0.0,
        maximum=1.0,
        fix="0 is the pre-trained model and 1 the fine-tune; pass allow_extrapolation=True to go beyond them.",
    )


@dataclass(frozen=True)
class WiSEFT:
    """WiSE-FT: θ₀ + alpha·(θ - θ₀) for every tensor.

    Args:
        alpha: the share of the task vector kept, in [0, 1] (0: pre-trained, 1: fine-tuned).
        allow_extrapolation: accept any finite alpha (beyond the fine-tune, or past θ₀).
    """

    alpha: float
    allow_extrapolation: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _factor(self.alpha, self.allow_extrapolation, "WiSEFT()"))

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``"WiSE-FT alpha=0.5"``."""
        return f"WiSE-FT alpha={self.alpha:g}"

    @property
    def key(self) -> str:
        """Name for metric keys and file names, e.g. ``"wise_ft_a0.5"``."""
        return f"wise_ft_a{self.alpha:g}"


@dataclass(frozen=True)
class LiNeS:
    """LiNeS: θ₀ + λ(l)·(θ - θ₀), λ(l) = alpha + beta·(l - 1)/(L - 1) for the tensors of block l = 1..L, else alpha.

    The paper's single-task setting is beta = 1 - alpha (:meth:`single_task`): the last block keeps the whole update.

    Args:
        alpha: the factor of the first block and of every tensor outside the blocks, in [0, 1].
        beta: how much more the last block keeps than the first, >= 0 with alpha + beta <= 1 (the factors increase
            with depth and stay within [0, 1]).
        allow_extrapolation: accept any finite alpha and beta >= 0 (factors outside [0, 1]).
    """

    alpha: float
    beta: float
    allow_extrapolation: bool = False

    def __post_init__(self) -> None:
        where = "LiNeS()"
        alpha = _factor(self.alpha, self.allow_extrapolation, where)
        # rounded like the factors, so that a pair written in decimals (0.8, 0.2) is not refused by float rounding
        maximum = None if self.allow_extrapolation else round(1.0 - alpha, _FACTOR_DECIMALS)
        beta = as_float(
            self.beta,
            where=where,
            argument="beta",
            minimum=0.0,
            maximum=maximum,
            fix=(
                f"LiNeS scales the last block by alpha + beta, which must stay within [0, 1] (alpha={alpha:g}); "
                "the paper's single-task setting is beta = 1 - alpha (LiNeS.single_task(alpha)), and "
                "allow_extrapolation=True lifts the upper bound."
                if maximum is not None
                else "The factors increase with depth (Layer-increasing Network Scaling): beta >= 0."
            ),
        )
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "beta", beta)

    @classmethod
    def single_task(cls, alpha: float) -> LiNeS:
        """The paper's setting for editing one fine-tune: ``LiNeS(alpha, 1 - alpha)``."""
        alpha = _factor(alpha, False, "LiNeS.single_task()")
        return cls(alpha, round(1.0 - alpha, _FACTOR_DECIMALS))

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``"LiNeS alpha=0.2 beta=0.8"``."""
        return f"LiNeS alpha={self.alpha:g} beta={self.beta:g}"

    @property
    def key(self) -> str:
        """Name for metric keys and file names, e.g. ``"lines_a0.2_b0.8"``."""
        return f"lines_a{self.alpha:g}_b{self.beta:g}"

    def block_factor(self, index: int, num_blocks: int) -> float:
        """λ of block ``index`` (0-based, so l = index + 1) of ``num_blocks``; a single block gets alpha."""
        depth = index / (num_blocks - 1) if num_blocks > 1 else 0.0
        return round(self.alpha + self.beta * depth, _FACTOR_DECIMALS)


TaskVectorEdit = WiSEFT | LiNeS


def edit_grid(
    wise_ft: Iterable[float] = (),
    lines: Iterable[tuple[float, float]] = (),
    *,
    allow_extrapolation: bool = False,
) -> tuple[TaskVectorEdit, ...]:
    """The edits of a sweep: one :class:`WiSEFT` per alpha of ``wise_ft``, one :class:`LiNeS` per ``(alpha, beta)`` of
    ``lines``, in that order, each validated; ``ValueError`` for an empty grid or a repeated edit.

    The LiNeS paper's single-task grid is ``lines=[(a, 1 - a) for a in (1.0, 0.9, ..., 0.0)]``.
    """
    edits: list[TaskVectorEdit] = [WiSEFT(alpha, allow_extrapolation) for alpha in wise_ft]
    for pair in lines:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ValueError(
                f"edit_grid(): lines entry {pair!r} is invalid; the valid range is an (alpha, beta) pair, e.g. "
                "(0.2, 0.8)."
            )
        edits.append(LiNeS(pair[0], pair[1], allow_extrapolation))
    as_int(
        len(edits),
        where="edit_grid()",
        argument="number of edits",
        minimum=1,
        fix="Give at least one WiSE-FT alpha (wise_ft=[0.5]) or LiNeS (alpha, beta) pair (lines=[(0.2, 0.8)]).",
    )
    repeated = sorted({edit.label for edit in edits if edits.count(edit) > 1})
    if repeated:
        raise ValueError(f"edit_grid(): the grid lists {repeated} more than once; list each edit once.")
    return tuple(edits)


def edit_factors(module: nn.Module, edit: TaskVectorEdit, names: Iterable[str] | None = None) -> dict[str, float]:
    """λ of every named parameter of ``module`` under ``edit`` (names as in ``module.named_parameters()``; None:
    all of them).

    LiNeS numbers the blocks of :func:`lit_mofo.blocks.detect_layout` (in module order) 1..L; every parameter of a
    block, its norms and biases included, gets the block's factor, and every other parameter alpha. ``ValueError`` for
    LiNeS on a model without transformer blocks, or for a name that is not a parameter.
    """
    all_names = [name for name, _ in module.named_parameters()]
    selected = all_names if names is None else list(names)
    unknown = sorted(set(selected) - set(all_names))
    if unknown:
        raise ValueError(
            f"edit_factors(): {unknown[:3]} {'are' if len(unknown) > 1 else 'is'} not a parameter of "
            f"{type(module).__name__} (names as in `named_parameters()`, e.g. {all_names[:1]})."
        )
    if isinstance(edit, WiSEFT):
        return dict.fromkeys(selected, edit.alpha)
    if not isinstance(edit, LiNeS):
        raise TypeError(f"edit={edit!r} is not a WiSEFT or LiNeS edit.")
    layout = detect_layout(module)
    if not layout.blocks:
        raise ValueError(
            f"LiNeS scales the task vector per transformer block, and {type(module).__name__} has none that "
            "lit_mofo.blocks.detect_layout recognises; use WiSEFT (one factor for every tensor) instead."
        )
    block_factor = {
        name: edit.block_factor(index, len(layout.blocks))
        for index, block in enumerate(layout.blocks)
        for name in block.parameters
    }
    return {name: block_factor.get(name, edit.alpha) for name in selected}


def _adapter_tensors(module: nn.Module) -> tuple[set[str], set[str], dict[str, str]]:
    """The parameters of ``module``'s PEFT adapter layers: (LoRA down-projections, kept at their fine-tuned value;
    LoRA up-projections, scaled from θ₀ = 0; other adapter tensors no edit can scale exactly -> what they are); all
    empty for a model without adapters."""
    down: set[str] = set()
    up: set[str] = set()
    refused: dict[str, str] = {}
    tensors = adapter_tensors(module)
    if not tensors:
        return down, up, refused
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.lora import LoraLayer

    for name, (layer, attribute) in tensors.items():
        if isinstance(layer, LoraLayer) and attribute in LORA_DOWN:
            down.add(name)
        elif isinstance(layer, LoraLayer) and attribute in LORA_UP:
            up.add(name)
        elif not isinstance(layer, IA3Layer):  # IA³: the effective weight is linear in its vectors
            refused[name] = f"{type(layer).__name__}.{attribute}"
    return down, up, refused


def task_vector_names(
    module: nn.Module, names: Iterable[str] | None = None, theta0: Mapping[str, Tensor] | None = None
) -> list[str]:
    """The parameters among ``names`` (None: all of ``module``'s) whose edit moves the model's effective weights
    along θ₀ + λ·Δ: all of them for a model without adapters; on a PEFT model every one but the LoRA
    down-projections A (see the module docstring).

    With ``theta0`` (θ₀ by name), also checks that every LoRA up-projection B among them started at zero, which the
    exactness needs. ``ValueError`` for an adapter tensor no edit scales exactly (DoRA, LoHa, LoKr, OFT, ...) or a
    B with a non-zero θ₀, naming it and the fix.
    """
    selected = [name for name, _ in module.named_parameters()] if names is None else list(names)
    down, up, refused = _adapter_tensors(module)
    fix = (
        "merge the adapters (CausalLMModule.merged_model(), or peft's merge_and_unload()) and edit the merged "
        "weights against the base model's."
    )
    blocked = [name for name in selected if name in refused]
    if blocked:
        raise ValueError(
            f"Task-vector edits cannot scale {blocked[0]!r} ({refused[blocked[0]]}"
            f"{f', and {len(blocked) - 1} more' if len(blocked) > 1 else ''}): the adapter's change of the weights "
            "is not linear in one tensor, so no edit of its tensors gives θ₀ + λ·Δ (LoRA, with DoRA off, and IA³ "
            f"are supported). To edit such a fine-tune, {fix}"
        )
    if theta0 is not None:
        nonzero = [name for name in selected if name in up and name in theta0 and bool(theta0[name].any())]
        if nonzero:
            raise ValueError(
                f"The LoRA up-projection {nonzero[0]!r} did not start at zero (θ₀ has non-zero entries): an edit "
                "scales a LoRA layer's change B·A through B alone, which is exact only from B = 0, peft's default "
                "`init_lora_weights=True` (PiSSA, OLoRA, LoftQ and similar initialisations start elsewhere). Train "
                f"with the default initialisation, or {fix}"
            )
    return [name for name in selected if name not in down]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def interpolate_(out: Tensor, theta0: Tensor, theta: Tensor, factor: float) -> Tensor:
    """Write θ₀ + factor·(θ - θ₀) into ``out`` (any dtype and device; ``theta0``/``theta`` are moved to it).

    ``factor == 0`` copies ``theta0`` and ``factor == 1`` copies ``theta``, bit for bit; otherwise the value is
    ``torch.lerp`` in float32 (float64 for float64 ``out``), rounded once to ``out.dtype``.
    """
    if factor == 0:
        return out.copy_(theta0)
    if factor == 1:
        return out if theta is out else out.copy_(theta)
    compute = _compute_dtype(out.dtype)
    start = theta0.to(device=out.device, dtype=compute)
    end = theta.to(device=out.device, dtype=compute)
    return out.copy_(torch.lerp(start, end, factor))


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same values bit for bit (so -0.0 differs from 0.0, and equal NaNs match)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.view(bits), b.to(a.device).view(bits))
    return torch.equal(a, b.to(a.device))


class TaskVectorEditor:
    """Apply task-vector edits to ``module`` one after another, each from the fine-tuned weights, and restore them.

    Args:
        module: the fine-tuned model (usually the LightningModule, whose parameter names the snapshot uses).
        theta0: pre-trained value of each parameter to edit, by name as in ``module.named_parameters()``
            (e.g. the tensors of :class:`~lit_mofo.snapshot.PretrainedSnapshot`); parameters not named are never
            touched. Any device and floating dtype; values are cast to the parameter's.
        stash_device: where the fine-tuned copies live while edits are applied (default the CPU).

    Raises:
        ValueError: a name of ``theta0`` that is not a parameter, or a shape that differs from the parameter's.

    Use it as a context manager (leaving it restores θ unless :meth:`keep` was called), or call :meth:`restore`.
    """

    def __init__(
        self, module: nn.Module, theta0: Mapping[str, Tensor], *, stash_device: str | torch.device = "cpu"
    ) -> None:
        params = dict(module.named_parameters())
        unknown = [name for name in theta0 if name not in params]
        if unknown:
            raise ValueError(
                f"TaskVectorEditor: theta0 names {unknown[:3]}, which {'are' if len(unknown) > 1 else 'is'} not a "
                f"parameter of {type(module).__name__}; give θ₀ by the names of `module.named_parameters()` "
                f"(e.g. {next(iter(params), None)!r})."
            )
        mismatched = [name for name, tensor in theta0.items() if tensor.shape != params[name].shape]
        if mismatched:
            name = mismatched[0]
            raise ValueError(
                f"TaskVectorEditor: theta0[{name!r}] has shape {tuple(theta0[name].shape)} but the parameter has "
                f"{tuple(params[name].shape)}; θ₀ must come from the same model (a sharded parameter needs its "
                "full tensor)."
            )
        self.module = module
        self.theta0 = theta0
        self.stash_device = torch.device(stash_device)
        self._params = {name: params[name] for name in theta0}
        # Tensors the fine-tune did not move stay as they are under every edit (θ = θ₀).
        self._moved = [name for name, param in self._params.items() if not _same_bits(param.detach(), theta0[name])]
        self._stash: dict[str, Tensor] = {}
        self._applied: TaskVectorEdit | None = None

    @property
    def applied(self) -> TaskVectorEdit | None:
        """The edit the module holds now (None: the fine-tuned weights)."""
        return self._applied

    @property
    def moved(self) -> list[str]:
        """Names of the tensors whose fine-tuned value differs from θ₀ (the ones an edit can change)."""
        return list(self._moved)

    @property
    def stash_nbytes(self) -> int:
        """Bytes of fine-tuned copies held now."""
        return sum(t.numel() * t.element_size() for t in self._stash.values())

    def factors(self, edit: TaskVectorEdit) -> dict[str, float]:
        """λ of each parameter in θ₀ under ``edit``."""
        return edit_factors(self.module, edit, self.theta0.keys())

    @torch.no_grad()
    def apply(self, edit: TaskVectorEdit) -> dict[str, float]:
        """Set the module to θ₀ + λ·(θ - θ₀) for ``edit``, from the fine-tuned θ whatever was applied before.

        Returns the factor of each parameter in θ₀.
        """
        factors = self.factors(edit)
        for name in self._moved:
            param = self._params[name]
            stashed = self._stash.get(name)
            if stashed is None:
                if factors[name] == 1:
                    continue  # still the fine-tuned value, and this edit keeps it
                stashed = self._stash[name] = param.detach().to(self.stash_device, copy=True)
            interpolate_(param, self.theta0[name], stashed, factors[name])
        self._applied = edit
        return factors

    @torch.no_grad()
    def restore(self) -> None:
        """Put the fine-tuned weights back, bit for bit, and free the copies."""
        for name, stashed in self._stash.items():
            self._params[name].copy_(stashed)
        self._stash = {}
        self._applied = None

    def keep(self) -> None:
        """Keep the applied edit in the module for good and free the copies (the fine-tuned θ is gone)."""
        self._stash = {}

    def __enter__(self) -> TaskVectorEditor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._stash:
            self.restore()


def apply_edit(module: nn.Module, theta0: Mapping[str, Tensor], edit: TaskVectorEdit) -> dict[str, float]:
    """Set every parameter of ``module`` named in ``theta0`` to θ₀ + λ·(θ - θ₀) for ``edit``, in place, for good.

    θ is the parameter's current value, so applying a second edit compounds the two; use
    :class:`TaskVectorEditor` to try several edits from the same fine-tune. Needs no copy of θ. Returns the factor
    of each parameter in θ₀.
    """
    editor = TaskVectorEditor(module, theta0)
    factors = editor.factors(edit)
    with torch.no_grad():
        for name in editor.moved:
            param = editor._params[name]
            interpolate_(param, theta0[name], param, factors[name])
    return factors


# ---------------------------------------------------------------------------------------------------- choosing an edit
Rule = Literal["none", "best_task", "least_forgetting"]
RULES: tuple[str, ...] = ("none", "best_task", "least_forgetting")
FINETUNED = "finetuned"  # the key of the unedited point
_ROUNDING = 1e-12  # comparisons against a budget or a tolerance forgive float rounding of the given bound


def split_metric(metric: str) -> tuple[str, str]:
    """``"<probe>/<metric>"`` as ``(probe, metric)``."""
    probe, _, name = metric.partition("/")
    return probe, name


def _finite(*values: float) -> bool:
    return all(math.isfinite(value) for value in values)


@dataclass(frozen=True)
class EditPoint:
    """One point of the curve: an edit (``None``: the fine-tuned weights as they are) and what the monitor's probes
    measured under it, ``{probe: {metric: value}}``, with the forgetting and retention of each value against the
    monitor's pre-trained baseline (see :func:`~lit_mofo.callbacks.forgetting_monitor.forgetting`)."""

    edit: TaskVectorEdit | None
    values: dict[str, dict[str, float]]
    forgetting: dict[str, dict[str, float]]
    retention: dict[str, dict[str, float]]
    seconds: float = 0.0
    pareto: dict[str, bool] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``"finetuned"``, or the edit's key (``"wise_ft_a0.5"``, ``"lines_a0.2_b0.8"``) used in metric names."""
        return FINETUNED if self.edit is None else self.edit.key

    @property
    def label(self) -> str:
        return "fine-tuned (unedited)" if self.edit is None else self.edit.label

    @property
    def alpha(self) -> float:
        return 1.0 if self.edit is None else self.edit.alpha

    @property
    def beta(self) -> float | None:
        return self.edit.beta if isinstance(self.edit, LiNeS) else None

    def value(self, metric: str) -> float:
        """The value of ``"<probe>/<metric>"``."""
        probe, name = split_metric(metric)
        return self.values[probe][name]

    def lost(self, metric: str) -> float:
        """The forgetting of ``"<probe>/<metric>"`` (positive = worse than pre-trained)."""
        probe, name = split_metric(metric)
        return self.forgetting[probe][name]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the edit (key, label, method, alpha, beta), the values, forgetting, retention, seconds."""
        method = None if self.edit is None else ("wise_ft" if isinstance(self.edit, WiSEFT) else "lines")
        return {
            "edit": self.key,
            "label": self.label,
            "method": method,
            "alpha": self.alpha,
            "beta": self.beta,
            "values": {probe: dict(values) for probe, values in self.values.items()},
            "forgetting": {probe: dict(values) for probe, values in self.forgetting.items()},
            "retention": {probe: dict(values) for probe, values in self.retention.items()},
            "seconds": self.seconds,
            "pareto": dict(self.pareto),
        }


def pareto_front(
    points: Sequence[EditPoint], task: str, forgetting: str, task_higher_is_better: bool = True
) -> list[EditPoint]:
    """The points no other point beats on both axes: a better or equal task score (``task``, ``"<probe>/<metric>"``)
    with less or equal forgetting (``forgetting``), one of them strictly. Points with a non-finite value are left
    out. Sorted by forgetting, least first."""
    sign = 1.0 if task_higher_is_better else -1.0
    scored = [
        (p, sign * p.value(task), p.lost(forgetting)) for p in points if _finite(p.value(task), p.lost(forgetting))
    ]
    front = [
        point
        for point, score, lost in scored
        if not any(s >= score and f <= lost and (s > score or f < lost) for _, s, f in scored)
    ]
    return sorted(front, key=lambda p: (p.lost(forgetting), -sign * p.value(task)))


def mark_pareto(
    points: Sequence[EditPoint], task: str, panels: Sequence[str], task_higher_is_better: bool = True
) -> list[EditPoint]:
    """``points`` with :attr:`EditPoint.pareto` set: for each forgetting metric of ``panels``, whether the point is
    on the :func:`pareto_front` of ``task`` against it."""
    fronts = {panel: {p.key for p in pareto_front(points, task, panel, task_higher_is_better)} for panel in panels}
    return [
        EditPoint(p.edit, p.values, p.forgetting, p.retention, p.seconds, {m: p.key in f for m, f in fronts.items()})
        for p in points
    ]


def select_point(
    points: Sequence[EditPoint],
    rule: Rule,
    *,
    task: str | None,
    forgetting: str | None,
    task_higher_is_better: bool = True,
    max_forgetting: float | None = None,
    max_task_drop: float | None = None,
) -> EditPoint | None:
    """The point ``rule`` picks among ``points`` (the unedited fine-tune, ``edit=None``, is a candidate like the
    edits); None when no point qualifies or ``rule`` is ``"none"``.

    - ``"best_task"``: the best task score (``task``, ``"<probe>/<metric>"``) among the points whose forgetting of
      ``forgetting`` is at most ``max_forgetting``; ties go to the least forgetting, then to the earlier point.
    - ``"least_forgetting"``: the least forgetting among the points whose task score is at most ``max_task_drop``
      worse than the unedited fine-tune's; ties go to the better task score, then to the earlier point. The
      fine-tune itself always qualifies.

    Bounds are in the metrics' own units (a fraction for exact match: 1 point = 0.01). Points with a non-finite
    value never qualify.
    """
    if rule == "none":
        return None
    if task is None or forgetting is None:
        raise ValueError(f"select_point(rule={rule!r}) needs `task` and `forgetting` ('<probe>/<metric>').")
    sign = 1.0 if task_higher_is_better else -1.0
    candidates = [p for p in points if _finite(p.value(task), p.lost(forgetting))]
    if rule == "best_task":
        if max_forgetting is None:
            raise ValueError("select_point(rule='best_task') needs max_forgetting.")
        within = [p for p in candidates if p.lost(forgetting) <= max_forgetting + _ROUNDING]
        ranked = sorted(within, key=lambda p: (-sign * p.value(task), p.lost(forgetting)))
    elif rule == "least_forgetting":
        if max_task_drop is None:
            raise ValueError("select_point(rule='least_forgetting') needs max_task_drop.")
        reference = next((p for p in points if p.edit is None), None)
        if reference is None:
            raise ValueError("select_point(rule='least_forgetting') needs the unedited point (edit=None) among points.")
        floor = sign * reference.value(task) - max_task_drop - _ROUNDING
        within = [p for p in candidates if sign * p.value(task) >= floor]
        ranked = sorted(within, key=lambda p: (p.lost(forgetting), -sign * p.value(task)))
    else:
        raise ValueError(f"select_point(): rule={rule!r} is invalid; the valid range is one of {RULES}.")
    return ranked[0] if ranked else None  # sorted() is stable: ties keep the points' order


@dataclass(frozen=True)
class EditSweep:
    """A measured sweep and how it is read: what :class:`~lit_mofo.callbacks.TaskVectorScaling` hands to the report
    (:func:`lit_mofo.report.edit_sweep_section`, :func:`lit_mofo.report.draw_edit_sweep`).

    Attributes:
        points: the curve, the unedited fine-tune first.
        step: the optimizer step of the fine-tune.
        task: the probe metric that scores the task (``"<probe>/<metric>"``), or None.
        panels: the forgetting metrics the curve is read against.
        baselines: the pre-trained values, ``{probe: {metric: value}}``.
        directions: whether a larger value is better, ``{probe: {metric: bool}}``.
        picked: the key of the point a rule picked, or None.
    """

    points: list[EditPoint]
    step: int
    task: str | None
    panels: list[str]
    baselines: dict[str, dict[str, float]]
    directions: dict[str, dict[str, bool]]
    picked: str | None = None

    @property
    def task_higher_is_better(self) -> bool:
        assert self.task is not None
        probe, metric = split_metric(self.task)
        return self.directions[probe][metric]

    @property
    def task_baseline(self) -> float:
        """The pre-trained model's task score."""
        assert self.task is not None
        probe, metric = split_metric(self.task)
        return self.baselines[probe][metric]


def applied_edit(checkpoint: Mapping[str, Any]) -> str | None:
    """The key of the edit a :class:`~lit_mofo.callbacks.TaskVectorScaling` applied to the weights of ``checkpoint``
    (it rewrites the checkpoints of the final step with the edit it applies, and records it in its state), or None
    for a checkpoint of fine-tuned weights."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("TaskVectorScaling") and isinstance(state, Mapping) and state.get("applied"):
            return str(state["applied"])
    return None
