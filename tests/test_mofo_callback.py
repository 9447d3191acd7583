"""MoFOCallback: the module's own Adam/AdamW turned into MoFO at the start of fit, schedules, resume and DDP intact."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import Mock

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from process_launch import run_script
from torch import Tensor, nn
from torch.optim import Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
)

from lit_mofo import MoFO, warmup_lr_scheduler
from lit_mofo.callbacks.mofo_callback import MoFOCallback
from lit_mofo.params import named_parameter_categories

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CALLBACK_YAML = ROOT / "configs" / "mofo_callback.yaml"
TINY_LM_YAML = ROOT / "configs" / "examples" / "tiny_lm.yaml"
DDP_SCRIPT = ROOT / "tests" / "scripts" / "ddp_mofo_callback.py"
sys.path.insert(0, str(EXAMPLES))

from tiny_lm import SyntheticTokenDataModule, TinyCausalLM  # noqa: E402

HYPER: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-7, "weight_decay": 0.01}
STEPS = 6
QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
SCHEDULER_ORDER_WARNINGS = ("lr_scheduler.step()", "optimizer.step()` has been overridden")


def small_data(**overrides: Any) -> SyntheticTokenDataModule:
    return SyntheticTokenDataModule(**{"num_sequences": 48, "batch_size": 8, "seq_len": 16, **overrides})


def make_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(default_root_dir=root, **{**QUIET, "max_steps": STEPS, **kwargs})


def assert_bit_identical(expected: Mapping[Any, Tensor], actual: Mapping[Any, Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), key


def assert_same_optimizer_state(expected: Optimizer, actual: Optimizer) -> None:
    expected_state, actual_state = expected.state_dict()["state"], actual.state_dict()["state"]
    assert expected_state.keys() == actual_state.keys() and expected_state
    for index, state in expected_state.items():
        assert_bit_identical(state, actual_state[index])  # step, exp_avg, exp_avg_sq


def two_named_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Weight matrices with decay, the rest without; each group carries a key of the user's own (``name``)."""
    decay, no_decay = [], []
    for name, param, category in named_parameter_categories(module):
        (decay if category == "weight" else no_decay).append((name, param))
    return [
        {"params": decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def cosine(optimizer: Optimizer) -> LRScheduler:
    """The paper's schedule: linear warmup, then cosine to 0 (a LambdaLR from transformers)."""
    return warmup_lr_scheduler(optimizer, STEPS, schedule="cosine", warmup_ratio=0.3)["scheduler"]


def sequential(optimizer: Optimizer) -> LRScheduler:
    warmup = LinearLR(optimizer, start_factor=0.25, total_iters=2)
    return SequentialLR(optimizer, [warmup, CosineAnnealingLR(optimizer, T_max=STEPS - 2)], milestones=[2])


def one_cycle(optimizer: Optimizer) -> LRScheduler:
    """Cycles lr and beta1 (``cycle_momentum``) through keys it writes into the param groups."""
    return OneCycleLR(optimizer, max_lr=2e-3, total_steps=STEPS)


def adamw(groups: list[dict[str, Any]]) -> Optimizer:
    return AdamW(groups, **HYPER)


def mofo(groups: list[dict[str, Any]]) -> Optimizer:
    return MoFO(groups, **HYPER, fraction=0.15)


class ScheduledLM(TinyCausalLM):
    """``configure_optimizers`` returns ``make_optimizer(two_named_groups(self))`` with a per-step ``make_schedule``.

    Build it with :func:`lm`; the factories are attributes, not ``__init__`` arguments, so the saved hyper-parameters
    (and checkpoints) stay plain data.
    """

    make_optimizer: Callable[[list[dict[str, Any]]], Optimizer] = staticmethod(adamw)
    make_schedule: Callable[[Optimizer], LRScheduler] = staticmethod(cosine)

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.learning_rates: list[list[float]] = []
        self.beta1s: list[list[float]] = []

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer(two_named_groups(self))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.make_schedule(optimizer), "interval": "step"},
        }

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        groups = self.trainer.optimizers[0].param_groups
        self.learning_rates.append([group["lr"] for group in groups])
        self.beta1s.append([group["betas"][0] for group in groups])


