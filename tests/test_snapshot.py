"""The shared pre-trained snapshot: one copy per module, taken before training, carried by checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
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
    snapshot.on_save_checkpoint(checkpoint)
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
