"""Non-finite gradients in MoFO: ``nonfinite="skip"`` leaves those entries out of the step, ``"raise"`` stops first.

With ``"skip"`` an entry whose gradient is NaN or infinite keeps its moments and its weight, counts as ``|m| = 0``
in the selection and is never moved; the rest of the tensor steps exactly as it would have. Every backend (torch
operations, the fused C kernels) does the same; the DTensor path is checked in ``tests/test_mofo_sharded.py``.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from lit_mofo import MoFO
from lit_mofo.optim import _cpu
from lit_mofo.optim.mofo import mofo, selection_mask

KERNELS = _cpu.load()
PATHS = [
    pytest.param(False, id="eager"),
    pytest.param(None, id="fused", marks=pytest.mark.skipif(KERNELS is None, reason="fused kernels unavailable")),
]
# (300, 301) is above the exact selection's small-tensor limit (bracket and candidates) and above sample_size=1024
# (sampled threshold); (7, 5) is selected among all entries; (13,) takes the dense step.
SHAPES = [(300, 301), (7, 5), (13,)]


def poisoned(shape: tuple[int, ...], gen: torch.Generator, kind: str) -> Tensor:
    """A random gradient with NaN, +inf and -inf entries (``kind="mixed"``), or all NaN (``kind="all_nan"``)."""
    grad = torch.randn(shape, generator=gen)
    if kind == "all_nan":
        return torch.full(shape, math.nan)
    flat = grad.view(-1)
    index = torch.randperm(flat.numel(), generator=gen)
    bad = max(3, flat.numel() // 50)
    flat[index[:bad:3]] = math.nan
    flat[index[1:bad:3]] = math.inf
    flat[index[2:bad:3]] = -math.inf
    return grad


def params_of(dtype: torch.dtype, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def snapshot(optimizer: MoFO, params: list[Tensor]) -> list[tuple[Tensor, ...]]:
    return [
        (p.detach().clone(), *(optimizer.state[p][key].clone() for key in ("exp_avg", "exp_avg_sq")))
        if p in optimizer.state
        else (p.detach().clone(),)
        for p in params
    ]


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_entries_with_nan_or_inf_gradients_sit_the_step_out_and_the_rest_steps_normally(fused, selection, dtype):
    if fused is None and dtype not in KERNELS.dtypes:
        pytest.skip(f"no {dtype} kernel with this compiler")
    params = params_of(dtype)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "fraction": 0.15, "selection": selection, "sample_size": 1024}
    optimizer = MoFO(params, fused=fused, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [poisoned(p.shape, gen, "mixed") if step % 2 else torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(dtype)
        before = snapshot(optimizer, params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer.step()
        for p, previous in zip(params, before, strict=True):
            finite = p.grad.isfinite()
            state = optimizer.state[p]
            assert state["exp_avg"].isfinite().all() and state["exp_avg_sq"].isfinite().all()
            assert p.isfinite().all()
            if len(previous) == 3:
                _, m0, v0 = previous
                assert torch.equal(state["exp_avg"][~finite], m0[~finite]), "a skipped entry's moment moved"
                assert torch.equal(state["exp_avg_sq"][~finite], v0[~finite])
                # The other entries: exactly the plain moment update (torch's lerp/addcmul, as the kernels do).
                g = p.grad.float()
                torch.testing.assert_close(state["exp_avg"][finite], m0.lerp(g, 0.1)[finite], rtol=1e-6, atol=0)
            moved = p.detach() != previous[0]
            assert not moved[~finite].any(), "an entry with a non-finite gradient moved"
            if p.dim() >= 2 and (selection == "exact" or p.numel() <= 1024):
                expected = selection_mask(state["exp_avg"], 0.15, p.grad)
                # Entries the step moved by less than the weight's precision look unmoved: check inclusion only.
                assert not (moved & ~expected).any(), "moved an entry outside the topk definition's mask"
                if dtype == torch.float32:
                    assert torch.equal(moved, expected)
        stats = optimizer.last_step_stats[0]
        assert stats.nonfinite == sum(int((~p.grad.isfinite()).sum()) for p in params)
        assert (stats.nonfinite > 0) == bool(step % 2)


@pytest.mark.skipif(KERNELS is None, reason="fused kernels unavailable")
@pytest.mark.parametrize("selection", ["exact", "sampled"])
def test_the_fused_kernels_skip_the_same_entries_and_compute_the_same_step_as_torch_operations(selection):
    fused = None
    ours, reference = params_of(torch.float32), params_of(torch.float32)
    kwargs = {"lr": 1e-2, "fraction": 0.15, "selection": selection, "sample_size": 1024}
    opt, ref_opt = MoFO(ours, fused=fused, **kwargs), MoFO(reference, fused=False, **kwargs)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p, q in zip(ours, reference, strict=True):
            p.grad = poisoned(p.shape, gen, "mixed")
            q.grad = p.grad.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
            ref_opt.step()
        assert opt.last_step_stats == ref_opt.last_step_stats
    for p, q in zip(ours, reference, strict=True):
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", PATHS)
def test_an_all_nan_gradient_leaves_the_tensor_unchanged_and_it_trains_again_afterwards(fused):
    weight = nn.Parameter(torch.randn(40, 30, generator=torch.Generator().manual_seed(0)))
    optimizer = MoFO([weight], lr=1e-2, fraction=0.1, fused=fused)
    weight.grad = torch.randn(40, 30)
    optimizer.step()
    before = snapshot(optimizer, [weight])[0]
    weight.grad = torch.full((40, 30), math.nan)
    with pytest.warns(RuntimeWarning, match=r"'?param group 0, index 0'? had 1200 non-finite entries"):
        optimizer.step()
    assert torch.equal(weight.detach(), before[0])
    assert torch.equal(optimizer.state[weight]["exp_avg"], before[1])
    assert torch.equal(optimizer.state[weight]["exp_avg_sq"], before[2])
    assert optimizer.state[weight]["step"].item() == 2.0
    assert optimizer.last_step_stats[0].updated == 0 and optimizer.last_step_stats[0].nonfinite == 1200
    weight.grad = torch.randn(40, 30)
    optimizer.step()
    assert (weight.detach() != before[0]).sum() == 120, "the tensor must train again (k = 120 entries)"


@pytest.mark.parametrize("fused", PATHS)
def test_a_checkpoint_after_a_nan_step_holds_finite_state_and_resumes_bit_identically(fused):
    def run(model: nn.Module, optimizer: MoFO, seed: int, steps: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(8, 12, generator=gen)).square().mean().backward()
            model[0].weight.grad[0, :5] = math.nan  # a poisoned row, every step
            model[0].weight.grad[3, 2] = -math.inf
            optimizer.step()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 3))
    optimizer = MoFO(model.parameters(), lr=1e-2, fused=fused)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        run(model, optimizer, seed=0, steps=3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    for state in checkpoint["optimizer"]["state"].values():
        assert state["exp_avg"].isfinite().all() and state["exp_avg_sq"].isfinite().all()
    assert all(t.isfinite().all() for t in checkpoint["model"].values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run(model, optimizer, seed=1, steps=3)
        resumed = copy.deepcopy(model)
        resumed.load_state_dict(checkpoint["model"])
        resumed_optimizer = MoFO(resumed.parameters(), lr=1.0)
        resumed_optimizer.load_state_dict(checkpoint["optimizer"])
        run(resumed, resumed_optimizer, seed=1, steps=3)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_the_warning_names_the_tensor_once_and_the_counter_counts_every_step():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    optimizer = MoFO(model.named_parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.ones(2, 4)).sum().backward()
            model[1].weight.grad[0, 0] = math.inf
            optimizer.step()
            assert optimizer.last_step_stats[0].nonfinite == 1
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "'1.weight' had 1 non-finite entries" in messages[0] and 'nonfinite="raise"' in messages[0]


def test_raise_names_the_tensor_and_the_step_before_changing_any_parameter_or_state():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    named = list(model.named_parameters())
    optimizer = MoFO([{"params": named[:2]}, {"params": named[2:], "lr": 0.5}], lr=1e-2, nonfinite="raise")
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        optimizer.step()
    saved_params = copy.deepcopy(model.state_dict())
    saved_state = copy.deepcopy(optimizer.state_dict())
    optimizer.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    model[1].bias.grad[1] = math.nan  # the second group's tensor: the first group must not have stepped either
    with pytest.raises(RuntimeError, match=r"'1\.bias' \(shape \(2,\)\) has 1 non-finite entries .* at step 3.*"
                       r"no parameter and no optimizer state was changed.*nonfinite=\"skip\""):  # fmt: skip
        optimizer.step()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved_params[name]), name
    state = optimizer.state_dict()["state"]
    for index, saved in saved_state["state"].items():
        for key, value in saved.items():
            assert torch.equal(state[index][key], value), (index, key)


def test_raise_without_names_gives_the_group_and_index():
    params = [nn.Parameter(torch.zeros(3, 3)), nn.Parameter(torch.zeros(2))]
    optimizer = MoFO(params, nonfinite="raise")
    params[0].grad, params[1].grad = torch.zeros(3, 3), torch.tensor([1.0, math.inf])
    with pytest.raises(RuntimeError, match=r"param group 0, index 1 \(shape \(2,\)\).* at step 1"):
        optimizer.step()
    assert not optimizer.state, "no state may be created by a step that raised"


def test_finite_gradients_give_the_same_step_with_either_option():
    runs = []
    for nonfinite in ("skip", "raise"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 30), nn.Tanh(), nn.Linear(30, 3))
        optimizer = MoFO(model.parameters(), lr=1e-2, nonfinite=nonfinite)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randn(4, 10, generator=gen)).square().mean().backward()
            optimizer.step()
        runs.append([p.detach() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


def test_functional_mofo_skips_and_raises_too():
    param, grad = torch.zeros(4, 4), torch.arange(1.0, 17.0).reshape(4, 4)
    grad[3, 3] = math.nan  # the largest entry: skipped, the next 8 move
    m, v, step = torch.zeros(4, 4), torch.zeros(4, 4), torch.tensor(0.0)
    kwargs = {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "fraction": 0.5}
    with pytest.raises(RuntimeError, match=r"tensor 0 \(shape \(4, 4\)\) has 1 non-finite entries .* at step 1"):
        mofo([param], [grad], [m], [v], [step], filter_min_ndim=2, nonfinite="raise", **kwargs)
    assert step.item() == 0.0 and not m.any()
    with pytest.warns(RuntimeWarning, match="tensor 0 had 1 non-finite entries"):
        stats = mofo([param], [grad], [m], [v], [step], filter_min_ndim=2, **kwargs)
    assert stats.nonfinite == 1 and stats.updated == 8
    assert param[3, 3] == 0 and m[3, 3] == 0 and v[3, 3] == 0
    assert torch.equal(param.view(-1) != 0, torch.arange(16).ge(7) & torch.arange(16).lt(15))


@pytest.mark.parametrize("value", ["ignore", None, True])
def test_bad_nonfinite_option_is_rejected_with_the_choices(value):
    with pytest.raises(ValueError, match=r"nonfinite=.* is invalid; the valid range is one of \('skip', 'raise'\)"):
        MoFO([torch.zeros(2, 2, requires_grad=True)], nonfinite=value)