class ManualLM(ScheduledLM):
    """The same, with manual optimization through ``self.optimizers()`` and ``self.lr_schedulers()``."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.stepped: list[type] = []

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        assert isinstance(optimizer, LightningOptimizer)
        loss = self(batch[0])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler.step()
        self.stepped.append(type(optimizer.optimizer))
        return loss


def lm(
    optimizer: Callable[[list[dict[str, Any]]], Optimizer] = adamw,
    schedule: Callable[[Optimizer], LRScheduler] = cosine,
    cls: type[ScheduledLM] = ScheduledLM,
) -> ScheduledLM:
    module = cls()
    module.make_optimizer = optimizer  # type: ignore[method-assign]
    module.make_schedule = schedule  # type: ignore[method-assign]
    return module


def fit(module: pl.LightningModule, root: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    trainer = make_trainer(root, callbacks=callbacks, **kwargs)
    trainer.fit(module, small_data())
    return trainer


# --- arguments --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, r"fraction=0.0 is invalid; the valid range is \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction=1.5 is invalid"),
        ({"fraction": True}, r"fraction=True is invalid"),
        ({"filter_min_ndim": -1}, r"filter_min_ndim=-1 is invalid; the valid range is an integer >= 0"),
        (
            {"dense": ["re:lm_head", "re:(unclosed"]},
            r"dense=\['re:lm_head', 're:\(unclosed'\] is invalid.*Entry 're:\(unclosed' is not a valid regular "
            r"expression",
        ),
        ({"dense": [3]}, r"dense=\[3\] is invalid.*Entry 3 is not a string"),
    ],
)
def test_bad_arguments_raise_misconfiguration_naming_the_value_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        MoFOCallback(**kwargs)


def test_mofo_options_reach_mofo_only_when_given() -> None:
    params = [nn.Parameter(torch.zeros(4, 4))]
    default = MoFOCallback().convert(AdamW(params))
    reference = MoFO([nn.Parameter(torch.zeros(4, 4))])
    for key in ("selection", "fused", "sample_size", "seed", "nonfinite"):  # None leaves MoFO's own default
        assert default.defaults.get(key) == reference.defaults.get(key)
        assert default.param_groups[0].get(key) == reference.param_groups[0].get(key)

    options = {"selection": "sampled", "fused": False, "sample_size": 2048, "seed": 7, "nonfinite": "raise"}
    if not set(options) <= set(reference.defaults):  # a lit_mofo.MoFO without these options
        with pytest.raises(MisconfigurationException, match=r"the installed lit_mofo\.MoFO has no `"):
            MoFOCallback(**options)
        return
    converted = MoFOCallback(**options).convert(AdamW(params, fused=True))  # AdamW's fused flag is not MoFO's
    assert {key: converted.param_groups[0][key] for key in options} == options


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selection": "topk"}, r"selection='topk' is invalid; the valid range is one of \('exact', 'sampled'\)"),
        ({"sample_size": 10}, r"sample_size=10 is invalid; the valid range is an integer >= 1024"),
        ({"nonfinite": "ignore"}, r"nonfinite='ignore' is invalid; the valid range is one of \('skip', 'raise'\)"),
    ],
)
def test_bad_mofo_options_are_refused_by_mofos_own_validation(kwargs: dict, message: str) -> None:
    if not set(kwargs) <= set(MoFO([nn.Parameter(torch.zeros(1))]).defaults):
        pytest.skip("the installed lit_mofo.MoFO has no such option")
    with pytest.raises(MisconfigurationException, match=message):
        MoFOCallback(**kwargs)


def test_a_bare_string_for_dense_is_one_pattern() -> None:
    assert MoFOCallback(dense="embedding").dense == ("embedding",)


# --- conversion of one optimizer ----------------------------------------------------------------------------------


class Net(nn.Module):
    """An embedding, two linear layers and a norm: every category of lit_mofo.params."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embed = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 3, bias=False)
        self.to(dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(torch.relu(self.proj(self.embed(tokens)))))


def train(net: Net, optimizer: Optimizer, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(10, (4, 5), generator=generator)
        target = torch.randint(3, (4, 5), generator=generator)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(tokens).float().flatten(0, 1), target.flatten())
        loss.backward()
        optimizer.step()


