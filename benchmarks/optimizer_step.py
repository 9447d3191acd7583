"""Time one optimizer step of MoFO against torch's AdamW on real model shapes, side by side in one process.

Usage::

    python benchmarks/optimizer_step.py                     # GPT-2-small + 2 Llama-2-7B layers, fp32 and bf16
    python benchmarks/optimizer_step.py --shapes gpt2-small --dtypes fp32 --steps 9
    python benchmarks/optimizer_step.py --device cuda       # same script on a GPU
    python benchmarks/optimizer_step.py --quick             # a few small tensors, seconds (kept working by a test)
    python benchmarks/optimizer_step.py --markdown benchmarks/results/optimizer_step.md
    python benchmarks/optimizer_step.py --threads 1 2 --methods adamw_fused mofo_exact_fused mofo_sampled_fused

Every method steps the same parameters with the same (fixed, random) gradients; rounds interleave the methods
(the order rotates each round) so that load from other processes hits all of them alike, and each method's time
is the median over the measured rounds after the warm-up rounds (the slow methods, the topk reference and the
eager MoFO paths, sit out the rounds after ``--slow-steps``). A method's ratio to torch's fused AdamW is the median
over the rounds of its time divided by fused AdamW's time in the same round, so that a burst of load from other
processes, which slows one round, cancels out. On a machine shared with other work, ``--threads 1`` gives steadier
ratios: OpenMP regions stall whenever one of their threads is descheduled. ``--threads 1 2`` measures every
configuration at each thread count in one process. Every figure is printed with the CPU's model, its vector
extensions, torch's CPU capability, the instruction set of MoFO's C kernels and the load average (the speed of
these memory-bound steps depends on all of them). The methods:

- ``adamw_forloop`` / ``adamw_foreach`` / ``adamw_fused``: ``torch.optim.AdamW`` with each implementation flag;
- ``mofo_reference_topk``: MoFO as the paper's reference code computes it, one ``torch.topk`` per tensor per step;
- ``mofo_{exact,sampled}_{fused,eager}``: ``lit_mofo.MoFO`` with ``selection=...`` and ``fused=None`` (the fused
  CPU kernels where they apply) or ``fused=False`` (torch operations only), and ``master_weights=False``: like
  torch's AdamW, no float32 copy of bfloat16 parameters (the same work, the comparison the targets are set on);
- for bfloat16 parameters, ``mofo_{exact,sampled}_fused_master``: MoFO's default, with float32 master weights
  (4 more bytes of state per parameter, read and written by every step);
- on CUDA, ``mofo_{exact,sampled}_triton`` (``fused=True``: the Triton kernels) instead of ``_fused``; the first
  step of each (Triton's compilation) is reported separately and never timed.

To keep the memory of eight optimizers within a laptop's, the optimizers share two moment tensors per parameter
and dtype (a timing does not depend on whose moments it updates); the memory columns are measured per method
afterwards: ``state`` is the optimizer state it would own, ``transient`` the peak of memory allocated during one
step beyond what was allocated before it (CUDA: ``torch.cuda.max_memory_allocated``; CPU on Linux/glibc: the
growth of peak resident memory, with large allocations forced to ``mmap`` so that freed memory is returned,
page-granular). The first-use compilation of the fused kernels (a fresh cache directory, in a subprocess) and
their load from the cache are reported separately; timed steps never include them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.optim import Optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_mofo.optim import _cpu
from lit_mofo.optim.mofo import MoFO

LR = 1e-5
FRACTION = 0.15
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2-small's 148 tensors (124.4M entries; the LM head is tied to the token embedding)."""
    shapes: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,)]  # ln_1, c_attn, attn c_proj
        shapes += [(768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]  # ln_2, c_fc, mlp c_proj
    return [*shapes, (768,), (768,)]


def llama2_7b_layer_shapes(layers: int) -> list[tuple[int, ...]]:
    """Llama-2-7B's per-layer tensors (202.4M entries a layer): q, k, v, o, gate, up, down and the two norms."""
    layer = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008), (4096,), (4096,)]
    return layer * layers


