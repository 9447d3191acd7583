"""MoFO's Triton kernels (``fused=True`` on CUDA), checked against the C kernels, torch operations and the spec.

Each test runs on the devices at hand:

- ``interpreter``: CPU tensors routed to the Triton kernels through Triton's interpreter. That needs
  ``TRITON_INTERPRET=1`` before triton is first imported (``import lightning`` imports it), so these variants run in
  a subprocess started by ``tests/test_mofo_triton_interpreter.py``; in the main test process they are skipped.
- ``cuda``: CUDA tensors and the compiled kernels, where a GPU is present (``benchmarks/gpu_check.sh``).

What they show: the Triton step is the C kernels' step bit for bit (same arithmetic, same sample, same exact
threshold), in every dtype, for both selections, with ties, zeros, heavy tails and non-finite gradients; the exact
mask is the topk definition on the step's own first moment through every repair branch; against torch operations
the moments are identical and the weights within 2 ulps (float32: torch's vectorised ``sqrt`` is not correctly
rounded, the kernels' is) or 1 ulp (bfloat16/float16); the sampled fraction is within its documented bound;
``fraction=1.0`` is AdamW; a resumed run is bit-identical; and a step really launches these kernels, the same number
of times for 3 tensors as for 30.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lit_mofo.optim import _cpu, _kernels, _selection
from lit_mofo.optim._eager import EagerKernels
from lit_mofo.optim.mofo import MoFO, selection_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mofo_selection import DATA

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
KERNELS = _cpu.load()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FRACTIONS = [0.15, 0.01, 0.5, 0.999]
# The non-finite data's warnings (one per tensor) are MoFO's documented behaviour, tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:MoFO. the gradient of .* non-finite entries:RuntimeWarning")


def _device_params() -> list:
    interpreter_reason = (
        "triton is not installed"
        if not HAS_TRITON
        else "run in a subprocess with TRITON_INTERPRET=1 by tests/test_mofo_triton_interpreter.py"
    )
    cuda_reason = "no CUDA device" if not torch.cuda.is_available() else "TRITON_INTERPRET=1 is set"
    interpreter = HAS_TRITON and INTERPRET
    cuda = HAS_TRITON and torch.cuda.is_available() and not INTERPRET
    return [
        pytest.param("interpreter", marks=pytest.mark.skipif(not interpreter, reason=interpreter_reason)),
        pytest.param("cuda", marks=pytest.mark.skipif(not cuda, reason=cuda_reason)),
    ]


@pytest.fixture(params=_device_params())
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[torch.device]:
    """The device whose tensors take the Triton path; small tensors take the exact selection's bracket path."""
    monkeypatch.setattr(_selection, "SMALL_TENSOR", 256)
    if request.param == "interpreter":
        monkeypatch.setitem(_kernels.FUSED_KERNELS, "cpu", _kernels.TRITON_KERNELS)  # fused=True on CPU: Triton
        # Small blocks: the small test tensors then have full blocks (vectorised path) and a partial last one.
        monkeypatch.setattr(kernels(), "block", 1024)
        yield torch.device("cpu")
    else:
        yield torch.device("cuda")


def kernels() -> _selection.BatchedKernels:
    loaded = _kernels.load_triton()
    assert loaded is not None, _kernels.triton_unavailable_reason()
    return loaded


SHAPES = [(1,), (2,), (3, 1), (7, 5), (20, 30), (64, 64)]


def make(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(device=device, dtype=dtype)) for shape in shapes]


def cpu_copies(params: list[Tensor]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().cpu().clone()) for p in params]


def gradients(kind: str, params: list[Tensor], gen: torch.Generator) -> list[Tensor]:
    """Gradients of one kind of data (the selection tests' kinds; ``nan_inf`` has NaN and -inf entries)."""
    return [DATA[kind](tuple(p.shape), gen).to(p.dtype) for p in params]


def assert_bitwise(actual: Tensor, expected: Tensor, what: str) -> None:
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert torch.equal(actual.view(torch.int16 if actual.element_size() == 2 else torch.int32),
                       expected.view(torch.int16 if expected.element_size() == 2 else torch.int32)), what  # fmt: skip


def ulps(actual: Tensor, expected: Tensor, *scales: Tensor) -> float:
    """Largest |actual - expected| in units of the dtype's spacing at the largest magnitude involved."""
    dtype = expected.dtype
    magnitude = expected.detach().abs()
    for scale in scales:
        magnitude = torch.maximum(magnitude, scale.detach().abs().to(dtype))
    spacing = torch.nextafter(magnitude, torch.tensor(math.inf, dtype=dtype, device=magnitude.device)) - magnitude
    return ((actual.detach().float() - expected.detach().float()).abs() / spacing.float()).max().item()


