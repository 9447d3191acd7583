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

from lit_mofo.callbacks.forgetting_monitor import refuse_sharded_strategy
from lit_mofo.params import CATEGORIES, match_any, named_parameter_categories
from lit_mofo.snapshot import PretrainedSnapshot

__all__ = ["L2ToPretrained"]

_NORMS = ("l2", "l1")


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

    θ₀ comes from the shared :class:`~lit_mofo.snapshot.PretrainedSnapshot` (one copy per module, shared with
    Half Fine-Tuning's resets and :class:`~lit_mofo.ParameterDrift`; carried in checkpoints so a resumed run keeps
    the true θ₀). The snapshot is stored on the CPU; when the parameters live on an accelerator, this callback also
    keeps a copy of θ₀ there (one extra copy of the regularised parameters in accelerator memory) so the step does
    not copy θ₀ across the bus.

    .. warning:: Sharded strategies (FSDP, DeepSpeed) are refused in ``setup``: a rank holds only a slice of each
       parameter, and θ₀ would have to be sliced the same way.

    Args:
        strength: λ, the penalty's weight, > 0. The MoFO paper sweeps it over powers of ten (e.g. 1e-4 … 1e-1).
        norm: ``"l2"`` (default) or ``"l1"``.
        include: parameters to regularise: names (regex searched in the qualified name) or categories
            (``"weight"``, ``"bias"``, ``"norm"``, ``"embedding"``); default: all trainable parameters.
        exclude: parameters not to regularise, same syntax.
        snapshot_dtype: dtype of the stored θ₀; ``None`` keeps each parameter's dtype.
        log_penalty: log ``l2_to_pretrained/penalty``, the penalty at the weights the step starts from (summed over
            the tensors that have a gradient), alongside the loss. It costs one reduction per regularised tensor.

    Example::

        from lit_mofo import L2ToPretrained

        trainer = Trainer(callbacks=[L2ToPretrained(strength=1e-2)])
    """

    def __init__(
        self,
        strength: float = 1e-2,
        norm: Literal["l2", "l1"] = "l2",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        snapshot_dtype: torch.dtype | None = None,
        log_penalty: bool = True,
    ) -> None:
        if not (isinstance(strength, (int, float)) and strength > 0 and strength == strength):
            raise MisconfigurationException(
                f"L2ToPretrained(strength={strength!r}): the penalty weight must be a number > 0 (e.g. 1e-2)."
            )
        if norm not in _NORMS:
            raise MisconfigurationException(f"L2ToPretrained(norm={norm!r}): choose one of {_NORMS}.")
        self.strength = float(strength)
        self.norm = norm
        self.include = None if include is None else tuple(include)
        self.exclude = tuple(exclude)
        self.snapshot_dtype = snapshot_dtype
        self.log_penalty = log_penalty
        self._names: list[str] = []
        self._params: list[Tensor] = []
        self._theta0: list[Tensor] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(strength=self.strength, norm=self.norm)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded_strategy(trainer, "L2ToPretrained")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        selected = [
            (name, param)
            for name, param, category in named_parameter_categories(pl_module)
            if param.requires_grad
            and (self.include is None or match_any(name, category, self.include))
            and not match_any(name, category, self.exclude)
        ]
        if not selected:
            raise MisconfigurationException(
                f"L2ToPretrained(include={self.include!r}, exclude={self.exclude!r}) selects no trainable parameter "
                f"of {type(pl_module).__name__}. Patterns are regexes searched in parameter names or one of "
                f"{CATEGORIES}."
            )
        snapshot = PretrainedSnapshot.attach(pl_module, owner=self)
        snapshot.capture(trainer, pl_module, [name for name, _ in selected], dtype=self.snapshot_dtype)
        self._names = [name for name, _ in selected]
        self._params = [param for _, param in selected]
        self._theta0 = [
            snapshot[name].to(device=param.device, dtype=param.dtype) for name, param in selected
        ]  # a no-op view when device and dtype already match
        numel = sum(p.numel() for p in self._params)
        rank_zero_info(
            f"L2ToPretrained: {self.norm} penalty λ={self.strength:g} on {len(selected)} tensors ({numel:,} values)."
        )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        total = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for param, theta0 in zip(self._params, self._theta0, strict=True):
                if param.grad is None:
                    continue
                diff = param - theta0
                if self.norm == "l2":
                    if self.log_penalty:
                        total += diff.float().pow(2).sum().double().cpu()
                    param.grad.add_(diff, alpha=self.strength)
                else:
                    if self.log_penalty:
                        total += diff.float().abs().sum().double().cpu()
                    param.grad.add_(diff.sign_(), alpha=self.strength)
        if self.log_penalty:
            # Lightning throttles what reaches the logger to every `log_every_n_steps`.
            scale = 0.5 * self.strength if self.norm == "l2" else self.strength
            pl_module.log("l2_to_pretrained/penalty", float(scale * total), on_step=True, on_epoch=False)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        PretrainedSnapshot.save_to(pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        PretrainedSnapshot.on_load_checkpoint(pl_module, checkpoint, owner=self)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._names, self._params, self._theta0 = [], [], []
            PretrainedSnapshot.detach(pl_module, owner=self)