def test_conversion_keeps_param_groups_with_every_key_and_drops_only_adams_flags() -> None:
    net = Net()
    groups = [
        {"params": [("embed.weight", net.embed.weight)], "name": "embedding", "fraction": None},
        {"params": [("proj.weight", net.proj.weight), ("head.weight", net.head.weight)], "name": "matrices"},
        {
            "params": [("proj.bias", net.proj.bias), ("norm.weight", net.norm.weight), ("norm.bias", net.norm.bias)],
            "weight_decay": 0.0,
            "lr": 5e-4,
            "custom": {"kept": True},
        },
    ]
    original = AdamW(groups, **HYPER, fused=True)
    converted = MoFOCallback(fraction=0.1, filter_min_ndim=2).convert(original)

    assert type(converted) is MoFO
    assert {key: converted.defaults[key] for key in HYPER} == HYPER
    adam_flags = {"amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
    mofo_defaults = MoFO([nn.Parameter(torch.zeros(1))]).defaults
    for old, new in zip(original.param_groups, converted.param_groups, strict=True):
        assert all(a is b for a, b in zip(new["params"], old["params"], strict=True))
        assert len(new["params"]) == len(old["params"])
        assert {key: value for key, value in old.items() if key not in adam_flags | {"params"}}.items() <= new.items()
        # Adam's flags are gone; a MoFO option of the same name ("fused") has MoFO's default, not AdamW's True.
        assert {key: new[key] for key in adam_flags & new.keys()} == {
            key: mofo_defaults[key] for key in adam_flags & new.keys()
        }
    assert [g["fraction"] for g in converted.param_groups] == [None, 0.1, 0.1]  # a group's own fraction is kept
    assert [g["filter_min_ndim"] for g in converted.param_groups] == [2, 2, 2]
    assert [g["param_names"] for g in converted.param_groups] == [g["param_names"] for g in original.param_groups]
    assert not original.state and not converted.state


@pytest.mark.parametrize(
    ("optimizer", "weight_decay"),
    [
        (lambda params: Adam(params, lr=1e-3), 0.0),
        (lambda params: Adam(params, lr=1e-3, weight_decay=0.05, decoupled_weight_decay=True), 0.05),
        (lambda params: AdamW(params, lr=1e-3), 0.01),  # AdamW's default decay stays
        (lambda params: AdamW(params, lr=1e-3, foreach=True), 0.01),
        (lambda params: AdamW(params, lr=1e-3, fused=True), 0.01),
    ],
)
def test_adam_and_adamw_convert_with_their_decoupled_weight_decay(optimizer: Callable, weight_decay: float) -> None:
    converted = MoFOCallback().convert(optimizer(Net().parameters()))
    assert [g["weight_decay"] for g in converted.param_groups] == [weight_decay]
    assert converted.defaults["weight_decay"] == weight_decay


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam_state_carries_over_the_same_whether_restored_before_or_after_the_conversion(dtype: torch.dtype) -> None:
    net = Net(dtype)
    trained = AdamW(net.parameters(), **HYPER)
    train(net, trained, steps=3)
    checkpoint = copy.deepcopy(trained.state_dict())
    callback = MoFOCallback()

    restored_then_converted = callback.convert(trained)
    converted_then_restored = callback.convert(AdamW(net.parameters(), **HYPER))
    converted_then_restored.load_state_dict(copy.deepcopy(checkpoint))

    for p, saved in zip(net.parameters(), checkpoint["state"].values(), strict=True):
        for optimizer in (restored_then_converted, converted_then_restored):
            state = optimizer.state[p]
            assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
            assert state["step"].item() == 3.0
            for key in ("exp_avg", "exp_avg_sq"):
                assert state[key].dtype == torch.float32  # MoFO's moments are float32 for low-precision params
                assert torch.equal(state[key], saved[key].float())
                assert state[key] is not trained.state[p][key]
    assert_same_optimizer_state(restored_then_converted, converted_then_restored)
    assert restored_then_converted.param_groups == converted_then_restored.param_groups


def test_converted_adamw_at_fraction_one_continues_exactly_like_the_adamw() -> None:
    reference, ours = Net(), Net()
    reference_optimizer, our_adamw = AdamW(reference.parameters(), **HYPER), AdamW(ours.parameters(), **HYPER)
    train(reference, reference_optimizer, steps=3)
    train(ours, our_adamw, steps=3)

    train(reference, reference_optimizer, steps=5, seed=1)
    train(ours, MoFOCallback(fraction=1.0).convert(our_adamw), steps=5, seed=1)  # bias correction from step 4 on
    for p, q in zip(reference.parameters(), ours.parameters(), strict=True):
        assert (p - q).abs().max() <= 1e-6


class ReweightedAdam(Adam):
    pass


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), r"it is a torch\.optim\.SGD\. Supported: torch\.optim\.Adam and "),
        (lambda p: torch.optim.Adafactor(p), r"it is a torch\.optim\.Adafactor\. Supported"),
        (lambda p: ReweightedAdam(p), r"ReweightedAdam subclasses torch\.optim\.Adam but may change its update"),
        (lambda p: Adam(p, amsgrad=True), r"param group 0 has amsgrad=True\. MoFO has no AMSGrad variant"),
        (lambda p: AdamW(p, maximize=True), r"has maximize=True\. MoFO minimizes"),
        (lambda p: Adam(p, capturable=True), r"has capturable=True\. .*set capturable=False"),
        (lambda p: Adam(p, differentiable=True), r"has differentiable=True\. .*set differentiable=False"),
        (
            lambda p: Adam(p, weight_decay=0.1),
            r"weight_decay=0\.1 in torch\.optim\.Adam's L2 form.*torch\.optim\.AdamW",
        ),
        (lambda p: AdamW(p, lr=torch.tensor(1e-3)), r"optimizer \(torch\.optim\.AdamW\): .*lr=tensor"),
        (
            lambda p: AdamW([{"params": p[:2]}, {"params": p[2:], "amsgrad": True}]),
            r"param group 1 has amsgrad=True",
        ),
    ],
)
def test_unsupported_optimizers_and_flags_are_refused_naming_the_fix(optimizer: Callable, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        MoFOCallback().convert(optimizer(list(Net().parameters())))


# --- dense patterns -------------------------------------------------------------------------------------------------


def test_dense_patterns_give_whole_groups_the_dense_step() -> None:
    net = Net()
    groups = [
        {"params": [net.embed.weight, net.head.weight]},
        {"params": [net.proj.weight, net.proj.bias, net.norm.weight, net.norm.bias]},
    ]
    converted = MoFOCallback(dense=["embedding", r"re:^head\."]).convert(AdamW(groups), net)
    assert [g["fraction"] for g in converted.param_groups] == [None, 0.15]

    # A 1-D tensor takes the dense step anyway: naming the norm does not split the group of proj.weight.
    converted = MoFOCallback(dense=["norm", "bias"]).convert(AdamW(groups), net)
    assert [g["fraction"] for g in converted.param_groups] == [0.15, 0.15]


def test_dense_pattern_that_would_split_a_param_group_is_refused() -> None:
    net = Net()
    with pytest.raises(
        MisconfigurationException,
        match=r"names 1 of the 3 trainable filtered tensors of param group 0 of the optimizer \(embed\.weight; not: "
        r"proj\.weight, head\.weight\)\. .*own param group in configure_optimizers",
    ):
        MoFOCallback(dense=["embedding"]).convert(AdamW(net.parameters()), net)


def fake_trainer(*optimizers: Optimizer, schedulers: tuple[Any, ...] = ()) -> SimpleNamespace:
    strategy = SimpleNamespace(
        optimizers=list(optimizers), lr_scheduler_configs=[SimpleNamespace(scheduler=s) for s in schedulers]
    )
    return SimpleNamespace(strategy=strategy)


def test_dense_pattern_naming_no_filtered_parameter_is_warned_about() -> None:
    net = Net()
    trainer = fake_trainer(AdamW([{"params": [net.embed.weight]}, {"params": list(net.parameters())[1:]}]))
    with pytest.warns(UserWarning, match=r"\['norm', 're:decoder'\] name no filtered parameter"):
        MoFOCallback(dense=["embedding", "norm", "re:decoder"]).on_fit_start(trainer, net)
    assert [g["fraction"] for g in trainer.strategy.optimizers[0].param_groups] == [None, 0.15]


def test_tensors_the_module_froze_do_not_split_a_group_for_dense() -> None:
    net = Net()
    net.embed.requires_grad_(False)
    net.proj.requires_grad_(False)  # the group's only trainable filtered tensor is head.weight
    trainer = fake_trainer(AdamW(net.parameters()))
    MoFOCallback(dense=r"re:^head\.").on_fit_start(trainer, net)
    assert [g["fraction"] for g in trainer.strategy.optimizers[0].param_groups] == [None]
    # the tensors HalfFineTuning froze still count: they train after a re-draw
    from lit_mofo.params import forget_initial_requires_grad, record_initial_requires_grad

    net = Net()
    record_initial_requires_grad(net)
    net.embed.requires_grad_(False)  # as HFT's draw would, after recording the module's own flags
    try:
        with pytest.raises(MisconfigurationException, match=r"names 1 of the 3 trainable filtered tensors"):
            MoFOCallback(dense=r"re:^head\.").on_fit_start(fake_trainer(AdamW(net.parameters())), net)
    finally:
        forget_initial_requires_grad(net)


def test_a_module_without_trainable_parameters_is_refused_before_training(tmp_path: Path) -> None:
    module = lm()
    module.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match=r"MoFOCallback: no parameter of ScheduledLM is trainable"):
        fit(module, tmp_path, [MoFOCallback()])


