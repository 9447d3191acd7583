"""The metric the built-in probes aggregate with across processes."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class SumPair(Metric):
    """Two running sums (e.g. summed loss and token count, or correct answers and questions), summed across
    processes on ``compute()``, which returns both. Non-finite values propagate (a NaN loss stays NaN).

    Written out because ``torchmetrics.aggregation.MeanMetric(nan_strategy="disable")`` (1.9) drops the weights,
    and the default strategies drop NaNs, which would hide a diverged model."""

    full_state_update = False
    numerator: Tensor
    denominator: Tensor

    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()
        dtype = torch.float32 if device is not None and device.type == "mps" else torch.float64  # MPS has no fp64
        self.add_state("numerator", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        if device is not None:
            self.to(device)

    def update(self, numerator: Tensor | float, denominator: Tensor | float) -> None:
        self.numerator += torch.as_tensor(numerator, device=self.numerator.device).to(self.numerator.dtype).sum()
        self.denominator += (
            torch.as_tensor(denominator, device=self.denominator.device).to(self.denominator.dtype).sum()
        )

    def restart(self, device: torch.device) -> None:
        """Zero the sums on ``device`` for a new evaluation (a rank with no batch still takes part in the sync)."""
        self.reset()
        self.to(device)
        self.update(0.0, 0.0)

    def compute(self) -> tuple[float, float]:
        return float(self.numerator.item()), float(self.denominator.item())
