"""MoFO's update rule, state, API and input validation, checked against a straightforward reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lit_mofo import MoFO
from lit_mofo.optim.mofo import selection_mask


class ReferenceMoFO:
    """methods.md §1 written out literally, in float64, with a full sort for the threshold."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fraction=0.15, filter_min_ndim=2):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.fraction, self.filter_min_ndim = fraction, filter_min_ndim
        self.state: dict[int, dict] = {}
        self.last_masks: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.double()
            st = self.state.setdefault(i, {"t": 0, "m": torch.zeros_like(g), "v": torch.zeros_like(g)})
            st["t"] += 1
            t = st["t"]
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            m, v = st["m"], st["v"]
            if self.fraction is not None and p.dim() >= self.filter_min_ndim:
                k = max(1, math.floor(self.fraction * p.numel()))
                tau = m.abs().flatten().sort(descending=True).values[k - 1]
                mask = m.abs() >= tau
            else:
                mask = torch.ones_like(m, dtype=torch.bool)
            self.last_masks[i] = mask
            upd = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
            new = p.double() * (1 - self.lr * self.wd) - self.lr * upd
            p.copy_(torch.where(mask, new, p.double()).to(p.dtype))


def make_params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 24), (7, 3, 5), (40,), (3, 2), (1, 1), (5,)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def random_grads(params, gen, none_every: int = 0, step: int = 0):
    for i, p in enumerate(params):
        if none_every and (i + step) % none_every == 0:
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.01, None])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("filter_min_ndim", [2, 0])
def test_update_matches_reference_and_leaves_unselected_entries_bitwise_fixed(fraction, weight_decay, filter_min_ndim):
    ours, ref = make_params(), make_params()
    opt = MoFO(ours, lr=1e-2, weight_decay=weight_decay, fraction=fraction, filter_min_ndim=filter_min_ndim)
    ref_opt = ReferenceMoFO(ref, lr=1e-2, weight_decay=weight_decay, fraction=fraction, filter_min_ndim=filter_min_ndim)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        random_grads(ours, gen, none_every=4, step=step)  # some grads are None in some steps
        for p, r in zip(ours, ref, strict=True):
            r.grad = None if p.grad is None else p.grad.clone()
        before = [p.detach().clone() for p in ours]
        opt.step()
        ref_opt.step()
        for i, (p, r, b) in enumerate(zip(ours, ref, before, strict=True)):
            torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
            if p.grad is None:
                assert torch.equal(p, b), "a parameter without gradient must not move"
                continue
            unselected = ~ref_opt.last_masks[i]
            assert torch.equal(p[unselected], b[unselected]), "unselected entries must stay bit-for-bit unchanged"
            if fraction is not None and p.dim() >= filter_min_ndim:
                assert (p != b).sum() <= max(1, math.floor(fraction * p.numel()))


def test_tiny_tensor_where_floor_of_fraction_times_numel_is_zero_still_moves_one_entry():
    p = torch.zeros(3, 4, requires_grad=True)  # floor(0.05 * 12) == 0 -> k = 1
    opt = MoFO([p], lr=0.1, fraction=0.05)
    p.grad = torch.arange(12.0).reshape(3, 4)
    opt.step()
    assert (p != 0).sum() == 1
    assert p[2, 3] != 0  # the entry with the largest |momentum|
    assert opt.last_step_stats[0].updated == 1


def test_ties_at_the_threshold_are_all_selected():
    p = torch.zeros(4, 5, requires_grad=True)
    opt = MoFO([p], lr=0.1, fraction=0.1)  # k = 2
    grad = torch.zeros(4, 5)
    grad[0, :4] = 3.0  # four entries tie for the largest |m|
    grad[1, 0] = -1.0
    p.grad = grad
    opt.step()
    assert torch.equal(p != 0, grad == 3.0)
    assert opt.last_step_stats[0].updated == 4


def test_selection_uses_momentum_magnitude_not_the_current_gradient():
    p = torch.zeros(1, 4, requires_grad=True)
    opt = MoFO([p], lr=0.1, fraction=0.25, betas=(0.9, 0.999))  # k = 1
    p.grad = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    opt.step()
    moved_first = p.detach().clone()
    p.grad = torch.tensor([[0.0, -2.0, 0.0, 0.0]])  # m = [0.9, -0.2, 0, 0] after this step
    opt.step()
    assert p[0, 1] == 0 and p[0, 0] != moved_first[0, 0]
    assert torch.equal(opt.state[p]["exp_avg"] != 0, torch.tensor([[True, True, False, False]]))


def test_selection_mask_is_none_when_every_entry_is_selected():
    assert selection_mask(torch.randn(5, 5), 1.0) is None
    mask = selection_mask(torch.tensor([[1.0, -4.0], [3.0, 2.0]]), 0.5)
    assert torch.equal(mask, torch.tensor([[False, True], [True, False]]))


