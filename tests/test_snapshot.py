"""The shared pre-trained snapshot: one copy per module, taken before training, carried by checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lit_mofo.snapshot import PretrainedSnapshot


def fake_trainer(global_step: int = 0, ckpt_path: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(global_step=global_step, ckpt_path=ckpt_path, strategy=SimpleNamespace())


@pytest.fixture
def module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def test_two_owners_share_one_copy_and_the_last_detach_frees_it(module: nn.Module) -> None:
    owner_a, owner_b = object(), object()
    first = PretrainedSnapshot.attach(module, owner_a)
    second = PretrainedSnapshot.attach(module, owner_b)
    assert first is second
    first.capture(fake_trainer(), module, ["0.weight"])
    second.capture(fake_trainer(), module, ["0.weight", "2.weight"])
    assert first.names == ["0.weight", "2.weight"]
    PretrainedSnapshot.detach(module, owner_a)
    assert PretrainedSnapshot.get(module) is first
    PretrainedSnapshot.detach(module, owner_b)
    assert PretrainedSnapshot.get(module) is None
    assert PretrainedSnapshot.attach(module, owner_a) is not first  # the next fit starts afresh


def test_capture_copies_to_cpu_once_and_survives_training(module: nn.Module) -> None:
    self_owner = object()
    snapshot = PretrainedSnapshot.attach(module, self_owner)
    before = module[0].weight.detach().clone()
    snapshot.capture(fake_trainer(), module, ["0.weight"])
    with torch.no_grad():
        module[0].weight.add_(1.0)
    snapshot.capture(fake_trainer(), module, ["0.weight"])  # already copied: kept, not re-taken
    assert torch.equal(snapshot["0.weight"], before)
    assert snapshot["0.weight"].device.type == "cpu"
    assert snapshot.nbytes == before.numel() * 4
    snapshot.restore(module, ["0.weight"])
    assert torch.equal(module[0].weight, before)
    PretrainedSnapshot.detach(module, self_owner)


def test_dtype_is_configurable_and_the_widest_request_wins(module: nn.Module) -> None:
    owner = object()
    snapshot = PretrainedSnapshot.attach(module, owner)
    snapshot.capture(fake_trainer(), module, ["2.weight"], dtype=torch.bfloat16)
    assert snapshot["2.weight"].dtype == torch.bfloat16
    snapshot.capture(fake_trainer(), module, ["2.weight"], dtype=torch.float32)
    assert snapshot["2.weight"].dtype == torch.float32
    assert torch.equal(snapshot["2.weight"], module[2].weight)
    PretrainedSnapshot.detach(module, owner)


def test_unknown_names_and_late_captures_are_refused(module: nn.Module) -> None:
    owner = object()
    snapshot = PretrainedSnapshot.attach(module, owner)
    with pytest.raises(MisconfigurationException, match=r"not parameters of Sequential"):
        snapshot.capture(fake_trainer(), module, ["nope.weight"])
    with pytest.raises(MisconfigurationException, match=r"before the first optimizer step"):
        snapshot.capture(fake_trainer(global_step=3), module, ["0.weight"])
    PretrainedSnapshot.detach(module, owner)


def test_checkpoint_round_trip_gives_theta0_not_the_resumed_weights(module: nn.Module) -> None:
    owner = object()
    snapshot = PretrainedSnapshot.attach(module, owner)
    theta0 = module[0].weight.detach().clone()
    snapshot.capture(fake_trainer(), module, ["0.weight"])
    checkpoint: dict = {}
    PretrainedSnapshot.save_to(module, checkpoint)
    assert checkpoint[PretrainedSnapshot.CHECKPOINT_KEY]["layout"] == "full"
    PretrainedSnapshot.detach(module, owner)

    with torch.no_grad():
        module[0].weight.mul_(2.0)  # the resumed weights
    PretrainedSnapshot.on_load_checkpoint(module, checkpoint, owner)
    resumed = PretrainedSnapshot.attach(module, owner)
    resumed.capture(fake_trainer(ckpt_path="last.ckpt"), module, ["0.weight"])
    assert torch.equal(resumed["0.weight"], theta0)
    with pytest.raises(MisconfigurationException, match=r"holds no pre-trained values for 1 tensor"):
        resumed.capture(fake_trainer(ckpt_path="last.ckpt"), module, ["2.weight"])
    PretrainedSnapshot.detach(module, owner)


def test_resuming_from_a_checkpoint_without_a_snapshot_is_refused(module: nn.Module) -> None:
    owner = object()
    snapshot = PretrainedSnapshot.attach(module, owner)
    with pytest.raises(MisconfigurationException, match=r"Resume with the same lit_mofo callbacks"):
        snapshot.capture(fake_trainer(ckpt_path="old.ckpt"), module, ["0.weight"])
    PretrainedSnapshot.detach(module, owner)


def test_the_bytes_are_reported_and_a_whole_copy_costs_what_it_holds(module: nn.Module) -> None:
    owner = object()
    snapshot = PretrainedSnapshot.attach(module, owner)
    snapshot.capture(fake_trainer(), module, ["0.weight", "0.bias"], dtype=torch.float64)
    assert snapshot.nbytes == snapshot.full_nbytes == (12 + 3) * 8
    assert snapshot.describe() == "2 tensor(s), 0.00 MiB (120 bytes) in this process"
    PretrainedSnapshot.detach(module, owner)


def late_restore_trainer(ckpt_path: str | None = None) -> SimpleNamespace:
    """A trainer whose strategy restores checkpoints after on_fit_start (as ModelParallelStrategy does)."""
    return SimpleNamespace(
        global_step=0, ckpt_path=ckpt_path, strategy=SimpleNamespace(restore_checkpoint_after_setup=True)
    )


def test_with_a_late_restore_the_checkpoint_replaces_what_on_fit_start_copied(module: nn.Module) -> None:
    theta0 = module[0].weight.detach().clone()
    owner = object()
    snapshot = PretrainedSnapshot.attach(module, owner)
    snapshot.capture(fake_trainer(), module, ["0.weight"])
    checkpoint: dict = {}
    PretrainedSnapshot.save_to(module, checkpoint)
    PretrainedSnapshot.detach(module, owner)

    with torch.no_grad():
        module[0].weight.mul_(2.0)  # the weights the resumed fit starts from, before the restore
    resumed = PretrainedSnapshot.attach(module, owner)
    # A stale ckpt_path of an earlier fit must not matter: the strategy restores later, in on_load_checkpoint.
    resumed.capture(late_restore_trainer(ckpt_path="earlier.ckpt"), module, ["0.weight"])
    assert torch.equal(resumed["0.weight"], module[0].weight)
    PretrainedSnapshot.on_load_checkpoint(module, checkpoint, owner, trainer=late_restore_trainer("last.ckpt"))
    PretrainedSnapshot.on_load_checkpoint(module, checkpoint, object())  # a second owner: adopted once
    assert torch.equal(resumed["0.weight"], theta0)
    PretrainedSnapshot.detach(module, owner)


@pytest.mark.parametrize("saved", ["without the tensor", "without a snapshot"])
def test_with_a_late_restore_a_checkpoint_missing_a_copied_tensor_is_refused(module: nn.Module, saved: str) -> None:
    owner = object()
    checkpoint: dict = {}
    if saved == "without the tensor":
        PretrainedSnapshot.attach(module, owner).capture(fake_trainer(), module, ["0.weight"])
        PretrainedSnapshot.save_to(module, checkpoint)
        PretrainedSnapshot.detach(module, owner)
    snapshot = PretrainedSnapshot.attach(module, owner)
    snapshot.capture(late_restore_trainer(), module, ["0.weight", "2.weight"])
    with pytest.raises(MisconfigurationException, match=r"resumes from 'last.ckpt', which holds no pre-trained"):
        PretrainedSnapshot.on_load_checkpoint(module, checkpoint, owner, trainer=late_restore_trainer("last.ckpt"))
    PretrainedSnapshot.detach(module, owner)


def test_a_checkpoint_written_before_the_layouts_were_named_still_loads(module: nn.Module) -> None:
    theta0 = module[2].weight.detach().clone()
    owner = object()
    PretrainedSnapshot.on_load_checkpoint(
        module, {PretrainedSnapshot.CHECKPOINT_KEY: {"tensors": {"2.weight": theta0}}}, owner
    )
    assert torch.equal(PretrainedSnapshot.attach(module, owner)["2.weight"], theta0)
    PretrainedSnapshot.detach(module, owner)


# ------------------------------------------------------------------------------------------ sharded parameters
@pytest.fixture
def sharded_module() -> Iterator[nn.Module]:
    """``module`` with DTensor parameters sharded on dim 0 of a one-rank mesh (FSDP2's layout, one process)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for layer in module:
        for name, param in list(layer.named_parameters()):
            setattr(layer, name, nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)])))
    yield module
    dist.destroy_process_group()