def quick_shapes() -> list[tuple[int, ...]]:
    return [(512, 512), (1024, 256), (512,), (2048, 128), (64,)]


class ReferenceTopkMoFO(Optimizer):
    """MoFO as the paper's reference code computes it: dense moment and Adam arithmetic, then one ``torch.topk``
    of ``|exp_avg|`` per tensor per step to build the mask (kept for timing; lit_mofo's own oracle is
    ``lit_mofo.optim.mofo.selection_mask``)."""

    def __init__(self, params: Iterable[Tensor], lr: float, fraction: float) -> None:
        super().__init__(params, {"lr": lr, "fraction": fraction, "betas": (0.9, 0.999), "eps": 1e-8})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                update = exp_avg / denom
                if p.dim() >= 2:
                    k = max(1, int(p.numel() * group["fraction"]))
                    index = torch.topk(exp_avg.abs().flatten(), k).indices
                    mask = torch.zeros(p.numel(), dtype=p.dtype, device=p.device).scatter_(0, index, 1.0)
                    update.mul_(mask.view_as(p))
                p.add_(update, alpha=-group["lr"] / (1 - beta1**t))


@dataclass
class Method:
    name: str
    build: Callable[[list[Tensor]], Optimizer]
    moment_dtype: Callable[[torch.dtype], torch.dtype]
    fused_step_tensor: bool = False
    slow: bool = False  # sits out the rounds after --slow-steps measured ones
    times: dict[int, float] = field(default_factory=dict)  # measured round -> seconds
    first: float | None = None  # the first step (allocation, compilation), never in the timings
    path: str = ""
    state_bytes: int = 0
    transient_bytes: int | None = None


def same_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype


def mofo_moment_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def make_methods(device: torch.device, dtype: torch.dtype = torch.float32) -> list[Method]:
    fused_adamw = device.type in ("cpu", "cuda")
    methods = [
        Method("adamw_forloop", lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=False), same_dtype),
        Method("adamw_foreach", lambda ps: torch.optim.AdamW(ps, lr=LR, foreach=True), same_dtype),
    ]
    if fused_adamw:
        methods.append(Method("adamw_fused", lambda ps: torch.optim.AdamW(ps, lr=LR, fused=True), same_dtype, True))
    methods.append(Method("mofo_reference_topk", lambda ps: ReferenceTopkMoFO(ps, LR, FRACTION), same_dtype, slow=True))
    kernels = (True, "triton") if device.type == "cuda" else (None, "fused")
    for selection in ("exact", "sampled"):
        for fused, label in (kernels, (False, "eager")):
            methods.append(
                Method(
                    f"mofo_{selection}_{label}",
                    lambda ps, s=selection, f=fused: MoFO(
                        ps, lr=LR, fraction=FRACTION, selection=s, fused=f, master_weights=False
                    ),
                    mofo_moment_dtype,
                    slow=fused is False,
                )
            )
    if dtype in (torch.bfloat16, torch.float16):  # MoFO's default for such parameters: a float32 master copy
        for selection in ("exact", "sampled"):
            methods.append(
                Method(
                    f"mofo_{selection}_{kernels[1]}_master",
                    lambda ps, s=selection, f=kernels[0]: MoFO(ps, lr=LR, fraction=FRACTION, selection=s, fused=f),
                    mofo_moment_dtype,
                )
            )
    return methods