def test_low_dimensional_tensors_take_the_dense_step_by_default():
    weight, bias = torch.zeros(8, 8, requires_grad=True), torch.zeros(8, requires_grad=True)
    opt = MoFO([weight, bias], lr=0.1, fraction=0.25)
    weight.grad, bias.grad = torch.randn(8, 8), torch.randn(8).abs() + 0.1
    opt.step()
    assert (bias != 0).all()
    assert (weight != 0).sum() == 16
    stats = opt.last_step_stats[0]
    assert (stats.updated, stats.numel, stats.filtered_updated, stats.filtered_numel) == (24, 72, 16, 64)
    assert stats.filtered_fraction == 0.25
    assert opt.update_fraction == pytest.approx(24 / 72)
    assert opt.last_step_total == stats  # one group: the total is that group


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0, clip: float | None = None):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            return loss

        losses.append(optimizer.step(closure).item())
    return losses


@pytest.mark.parametrize("filter_min_ndim", [2, 0])
def test_fraction_one_reproduces_torch_adamw_over_50_steps(filter_min_ndim):
    ours, theirs = small_model(), small_model()
    hyper = {"lr": 3e-3, "betas": (0.85, 0.99), "eps": 1e-7, "weight_decay": 0.05}
    train(ours, MoFO(ours.parameters(), fraction=1.0, filter_min_ndim=filter_min_ndim, **hyper), 50)
    train(theirs, torch.optim.AdamW(theirs.parameters(), **hyper), 50)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert (p - q).abs().max() <= 1e-6


def test_step_calls_the_closure_with_grad_enabled_and_returns_its_loss():
    model = small_model()
    opt = MoFO(model.parameters(), lr=1e-3)
    with torch.no_grad():  # like torch optimizers, the closure re-enables grad itself
        loss = opt.step(lambda: (opt.zero_grad(), model(torch.ones(2, 10)).sum().backward(), torch.tensor(7.0))[-1])
    assert loss.item() == 7.0
    assert all(p.grad is not None for p in model.parameters())
    assert opt.step() is None


def test_step_runs_under_no_grad_and_keeps_parameters_leaves():
    model = small_model()
    opt = MoFO(model.parameters(), lr=1e-3)
    model(torch.ones(2, 10)).sum().backward()
    opt.step()
    for p in model.parameters():
        assert p.is_leaf and p.grad_fn is None and p.requires_grad
    assert all(s["exp_avg"].grad_fn is None for s in opt.state.values())


def test_parameters_without_gradient_are_skipped_and_get_no_state():
    used, unused = torch.zeros(4, 4, requires_grad=True), torch.ones(4, 4, requires_grad=True)
    opt = MoFO([used, unused], lr=0.1)
    used.grad = torch.randn(4, 4)
    opt.step()
    assert unused not in opt.state and torch.equal(unused, torch.ones(4, 4))
    assert set(opt.state[used]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[used]["step"].item() == 1.0
    assert opt.last_step_stats[0].numel == 16


def test_state_dict_round_trip_continues_bit_identically():
    model = small_model()
    opt = MoFO(model.parameters(), lr=1e-2, weight_decay=0.01)
    train(model, opt, 10)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 10, seed=1)

    resumed = small_model(seed=3)
    resumed.load_state_dict(saved_model)
    resumed_opt = MoFO(resumed.parameters(), lr=123.0)  # hyper-parameters come from the state dict
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["lr"] == 1e-2 and resumed_opt.param_groups[0]["fraction"] == 0.15
    train(resumed, resumed_opt, 10, seed=1)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_named_parameters_and_param_groups_with_overrides():
    model = small_model()
    named = list(model.named_parameters())
    opt = MoFO(
        [
            {"params": named[:2], "fraction": None, "lr": 0.5},
            {"params": named[2:], "fraction": 0.3, "weight_decay": 0.1},
        ],
        lr=1e-3,
    )
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias"]
    assert opt.param_groups[0]["fraction"] is None and opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[1]["fraction"] == 0.3 and opt.param_groups[1]["weight_decay"] == 0.1
    train(model, opt, 1)
    first_layer = opt.last_step_stats[0]
    assert first_layer.updated == first_layer.numel == 10 * 32 + 32  # dense group
    # Per-tensor k = floor(0.3 * numel): 307 of the 32x32 matrix, 28 of the 3x32 one (random grads: no ties).
    assert opt.last_step_stats[1].filtered_updated == 307 + 28