# --- what else holds the optimizer ----------------------------------------------------------------------------------


def test_schedulers_nested_or_not_are_moved_to_the_new_optimizer_and_track_its_steps() -> None:
    net = Net()
    optimizer = AdamW(net.parameters(), lr=1e-3)
    chained = sequential(optimizer)
    lambda_lr = cosine(AdamW(net.parameters(), lr=1e-3))  # a second optimizer with its own scheduler
    other = lambda_lr.optimizer
    trainer = fake_trainer(optimizer, other, schedulers=(chained, lambda_lr))

    MoFOCallback().on_fit_start(trainer, net)
    new, new_other = trainer.strategy.optimizers
    assert type(new) is MoFO and type(new_other) is MoFO
    assert chained.optimizer is new and all(s.optimizer is new for s in chained._schedulers)
    assert lambda_lr.optimizer is new_other
    assert getattr(new.step, "_wrapped_by_lr_sched", False) and getattr(new_other.step, "_wrapped_by_lr_sched", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        train(net, new, steps=1)
        chained.step()
    assert new._opt_called


def test_an_optimizer_that_already_is_mofo_is_left_alone() -> None:
    net = Net()
    optimizer = MoFO(net.parameters(), fraction=0.3)
    trainer = fake_trainer(optimizer)
    MoFOCallback(fraction=0.1).on_fit_start(trainer, net)
    assert trainer.strategy.optimizers[0] is optimizer and optimizer.param_groups[0]["fraction"] == 0.3


def test_a_refused_optimizer_leaves_every_optimizer_in_place() -> None:
    net = Net()
    first, second = AdamW(net.parameters()), torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = fake_trainer(first, second)
    with pytest.raises(MisconfigurationException, match=r"cannot convert optimizer 1: it is a torch\.optim\.SGD"):
        MoFOCallback().on_fit_start(trainer, net)
    assert trainer.strategy.optimizers == [first, second]


# --- loading state into the converted optimizer ---------------------------------------------------------------------


def test_loading_mofo_state_trained_with_another_fraction_keeps_the_configured_one_and_warns() -> None:
    net = Net()
    trained = MoFO(net.parameters(), fraction=0.15)
    train(net, trained, steps=2)
    converted = MoFOCallback(fraction=0.1).convert(AdamW(net.parameters()))
    with pytest.warns(UserWarning, match=r"group 0: fraction=0\.15 -> 0\.1"):
        converted.load_state_dict(trained.state_dict())
    assert converted.param_groups[0]["fraction"] == 0.1
    assert converted.param_groups[0]["weight_decay"] == 0.0  # the checkpoint's hyper-parameters, as for any optimizer
    assert_same_optimizer_state(trained, converted)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (lambda p: Adam(p, amsgrad=True), r"Adam state .* cannot be converted: param group 0 has amsgrad=True"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), r"neither MoFO's nor Adam's .*'momentum'"),
    ],
)
def test_loading_state_mofo_cannot_continue_from_is_refused(source: Callable, message: str) -> None:
    net = Net()
    trained = source(list(net.parameters()))
    train(net, trained, steps=1)
    converted = MoFOCallback().convert(AdamW(net.parameters()))
    with pytest.raises(ValueError, match=message):
        converted.load_state_dict(trained.state_dict())


