"""L2ToPretrained: the penalty's gradient, exactly as if it were in the loss, anchored to θ₀ across resumes."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from process_launch import run_ranks
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_mofo.callbacks.l2_to_pretrained import L2ToPretrained
from lit_mofo.snapshot import PretrainedSnapshot

ROOT = Path(__file__).resolve().parents[1]


class Regression(pl.LightningModule):
    """A two-layer regression with SGD, so the penalty's effect on the update is a closed form."""

    def __init__(self, explicit_penalty: float = 0.0, norm: str = "l2", lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
        self.theta0 = [p.detach().clone() for p in self.net.parameters()]
        self.explicit_penalty = explicit_penalty
        self.norm = norm
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.explicit_penalty:
            diffs = [p - t for p, t in zip(self.net.parameters(), self.theta0, strict=True)]
            if self.norm == "l2":
                loss = loss + 0.5 * self.explicit_penalty * sum(d.pow(2).sum() for d in diffs)
            else:
                loss = loss + self.explicit_penalty * sum(d.abs().sum() for d in diffs)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 6, generator=generator)  # 4 batches: the step-4 checkpoint ends an epoch
    y = x.sum(dim=1, keepdim=True) * 3.0
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(
    module: pl.LightningModule,
    callbacks: list,
    tmp_path: Path,
    max_steps: int = 8,
    enable_checkpointing: bool = False,
    **kwargs,
) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    trainer.fit(module, loader(), **kwargs)
    return trainer


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_the_callback_trains_like_the_penalty_written_into_the_loss(tmp_path: Path, norm: str) -> None:
    with_callback = Regression()
    fit(with_callback, [L2ToPretrained(strength=0.5, norm=norm, log_penalty=False)], tmp_path)
    in_the_loss = Regression(explicit_penalty=0.5, norm=norm)
    fit(in_the_loss, [], tmp_path)
    unregularised = Regression()
    fit(unregularised, [], tmp_path)
    for a, b, c in zip(with_callback.parameters(), in_the_loss.parameters(), unregularised.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a, c, atol=1e-4)


def test_a_stronger_penalty_keeps_the_weights_closer_to_theta0(tmp_path: Path) -> None:
    distances = []
    for strength in (1e-3, 2.0):
        module = Regression()
        fit(module, [L2ToPretrained(strength=strength)], tmp_path, max_steps=16)
        distances.append(sum((p - t).norm() ** 2 for p, t in zip(module.net.parameters(), module.theta0, strict=True)))
    assert distances[1] < 0.5 * distances[0]


def test_parameters_without_a_gradient_are_left_alone(tmp_path: Path) -> None:
    module = Regression()
    module.net[0].weight.requires_grad_(False)
    frozen = module.net[0].weight.detach().clone()
    callback = L2ToPretrained(strength=1.0)
    fit(module, [callback], tmp_path)
    assert torch.equal(module.net[0].weight, frozen)


def test_include_and_exclude_choose_the_regularised_tensors(tmp_path: Path) -> None:
    only_biases = Regression()
    fit(only_biases, [L2ToPretrained(strength=0.5, include=["bias"], log_penalty=False)], tmp_path)
    reference = Regression()
    fit(reference, [], tmp_path)
    # weights follow the unregularised run until the biases diverge; the biases themselves are pulled back
    assert not torch.allclose(only_biases.net[0].bias, reference.net[0].bias)
    with (
        pytest.warns(UserWarning, match=r"include entries \['re:does_not_exist'\] match no parameter"),
        pytest.raises(MisconfigurationException, match=r"selects no trainable parameter"),
    ):
        fit(Regression(), [L2ToPretrained(include=["re:does_not_exist"])], tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": 0.0}, r"strength=0.0.*> 0"),
        ({"strength": -1.0}, r"strength=-1.0.*> 0"),
        ({"strength": float("nan")}, r"strength=nan"),
        ({"norm": "l3"}, r"norm='l3'.*\('l2', 'l1'\)"),
        ({"strength": float("inf")}, r"strength=inf is invalid; the valid range is a number > 0, finite"),
        ({"strength": True}, r"strength=True is invalid; the valid range is a number > 0\. .*e\.g\. 1e-2"),
        ({"strength": "1e-2"}, r"strength='1e-2' is invalid"),
        ({"norm": True}, r"norm=True is invalid"),
        ({"include": ["("]}, r"L2ToPretrained\(\): include=\['\('\] is invalid.*not a valid regular expression"),
        ({"exclude": [3]}, r"exclude=\[3\] is invalid.*Entry 3 is not a string"),
        ({"snapshot_dtype": "int8"}, r"snapshot_dtype='int8' is invalid.*'bfloat16'"),
        ({"log_penalty": "false"}, r"log_penalty='false' is invalid; the valid range is True or False"),
    ],
)
def test_bad_arguments_are_refused_with_the_valid_range(kwargs: dict, message: str) -> None:
    with pytest.raises(MisconfigurationException, match=message):
        L2ToPretrained(**kwargs)


