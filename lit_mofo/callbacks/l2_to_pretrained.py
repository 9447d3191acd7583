r"""Regularise fine-tuning towards the pre-trained weights: the L2 (or L1) baseline of the MoFO paper.

The penalty :math:`\frac{\lambda}{2}\lVert\theta-\theta_0\rVert_2^2` (or :math:`\lambda\lVert\theta-\theta_0\rVert_1`)
is applied through its gradient, added to each trained parameter's gradient just before the optimizer step, so the
user's loss and ``training_step`` stay untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lit_mofo._validation import as_bool, as_choice, as_dtype, as_float
from lit_mofo.adapters import LoraWeight, adapter_values, checked_lora_weights, effective_name
from lit_mofo.params import WORDS, check_patterns, check_trainable, initial_requires_grad, parameter_words, select_names
from lit_mofo.snapshot import PretrainedSnapshot, StageStartSnapshot
from lit_mofo.strategy import StrategyAdapter

__all__ = ["L2ToPretrained"]

_NORMS = ("l2", "l1")
_ANCHORS = ("pretrained", "previous_stage")
Anchor = Literal["pretrained", "previous_stage"]


class L2ToPretrained(Callback):
    r"""Pull the trained weights towards their pre-trained values θ₀ (taken at the start of fit).

    Before every optimizer step, each parameter ``p`` that has a gradient gets

    * ``norm="l2"``: ``p.grad += strength * (p - θ₀)``, the gradient of ``strength / 2 * ||p - θ₀||²``;
    * ``norm="l1"``: ``p.grad += strength * sign(p - θ₀)``, the gradient of ``strength * ||p - θ₀||₁``.

    This is exactly adding the penalty to the loss (the gradients are already all-reduced under DDP and unscaled under
    mixed precision at that point; gradient clipping, which Lightning applies afterwards, sees the sum). It moves
    every trained entry, so it composes with any optimizer: with Adam the penalty's gradient goes through the
    moments, like the MoFO paper's L1/L2 baselines. Parameters whose gradient is ``None`` that step (frozen by
    :class:`~lit_mofo.HalfFineTuning`, unused) are left alone.

    **Which tensors**: those that match ``include``/``exclude`` among the parameters the module left trainable
    (``requires_grad=True`` at the start of fit, as :func:`lit_mofo.params.initial_requires_grad` records it
    before Half Fine-Tuning changes any flag). A tensor Half Fine-Tuning freezes now and trains after a re-draw is
    regularised whenever it trains, whichever of the two callbacks is listed first, also in a resumed run. The
    module's own frozen tensors are neither regularised nor copied; so a tensor that your own code unfreezes later
    in the fit (e.g. Lightning's ``BackboneFinetuning``) gets no penalty.

    θ₀ comes from the shared :class:`~lit_mofo.snapshot.PretrainedSnapshot` (one copy per module, shared with
    Half Fine-Tuning's resets and :class:`~lit_mofo.ParameterDrift`; carried in checkpoints so a resumed run keeps
    the true θ₀). The snapshot is stored on the CPU; when the parameters live on an accelerator, this callback also
    keeps a copy of θ₀ there (one extra copy of the regularised parameters in accelerator memory) so the step does
    not copy θ₀ across the bus.

    **Strategies**: a single device, DDP and FSDP2 (Lightning's ``ModelParallelStrategy`` with
    ``tensor_parallel_size=1``, the module sharding itself as :class:`~lit_mofo.modules.CausalLMModule` does). Under
    FSDP2 each rank holds θ₀ of its own shards only (the snapshot costs 1/world-size of a whole copy per rank) and
    adds the penalty's gradient to its shard of each gradient, after FSDP2's reduce-scatter: the same arithmetic,
    entry for entry, as one process. The logged penalty is summed over the shards (one all-reduce per step).

    **LoRA and other PEFT models.** On a model with LoRA adapters the penalty is on the *effective* weights: for each
    adapted matrix ``W + ΔW`` (``ΔW = scale·B·A``) the term is ``strength / 2 * ||ΔW - ΔW₀||²`` (``l1``:
    ``strength * ||ΔW - ΔW₀||₁``), ΔW₀ the change the adapters started with (zero with peft's default
    initialisation), and its gradient with respect to A and B (by autograd, one ``B·A`` product and its backward
    per matrix and step) is added to theirs: the L2-to-θ₀ baseline of a merged model, not a pull of A and B towards
    their random start. Patterns match the merged model's names (``...q_proj.weight``, category ``"weight"``);
    other trainable tensors (``modules_to_save``, biases) are regularised as above. θ₀ costs only the adapter
    tensors. DoRA and other adapter kinds are refused at the start of fit; PEFT under FSDP2 too.

    **Continual runs** (:mod:`lit_mofo.continual`): ``anchor="pretrained"`` (default) pulls towards θ₀, the weights
    before stage 1, in every stage; ``anchor="previous_stage"`` pulls towards the weights the current stage started
    from (the previous stage's end; θ₀ in stage 1), kept in the :class:`~lit_mofo.snapshot.StageStartSnapshot` and
    re-read at every stage start — the regulariser of a sequence that should stay close to what it has learnt so far
    rather than to the pre-trained model. Outside a continual run both anchors are the weights at the start of fit.
    The logged penalty is against the anchor in use.

    .. warning:: DeepSpeed, FSDP1 (``strategy="fsdp"``), tensor parallelism and XLA are refused in ``setup`` with
       the fix: they flatten or partition the parameters so that no rank holds a tensor or a dimension-0 shard of
       it. Use ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` or ``strategy="ddp"``.

    Args:
        strength: λ, the penalty's weight, a finite number > 0. The MoFO paper sweeps it over powers of ten
            (e.g. 1e-4 … 1e-1).
        norm: ``"l2"`` (default) or ``"l1"``.
        include: parameters to regularise: a pattern or a list of them, each a word of
            :data:`lit_mofo.params.WORDS` - a role (``"attention"``, ``"ffn"``, ``"router"``, ``"ssm"``, ``"norm"``,
            ``"embedding"``, ``"head"``, ``"other"``) or a kind (``"weight"``, ``"bias"``) - or a regular expression
            written ``"re:<regex>"``, searched in the qualified name (``"re:lm_head"`` is one pattern; see
            :mod:`lit_mofo.params`); default: every trainable parameter. A pattern that matches no parameter is
            warned about; a selection of no trainable parameter is refused at the start of fit.
        exclude: parameters not to regularise, same syntax.
        snapshot_dtype: dtype of the stored θ₀ (``"float32"``, ``"bfloat16"``, ``"bf16"``, ``torch.float16``, ...);
            ``None`` keeps each parameter's dtype.
        log_penalty: log ``l2_to_pretrained/penalty``, the penalty term at the weights the step starts from (over
            every regularised tensor, with a gradient that step or not), alongside the loss. It costs one reduction
            per regularised tensor.
        anchor: ``"pretrained"`` (θ₀) or ``"previous_stage"`` (the weights the current stage of a continual run
            started from); see **Continual runs**.

    Example::

        from lit_mofo import L2ToPretrained

        trainer = Trainer(callbacks=[L2ToPretrained(strength=1e-2)])
    """

    def __init__(
        self,
        strength: float = 1e-2,
        norm: Literal["l2", "l1"] = "l2",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] = (),
        snapshot_dtype: str | torch.dtype | None = None,
        log_penalty: bool = True,
        anchor: Anchor = "pretrained",
    ) -> None:
        where, error = "L2ToPretrained()", MisconfigurationException
        self.strength = as_float(
            strength,
            where=where,
            argument="strength",
            minimum=0.0,
            min_inclusive=False,
            fix="Give the penalty weight λ as a number, e.g. 1e-2 (the MoFO paper sweeps powers of ten, 1e-4 to 1e-1).",
            error=error,
        )
        self.norm = as_choice(norm, where=where, argument="norm", choices=_NORMS, error=error)
        self.include = check_patterns(include, where=where, argument="include", error=error)
        self.exclude = check_patterns(exclude, where=where, argument="exclude", error=error) or ()
        self.snapshot_dtype = as_dtype(snapshot_dtype, where=where, argument="snapshot_dtype", error=error)
        self.log_penalty = as_bool(log_penalty, where=where, argument="log_penalty", error=error)
        self.anchor: Anchor = as_choice(
            anchor,
            where=where,
            argument="anchor",
            choices=_ANCHORS,
            fix="'pretrained' pulls towards θ₀, 'previous_stage' towards the weights the current stage started from.",
            error=error,
        )
        self._snapshot_class: type[PretrainedSnapshot] = (
            StageStartSnapshot if self.anchor == "previous_stage" else PretrainedSnapshot
        )
        self._names: list[str] = []
        self._regularised: list[str] = []
        self._params: list[Tensor] = []
        self._theta0: list[Tensor] = []
        self._lora: list[LoraWeight] = []
        self._lora_params: list[list[Tensor]] = []
        self._lora_delta0: list[Tensor | None] = []
        self._adapter = StrategyAdapter("single")

    @property
    def regularised_names(self) -> list[str]:
        """Names (as in ``pl_module.named_parameters()``) of the tensors regularised in the current or last fit; on a
        LoRA model, each adapted matrix by its merged name (see the class docstring)."""
        return list(self._regularised)

    @property
    @override
    def state_key(self) -> str:
        if self.anchor == "pretrained":  # the key of the checkpoints written before the anchor existed
            return self._generate_state_key(strength=self.strength, norm=self.norm)
        return self._generate_state_key(strength=self.strength, norm=self.norm, anchor=self.anchor)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._adapter = StrategyAdapter.of(trainer, user="L2ToPretrained")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_trainable(pl_module, where="L2ToPretrained", error=MisconfigurationException)
        self._adapter.reshard(pl_module)  # FSDP2: the sharded parameters, also after an evaluation before fit
        trainable = initial_requires_grad(pl_module)  # the module's choice, also when HalfFineTuning ran first
        lora = checked_lora_weights(
            pl_module, user=type(self).__name__, what="penalises", sharded=self._adapter.sharded
        )
        words = parameter_words(pl_module)
        params = dict(pl_module.named_parameters())
        real = {name: name for name in words}
        if lora:  # a LoRA model: each adapted matrix by its merged name (its base weight's), trainable by its adapters
            adapters = {name for weight in lora.values() for name in weight.adapters}
            real = {effective_name(name): name for name in words if name not in adapters}
            by_real_name = trainable
            trainable = {effective_name(name): flag for name, flag in by_real_name.items() if name not in adapters}
            for weight in lora.values():
                trainable[weight.name] = any(by_real_name[name] for name in weight.adapters)
        chosen = select_names(
            {name: words[real_name] for name, real_name in real.items()},
            self.include,
            self.exclude,
            where="L2ToPretrained()",
        )
        selected = [(name, params[real[name]]) for name in chosen if trainable[name]]
        if not selected:
            frozen = len(chosen) - len(selected)
            raise MisconfigurationException(
                f"L2ToPretrained(include={self.include!r}, exclude={self.exclude!r}) selects no trainable parameter "
                f"of {type(pl_module).__name__}"
                + (f" ({frozen} match but had requires_grad=False at the start of fit)" if frozen else "")
                + f". Patterns are words of {list(WORDS)} (roles and kinds, see lit_mofo.params) or regular "
                "expressions written re:<regex>, searched in the parameter names; widen `include` or narrow `exclude`."
            )
        by_name = {weight.name: weight for weight in lora.values()}
        self._lora = [by_name[name] for name, _ in selected if name in by_name]
        selected = [(name, param) for name, param in selected if name not in by_name]
        self._names = [real[name] for name, _ in selected]
        self._regularised = [*self._names, *(weight.name for weight in self._lora)]
        self._params = [param for _, param in selected]
        snapshot = self._snapshot_class.attach(pl_module, owner=self)
        captured = [*self._names, *(name for weight in self._lora for name in weight.adapters)]
        snapshot.capture(trainer, pl_module, captured, dtype=self.snapshot_dtype)
        params = dict(pl_module.named_parameters())
        self._lora_params = [[params[name] for name in weight.adapters] for weight in self._lora]
        numel = sum(p.numel() for p in self._params) + sum(w.layer.get_base_layer().weight.numel() for w in self._lora)
        selected = [*selected, *((weight.name, None) for weight in self._lora)]
        rank_zero_info(
            f"L2ToPretrained: {self.norm} penalty λ={self.strength:g} on {len(selected)} tensors ({numel:,} values)."
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # θ₀ is read here, after every callback's on_fit_start: another one may still widen the snapshot's dtype
        # for a tensor there (the widest request wins), and θ₀ must not depend on the order of the callbacks. A
        # resumed sharded fit has it from the checkpoint only now, too.
        self._read_anchor(pl_module)

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        """The stage protocol (:class:`lit_mofo.continual.StageCallback`): with ``anchor="previous_stage"``, pull
        towards the weights this stage starts from (the stage-start snapshot, retaken just before)."""
        if self.anchor == "previous_stage" and not stage.resumed:
            self._read_anchor(pl_module)

    def _read_anchor(self, pl_module: pl.LightningModule) -> None:
        snapshot = self._snapshot_class.get(pl_module)
        assert snapshot is not None
        self._theta0 = []
        for name, param in zip(self._names, self._params, strict=True):
            local = self._adapter.local(param)  # the rank's shard under FSDP2, the tensor itself otherwise
            self._theta0.append(snapshot[name].to(device=local.device, dtype=local.dtype))  # no copy if they match
        params = dict(pl_module.named_parameters())
        self._lora_delta0 = []
        for weight in self._lora:  # ΔW₀: None when the adapters start at B = 0 (peft's default), as usual
            theta0 = {name: snapshot[name] for name in weight.adapters}
            with adapter_values(params, theta0), torch.no_grad():
                delta0 = weight.delta()
            self._lora_delta0.append(delta0 if bool(delta0.any()) else None)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        local = self._adapter.local  # under FSDP2 the rank's shards of the parameter and of its reduced gradient
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for param, theta0 in zip(self._params, self._theta0, strict=True):
                if param.grad is None and not self.log_penalty:
                    continue
                diff = local(param) - theta0
                if self.log_penalty:  # over every regularised tensor: the same whichever callback dropped a gradient
                    total += (diff.float().pow(2) if self.norm == "l2" else diff.float().abs()).sum().double().cpu()
                if param.grad is not None:
                    local(param.grad).add_(diff if self.norm == "l2" else diff.sign_(), alpha=self.strength)
        total += self._lora_penalty()
        if self.log_penalty:
            total = self._adapter.sum_over_shards(total)  # whole tensors: the shards' sums added up (FSDP2)
            # Lightning throttles what reaches the logger to every `log_every_n_steps`.
            scale = 0.5 * self.strength if self.norm == "l2" else self.strength
            pl_module.log("l2_to_pretrained/penalty", float(scale * total), on_step=True, on_epoch=False)

    def _lora_penalty(self) -> Tensor:
        """Add the penalty's gradient on each LoRA-adapted matrix's effective weights to its adapters' gradients;
        returns the summed penalty term (before ``strength``), in float64 on the CPU."""
        total = torch.zeros((), dtype=torch.float64)
        for weight, params, delta0 in zip(self._lora, self._lora_params, self._lora_delta0, strict=True):
            with_grad = [param for param in params if param.grad is not None]
            if not with_grad and not self.log_penalty:
                continue
            with torch.enable_grad():  # optimizers step without autograd; the penalty's gradient needs it
                diff = weight.delta() if delta0 is None else weight.delta() - delta0
                term = diff.float().pow(2).sum() if self.norm == "l2" else diff.float().abs().sum()
                if with_grad:
                    scale = 0.5 * self.strength if self.norm == "l2" else self.strength
                    grads = torch.autograd.grad(scale * term, with_grad)
                    with torch.no_grad():
                        for param, grad in zip(with_grad, grads, strict=True):
                            param.grad.add_(grad.to(param.grad.dtype))
            total += term.detach().double().cpu()
        return total

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._snapshot_class.save_to(pl_module, checkpoint, trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._snapshot_class.on_load_checkpoint(pl_module, checkpoint, owner=self, trainer=trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._params, self._theta0 = [], []
            self._lora, self._lora_params, self._lora_delta0 = [], [], []
            self._snapshot_class.detach(pl_module, owner=self)
