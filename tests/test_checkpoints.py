"""Checkpoints a crash cannot leave half-written, what makes one complete, and the newest complete one of a run.

The sharded case (2 processes under FSDP2, killed during a save) is in ``tests/test_cli.py``, through the
``lit-mofo`` command that makes every run's saves atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_mofo.checkpoints import (
    PARTIAL_SUFFIX,
    checkpoint_problem,
    hyper_parameters_match,
    newest_complete_checkpoint,
    save_checkpoints_atomically,
)


class _Tiny(pl.LightningModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(width, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(module: _Tiny) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, module.hparams.width)), batch_size=4))
    return trainer


def test_a_save_killed_mid_write_leaves_no_checkpoint_under_its_name_and_the_next_save_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(_Tiny())
    save_checkpoints_atomically(trainer.strategy)
    save_checkpoints_atomically(trainer.strategy)  # once is enough
    last = tmp_path / "last.ckpt"
    trainer.save_checkpoint(last)
    assert checkpoint_problem(last) is None and not (tmp_path / f"last.ckpt{PARTIAL_SUFFIX}").exists()
    complete = last.read_bytes()

    write = trainer.strategy.checkpoint_io.save_checkpoint

    def killed(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        write(checkpoint, path)
        Path(path).write_bytes(Path(path).read_bytes()[:300])  # the process died while the file was written
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.strategy.checkpoint_io, "save_checkpoint", killed)
    for name in ("epoch=0-step=1.ckpt", "last.ckpt"):  # a new name, and the name of a complete checkpoint
        with pytest.raises(KeyboardInterrupt):
            trainer.save_checkpoint(tmp_path / name)
    assert not (tmp_path / "epoch=0-step=1.ckpt").exists()
    assert last.read_bytes() == complete  # the complete checkpoint of that name is untouched
    torn = tmp_path / f"epoch=0-step=1.ckpt{PARTIAL_SUFFIX}"
    assert "cut short" in (checkpoint_problem(torn) or "")
    assert newest_complete_checkpoint([tmp_path], dict(trainer.lightning_module.hparams)) == last

    monkeypatch.setattr(trainer.strategy.checkpoint_io, "save_checkpoint", write)
    trainer.save_checkpoint(tmp_path / "epoch=0-step=1.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch=0-step=1.ckpt",
        "last.ckpt",
        f"last.ckpt{PARTIAL_SUFFIX}",
    ]
    trainer.save_checkpoint(last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]


def test_the_newest_complete_checkpoint_is_of_the_same_run_and_skips_damaged_ones(tmp_path: Path) -> None:
    ours, other = _Tiny(width=4), _Tiny(width=8)
    trainer, other_trainer = _trainer(ours), _trainer(other)
    paths = {}
    for name, when, run in (("a", 1, trainer), ("b", 2, trainer), ("other", 3, other_trainer), ("torn", 4, trainer)):
        paths[name] = tmp_path / f"{name}.ckpt"
        run.save_checkpoint(paths[name])
        os.utime(paths[name], (1_000_000 * when, 1_000_000 * when))
    paths["torn"].write_bytes(paths["torn"].read_bytes()[:500])
    reference = {"_class_path": "tests.test_checkpoints._Tiny", "width": 4}
    assert newest_complete_checkpoint([tmp_path], reference) == paths["b"]
    assert newest_complete_checkpoint([tmp_path], {"width": 8}) == paths["other"]
    assert newest_complete_checkpoint([tmp_path], reference, before=1_500_000) == paths["a"]
    assert newest_complete_checkpoint([tmp_path], reference, exclude=paths["b"]) == paths["a"]
    assert newest_complete_checkpoint([tmp_path / "nowhere"], reference) is None


@pytest.mark.parametrize(
    ("candidate", "reference", "same"),
    [
        ({"_class_path": "a.M", "lr": 1, "_instantiator": "x"}, {"_class_path": "a.sub.M", "lr": 1}, True),
        ({"_class_path": "a.M", "lr": 1}, {"_class_path": "a.N", "lr": 1}, False),  # another class
        (
            {"model": "scenario:base", "config": {"n": [1, 2]}},
            {"model": "scenario:base", "config": {"n": (1, 2)}},
            True,
        ),
        ({"model": "scenario:base"}, {"model": "scenario:disjoint"}, False),
        ({"model": "a", "only_here": 1}, {"model": "a", "only_there": 2}, True),  # the entries both have agree
        ({"_class_path": "a.M"}, {"_class_path": "a.M"}, True),
        ({}, {"model": "a"}, False),  # a checkpoint without hyper-parameters is not this model's
        (None, None, True),
        ({"x": 1}, {"y": 1}, False),  # nothing in common: nothing says they are the same
    ],
)
def test_hyper_parameters_match_when_every_entry_both_have_agrees(
    candidate: dict[str, Any] | None, reference: dict[str, Any] | None, same: bool
) -> None:
    assert hyper_parameters_match(candidate, reference) is same