# --- strategies -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [
        FSDPStrategy(),
        object.__new__(DeepSpeedStrategy),  # needs no install
        ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
    ],
    ids=["fsdp", "deepspeed", "tensor_parallel"],
)
def test_flattening_and_tensor_parallel_strategies_are_refused_in_setup(strategy: Any) -> None:
    # FSDP2 without tensor parallelism is supported (tests/test_fsdp2_callbacks.py); the rest is refused with the fix.
    callback = MoFOCallback()
    trainer = SimpleNamespace(strategy=strategy, callbacks=[callback], world_size=2)
    fix = r"MoFOCallback does not support `\w+Strategy.*(ddp|tensor_parallel_size=1)"
    with pytest.raises(MisconfigurationException, match=fix):
        callback.setup(trainer, Mock(), "fit")  # type: ignore[arg-type]
    callback.setup(trainer, Mock(), "validate")  # type: ignore[arg-type]  # nothing to convert outside fit


def test_one_callback_per_trainer_since_the_state_key_is_the_class_name() -> None:
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `MoFOCallback`"):
        pl.Trainer(**QUIET, callbacks=[MoFOCallback(), MoFOCallback(fraction=0.1)])


# --- training -----------------------------------------------------------------------------------------------------


def test_training_with_the_callback_equals_mofo_in_configure_optimizers_bit_for_bit(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    with_callback, direct, plain = lm(adamw), lm(mofo), lm(adamw)
    converted = fit(with_callback, tmp_path / "callback", callbacks=[MoFOCallback(fraction=0.15)])
    reference = fit(direct, tmp_path / "direct", callbacks=[])
    fit(plain, tmp_path / "plain", callbacks=[])

    assert type(converted.optimizers[0]) is MoFO
    assert converted.lr_scheduler_configs[0].scheduler.optimizer is converted.optimizers[0]
    assert with_callback.optimizers().optimizer is converted.optimizers[0]  # LightningOptimizer wraps the MoFO
    assert [g["name"] for g in converted.optimizers[0].param_groups] == ["decay", "no_decay"]
    assert_bit_identical(direct.state_dict(), with_callback.state_dict())
    assert_same_optimizer_state(reference.optimizers[0], converted.optimizers[0])
    assert not torch.equal(plain.model.lm_head.weight, with_callback.model.lm_head.weight)
    # The schedule is the one the AdamW run follows.
    assert len(with_callback.learning_rates) == STEPS
    assert with_callback.learning_rates == plain.learning_rates == direct.learning_rates
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if any(text in m for text in SCHEDULER_ORDER_WARNINGS)], messages