def describe_path(method: Method, params: list[Tensor], device: torch.device) -> str:
    if not method.name.startswith("mofo_") or method.name == "mofo_reference_topk":
        return "torch"
    if method.name.endswith("_eager"):
        return "torch ops"
    if "_triton" in method.name:
        return "Triton kernels"
    kernels = _cpu.load()
    if kernels is None:
        return f"torch ops ({_cpu.unavailable_reason()})"
    moment = mofo_moment_dtype(params[0].dtype)
    usable = device.type == "cpu" and params[0].dtype in kernels.dtypes and moment == torch.float32
    return f"C kernels ({kernels.isa})" if usable else "torch ops (no kernel for this device/dtype)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def share_state(optimizer: Optimizer, params: list[Tensor], method: Method, moments: dict) -> None:
    """Point the optimizer's state at the shared moments (created once per moment dtype)."""
    for p in params:
        dtype = method.moment_dtype(p.dtype)
        m, v = moments.setdefault((id(p), dtype), (torch.zeros_like(p, dtype=dtype), torch.zeros_like(p, dtype=dtype)))
        step_device = p.device if method.fused_step_tensor else torch.device("cpu")
        optimizer.state[p] = {
            "step": torch.tensor(0.0, dtype=torch.float32, device=step_device),
            "exp_avg": m,
            "exp_avg_sq": v,
        }


def state_bytes(optimizer: Optimizer) -> int:
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        if isinstance(state, dict)
        for value in state.values()
        if isinstance(value, Tensor)
    )


def _read_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field_name)


def cpu_transient_supported() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and os.path.exists("/proc/self/clear_refs")