# ---- the step is the C kernels' step, bit for bit ------------------------------------------------------------------


@pytest.mark.skipif(KERNELS is None, reason=f"C kernels unavailable: {_cpu.unavailable_reason()}")
@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("data", ["normal", "ties", "zeros", "heavy_tail", "nan_inf"])
def test_triton_step_is_the_c_kernels_step_bit_for_bit(device, selection, dtype, data):
    if dtype not in KERNELS.dtypes:
        pytest.skip(f"no {dtype} C kernel with this compiler")
    shapes = [(40, 30), (20, 30), (7, 5), (13,), (1,)]  # (40, 30) is above sample_size: sampled there
    ours, reference = make(shapes, dtype, device), make(shapes, dtype, torch.device("cpu"))
    options = {"lr": 1e-2, "weight_decay": 0.1, "fraction": 0.15, "selection": selection, "sample_size": 1024}
    triton_opt, c_opt = MoFO(ours, fused=True, **options), MoFO(reference, fused=None, **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q, g in zip(ours, reference, gradients(data, reference, gen), strict=True):
            q.grad = g
            p.grad = g.to(device)
        triton_opt.step()
        c_opt.step()
        assert triton_opt.last_step_stats == c_opt.last_step_stats
    if dtype != torch.float32:  # a parameter written since the last step restarts from its new value
        for p, q in zip(ours, reference, strict=True):
            with torch.no_grad():
                p.view(-1)[: p.numel() // 2] = 0.5
                q.view(-1)[: q.numel() // 2] = 0.5
            q.grad = gradients("normal", [q], gen)[0]
            p.grad = q.grad.to(device)
        triton_opt.step()
        c_opt.step()
    for i, (p, q) in enumerate(zip(ours, reference, strict=True)):
        assert_bitwise(p, q, f"parameter {i}")
        keys = ("exp_avg", "exp_avg_sq", "master_weight") if dtype != torch.float32 else ("exp_avg", "exp_avg_sq")
        for key in keys:
            assert_bitwise(triton_opt.state[p][key], c_opt.state[q][key], f"{key} {i}")


# ---- the exact mask is the topk definition -------------------------------------------------------------------------


def moved_is_selected(device: torch.device, **options: object) -> dict[str, object]:
    """Options under which an entry moves if and only if it is selected: the step halves every selected weight
    (lr 0.5, weight decay 1) and the Adam part is negligible (eps 1e6), in every dtype."""
    return {"lr": 0.5, "weight_decay": 1.0, "eps": 1e6, **options}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("data", list(DATA))
def test_exact_mask_is_the_topk_definition_on_its_own_first_moment(device, dtype, data):
    gen = torch.Generator().manual_seed(2)
    for fraction in FRACTIONS:
        params = make(SHAPES, dtype, device, seed=3)
        optimizer = MoFO(params, fused=True, **moved_is_selected(device, fraction=fraction, filter_min_ndim=0))
        for p, g in zip(params, gradients(data, params, gen), strict=True):
            p.grad = g.to(device)
        before = [p.detach().clone() for p in params]
        optimizer.step()
        expected = []
        for p in params:
            mask = selection_mask(optimizer.state[p]["exp_avg"], fraction, p.grad)
            expected.append(p.grad.isfinite() if mask is None else mask)
        for p, b, mask in zip(params, before, expected, strict=True):
            assert torch.equal(p.detach() != b, mask), f"{tuple(p.shape)}, fraction {fraction}"
        assert optimizer.last_step_stats[0].updated == sum(int(mask.sum()) for mask in expected)


@pytest.mark.parametrize(
    "patch",
    [
        pytest.param({"bracket_ranks": lambda k, numel, size: (1, 2)}, id="bracket_above_the_threshold"),
        pytest.param({"bracket_ranks": lambda k, numel, size: (size - 1, size)}, id="bracket_below_the_threshold"),
        pytest.param({"bracket_ranks": lambda k, numel, size: (0, size + 1)}, id="bracket_is_everything"),
        pytest.param({"candidate_capacity": lambda share, local: 17}, id="candidates_overflow"),
    ],
)
def test_every_repair_branch_of_the_exact_selection_gives_the_topk_mask(device, patch, monkeypatch):
    for name, value in patch.items():
        monkeypatch.setattr(_selection, name, value)
    gen = torch.Generator().manual_seed(4)
    for data in ("normal", "ties", "nan_inf", "sorted"):
        for fraction in (0.15, 0.6):
            params = make([(40, 30), (20, 30)], torch.bfloat16, device, seed=5)
            optimizer = MoFO(params, fused=True, **moved_is_selected(device, fraction=fraction))
            for p, g in zip(params, gradients(data, params, gen), strict=True):
                p.grad = g.to(device)
            before = [p.detach().clone() for p in params]
            optimizer.step()
            for p, b in zip(params, before, strict=True):
                expected = selection_mask(optimizer.state[p]["exp_avg"], fraction, p.grad)
                assert torch.equal(p.detach() != b, expected), f"{data}, fraction {fraction}"


def test_the_default_bracket_path_on_a_tensor_above_the_small_tensor_limit(device, monkeypatch):
    monkeypatch.setattr(_selection, "SMALL_TENSOR", 16384)
    (param,) = make([(130, 131)], torch.float32, device)  # 17030 entries: sampled bracket and candidates
    optimizer = MoFO([param], fused=True, **moved_is_selected(device, fraction=0.15))
    param.grad = torch.randn(130, 131, generator=torch.Generator().manual_seed(0)).to(device)
    before = param.detach().clone()
    optimizer.step()
    assert torch.equal(param.detach() != before, selection_mask(optimizer.state[param]["exp_avg"], 0.15))


# ---- against torch operations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_moments_equal_and_weights_within_an_ulp_or_two_of_torch_operations(device, selection, dtype):
    shapes = [(40, 30), (20, 30), (7, 5), (13,), (1,)]
    ours, reference = make(shapes, dtype, device), make(shapes, dtype, device)
    options = {"lr": 1e-2, "weight_decay": 0.1, "fraction": 0.15, "selection": selection, "sample_size": 1024}
    triton_opt, torch_opt = MoFO(ours, fused=True, **options), MoFO(reference, fused=False, **options)
    gen = torch.Generator().manual_seed(6)
    budget = 2.0 if dtype == torch.float32 else 1.0
    for _ in range(4):
        for p, q in zip(ours, reference, strict=True):
            q.grad = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
            p.grad = q.grad.clone()
        before = [q.detach().clone() for q in reference]
        triton_opt.step()
        torch_opt.step()
        assert triton_opt.last_step_stats == torch_opt.last_step_stats
        for p, q, b in zip(ours, reference, before, strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                # torch's CPU kernels compute lerp_/addcmul_ as the kernels' fused multiply-adds; CUDA's may
                # contract differently: 1 ulp there.
                assert ulps(triton_opt.state[p][key], torch_opt.state[q][key]) <= (0 if device.type == "cpu" else 1)
            assert ulps(p, q, b) <= budget, tuple(p.shape)
            with torch.no_grad():
                p.copy_(q)  # each step from the same point


def test_fraction_one_is_torch_adamw(device):
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).to(device)
    theirs = copy.deepcopy(ours)
    hyper = {"lr": 3e-3, "betas": (0.85, 0.99), "eps": 1e-7, "weight_decay": 0.05}
    optimizers = [
        MoFO(ours.parameters(), fraction=1.0, fused=True, **hyper),
        torch.optim.AdamW(theirs.parameters(), **hyper),
    ]
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        x, y = torch.randn(16, 10, generator=gen).to(device), torch.randint(0, 3, (16,), generator=gen).to(device)
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (p - q).abs().max() <= 1e-6


@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_a_resumed_run_is_bit_identical(device, selection):
    def run(params: list[Tensor], optimizer: MoFO, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=p.dtype)
            optimizer.step()

    options = {"lr": 1e-2, "selection": selection, "sample_size": 1024, "seed": 7, "fused": True}
    params = make([(40, 30), (20, 30), (13,)], torch.bfloat16, device)
    optimizer = MoFO(params, **options)
    run(params, optimizer, seed=0)
    saved_params, saved_state = copy.deepcopy(params), copy.deepcopy(optimizer.state_dict())
    run(params, optimizer, seed=1)
    resumed = [nn.Parameter(p.detach().clone()) for p in saved_params]
    resumed_optimizer = MoFO(resumed, lr=1.0, fused=True)
    resumed_optimizer.load_state_dict(saved_state)
    assert all(s["step"].device.type == "cpu" for s in resumed_optimizer.state.values()), "step must stay on the host"
    run(resumed, resumed_optimizer, seed=1)
    for p, q in zip(params, resumed, strict=True):
        assert_bitwise(p, q, "resumed parameter")


def test_sampled_fraction_is_within_its_documented_bound(device, monkeypatch):
    # std <= sqrt(f (1 - f) / s); 4 standard deviations fail with probability 6e-5 per tensor-step.
    monkeypatch.setattr(kernels(), "block", 4096)  # fewer, larger programs: the interpreter's cost is per program
    sample_size, fraction = 4096, 0.15
    params = make([(200, 200), (150, 180)], torch.float32, device)
    optimizer = MoFO(params, lr=1e-3, fraction=fraction, selection="sampled", sample_size=sample_size, fused=True)
    gen = torch.Generator().manual_seed(0)
    bound = 4 * math.sqrt(fraction * (1 - fraction) / sample_size)
    errors = []
    for _ in range(5):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * torch.rand(p.shape[0], 1, generator=gen)).to(device)
        optimizer.step()
        errors.append(optimizer.last_step_stats[0].filtered_fraction - fraction)
    assert max(abs(e) for e in errors) < bound, errors


# ---- the path really is the Triton kernels --------------------------------------------------------------------------


def test_a_fused_step_launches_the_triton_kernels_and_nothing_else(device, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path must not fall back to the per-tensor backends")

    for name in ("moments_bracket", "update", "fused", "sample"):
        monkeypatch.setattr(EagerKernels, name, refuse)
        if KERNELS is not None:
            monkeypatch.setattr(_cpu.CpuKernels, name, refuse)
    launches = kernels().launches
    for selection, expected in (
        ("exact", {"sample", "moments_bracket", "histogram_candidates", "histogram_range", "update", "fused"}),
        ("sampled", {"sample", "fused"}),
    ):
        params = make([(40, 30), (13,)], torch.float32, device)
        optimizer = MoFO(params, lr=1e-2, selection=selection, sample_size=1024, fused=True)
        for p in params:
            p.grad = torch.ones_like(p)
        before = launches.copy()
        optimizer.step()
        ran = {name for name in launches if launches[name] > before[name]}
        assert ran == expected, (selection, dict(launches - before))


def test_launches_per_step_do_not_grow_with_the_number_of_tensors(device):
    launches = kernels().launches
    counted = []
    for count in (3, 30):
        params = make([(20, 30)] * count + [(13,)] * count, torch.float32, device)
        optimizer = MoFO(params, lr=1e-2, fused=True)
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(device)
        before = launches.copy()
        optimizer.step()
        counted.append(dict(launches - before))
    assert counted[0] == counted[1], counted


CUDA_ONLY = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available() and not INTERPRET), reason="needs CUDA and compiled Triton kernels"
)


@CUDA_ONLY
def test_a_cuda_step_makes_no_host_synchronisation():
    device = torch.device("cuda")
    params = make([(200, 300)] * 4 + [(300,)] * 4, torch.bfloat16, device)
    for selection in ("exact", "sampled"):
        optimizer = MoFO(params, lr=1e-2, selection=selection, sample_size=1024, fused=True)
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()  # the first step allocates state and compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert optimizer.last_step_stats[0].numel == sum(p.numel() for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_operations_on_cuda_give_the_cpu_steps_mask():
    # fused=None on CUDA (the default) is the eager path; it has no kernel of its own to compare with.
    for selection in ("exact", "sampled"):
        cuda = make([(300, 301), (40, 30), (13,)], torch.float32, torch.device("cuda"))
        cpu = cpu_copies(cuda)
        options = {"lr": 0.5, "weight_decay": 1.0, "selection": selection, "sample_size": 1024}
        on_cuda, on_cpu = MoFO(cuda, fused=None, **options), MoFO(cpu, fused=False, **options)
        gen = torch.Generator().manual_seed(0)
        for p, q in zip(cuda, cpu, strict=True):
            q.grad = torch.randn(q.shape, generator=gen)
            p.grad = q.grad.cuda()
        before = [q.detach().clone() for q in cpu]
        on_cuda.step()
        on_cpu.step()
        assert on_cuda.last_step_stats == on_cpu.last_step_stats
        for p, q, b in zip(cuda, cpu, before, strict=True):
            assert torch.equal(p.detach().cpu() != b, q.detach() != b)
            torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-6, atol=1e-7)