@pytest.mark.parametrize("schedule", [sequential, one_cycle], ids=["sequential", "one_cycle"])
def test_other_schedulers_keep_their_lr_and_momentum_sequence(
    tmp_path: Path, schedule: Callable, recwarn: pytest.WarningsRecorder
) -> None:
    with_callback, plain = lm(adamw, schedule), lm(adamw, schedule)
    converted = fit(with_callback, tmp_path / "callback", callbacks=[MoFOCallback()])
    fit(plain, tmp_path / "plain", callbacks=[])

    assert type(converted.optimizers[0]) is MoFO
    assert with_callback.learning_rates == plain.learning_rates
    assert with_callback.beta1s == plain.beta1s  # OneCycleLR cycles beta1 through the groups' betas
    assert len(set(map(tuple, with_callback.learning_rates))) > 2
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if any(text in m for text in SCHEDULER_ORDER_WARNINGS)], messages


def test_manual_optimization_steps_the_converted_optimizer(tmp_path: Path) -> None:
    with_callback, direct = lm(adamw, cls=ManualLM), lm(mofo, cls=ManualLM)
    fit(with_callback, tmp_path / "callback", callbacks=[MoFOCallback()])
    fit(direct, tmp_path / "direct", callbacks=[])

    assert with_callback.stepped == [MoFO] * STEPS
    assert_bit_identical(direct.state_dict(), with_callback.state_dict())
    assert with_callback.learning_rates == direct.learning_rates


