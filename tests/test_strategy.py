"""The strategy adapter: which strategies lit_mofo's callbacks support, and what they ask of them on one process.

The multi-process behaviour (reductions over shards and ranks, failing together) is exercised by the sharded
callback tests, which run under ``ModelParallelStrategy`` and DDP with 2 gloo processes; FSDP2's module state is
checked here on a process group of one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lit_mofo.strategy import StrategyAdapter, full_state_dict, is_dtensor


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


def test_no_trainer_or_a_trainer_without_a_strategy_is_one_process() -> None:
    assert StrategyAdapter.of(None, user="X").kind == "single"
    assert StrategyAdapter.of(SimpleNamespace(world_size=2, global_rank=1), user="X").kind == "single"  # type: ignore[arg-type]


def test_a_ranks_share_of_split_work_is_strided_and_the_ranks_together_cover_every_item_once() -> None:
    shares = [StrategyAdapter("single", ranks=(3, rank)).share(8) for rank in range(3)]
    assert shares == [range(0, 8, 3), range(1, 8, 3), range(2, 8, 3)]
    assert sorted(i for share in shares for i in share) == list(range(8))
    assert StrategyAdapter.of(None, user="X").share(5) == range(5)
    stand_in = StrategyAdapter.of(SimpleNamespace(world_size=2, global_rank=1), user="X")  # type: ignore[arg-type]
    assert stand_in.share(5) == range(1, 5, 2) and not stand_in.distributed  # plans a share, runs no collective


def test_the_adapter_names_the_strategy_and_swaps_optimizers_only_with_one() -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
    adapter = StrategyAdapter.of(trainer, user="X")
    assert adapter.name == "SingleDeviceStrategy" and StrategyAdapter.of(None, user="X").name == "no strategy"
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    adapter.replace_optimizers([optimizer])
    assert adapter.optimizers == [optimizer] and trainer.optimizers == [optimizer]
    with pytest.raises(RuntimeError, match=r"replace_optimizers\(\) needs a Trainer's strategy"):
        StrategyAdapter.of(None, user="X").replace_optimizers([optimizer])


def test_agree_on_one_process_raises_the_error_or_returns_the_flags() -> None:
    adapter = StrategyAdapter("fsdp2")  # no process group: one process, whatever the kind
    assert adapter.agree("probe 'x'") == ()
    assert adapter.agree("probe 'x'", flags=[True, False]) == (True, False)
    with pytest.raises(ValueError, match="bad batch"):
        adapter.agree("probe 'x'", ValueError("bad batch"), flags=[True])
    assert adapter.all_gather_object({"loss": 1.5}) == [{"loss": 1.5}]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


class Net(nn.Module):
    """A model with blocks and parameters of its own (like a causal LM's embeddings and head)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class Outer(nn.Module):
    """A LightningModule-like holder whose ``model`` is the network."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Net()


@pytest.fixture
def one_process_group() -> Iterator[Any]:
    """A gloo group of one process and its 1-D mesh: FSDP2 and DTensors work, every collective is local."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_reshard_puts_the_root_back_into_shards_after_a_forward_without_autograd(one_process_group: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    net = Net()
    for block in net.blocks:
        fully_shard(block, mesh=one_process_group)
    fully_shard(net, mesh=one_process_group)
    with torch.no_grad():
        net(torch.randn(3, 4))
    # FSDP2 keeps the root's parameters gathered after a forward (for the backward that would follow in training).
    assert not is_dtensor(net.head.weight) and all(is_dtensor(p) for p in net.blocks.parameters())
    StrategyAdapter.reshard(net)
    assert all(is_dtensor(p) for p in net.parameters())
    StrategyAdapter.reshard(net)  # already sharded: nothing to do
    StrategyAdapter.reshard(Net())  # no FSDP2 unit: nothing to do


def test_sharded_outside_names_the_parameters_a_call_of_the_model_alone_would_not_gather(
    one_process_group: Any,
) -> None:
    from torch.distributed.fsdp import fully_shard

    rooted_in_model, rooted_outside = Outer(), Outer()
    for outer in (rooted_in_model, rooted_outside):
        for block in outer.model.blocks:
            fully_shard(block, mesh=one_process_group)
    fully_shard(rooted_in_model.model, mesh=one_process_group)
    fully_shard(rooted_outside, mesh=one_process_group)
    assert StrategyAdapter.sharded_outside(rooted_in_model.model) == []
    assert StrategyAdapter.sharded_outside(rooted_outside) == []
    assert StrategyAdapter.sharded_outside(rooted_outside.model) == ["head.weight", "head.bias"]
    assert StrategyAdapter.sharded_outside(Net()) == []  # nothing sharded


def test_model_parallel_restores_checkpoints_after_on_fit_start_and_writes_them_sharded_by_default() -> None:
    def adapter(**options: Any) -> StrategyAdapter:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **options)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
        assert StrategyAdapter.restores_after_fit_start(trainer)
        return StrategyAdapter.of(trainer, user="X")

    assert adapter().sharded_checkpoints
    assert not adapter(save_distributed_checkpoint=False).sharded_checkpoints
    ddp = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert not StrategyAdapter.restores_after_fit_start(ddp) and not StrategyAdapter.of(ddp, "X").sharded_checkpoints