def force_mmap_for_large_allocations() -> None:
    """Make glibc map every allocation of 64 KiB or more separately and unmap it when freed, so that resident
    memory follows what is allocated (by default it keeps freed blocks of up to 32 MiB for reuse)."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def release_free_memory() -> None:
    gc.collect()
    if cpu_transient_supported():
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages kept from before


def measure_transient(step: Callable[[], None], device: torch.device) -> int | None:
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu" or not cpu_transient_supported():
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    before = _read_status("VmRSS")
    step()
    return max(0, _read_status("VmHWM") - before)


def kernel_description() -> str:
    """Whether the fused CPU kernels loaded (and how long the load took)."""
    start = time.perf_counter()
    kernels = _cpu.load()
    seconds = time.perf_counter() - start
    if kernels is None:
        return f"fused MoFO kernels: unavailable ({_cpu.unavailable_reason()})"
    return f"fused MoFO kernels: loaded in {seconds:.2f} s, built for {kernels.isa}"


def compile_costs() -> tuple[float | None, float | None, str | None]:
    """Seconds to compile the fused kernels into an empty cache and to load them from it, each in a fresh process."""
    code = "from lit_mofo.optim import _cpu; k = _cpu.load(); print(_cpu.load_seconds() if k else -1)"
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LIT_MOFO_CACHE_DIR": cache}
        seconds = []
        for _ in range(2):
            out = subprocess.run(
                [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600
            )
            try:
                seconds.append(float(out.stdout.strip().splitlines()[-1]))
            except (IndexError, ValueError):
                return None, None, out.stderr.strip()[-300:]
    if seconds[0] < 0:
        return None, None, _cpu.unavailable_reason()
    return seconds[0], seconds[1], None


@dataclass
class Result:
    shapes: str
    dtype: str
    numel: int
    tensors: int
    methods: list[Method]
    rounds: int
    threads: int
    load_before: float
    load_after: float


def run_config(
    shape_name: str,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    warmup: int,
    steps: int,
    slow_steps: int,
    measure_memory: bool,
    only: list[str] | None = None,
) -> Result:
    load_before = os.getloadavg()[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    methods = [m for m in make_methods(device, dtype) if only is None or m.name in only or m.name == "adamw_fused"]
    optimizers = {}
    moments: dict = {}
    for method in methods:
        optimizer = method.build(params)
        share_state(optimizer, params, method, moments)
        optimizers[method.name] = optimizer
        method.path = describe_path(method, params, device)
    for r in range(warmup + steps):
        shift = r % len(methods)
        for method in methods[shift:] + methods[:shift]:
            if method.slow and r >= warmup + slow_steps:
                continue
            synchronize(device)
            start = time.perf_counter()
            optimizers[method.name].step()
            synchronize(device)
            if r == 0:
                method.first = time.perf_counter() - start
            if r >= warmup:
                method.times[r] = time.perf_counter() - start
    del optimizers, moments
    gc.collect()
    if measure_memory:
        if device.type == "cpu" and cpu_transient_supported():
            force_mmap_for_large_allocations()
        for method in methods:  # one at a time, with the state it owns
            optimizer = method.build(params)
            optimizer.step()  # allocate the state
            method.state_bytes = state_bytes(optimizer)
            method.transient_bytes = measure_transient(optimizer.step, device)
            del optimizer
            gc.collect()
    return Result(
        shape_name,
        str(dtype).replace("torch.", ""),
        sum(p.numel() for p in params),
        len(params),
        methods,
        steps,
        torch.get_num_threads(),
        load_before,
        os.getloadavg()[0],
    )


def median_time(method: Method) -> float:
    return statistics.median(method.times.values())


def median_ratio(method: Method, base: Method) -> float:
    """The median over the rounds both ran of ``method``'s time over ``base``'s time in the same round."""
    return statistics.median(method.times[r] / base.times[r] for r in method.times if r in base.times)


def format_table(result: Result) -> list[str]:
    by_name = {m.name: m for m in result.methods}
    base = by_name.get("adamw_fused")
    reference = by_name.get("mofo_reference_topk")
    adamw_state = base.state_bytes if base is not None else None
    mib = 2**20
    firsts = ", ".join(f"{m.name} {m.first:.1f} s" for m in result.methods if m.name.endswith("_triton") and m.first)
    lines = [
        f"**{result.shapes}**, {result.dtype} parameters ({result.tensors} tensors, {result.numel / 1e6:.1f}M "
        f"entries), {result.threads} thread(s), median of {result.rounds} interleaved steps, load average "
        f"{result.load_before:.1f} before / {result.load_after:.1f} after"
        + (f" (first step, with Triton's compilation: {firsts})" if firsts else "")
        + ":",
        "",
        "| method | path | step (ms) | x fused AdamW | speed-up over topk MoFO | state (MiB) | state vs AdamW (MiB) "
        "| transient peak (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result.methods:
        t = median_time(m)
        ratio = f"{median_ratio(m, base):.2f}" if base else "n/a"
        if reference is None:
            speedup = "n/a"
        else:
            speedup = f"{median_ratio(reference, m):.1f}x" if m is not reference else "1.0x"
        state = f"{m.state_bytes / mib:.0f}" if m.state_bytes else "-"
        extra = f"{(m.state_bytes - adamw_state) / mib:+.0f}" if m.state_bytes and adamw_state is not None else "-"
        transient = f"{m.transient_bytes / mib:.0f}" if m.transient_bytes is not None else "-"
        lines.append(f"| {m.name} | {m.path} | {t * 1e3:.1f} | {ratio} | {speedup} | {state} | {extra} | {transient} |")
    return lines


# The summary's targets: the exact selection within 1.5x fused AdamW's step, the sampled one within 1.1x.
TARGETS = {"exact": 1.5, "sampled": 1.1}


def format_summary(results: list[Result]) -> list[str]:
    """One row per configuration: fused AdamW's step and the fused MoFO paths' ratios to it, against the targets."""
    kernel = "triton" if any(m.name.endswith("_triton") for r in results for m in r.methods) else "fused"
    lines = [
        "| shape set | dtype | threads | fused AdamW (ms) | exact x AdamW (target <= 1.5) "
        "| sampled x AdamW (target <= 1.1) | load average |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        by_name = {m.name: m for m in r.methods}
        base = by_name.get("adamw_fused")
        if base is None:
            continue
        cells = []
        for selection, target in TARGETS.items():
            method = by_name.get(f"mofo_{selection}_{kernel}")
            if method is None:
                cells.append("-")
                continue
            ratio = median_ratio(method, base)
            cells.append(f"{ratio:.2f}" + ("" if ratio <= target else " (over)"))
        lines.append(
            f"| {r.shapes} | {r.dtype} | {r.threads} | {median_time(base) * 1e3:.1f} | {cells[0]} | {cells[1]} "
            f"| {r.load_before:.1f} / {r.load_after:.1f} |"
        )
    return lines


VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16")


def cpu_description() -> str:
    """The CPU's model, its vector extensions (from /proc/cpuinfo on Linux), torch's CPU capability and, where the
    fused MoFO kernels loaded, the instruction set they run: what the speed of a memory-bound step depends on."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    vector = " ".join(flag for flag in VECTOR_FLAGS if flag in flags) or "unknown"
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return f"CPU: {model}, {os.cpu_count()} CPUs; vector flags: {vector}; torch CPU capability: {capability}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["gpt2-small", "llama2-7b-layers"], choices=["gpt2-small", "llama2-7b-layers"]
    )
    parser.add_argument("--llama-layers", type=int, default=2, help="Llama-2-7B layers in the 7B shape set")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=7, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds before measuring")
    parser.add_argument(
        "--slow-steps",
        type=int,
        default=3,
        help="measured rounds of the slow methods (topk reference, eager MoFO), which sit out the later rounds",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=None, help="torch.set_num_threads, a run per value (default: torch's)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help="only these methods (and fused AdamW, the ratios' reference)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory measurement")
    parser.add_argument("--no-compile-cost", action="store_true", help="skip timing a cold kernel compilation")
    parser.add_argument("--quick", action="store_true", help="five small tensors, fp32, 2 rounds: a smoke test")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    configs: list[tuple[str, list[tuple[int, ...]]]]
    if args.quick:
        configs = [("quick", quick_shapes())]
        dtypes = ["fp32"]
        args.steps, args.warmup, args.slow_steps = 2, 1, 2
    else:
        dtypes = args.dtypes
        configs = []
        for name in args.shapes:
            if name == "gpt2-small":
                configs.append(("GPT-2-small", gpt2_small_shapes()))
            else:
                configs.append((f"Llama-2-7B, {args.llama_layers} layer(s)", llama2_7b_layer_shapes(args.llama_layers)))
    thread_counts = args.threads or [torch.get_num_threads()]
    names = {m.name for m in make_methods(device, torch.bfloat16)}
    if args.methods is not None and not set(args.methods) <= names:
        parser.error(f"unknown methods {sorted(set(args.methods) - names)}; the methods are {sorted(names)}")

    header = [
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        cpu_description(),
    ]
    header.append(kernel_description())
    if not args.no_compile_cost and not args.quick:
        cold, warm, error = compile_costs()
        if cold is None:
            header.append(f"first-use compilation: unavailable ({error})")
        else:
            header.append(
                f"first-use compilation of the fused kernels (empty cache, fresh process): {cold:.2f} s; "
                f"load from the cache in a later process: {warm:.3f} s"
            )
    print("\n".join(header), flush=True)

    sections = ["\n".join(header)]
    results = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for name, shapes in configs:
            for dtype_name in dtypes:
                result = run_config(
                    name,
                    shapes,
                    DTYPES[dtype_name],
                    device,
                    args.warmup,
                    args.steps,
                    args.slow_steps,
                    measure_memory=not args.no_memory,
                    only=args.methods,
                )
                results.append(result)
                table = "\n".join(format_table(result))
                print("\n" + table, flush=True)
                sections.append(table)
    summary = "\n".join(["Summary, median per-round ratios to fused AdamW:", "", *format_summary(results)])
    print("\n" + summary, flush=True)
    sections.append(summary)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n\n".join(sections) + "\n")


if __name__ == "__main__":
    main()