def test_unsupported_optimizer_fails_the_fit_with_the_supported_list(tmp_path: Path) -> None:
    module = lm(lambda groups: torch.optim.SGD(groups, lr=0.1))
    with pytest.raises(MisconfigurationException, match=r"Supported: torch\.optim\.Adam and torch\.optim\.AdamW"):
        fit(module, tmp_path, callbacks=[MoFOCallback()])


# --- checkpoints --------------------------------------------------------------------------------------------------

# Checkpoint at an epoch boundary (a plain DataLoader cannot resume mid-epoch) with every_n_train_steps, as in
# tests/test_lightning.py: Lightning 2.6 reruns a batch when resuming from a checkpoint written at fit end.
RESUME_STEPS, STEPS_PER_EPOCH = 8, 4


def resume_data() -> SyntheticTokenDataModule:
    return small_data(num_sequences=STEPS_PER_EPOCH * 8, shuffle=False)


def resume_schedule(optimizer: Optimizer) -> LRScheduler:
    return warmup_lr_scheduler(optimizer, RESUME_STEPS, warmup_ratio=0.25)["scheduler"]


def resume_module() -> ScheduledLM:
    return lm(adamw, resume_schedule)


def first_half(root: Path, callbacks: list[pl.Callback]) -> tuple[str, pl.Trainer]:
    every_epoch = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=STEPS_PER_EPOCH)
    trainer = make_trainer(
        root, max_steps=STEPS_PER_EPOCH, enable_checkpointing=True, callbacks=[*callbacks, every_epoch]
    )
    trainer.fit(resume_module(), resume_data())
    assert Path(every_epoch.best_model_path).name == f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    return every_epoch.best_model_path, trainer


@pytest.fixture(scope="module")
def callback_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    checkpoint, _ = first_half(tmp_path_factory.mktemp("first_half"), callbacks=[MoFOCallback()])
    return checkpoint


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_checkpoint_holds_mofo_state_and_resumes_bit_identically_with_the_callback(
    tmp_path: Path, callback_checkpoint: str
) -> None:
    saved = torch.load(callback_checkpoint, weights_only=True)
    assert all(group["fraction"] == 0.15 for group in saved["optimizer_states"][0]["param_groups"])
    assert saved["callbacks"]["MoFOCallback"]["converted"] == [0]

    uninterrupted = resume_module()
    straight = make_trainer(tmp_path / "straight", max_steps=RESUME_STEPS, callbacks=[MoFOCallback()])
    straight.fit(uninterrupted, resume_data())

    resumed = resume_module()
    second = make_trainer(tmp_path / "second", max_steps=RESUME_STEPS, callbacks=[MoFOCallback()])
    second.fit(resumed, resume_data(), ckpt_path=callback_checkpoint)

    assert second.global_step == straight.global_step == RESUME_STEPS
    assert type(second.optimizers[0]) is MoFO
    assert_bit_identical(uninterrupted.state_dict(), resumed.state_dict())
    assert_same_optimizer_state(straight.optimizers[0], second.optimizers[0])
    assert resumed.learning_rates == uninterrupted.learning_rates[STEPS_PER_EPOCH:]