def test_penalty_is_logged_and_the_snapshot_is_released_after_fit(tmp_path: Path) -> None:
    module = Regression()
    callback = L2ToPretrained(strength=0.5)
    trainer = fit(module, [callback], tmp_path)
    assert "l2_to_pretrained/penalty" in trainer.callback_metrics
    assert trainer.callback_metrics["l2_to_pretrained/penalty"] > 0
    assert PretrainedSnapshot.get(module) is None


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint (it writes none), which Lightning notes.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks used to create the checkpoint")
def test_a_resumed_run_keeps_the_true_theta0_and_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    uninterrupted = Regression()
    every_4_steps = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(uninterrupted, [L2ToPretrained(strength=0.5), every_4_steps], tmp_path, max_steps=8, enable_checkpointing=True)
    mid = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert PretrainedSnapshot.CHECKPOINT_KEY in torch.load(mid, weights_only=False)

    resumed = Regression()
    with torch.no_grad():  # a different starting point: θ₀ must come from the checkpoint, not from here
        for p in resumed.parameters():
            p.add_(1.0)
    fit(resumed, [L2ToPretrained(strength=0.5)], tmp_path, max_steps=8, ckpt_path=mid)
    for a, b in zip(resumed.parameters(), uninterrupted.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sharded_strategies_are_refused() -> None:
    class FSDPStrategy:  # stands in for lightning's FSDPStrategy, which needs a GPU to construct
        pass

    trainer = type("T", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(MisconfigurationException, match=r"FSDPStrategy.*strategy=\"ddp\".*ModelParallelStrategy"):
        L2ToPretrained().setup(trainer, Regression(), "fit")


@pytest.mark.slow
def test_two_ddp_ranks_end_with_identical_regularised_weights(tmp_path: Path) -> None:
    ranks = run_ranks(ROOT / "tests" / "scripts" / "ddp_l2.py", tmp_path, timeout=300)
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][name]), name
        assert not torch.equal(value, ranks[0]["initial"][name]), f"{name} did not train"
    assert ranks[0]["penalty"] > 0


@pytest.mark.parametrize("value", ["float16", "torch.float16", "fp16", torch.float16])
def test_snapshot_dtype_takes_the_same_forms_as_the_other_callbacks(value: object) -> None:
    assert L2ToPretrained(snapshot_dtype=value).snapshot_dtype is torch.float16  # type: ignore[arg-type]


def test_a_single_pattern_string_is_one_pattern_not_its_characters(tmp_path: Path) -> None:
    one, as_string = Regression(), L2ToPretrained(strength=0.5, include=r"re:net\.2", log_penalty=False)
    fit(one, [as_string], tmp_path)
    other, as_list = Regression(), L2ToPretrained(strength=0.5, include=[r"re:net\.2"], log_penalty=False)
    fit(other, [as_list], tmp_path)
    assert as_string.regularised_names == as_list.regularised_names == ["net.2.weight", "net.2.bias"]
    for a, b in zip(one.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_pattern_that_matches_nothing_is_warned_about_with_the_near_category(tmp_path: Path) -> None:
    # A typo of a word is no word: read as a regex (the deprecated spelling, warned about at once with the word it
    # resembles), which matches nothing.
    with pytest.warns(
        FutureWarning,
        match=r"include entry 'embeddings' is not a word .*\(did you mean the word 'embedding'\?\); .*"
        r"write 're:embeddings'",
    ):
        callback = L2ToPretrained(include=["bias", "embeddings"], log_penalty=False)
    with pytest.warns(
        UserWarning, match=r"include entries \['embeddings'\] match no parameter.*did you mean 'embedding'"
    ):
        fit(Regression(), [callback], tmp_path, max_steps=1)
    assert callback.regularised_names == ["net.0.bias", "net.2.bias"]


class Spy(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snapshot = PretrainedSnapshot.get(pl_module)
        self.snapshot_names = snapshot.names if snapshot is not None else []


def test_tensors_the_module_froze_are_neither_regularised_nor_copied(tmp_path: Path) -> None:
    module = Regression()
    module.net[0].requires_grad_(False)
    callback, spy = L2ToPretrained(strength=1.0), Spy()
    fit(module, [callback, spy], tmp_path, max_steps=2)
    assert callback.regularised_names == spy.snapshot_names == ["net.2.weight", "net.2.bias"]
    with pytest.raises(MisconfigurationException, match=r"selects no trainable parameter of Regression \(2 match but"):
        frozen = Regression()
        frozen.net[0].requires_grad_(False)
        fit(frozen, [L2ToPretrained(include=[r"re:net\.0"])], tmp_path, max_steps=1)


def test_a_module_without_trainable_parameters_is_refused_before_training(tmp_path: Path) -> None:
    module = Regression()
    module.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match=r"L2ToPretrained: no parameter of Regression is trainable"):
        fit(module, [L2ToPretrained()], tmp_path, max_steps=1)
