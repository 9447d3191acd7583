"""The strategy adapter: which strategies lit_mofo's callbacks support, and what they ask of them on one process.

The multi-process behaviour (reductions over shards and ranks, failing together) is exercised by the sharded
callback tests, which run under ``ModelParallelStrategy`` and DDP with 2 gloo processes.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lit_mofo.strategy import StrategyAdapter, is_dtensor


def _fake_trainer(strategy: object, world_size: int = 2) -> pl.Trainer:
    return SimpleNamespace(strategy=strategy, world_size=world_size)  # type: ignore[return-value]


def test_single_device_and_ddp_and_model_parallel_are_recognised() -> None:
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    assert StrategyAdapter.of(single, user="X").kind == "single"
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert StrategyAdapter.of(ddp, user="X").kind == "ddp"
    found = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", logger=False)
    adapter = StrategyAdapter.of(found, user="X")
    assert adapter.kind == "ddp" and adapter.ddp_options["find_unused_parameters"] is True
    sharded = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        logger=False,
    )
    adapter = StrategyAdapter.of(sharded, user="X")
    assert adapter.kind == "fsdp2" and adapter.sharded


def test_tensor_parallelism_is_refused_with_the_fix() -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
        logger=False,
    )
    with pytest.raises(
        MisconfigurationException,
        match=r"ParameterDrift does not support .*tensor_parallel_size=2.*"
        r"Use `tensor_parallel_size=1`",
    ):
        StrategyAdapter.of(trainer, user="ParameterDrift")


def test_default_model_parallel_sizes_mean_tensor_parallelism_and_are_refused() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(MisconfigurationException, match="tensor_parallel_size=2"):
        StrategyAdapter.of(trainer, user="X")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("DeepSpeedStrategy", "partitions its own flat fp32 buffers"),
        ("FSDPStrategy", "FSDP1 flattens the parameters"),
        ("XLAFSDPStrategy", "XLA's FSDP"),
        ("XLAStrategy", "XLA devices"),
    ],
)
def test_refused_strategies_name_the_reason_and_the_fix(name: str, reason: str) -> None:
    strategy = type(name, (), {})()
    with pytest.raises(
        MisconfigurationException,
        match=rf"HalfFineTuning does not support `{name}`: .*{reason}.*"
        r"ModelParallelStrategy\(data_parallel_size=N, tensor_parallel_size=1\)",
    ):
        StrategyAdapter.of(_fake_trainer(strategy), user="HalfFineTuning")


def test_a_subclass_of_a_refused_strategy_is_refused_too() -> None:
    base = type("DeepSpeedStrategy", (), {})
    custom = type("MyDeepSpeed", (base,), {})
    with pytest.raises(MisconfigurationException, match="does not support `MyDeepSpeed`: DeepSpeed"):
        StrategyAdapter.of(_fake_trainer(custom()), user="X")


def test_an_unknown_multi_process_strategy_is_refused_and_a_one_process_one_accepted() -> None:
    unknown = type("MyParallel", (), {})()
    with pytest.raises(MisconfigurationException, match="tested with a single device, DDP and FSDP2 only"):
        StrategyAdapter.of(_fake_trainer(unknown, world_size=2), user="X")
    assert StrategyAdapter.of(_fake_trainer(unknown, world_size=1), user="X").kind == "single"
    assert StrategyAdapter.of(_fake_trainer(object.__new__(SingleDeviceStrategy), world_size=1), user="X").kind == (
        "single"
    )


def test_one_process_reductions_are_identities_and_plain_tensors_are_their_own_shards() -> None:
    adapter = StrategyAdapter("single")
    values = torch.tensor([1.0, 2.0])
    for reduce in (adapter.sum_over_shards, adapter.max_over_shards, adapter.sum_over_ranks, adapter.max_over_ranks):
        assert torch.equal(reduce(values), values)
    param = torch.nn.Parameter(torch.randn(3, 2))
    assert adapter.local(param) is param and adapter.full(param) is param
    full = torch.randn(3, 2)
    assert adapter.shard_like(full, param) is full
    assert not is_dtensor(param) and not adapter.sharded and adapter.mesh is None
    assert adapter.broadcast({"a": 1}) == {"a": 1}
    assert adapter.world_size == 1 and adapter.rank == 0 and adapter.is_global_zero


def test_run_together_returns_the_result_or_reraises_the_error_on_one_process() -> None:
    adapter = StrategyAdapter("ddp", DDPStrategy())
    assert adapter.run_together("probe 'x'", lambda: 3) == 3
    with pytest.raises(KeyError, match="missing"):
        adapter.run_together("probe 'x'", lambda: {}["missing"])