def test_resuming_without_the_callback_is_warned_about_and_falls_back_to_adamw(
    tmp_path: Path, callback_checkpoint: str
) -> None:
    # The documented rule: keep the callback when resuming. Without it the module's AdamW takes the MoFO state.
    resumed = resume_module()
    second = make_trainer(tmp_path, max_steps=STEPS_PER_EPOCH + 1)
    with pytest.warns(UserWarning, match=r"Please add the following callbacks: \[.*'MoFOCallback'"):
        second.fit(resumed, resume_data(), ckpt_path=callback_checkpoint)
    assert type(second.optimizers[0]) is AdamW


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_adamw_checkpoint_resumes_into_mofo_with_its_moments(tmp_path: Path) -> None:
    checkpoint, _ = first_half(tmp_path / "adamw", callbacks=[])
    saved = torch.load(checkpoint, weights_only=True)
    assert "fraction" not in saved["optimizer_states"][0]["param_groups"][0]

    class StateAtTrainStart(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.optimizer = copy.deepcopy(trainer.optimizers[0])

    probe = StateAtTrainStart()
    callback = MoFOCallback()
    resumed = resume_module()
    second = make_trainer(tmp_path / "second", max_steps=RESUME_STEPS, callbacks=[callback, probe])
    second.fit(resumed, resume_data(), ckpt_path=checkpoint)
    assert second.global_step == RESUME_STEPS and type(second.optimizers[0]) is MoFO

    # The same state as restoring the AdamW first and converting it afterwards.
    reference_module = resume_module()
    reference_module.load_state_dict(saved["state_dict"])
    adamw_restored = reference_module.configure_optimizers()["optimizer"]
    adamw_restored.load_state_dict(saved["optimizer_states"][0])
    converted = callback.convert(adamw_restored, reference_module)
    assert_same_optimizer_state(converted, probe.optimizer)
    assert probe.optimizer.state_dict()["param_groups"] == converted.state_dict()["param_groups"]
    assert [g["fraction"] for g in probe.optimizer.param_groups] == [0.15, 0.15]


# --- LightningCLI -------------------------------------------------------------------------------------------------


def test_callback_yaml_only_adds_the_callback_so_it_composes_with_any_config() -> None:
    config = yaml.safe_load(CALLBACK_YAML.read_text())
    assert set(config) == {"trainer"} and set(config["trainer"]) == {"callbacks"}
    (entry,) = config["trainer"]["callbacks"]
    assert entry["class_path"] == "lit_mofo.callbacks.mofo_callback.MoFOCallback"
    assert MoFOCallback(**entry["init_args"]).fraction == 0.15


def test_cli_with_the_callback_yaml_trains_the_adamw_as_mofo(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("lit_mofo_example_cli", EXAMPLES / "cli.py")
    assert spec is not None and spec.loader is not None
    example_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example_cli)
    cli = example_cli.main(
        [
            "fit",
            "--config",
            str(TINY_LM_YAML),
            "--config",
            str(CALLBACK_YAML),
            "--optimizer",
            "torch.optim.AdamW",
            "--optimizer.lr",
            "0.001",
            "--trainer.max_steps",
            "3",
            f"--trainer.default_root_dir={tmp_path}",
            *[f"--trainer.{key}={value}" for key, value in QUIET.items()],
            "--data.num_sequences=32",
            "--data.batch_size=8",
        ]
    )
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, MoFOCallback)]
    assert (callback.fraction, callback.filter_min_ndim, callback.dense) == (0.15, 2, ())
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is MoFO
    assert [(g["lr"], g["weight_decay"], g["fraction"]) for g in optimizer.param_groups] == [(1e-3, 0.01, 0.15)]
    assert cli.trainer.global_step == 3
    # TinyCausalLM logs MoFO's realised fraction whenever its optimizer is a MoFO.
    assert cli.trainer.callback_metrics["mofo/filtered_update_fraction"].item() == pytest.approx(0.15, abs=2e-3)


# --- DDP ------------------------------------------------------------------------------------------------------------


def run_ddp_script(out_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_script(DDP_SCRIPT, str(out_dir), timeout=timeout)


@pytest.mark.slow
def test_ddp_callback_run_matches_mofo_in_configure_optimizers_on_both_ranks(tmp_path: Path) -> None:
    result = run_ddp_script(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]

    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert r["optimizer_types"] == {"callback": "MoFO", "direct": "MoFO"}
        assert r["global_steps"] == {"callback": r["steps"], "direct": r["steps"]}
        assert_bit_identical(r["final"]["direct"], r["final"]["callback"])
        assert r["learning_rates"]["callback"] == r["learning_rates"]["direct"]
        assert len(set(r["learning_rates"]["callback"])) > 2
    assert_bit_identical(ranks[0]["final"]["callback"], ranks[1]["final"]["callback"])
    moved = [name for name, p in ranks[0]["final"]["callback"].items() if not torch.equal(p, ranks[0]["initial"][name])]
    assert moved == list(ranks[0]["initial"])