def model_parallel_trainer(sharded_checkpoints: bool, ckpt_path: str | None = None) -> SimpleNamespace:
    strategy = ModelParallelStrategy(
        data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoints
    )
    return SimpleNamespace(strategy=strategy, world_size=1, global_step=0, ckpt_path=ckpt_path)


def test_a_sharded_parameter_is_copied_as_its_local_shard_and_restored_into_it(sharded_module: nn.Module) -> None:
    owner = object()
    snapshot = PretrainedSnapshot.attach(sharded_module, owner)
    snapshot.capture(model_parallel_trainer(True), sharded_module, ["0.weight"])
    stored = snapshot["0.weight"]
    assert type(stored) is torch.Tensor and stored.device.type == "cpu"
    assert torch.equal(stored, sharded_module[0].weight.to_local())
    theta0 = stored.clone()
    with torch.no_grad():
        sharded_module[0].weight.to_local().add_(1.0)
    snapshot.restore(sharded_module, ["0.weight"])
    assert torch.equal(sharded_module[0].weight.to_local(), theta0)
    PretrainedSnapshot.detach(sharded_module, owner)


def test_a_sharded_checkpoint_carries_each_ranks_shards_in_its_state_dict(
    sharded_module: nn.Module, tmp_path: Path
) -> None:
    import torch.distributed.checkpoint as dcp

    owner = object()
    theta0 = {name: p.detach().to_local().clone() for name, p in sharded_module.named_parameters()}
    PretrainedSnapshot.attach(sharded_module, owner).capture(
        model_parallel_trainer(True), sharded_module, list(theta0), dtype=torch.float64
    )
    checkpoint: dict = {"state_dict": {}}
    PretrainedSnapshot.save_to(sharded_module, checkpoint, model_parallel_trainer(True))
    saved = checkpoint["state_dict"]
    assert sorted(saved) == [PretrainedSnapshot.STATE_DICT_PREFIX + name for name in sorted(theta0)]
    assert all(type(t).__name__ == "DTensor" and t.dtype == torch.float64 for t in saved.values())
    assert checkpoint[PretrainedSnapshot.CHECKPOINT_KEY] == {
        "layout": "sharded",
        "dtypes": dict.fromkeys(theta0, "float64"),
    }
    dcp.save({"state_dict": saved}, checkpoint_id=tmp_path)  # what ModelParallelStrategy does with state_dict
    PretrainedSnapshot.detach(sharded_module, owner)

    with torch.no_grad():
        for param in sharded_module.parameters():
            param.to_local().mul_(3.0)
    meta = {PretrainedSnapshot.CHECKPOINT_KEY: checkpoint[PretrainedSnapshot.CHECKPOINT_KEY]}  # from meta.pt
    PretrainedSnapshot.on_load_checkpoint(sharded_module, meta, owner, model_parallel_trainer(True, str(tmp_path)))
    resumed = PretrainedSnapshot.attach(sharded_module, owner)
    for name, value in theta0.items():
        assert resumed[name].dtype == torch.float64 and torch.equal(resumed[name], value.double())
    PretrainedSnapshot.detach(sharded_module, owner)


