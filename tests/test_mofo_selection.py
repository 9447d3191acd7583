"""MoFO's fast selection and fused kernels, checked against the straightforward definitions.

``exact`` selection must give the very mask of the topk definition (``|m| >= k-th largest |m|``) on every kind of
data, through every branch of its bracket algorithm, on both backends; ``sampled`` selection must realise the
target fraction to the documented accuracy with a sample that is seeded, checkpointed and rank-independent; the
fused kernels must compute what torch's operations compute.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lit_mofo.optim import _cpu, _selection
from lit_mofo.optim._eager import EagerKernels
from lit_mofo.optim._selection import (
    C_MOVED,
    C_SKIPPED,
    Batch,
    Entry,
    StepScalars,
    exact_thresholds,
    plan_exact,
    sample_indices,
    sample_key,
)
from lit_mofo.optim.mofo import MoFO, mofo, selection_mask

KERNELS = _cpu.load()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason=f"fused kernels unavailable: {_cpu.unavailable_reason()}")
BACKENDS = [
    pytest.param("eager", id="eager"),
    pytest.param("fused", id="fused", marks=needs_kernels),
]


def backend(name: str) -> _selection.BatchedKernels:
    return EagerKernels() if name == "eager" else KERNELS  # type: ignore[return-value]


def one_tensor(
    exp_avg: Tensor, grad: Tensor, k: int, key: int = 0, exp_avg_sq: Tensor | None = None, param: Tensor | None = None
) -> Entry:
    """The selection driver's entry for one whole tensor (parameter and second moment zero unless given)."""
    return Entry(
        torch.zeros_like(exp_avg) if param is None else param,
        grad,
        exp_avg,
        torch.zeros_like(exp_avg) if exp_avg_sq is None else exp_avg_sq,
        None,
        None,
        k,
        key,
        SCALARS,
    )


SCALARS = StepScalars(
    weight=0.1, beta2=0.999, step_size=1e-3, bias_correction2_sqrt=0.5, eps=1e-8, decay=1.0, has_weight_decay=False
)


def topk_threshold(exp_avg: Tensor, k: int, grad: Tensor | None = None) -> Tensor:
    """The straightforward definition: the k-th entry of ``torch.topk`` of ``|m|`` (NaN ranks largest); an entry
    whose gradient is non-finite counts as 0 (``nonfinite="skip"``)."""
    magnitude = exp_avg.abs()
    if grad is not None:
        magnitude = magnitude.masked_fill(~grad.isfinite(), 0.0)
    return torch.topk(magnitude.flatten(), k).values[-1]


# Data whose moments stress the selection: ties, zeros, heavy tails, bunched candidates, NaN and inf.
def _normal(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen)