# ---- availability (no triton import needed) -------------------------------------------------------------------------


@pytest.fixture
def fresh_triton_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernels, "_triton_state", _kernels._TritonState())


def test_fused_true_without_triton_raises_at_construction_with_the_install_fix(fresh_triton_state, monkeypatch):
    def missing(name: str) -> None:
        raise ModuleNotFoundError("No module named 'triton'")  # what importing lit_mofo.optim._triton raises then

    monkeypatch.setattr(_kernels, "importlib", types.SimpleNamespace(import_module=missing))
    monkeypatch.setitem(_kernels.FUSED_KERNELS, "cpu", _kernels.TRITON_KERNELS)  # stands in for a CUDA parameter
    message = r"Triton kernels .* unavailable \(ModuleNotFoundError: No module named 'triton'\)\. Install triton"
    with pytest.raises(RuntimeError, match=message + r" .*lit-mofo\[triton\].*fused=None"):
        MoFO([torch.zeros(4, 4, requires_grad=True)], fused=True)
    MoFO([torch.zeros(4, 4, requires_grad=True)], fused=None)  # torch operations need no triton


def test_lit_mofo_fused_0_turns_the_triton_kernels_off(fresh_triton_state, monkeypatch):
    monkeypatch.setenv("LIT_MOFO_FUSED", "0")
    assert _kernels.load_triton() is None
    assert "LIT_MOFO_FUSED=0" in _kernels.triton_unavailable_reason()