def test_lr_scheduler_changes_the_step_size():
    p = torch.zeros(1, 1, requires_grad=True)
    opt = MoFO([p], lr=1.0, fraction=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    deltas = []
    for _ in range(3):
        before = p.item()
        p.grad = torch.ones(1, 1)
        opt.step()
        scheduler.step()
        deltas.append(before - p.item())
    # Constant gradient: the bias-corrected Adam update is ~1, so each step moves by ~lr.
    assert deltas == pytest.approx([1.0, 0.5, 0.25], rel=1e-5)


def test_clipped_gradients_are_what_the_update_uses():
    ours, ref = small_model(), small_model()
    train(ours, MoFO(ours.parameters(), lr=1e-2), 5, clip=0.1)
    ref_opt = ReferenceMoFO(list(ref.parameters()), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        ref.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_opt.step()
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_keep_fp32_moments_and_track_an_fp32_reference(dtype):
    low = [p.detach().to(dtype).requires_grad_() for p in make_params()]
    ref = [p.detach().to(dtype).requires_grad_() for p in make_params()]
    opt = MoFO(low, lr=1e-2, fraction=0.2, master_weights=False)  # the reference rounds every step's result too
    ref_opt = ReferenceMoFO(ref, lr=1e-2, fraction=0.2)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        random_grads(low, gen)
        for p, r in zip(low, ref, strict=True):
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(low, ref, strict=True):
        assert p.dtype == dtype
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(p, r, atol=0, rtol=0)  # same fp32 math, one rounding to dtype per step


def test_low_precision_resume_keeps_fp32_moments_and_continues_bit_identically():
    def run(params, opt, seed, steps=3):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            random_grads(params, gen)
            opt.step()

    params = [p.detach().to(torch.bfloat16).requires_grad_() for p in make_params()]
    opt = MoFO(params, lr=1e-2)
    run(params, opt, seed=0)
    saved_params, saved_opt = copy.deepcopy(params), copy.deepcopy(opt.state_dict())
    run(params, opt, seed=1)

    resumed_params = [p.detach().clone().requires_grad_() for p in saved_params]
    resumed = MoFO(resumed_params, lr=1e-2)
    resumed.load_state_dict(saved_opt)  # torch alone would cast the moments to bfloat16
    for p, saved in zip(resumed_params, saved_opt["state"].values(), strict=True):
        assert resumed.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(resumed.state[p]["exp_avg"], saved["exp_avg"])
        assert resumed.state[p]["exp_avg"] is not saved["exp_avg"]  # a copy, like torch's load
    run(resumed_params, resumed, seed=1)
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)


def test_float64_parameters_keep_float64_moments():
    p = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    opt = MoFO([p], lr=0.1)
    p.grad = torch.randn(3, 3, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float64


def test_non_contiguous_parameter_is_updated_in_place():
    base = torch.zeros(6, 4)
    p = base.t().requires_grad_()  # a non-contiguous leaf
    opt = MoFO([p], lr=0.1, fraction=0.25)
    p.grad = torch.arange(24.0).reshape(4, 6)
    opt.step()
    assert (p != 0).sum() == 6 and (p[3] != 0).all() and not p.is_contiguous()
    assert base[:, 3].ne(0).all()  # written through to the storage it views


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, r"fraction=0\.0 .*\(0, 1\]"),
        ({"fraction": 1.5}, r"fraction=1\.5 .*\(0, 1\]"),
        ({"fraction": -0.1}, r"fraction=-0\.1"),
        ({"lr": -1e-3}, r"lr=-0\.001 .*>= 0"),
        ({"eps": -1.0}, r"eps=-1\.0 .*>= 0"),
        ({"weight_decay": -0.1}, r"weight_decay=-0\.1 .*>= 0"),
        ({"betas": (1.0, 0.999)}, r"betas=\(1\.0, 0\.999\) .*\[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas=\(0\.9, -0\.1\) .*\[0, 1\)"),
        ({"filter_min_ndim": -1}, r"filter_min_ndim=-1 .*>= 0"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoFO([torch.zeros(2, 2, requires_grad=True)], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": "1e-3"}, r"MoFO\(\): lr='1e-3' is invalid; the valid range is a number >= 0\. .*2e-5"),
        ({"lr": math.inf}, r"lr=inf is invalid; the valid range is a number >= 0, finite"),
        ({"lr": math.nan}, r"lr=nan is invalid"),
        ({"lr": torch.tensor(1e-3)}, r"lr=tensor\(0\.0010\) is invalid"),
        ({"fraction": "0.15"}, r"fraction='0\.15' is invalid; the valid range is \(0, 1\]\. .*None for the dense"),
        ({"fraction": True}, r"fraction=True is invalid"),
        ({"eps": None}, r"eps=None is invalid; the valid range is a number >= 0\. The usual value is 1e-8"),
        ({"weight_decay": math.inf}, r"weight_decay=inf is invalid; .*finite"),
        ({"betas": 0.9}, r"betas=0\.9 is invalid; the valid range is two numbers \(beta1, beta2\), each in \[0, 1\)"),
        ({"betas": ("0.9", 0.999)}, r"betas=\('0\.9', 0\.999\) is invalid"),
        ({"betas": (0.9, 0.99, 0.9)}, r"betas=\(0\.9, 0\.99, 0\.9\) is invalid"),
        ({"filter_min_ndim": 2.0}, r"filter_min_ndim=2\.0 is invalid; the valid range is an integer >= 0"),
        ({"sample_size": 2048.0}, r"sample_size=2048\.0 is invalid; the valid range is an integer >= 1024"),
        ({"seed": True}, r"seed=True is invalid"),
        ({"fused": 1}, r"fused=1 is invalid; the valid range is None, True or False"),
        ({"selection": None}, r"selection=None is invalid"),
    ],
)
def test_wrongly_typed_or_non_finite_hyperparameters_raise_value_error_naming_value_range_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoFO([torch.zeros(2, 2, requires_grad=True)], **kwargs)


def test_group_overrides_are_checked_like_the_defaults_also_when_added_later():
    optimizer = MoFO([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match=r"MoFO param group 1: lr='fast' is invalid"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": "fast"})
    with pytest.raises(ValueError, match=r"MoFO param group 1: nonfinite='ignore' is invalid"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "nonfinite": "ignore"})
    assert len(optimizer.param_groups) == 1, "a rejected group must not stay in the optimizer"


def test_hyperparameter_check_validates_a_partial_config_as_the_cli_does():
    from lit_mofo.optim.mofo import _validate_hyperparameters

    _validate_hyperparameters({"lr": 2e-5, "fraction": 0.15}, where="optimizer.init_args")
    with pytest.raises(ValueError, match=r"optimizer\.init_args: fraction='abc' is invalid"):
        _validate_hyperparameters({"fraction": "abc"}, where="optimizer.init_args")


def test_bad_group_override_is_rejected_with_the_group_index():
    with pytest.raises(ValueError, match=r"param group 1: fraction=2\.0"):
        MoFO(
            [
                {"params": [torch.zeros(2, requires_grad=True)]},
                {"params": [torch.zeros(2, requires_grad=True)], "fraction": 2.0},
            ]
        )


def test_sparse_gradients_are_rejected():
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = MoFO(embedding.parameters(), lr=1e-3)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="MoFO does not support sparse gradients"):
        opt.step()


def test_complex_parameters_are_rejected():
    with pytest.raises(ValueError, match=r"does not support complex parameters.*view_as_real"):
        MoFO([torch.zeros(2, 2, dtype=torch.complex64, requires_grad=True)])


def test_distributed_dtensor_parameters_are_rejected_with_the_ddp_fix():
    # Since the global threshold (issue 6), DTensors on a 1-D mesh are accepted (tests/test_mofo_sharded.py);
    # layouts whose threshold MoFO cannot agree across ranks are still rejected, naming the fix.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for placement in (Shard(0), Replicate()):
            MoFO([nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh, [placement]))])
        mesh_2d = init_device_mesh("cpu", (1, 1))
        for placements in ([Shard(0), Shard(1)], [Replicate(), Shard(0)]):
            param = nn.Parameter(distribute_tensor(torch.zeros(4, 4), mesh_2d, placements))
            with pytest.raises(ValueError, match=r"DTensor parameter.*not supported.*strategy=\"ddp\""):
                MoFO([param])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("selection", ["exact", "sampled"])
@pytest.mark.parametrize("fused", [None, False])
def test_every_selection_and_path_matches_the_reference(selection, fused):
    # make_params' tensors are smaller than sample_size, so "sampled" selects exactly there too.
    ours, ref = make_params(), make_params()
    opt = MoFO(ours, lr=1e-2, weight_decay=0.1, fraction=0.2, filter_min_ndim=0, selection=selection, fused=fused)
    ref_opt = ReferenceMoFO(ref, lr=1e-2, weight_decay=0.1, fraction=0.2, filter_min_ndim=0)
    gen = torch.Generator().manual_seed(3)
    for step in range(8):
        random_grads(ours, gen, none_every=3, step=step)
        for p, r in zip(ours, ref, strict=True):
            r.grad = None if p.grad is None else p.grad.clone()
        before = [p.detach().clone() for p in ours]
        opt.step()
        ref_opt.step()
        for i, (p, r, b) in enumerate(zip(ours, ref, before, strict=True)):
            torch.testing.assert_close(p, r, atol=1e-6, rtol=1e-6)
            if p.grad is not None:
                assert torch.equal(p[~ref_opt.last_masks[i]], b[~ref_opt.last_masks[i]])