def _ties(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randint(-3, 4, shape, generator=gen).float()


def _zeros(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.zeros(shape)


def _mostly_zero(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.05)


def _heavy_tail(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=gen).exp_().pow_(4) * torch.randn(shape, generator=gen).sign()


def _sorted(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    return torch.randn(math.prod(shape), generator=gen).sort().values.reshape(shape)


def _row_scaled(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    x = torch.randn(shape, generator=gen)
    scale = 10.0 ** (torch.arange(shape[0]) % 5).float()
    return x * scale.reshape(-1, *([1] * (len(shape) - 1)))


def _nan_inf(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    x = torch.randn(shape, generator=gen).flatten()
    index = torch.randperm(x.numel(), generator=gen)
    x[index[: max(1, x.numel() // 200)]] = math.nan
    x[index[x.numel() // 200 : x.numel() // 100]] = -math.inf
    return x.reshape(shape)


DATA: dict[str, Callable[[tuple[int, ...], torch.Generator], Tensor]] = {
    "normal": _normal,
    "ties": _ties,
    "zeros": _zeros,
    "mostly_zero": _mostly_zero,
    "heavy_tail": _heavy_tail,
    "sorted": _sorted,
    "row_scaled": _row_scaled,
    "nan_inf": _nan_inf,
}
SHAPES = [(1,), (2,), (3, 1), (7, 5), (64, 64), (130, 131), (300, 301), (1000, 263)]
FRACTIONS = [0.15, 0.01, 0.5, 0.999]


def run_exact(ops: _selection.BatchedKernels, exp_avg: Tensor, grad: Tensor, k: int) -> float:
    """The threshold after the moment update of ``exp_avg`` (in place), checking the count of skipped entries."""
    entry = plan_exact(one_tensor(exp_avg, grad, k, sample_key(0, 0, 1)))
    exp_avg_sq = entry.exp_avg_sq
    before = exp_avg.clone()
    nonfinite = ~grad.isfinite()
    thresholds, counts = exact_thresholds(ops, Batch([entry], ops.block))
    tau, skipped = thresholds[0].item(), int(counts[0, C_SKIPPED])
    assert skipped == int(nonfinite.sum())
    torch.testing.assert_close(exp_avg[nonfinite], before[nonfinite], rtol=0, atol=0, equal_nan=True)
    assert not exp_avg_sq[nonfinite].any(), "the second moment of a skipped entry must stay unchanged (0)"
    return tau


def assert_same_threshold(tau: float, exp_avg: Tensor, k: int, grad: Tensor | None = None) -> None:
    expected = topk_threshold(exp_avg, k, grad)
    if math.isnan(expected.item()):
        assert math.isnan(tau), f"the k largest include NaN, so tau must be NaN, got {tau}"
    else:
        assert torch.tensor(tau, dtype=torch.float32) == expected, f"tau={tau!r}, topk gives {expected.item()!r}"
    mask = exp_avg.abs() >= tau
    assert torch.equal(mask, exp_avg.abs() >= expected), "the mask differs from the topk definition"


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("data", list(DATA))
def test_exact_threshold_is_the_topk_kth_value_on_every_kind_of_data(backend_name, shape, data):
    ops = backend(backend_name)
    gen = torch.Generator().manual_seed(hash((data, shape)) % 2**31)
    exp_avg, grad = DATA[data](shape, gen), DATA[data](shape, gen)
    numel = exp_avg.numel()
    for fraction in FRACTIONS:
        k = max(1, math.floor(fraction * numel))
        m = exp_avg.clone()
        tau = run_exact(ops, m, grad, k)
        assert_same_threshold(tau, m, k, grad)
        reference = selection_mask(m, fraction, grad)  # the optimizer's oracle agrees too
        if not math.isnan(tau) and reference is not None:
            assert torch.equal((m.abs() >= tau) & grad.isfinite(), reference)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(
    "ranks",
    [
        pytest.param(lambda size: (1, 2), id="bracket_above_the_threshold"),
        pytest.param(lambda size: (size - 1, size), id="bracket_below_the_threshold"),
        pytest.param(lambda size: (0, size + 1), id="bracket_is_everything"),
    ],
)
def test_exact_threshold_stays_exact_when_the_bracket_misses(backend_name, ranks, monkeypatch):
    monkeypatch.setattr(_selection, "bracket_ranks", lambda k, numel, size: ranks(size))
    ops = backend(backend_name)
    gen = torch.Generator().manual_seed(0)
    for data in ("normal", "ties", "nan_inf"):
        exp_avg, grad = DATA[data]((400, 300), gen), DATA[data]((400, 300), gen)
        for fraction in (0.15, 0.6):
            k = math.floor(fraction * exp_avg.numel())
            m = exp_avg.clone()
            assert_same_threshold(run_exact(ops, m, grad, k), m, k, grad)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_exact_threshold_stays_exact_when_the_candidate_buffer_overflows(backend_name, monkeypatch):
    monkeypatch.setattr(_selection, "candidate_capacity", lambda share, local: 17)
    ops = backend(backend_name)
    gen = torch.Generator().manual_seed(1)
    for data in ("normal", "sorted", "ties"):
        exp_avg, grad = DATA[data]((500, 300), gen), DATA[data]((500, 300), gen)
        m = exp_avg.clone()
        k = math.floor(0.15 * m.numel())
        assert_same_threshold(run_exact(ops, m, grad, k), m, k, grad)


@needs_kernels
def test_c_selection_matches_kthvalue_with_duplicates_and_leaves_its_input_unchanged():
    gen = torch.Generator().manual_seed(0)
    for n in [*range(1, 70), 1000, 4097]:
        for values in (
            torch.rand(n, generator=gen),
            torch.randint(0, 4, (n,), generator=gen).float(),
            torch.randn(n, generator=gen).exp().pow(8).clamp(max=math.inf),  # many binades, +inf included
        ):
            entry = one_tensor(values, values, 1)
            entry.sample = n  # a sample of n entries: the values themselves
            batch = Batch([entry], KERNELS.block)
            for kth in sorted({0, n // 3, n // 2, n - 1}):
                work = values.clone()
                selected = KERNELS.select_sample(batch, work, torch.tensor([[n - kth]]))  # descending rank, 1-based
                assert selected.item() == torch.kthvalue(values, kth + 1).values.item()
                assert torch.equal(work, values), "select must leave its input unchanged"


def test_sample_positions_are_the_same_in_torch_and_in_c_and_uniform():
    for numel in (1, 7, 1000, 2**32 - 1, 2**32, 2**40 + 5):
        for key in (0, 2**63 + 5, 2**64 - 1, sample_key(3, 7, 11)):
            index = sample_indices(key, 4000, numel)
            assert int(index.min()) >= 0 and int(index.max()) < numel
            if KERNELS is not None and numel < 2**24:  # float32 holds the positions exactly
                positions = torch.arange(numel, dtype=torch.float32)  # |lerp(x, x)| = x: the sample is its index
                entry = one_tensor(positions, positions, 1, key)
                entry.sample = 4000
                out = torch.empty(4000)
                KERNELS.sample(Batch([entry], KERNELS.block), out)
                assert torch.equal(out.long(), index)
    # Stratified: sample j lies in the j-th of `size` equal strata, uniformly within it.
    size, numel = 100_000, 10**9 + 7
    index = sample_indices(sample_key(0, 0, 1), size, numel)
    j = torch.arange(size)
    start, end = j * numel // size, (j + 1) * numel // size
    assert bool(((index >= start) & (index < end)).all())
    within = (index - start).double() / (end - start).double()
    counts = torch.histc(within, bins=20, min=0, max=1)
    assert counts.std() / counts.mean() < 3 / math.sqrt(size / 20)  # flat up to sampling noise


def test_sample_keys_differ_between_seeds_tensors_and_steps():
    keys = {sample_key(seed, tensor, step) for seed in range(4) for tensor in range(4) for step in range(1, 5)}
    assert len(keys) == 64


# ---------------------------------------------------------------------------------------------------------------
# The optimizer with each selection and path


def model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(40, 300), nn.Tanh(), nn.Linear(300, 260), nn.Tanh(), nn.Linear(260, 7))
    return net.to(dtype)


def train(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    moved = []
    for _ in range(steps):
        x = torch.randn(32, 40, generator=gen).to(next(net.parameters()).dtype)
        before = {name: p.detach().clone() for name, p in net.named_parameters()}
        optimizer.zero_grad()
        net(x).float().square().mean().backward()
        optimizer.step()
        moved.append({name: p.detach() != before[name] for name, p in net.named_parameters()})
    return moved


@needs_kernels
@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_fused_kernels_compute_what_torch_operations_compute(selection, dtype):
    if dtype not in KERNELS.dtypes:
        pytest.skip(f"no {dtype} kernel with this compiler")
    fused, eager = model(dtype=dtype), model(dtype=dtype)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "selection": selection, "sample_size": 1024}
    opt_fused = MoFO(fused.parameters(), fused=True, **kwargs)
    opt_eager = MoFO(eager.parameters(), fused=False, **kwargs)
    # Both take the eager model's gradients: a last-bit difference in one step must not feed the next gradients
    # (in float16 one such difference changed 1506 gradient entries of a tensor two steps later).
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        opt_eager.zero_grad()
        eager(torch.randn(32, 40, generator=gen).to(dtype)).float().square().mean().backward()
        for p, q in zip(fused.parameters(), eager.parameters(), strict=True):
            p.grad = q.grad.clone()
        opt_fused.step()
        opt_eager.step()
        assert opt_fused.last_step_stats == opt_eager.last_step_stats
    for (name, p), q in zip(fused.named_parameters(), eager.parameters(), strict=True):
        state_f, state_e = opt_fused.state[p], opt_eager.state[q]
        torch.testing.assert_close(state_f["exp_avg"], state_e["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state_f["exp_avg_sq"], state_e["exp_avg_sq"], rtol=1e-6, atol=1e-12)
        # torch's vectorised sqrt (SLEEF, 0.5 ulp) is not always correctly rounded, the C one is: a last-bit
        # difference in a step now and then; rounding the step to 16 bits hides almost all of them.
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(p, q, rtol=max(ulp, 1e-6), atol=max(ulp * 1e-2, 1e-7), msg=name)
        if dtype != torch.float32:
            assert (p != q).float().mean() < 1e-3, name


@pytest.mark.parametrize("fused", [None, False])
def test_exact_selection_moves_exactly_the_topk_entries_of_every_filtered_tensor(fused):
    net = model()
    optimizer = MoFO(net.parameters(), lr=0.05, fraction=0.15, fused=fused)
    for step in range(4):
        (step_moved,) = train(net, optimizer, 1, seed=step)
        for (name, p), moved in zip(net.named_parameters(), step_moved.values(), strict=True):
            if p.dim() < 2:
                assert moved.all(), name
                continue
            m = optimizer.state[p]["exp_avg"]
            assert torch.equal(moved, m.abs() >= topk_threshold(m, math.floor(0.15 * p.numel()))), name


@pytest.mark.parametrize("fused", [None, pytest.param(False, marks=pytest.mark.slow)])
def test_sampled_fraction_is_within_half_a_point_of_the_target_above_the_sample_size(fused):
    # Tensors above sample_size (65536) take the sampled threshold; 0.5 points is 3.6 standard deviations.
    shapes = [(300, 300), (512, 512), (1024, 300)]
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    optimizer = MoFO(params, lr=1e-3, fraction=0.15, selection="sampled", fused=fused)
    gen = torch.Generator().manual_seed(0)
    errors = []
    for _ in range(8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * torch.rand(p.shape[0], 1, generator=gen)
        before = [p.detach().clone() for p in params]
        optimizer.step()
        for p, b in zip(params, before, strict=True):
            errors.append((p != b).float().mean().item() - 0.15)
    assert max(abs(e) for e in errors) < 0.005
    # And the spread is the sampling one, sqrt(f (1 - f) / s): neither biased nor needlessly exact.
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert 0.3 * math.sqrt(0.15 * 0.85 / 65536) < rms < 2 * math.sqrt(0.15 * 0.85 / 65536)


def test_sampled_selection_is_exact_for_tensors_up_to_the_sample_size():
    p = torch.zeros(100, 100, requires_grad=True)
    optimizer = MoFO([p], lr=0.1, fraction=0.15, selection="sampled", sample_size=10_000)
    p.grad = torch.randn(100, 100)
    optimizer.step()
    assert (p != 0).sum().item() == 1500


def sampled_run(seed: int, steps: int = 3, optimizer_seed: int | None = None) -> tuple[nn.Module, MoFO]:
    net = model()
    optimizer = MoFO(net.parameters(), lr=1e-2, selection="sampled", sample_size=1024, seed=seed)
    train(net, optimizer, steps)
    return net, optimizer


def test_sampled_selection_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    a, _ = sampled_run(seed=5)
    torch.set_rng_state(rng_before)
    b, _ = sampled_run(seed=5)
    c, _ = sampled_run(seed=6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    net = model()
    optimizer = MoFO(net.parameters(), selection="sampled", sample_size=1024)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    state = torch.get_rng_state()
    optimizer.step()
    assert torch.equal(torch.get_rng_state(), state), "the sample must not draw from torch's global generator"


@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_resume_from_state_dict_continues_bit_identically_with_the_saved_seed(selection):
    net = model()
    optimizer = MoFO(net.parameters(), lr=1e-2, selection=selection, sample_size=1024, seed=7)
    train(net, optimizer, 3)
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(net, optimizer, 3, seed=1)

    resumed = model(seed=9)
    resumed.load_state_dict(saved_net)
    resumed_opt = MoFO(resumed.parameters(), seed=1234)  # the seed, like every option, comes from the checkpoint
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["seed"] == 7 and resumed_opt.param_groups[0]["selection"] == selection
    train(resumed, resumed_opt, 3, seed=1)
    for p, q in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checkpoint_saved_before_the_selection_options_loads_with_their_defaults():
    net = model()
    optimizer = MoFO(net.parameters(), lr=1e-2)
    train(net, optimizer, 1)
    old = copy.deepcopy(optimizer.state_dict())
    for group in old["param_groups"]:
        for key in ("selection", "fused", "sample_size", "seed"):
            del group[key]
    resumed = MoFO(model().parameters(), selection="sampled")
    resumed.load_state_dict(old)
    assert [resumed.param_groups[0][key] for key in ("selection", "fused", "sample_size", "seed")] == [
        "exact",
        None,
        65536,
        0,
    ]


def test_two_optimizers_with_the_same_seed_select_alike_as_ddp_ranks_do():
    nets = [model(), model()]
    optimizers = [MoFO(n.parameters(), lr=1e-2, selection="sampled", sample_size=1024) for n in nets]
    moved = [train(n, o, 3) for n, o in zip(nets, optimizers, strict=True)]
    for step0, step1 in zip(*moved, strict=True):
        assert all(torch.equal(step0[name], step1[name]) for name in step0)


def test_selection_can_differ_per_param_group():
    net = model()
    first, rest = list(net.parameters())[:2], list(net.parameters())[2:]
    optimizer = MoFO([{"params": first, "selection": "sampled"}, {"params": rest}], lr=1e-2)
    assert [g["selection"] for g in optimizer.param_groups] == ["sampled", "exact"]
    train(net, optimizer, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selection": "topk"}, r"selection='topk' .*\('exact', 'sampled'\).*\"exact\""),
        ({"fused": "yes"}, r"fused='yes' .*None, True or False"),
        ({"sample_size": 100}, r"sample_size=100 .*>= 1024"),
        ({"seed": -1}, r"seed=-1 .*\[0, 2\*\*63\)"),
    ],
)
def test_bad_selection_options_raise_value_error_naming_value_choices_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoFO([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_functional_mofo_rejects_an_unknown_selection():
    with pytest.raises(ValueError, match=r"selection='fast'.*\('exact', 'sampled'\)"):
        mofo([], [], [], [], [], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0, fraction=0.1,
             filter_min_ndim=2, selection="fast")  # fmt: skip


@needs_kernels
def test_fused_true_rejects_tensors_the_kernels_cannot_step():
    with pytest.raises(ValueError, match=r"fused=True.*torch.float64.*fused=None"):
        MoFO([torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)], fused=True)
    p = torch.zeros(8, 4).t().requires_grad_()  # non-contiguous: found at step time
    optimizer = MoFO([p], fused=True)
    p.grad = torch.ones(4, 8)
    with pytest.raises(ValueError, match=r"contiguous: False.*fused=None"):
        optimizer.step()


@pytest.fixture
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process where the kernels cannot be built (as without a C compiler)."""
    monkeypatch.setattr(_cpu, "_state", _cpu._State())
    monkeypatch.setattr(_cpu, "_compiler", lambda: None)


def test_without_a_compiler_fused_none_falls_back_with_one_info_message(no_kernels, caplog):
    with caplog.at_level(logging.INFO, logger="lit_mofo.optim._cpu"):
        net, ref = model(), model()
        train(net, MoFO(net.parameters(), lr=1e-2), 2)
        train(net, MoFO(net.parameters(), lr=1e-2), 1)
    train(ref, MoFO(ref.parameters(), lr=1e-2, fused=False), 2)
    assert _cpu.unavailable_reason() == "RuntimeError: no C compiler found (set $CC, or install cc/gcc/clang)"
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_without_a_compiler_fused_true_raises_at_construction(no_kernels):
    with pytest.raises(RuntimeError, match=r"fused=True.*no C compiler found.*fused=None"):
        MoFO([torch.zeros(2, 2, requires_grad=True)], fused=True)


def test_lit_mofo_fused_0_disables_the_kernels(monkeypatch):
    monkeypatch.setattr(_cpu, "_state", _cpu._State())
    monkeypatch.setenv("LIT_MOFO_FUSED", "0")
    assert _cpu.load() is None
    assert "LIT_MOFO_FUSED=0" in _cpu.unavailable_reason()


@needs_kernels
def test_kernels_are_cached_and_loaded_from_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_MOFO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_cpu, "_state", _cpu._State())
    assert _cpu.load() is not None
    (library,) = tmp_path.glob("mofo_kernels_*.so")
    monkeypatch.setattr(_cpu, "_state", _cpu._State())
    monkeypatch.setattr(_cpu.subprocess, "run", _fail_if_compiling(_cpu.subprocess.run))
    assert _cpu.load() is not None
    assert list(tmp_path.glob("mofo_kernels_*.so")) == [library]


def _fail_if_compiling(run: Callable) -> Callable:
    def guarded(command, *args, **kwargs):
        assert "--version" in command, f"compiled although the cache holds the library: {command}"
        return run(command, *args, **kwargs)

    return guarded


@needs_kernels
def test_portable_build_without_cpu_specific_instructions_selects_exactly_too(monkeypatch, tmp_path):
    # The library compiled without CPU-specific flags takes the plain C loops instead of the vector ones.
    monkeypatch.setenv("LIT_MOFO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LIT_MOFO_CPU_CAPABILITY", "default")
    monkeypatch.setattr(_cpu, "_state", _cpu._State())
    portable = _cpu.load()
    assert portable is not None, _cpu.unavailable_reason()
    gen = torch.Generator().manual_seed(5)
    for data in ("normal", "ties", "nan_inf", "sorted"):
        exp_avg, grad = DATA[data]((300, 301), gen), DATA[data]((300, 301), gen)
        for k in (1, 13545, 90000):
            m, m_native = exp_avg.clone(), exp_avg.clone()
            assert_same_threshold(run_exact(portable, m, grad, k), m, k, grad)
            run_exact(KERNELS, m_native, grad, k)
            torch.testing.assert_close(m, m_native, rtol=0, atol=0, equal_nan=True, msg="build-dependent moments")
    p, q = torch.randn(64, 70, generator=gen), torch.randn(64, 70, generator=gen)
    for kernels in (portable, KERNELS):
        m, v = torch.zeros(64, 70), torch.zeros(64, 70)
        counts = torch.zeros(1, _selection.C_COLUMNS, dtype=torch.int64)
        batch = Batch([one_tensor(m, q, 100, exp_avg_sq=v, param=p.clone())], kernels.block)
        kernels.fused(batch, torch.tensor([0.05]), counts)
        moved, skipped = int(counts[0, C_MOVED]), int(counts[0, C_SKIPPED])
        assert moved == int((m.abs() >= 0.05).sum()) and skipped == 0


# ---------------------------------------------------------------------------------------------------------------
# The instruction set of the C kernels


def test_the_kernels_are_built_only_for_instruction_sets_the_cpu_has(monkeypatch):
    def levels(flags: set[str], cap: str = "") -> list[str]:
        monkeypatch.setattr(_cpu, "_cpu_flags", lambda: flags)
        monkeypatch.setattr(_cpu.platform, "machine", lambda: "x86_64")
        monkeypatch.setenv("LIT_MOFO_CPU_CAPABILITY", cap)
        return [level for level, _, _ in _cpu._builds()]

    avx2 = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"}
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert levels(avx512) == ["avx512", "avx2", "default"]
    assert levels(avx2) == ["avx2", "default"], "an AVX2-only CPU never gets AVX-512 instructions"
    assert levels(avx2 - {"fma"}) == ["default"]
    assert levels(avx512, cap="avx2") == ["avx2", "default"]
    assert levels(avx2, cap="avx512") == ["avx2", "default"], "the cap lowers the level, never raises it"


@needs_kernels
def test_every_instruction_set_the_cpu_has_computes_the_same_bits(monkeypatch):
    """A whole MoFO step (exact and sampled, bfloat16 with master weights, non-finite gradients) with the kernels
    built for each level this CPU supports: the level changes the speed only."""

    def run(level: str) -> list[Tensor]:
        monkeypatch.setenv("LIT_MOFO_CPU_CAPABILITY", level)
        monkeypatch.setattr(_cpu, "_state", _cpu._State())
        assert _cpu.load() is not None and _cpu.load().isa == level, _cpu.unavailable_reason()
        gen = torch.Generator().manual_seed(0)
        tensors = []
        for selection in ("exact", "sampled"):
            for dtype in (torch.float32, torch.bfloat16):
                params = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in ((300, 301), (70, 3), (9,))]
                optimizer = MoFO(params, lr=1e-2, weight_decay=0.1, selection=selection, sample_size=1024, fused=True)
                for step in range(3):
                    for p in params:
                        p.grad = DATA["nan_inf" if step == 1 else "normal"](tuple(p.shape), gen).to(dtype)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        optimizer.step()
                for p in params:
                    tensors += [p.detach().clone(), *(v.clone() for k, v in optimizer.state[p].items() if k != "step")]
        return tensors

    if KERNELS.isa == "native":
        pytest.skip("not an x86-64 Linux CPU: one build, -march=native")
    levels = [level for level, _, _ in _cpu._builds()]
    results = {level: run(level) for level in levels}
    for level in levels[1:]:
        for a, b in zip(results[levels[0]], results[level], strict=True):
            bits = torch.int16 if a.element_size() == 2 else torch.int32
            assert torch.equal(a.view(bits), b.view(bits)), f"{levels[0]} and {level} differ"