# ---- what the compiled kernels are, without a GPU ------------------------------------------------------------------

COMPILED = pytest.mark.skipif(
    not HAS_TRITON or INTERPRET, reason="needs triton in its compiled mode (the interpreter has no code generation)"
)


def ptx(kernel_name: str, dtype: torch.dtype, arch: int = 90, master: bool = False) -> str:
    """The kernel compiled ahead of time for an NVIDIA GPU (Triton's bundled LLVM and ptxas; no GPU needed), with
    the launch options of :class:`~lit_mofo.optim._triton.TritonKernels` and aligned base pointers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lit_mofo.optim import _triton

    pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}[dtype]
    signature = {"pbase": pointer, "mbase": "*fp32", "meta_ptr": "*i64", "scal_ptr": "*fp32", "starts_ptr": "*i64",
                 "count": "i32", "tau_ptr": "*fp32", "counts_ptr": "*i64"}  # fmt: skip
    if kernel_name == "moments_bracket":
        signature = {**{k: v for k, v in signature.items() if k not in ("tau_ptr", "counts_ptr")}, "lo_ptr": "*fp32",
                     "hi_ptr": "*fp32", "counts_ptr": "*i64", "cand_ptr": "*fp32"}  # fmt: skip
    constexprs = {"PDTYPE": _triton._DTYPES[dtype], "P_ALIGN": 16 // dtype.itemsize, "M_ALIGN": 4,
                  "BLOCK": _triton.TritonKernels.block, "T_PAD": 64}  # fmt: skip
    if kernel_name != "moments_bracket":
        constexprs["HAS_MASTER"] = master
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(
        fn=getattr(_triton, f"_{kernel_name}_kernel"),
        signature=signature,
        constexprs=constexprs,
        attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]},
    )
    options = {"num_warps": _triton.TritonKernels.warps, "enable_fp_fusion": False}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


@COMPILED
@pytest.mark.parametrize(
    ("kernel_name", "dtype", "arch", "master"),
    [
        ("fused", torch.bfloat16, 90, False),
        ("fused", torch.float32, 90, False),
        ("fused", torch.float16, 80, False),
        ("update", torch.bfloat16, 90, False),
        ("moments_bracket", torch.float32, 90, False),
        ("fused", torch.bfloat16, 90, True),
        ("update", torch.float16, 80, True),
    ],
)
def test_compiled_kernels_use_ieee_arithmetic_only_the_written_fmas_and_vector_loads(kernel_name, dtype, arch, master):
    import re

    code = ptx(kernel_name, dtype, arch, master)
    per_thread = 4096 // (32 * 8)  # entries per thread; each kernel has a full-block and a partial-block body
    # Correctly rounded division and square root, as torch's CUDA kernels and the C kernels compute them; no
    # approximate variants and no flush of subnormals to zero.
    assert not re.search(r"\b(div\.(approx|full)|sqrt\.approx|rsqrt|ex2\.approx)", code)
    assert ".ftz" not in code
    if kernel_name != "moments_bracket":
        assert len(re.findall(r"\bsqrt\.rn\.f32", code)) == 2 * per_thread
        assert len(re.findall(r"\bdiv\.rn\.f32", code)) == 2 * 2 * per_thread
    # The fused multiply-adds written in the kernels (lerp's two candidates and the second moment), no others.
    fmas = len(re.findall(r"\bfma\.rn\.f32", code))
    assert fmas == (0 if kernel_name == "update" else 3 * 2 * per_thread), fmas
    assert re.search(r"\bld\.global\.v4\.b32", code), "full blocks must use vector loads"