def test_a_full_checkpoint_of_sharded_parameters_holds_whole_tensors(sharded_module: nn.Module) -> None:
    owner = object()
    theta0 = {name: p.detach().full_tensor().clone() for name, p in sharded_module.named_parameters()}
    PretrainedSnapshot.attach(sharded_module, owner).capture(model_parallel_trainer(False), sharded_module, theta0)
    checkpoint: dict = {"state_dict": {}}
    PretrainedSnapshot.save_to(sharded_module, checkpoint, model_parallel_trainer(False))
    saved = checkpoint[PretrainedSnapshot.CHECKPOINT_KEY]
    assert saved["layout"] == "full" and not checkpoint["state_dict"]
    for name, value in theta0.items():
        assert type(saved["tensors"][name]) is torch.Tensor and torch.equal(saved["tensors"][name], value)
    PretrainedSnapshot.detach(sharded_module, owner)

    PretrainedSnapshot.on_load_checkpoint(sharded_module, checkpoint, owner, model_parallel_trainer(False, "x.ckpt"))
    resumed = PretrainedSnapshot.attach(sharded_module, owner)
    assert all(torch.equal(resumed[name], value) for name, value in theta0.items())  # one rank: the shard is whole
    PretrainedSnapshot.detach(sharded_module, owner)
