"""Which kernels step a tensor: the fused C kernels on CPU, the Triton kernels on CUDA, torch operations otherwise.

:func:`kernels_for` is the one place that reads MoFO's ``fused`` option: ``False`` means torch operations;
``None`` the kernels of :data:`DEFAULT_KERNELS` where they load and apply (the C kernels for CPU tensors), torch
operations otherwise; ``True`` the kernels of :data:`FUSED_KERNELS` (C on CPU, Triton on CUDA), and an error naming
the fix for a tensor they cannot step. Both families are loaded on first use, once per process.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from lit_mofo.optim import _cpu
from lit_mofo.optim._selection import BatchedKernels

__all__ = ["C_KERNELS", "DEFAULT_KERNELS", "FUSED_KERNELS", "TRITON_KERNELS", "kernels_for", "load_triton"]

log = logging.getLogger(__name__)


class _Kernels:
    """A family of fused kernels, loaded on first use: ``load()`` returns them or ``None`` (``reason()`` says why)."""

    def __init__(self, label: str, load: Callable[[], Any], reason: Callable[[], str | None], fix: str) -> None:
        self.label, self.load, self.reason, self.fix = label, load, reason, fix


class _TritonState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.kernels: BatchedKernels | None = None
        self.reason: str | None = None


_triton_state = _TritonState()


def load_triton() -> BatchedKernels | None:
    """The Triton kernels (``triton`` imported on the first call); ``None`` where triton is missing or
    ``LIT_MOFO_FUSED=0``, with the reason in :func:`triton_unavailable_reason`. Never raises."""
    if _triton_state.done:
        return _triton_state.kernels
    with _triton_state.lock:
        if not _triton_state.done:
            try:
                if os.environ.get("LIT_MOFO_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
                    raise RuntimeError("disabled by LIT_MOFO_FUSED=0")
                _triton_state.kernels = importlib.import_module("lit_mofo.optim._triton").TritonKernels()
            except Exception as err:  # a missing or broken triton means: no Triton path
                _triton_state.kernels = None
                _triton_state.reason = f"{type(err).__name__}: {err}"
                log.info("lit_mofo: MoFO's Triton kernels unavailable (%s).", _triton_state.reason)
            _triton_state.done = True
    return _triton_state.kernels


def triton_unavailable_reason() -> str | None:
    """Why :func:`load_triton` returned ``None``."""
    return _triton_state.reason


C_KERNELS = _Kernels(
    "the fused MoFO kernels (C)",
    _cpu.load,
    _cpu.unavailable_reason,
    "Use fused=None to fall back to torch operations automatically, or fused=False.",
)
TRITON_KERNELS = _Kernels(
    "MoFO's Triton kernels",
    lambda: load_triton(),  # looked up at each call, so that tests can replace the loader's state
    lambda: triton_unavailable_reason(),
    "Install triton (pip install 'lit-mofo[triton]'; torch's CUDA wheels for Linux include it), or use fused=None "
    "or fused=False for torch operations.",
)
# Per device type: the kernels that fused=True requires, and those that fused=None uses where they load and apply
# (on CUDA, the Triton kernels are opt-in until they are validated on GPU hardware).
FUSED_KERNELS: dict[str, _Kernels] = {"cpu": C_KERNELS, "cuda": TRITON_KERNELS}
DEFAULT_KERNELS: dict[str, _Kernels] = {"cpu": C_KERNELS}


def kernels_for(
    fused: bool | None, param: Tensor, where: str, tensors: Sequence[Tensor | None] | None = None
) -> BatchedKernels | None:
    """The fused kernels that step ``param`` (its local tensors ``tensors``: parameter, gradient, moments, master
    copy), or ``None`` for torch operations. With ``fused=True`` a tensor they cannot step is an error naming the fix;
    without ``tensors`` (at construction) only the device and dtype are checked."""
    if fused is False:
        return None
    device = param.device.type
    family = (FUSED_KERNELS if fused else DEFAULT_KERNELS).get(device)
    kernels = family.load() if family is not None else None
    if kernels is None:
        if not fused:
            return None
        if family is None:
            raise ValueError(
                f"{where}: fused=True, but MoFO's fused kernels step CPU (C) and CUDA (Triton) parameters; got a "
                f"{param.dtype} parameter of shape {tuple(param.shape)} on {param.device}. Use fused=None to fall "
                "back to torch operations for such tensors, or fused=False."
            )
        raise RuntimeError(
            f"{where}: fused=True, but {family.label} for {device} parameters are unavailable "
            f"({family.reason()}). {family.fix}"
        )
    if tensors is None:
        supported = param.dtype in kernels.dtypes
    else:
        supported = kernels.supports(*tensors)  # type: ignore[arg-type]
    if supported:
        return kernels
    if fused:
        grad = tensors[1] if tensors is not None else None
        layout = (
            f" (contiguous: {param.is_contiguous()}, grad {grad.dtype} on {grad.device})" if grad is not None else ""
        )
        raise ValueError(
            f"{where}: fused=True, but {family.label} step contiguous float32, bfloat16 or float16 parameters with "  # type: ignore[union-attr]
            f"float32 moments; got a {param.dtype} parameter of shape {tuple(param.shape)} on {param.device}"
            f"{layout}. Use fused=None to fall back to torch operations for such tensors, or fused=False."
        )
    return None