def test_whole_modules_need_no_resharding_and_give_their_own_state_dict() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 3))
    assert StrategyAdapter.named_parameters(module) == dict(module.named_parameters())
    assert full_state_dict(module).keys() == module.state_dict().keys()
    StrategyAdapter.refresh_after_requires_grad_change(module)  # no FSDP2 unit: nothing to do


class RestoringStrategy:
    """Stands in for ModelParallelStrategy's checkpoint restore: records each parameter's flag when it loads."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.lightning_module = module
        self.optimizers = [torch.optim.AdamW(module.parameters())]
        self.seen: dict[str, bool] = {}

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        self.seen = {name: p.requires_grad for name, p in self.lightning_module.named_parameters()}
        return {}


# The directory case writes a torch.distributed.checkpoint in this one process, which torch notes.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
@pytest.mark.parametrize("checkpoint", ["file", "directory"])
def test_a_guarded_restore_asks_no_optimizer_state_for_parameters_the_checkpoint_has_none_for(
    checkpoint: str, tmp_path: Path
) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    module[1].bias.requires_grad_(False)  # the user's own frozen tensor stays frozen
    strategy = RestoringStrategy(module)
    state = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(1)}
    if checkpoint == "file":  # Lightning's full checkpoint: states keyed by position in module.parameters()
        path = tmp_path / "last.ckpt"
        torch.save({"optimizer_states": [{"state": {0: state, 2: state}, "param_groups": []}]}, path)
    else:  # a torch.distributed.checkpoint directory: flattened keys optimizer_<i>.state.<name>.<key>
        import torch.distributed.checkpoint as dcp

        path = tmp_path / "last.ckpt"
        dcp.save({"optimizer_0": {"state": {"0.weight": state, "1.weight": state}}}, checkpoint_id=path)
        torch.save({"global_step": 1}, path / "meta.pt")  # Lightning's part, written after the shards
    adapter = StrategyAdapter("fsdp2", strategy)  # type: ignore[arg-type]
    trainer = SimpleNamespace(strategy=strategy)
    adapter.guard_optimizer_restore(trainer)  # type: ignore[arg-type]
    adapter.guard_optimizer_restore(trainer)  # type: ignore[arg-type]  # once is enough
    strategy.load_checkpoint(path)
    assert strategy.seen == {"0.weight": True, "0.bias": False, "1.weight": True, "1.bias": False}
    assert [p.requires_grad for p in module.parameters()] == [True, True, True, False]  # given back
    StrategyAdapter.release_optimizer_restore_guard(trainer)  # type: ignore[arg-type]
    assert "load_checkpoint" not in vars(strategy)
    strategy.load_checkpoint(path)
    assert strategy.seen == {"0.weight": True, "0.bias": True, "1.weight": True, "1.bias": False}


def test_whole_tensors_are_not_guarded() -> None:
    strategy = RestoringStrategy(torch.nn.Linear(2, 1))
    StrategyAdapter("ddp", strategy).guard_optimizer_restore(SimpleNamespace(strategy=strategy))  # type: ignore[arg-type]
    assert "load_checkpoint" not in vars(strategy)


# The directory cases write a torch.distributed.checkpoint in this one process, which torch notes.
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
@pytest.mark.parametrize("damage", ["torn-file", "no-meta", "no-dcp-metadata"])
def test_a_guarded_restore_of_an_incomplete_checkpoint_says_so_and_names_the_previous_one_before_reading_it(
    damage: str, tmp_path: Path
) -> None:
    """A checkpoint cut short while it was written used to fail with a raw FileNotFoundError (no ``.metadata``) or a
    zip error from the guard's own read of the optimizer states, before Lightning had looked at the path."""
    import os

    import torch.distributed.checkpoint as dcp

    module = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    strategy = RestoringStrategy(module)
    hyper_parameters = {"_class_path": "torch.nn.modules.container.Sequential"}
    previous = tmp_path / "epoch=0-step=4.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.0", "hyper_parameters": hyper_parameters}, previous)
    os.utime(previous, (1_000_000, 1_000_000))
    path = tmp_path / "epoch=0-step=8.ckpt"
    if damage == "torn-file":
        torch.save({"state_dict": module.state_dict(), "optimizer_states": []}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        dcp.save({"state_dict": module.state_dict()}, checkpoint_id=path)
        if damage == "no-dcp-metadata":
            (path / ".metadata").unlink()
            torch.save({"global_step": 8}, path / "meta.pt")
    adapter = StrategyAdapter("fsdp2", strategy)  # type: ignore[arg-type]
    adapter.guard_optimizer_restore(SimpleNamespace(strategy=strategy))  # type: ignore[arg-type]
    reason = {"torn-file": "cut short", "no-meta": "`meta.pt`", "no-dcp-metadata": "`.metadata`"}[damage]
    with pytest.raises(MisconfigurationException, match=f"Cannot resume from {path}: .*{reason}") as caught:
        strategy.load_checkpoint(path)
    assert f"The previous complete checkpoint of this run there is {previous}." in str(caught.value)
    assert strategy.seen == {}  # nothing was loaded
