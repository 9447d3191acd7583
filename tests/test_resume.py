"""Exact resume from any checkpoint: the loader the data modules use, the epoch counter after a checkpoint written on
the last batch of an epoch, the data order of later epochs and of distributed runs (DDP, FSDP2), and a user's own
``DistributedSampler``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from process_launch import run_ranks, run_script
from torch.utils.data import DistributedSampler, RandomSampler, TensorDataset, WeightedRandomSampler

from lit_mofo import HalfFineTuning
from lit_mofo.data import ResumableDataLoader
from lit_mofo.modules import CausalLMModule
from lit_mofo.scenario import ScenarioDataModule, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# The fits here have no validation data (num_val=0): the data module's empty list of validation loaders, which
# Lightning notes.
pytestmark = pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")


# ---- the loader ----------------------------------------------------------------------------------------------------


def _loader(num_workers: int = 0, generator: bool = False) -> ResumableDataLoader:
    return ResumableDataLoader(
        TensorDataset(torch.arange(10)),
        batch_size=3,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(5) if generator else None,
    )


def _epochs(loader: ResumableDataLoader, count: int) -> list[list[list[int]]]:
    return [[batch[0].tolist() for batch in loader] for _ in range(count)]


@pytest.mark.parametrize(
    ("num_workers", "generator"), [(0, False), (2, False), (0, True)], ids=["global-rng", "workers", "own-generator"]
)
def test_a_loader_restored_after_any_batch_yields_exactly_the_rest_and_no_empty_epoch(
    num_workers: int, generator: bool
) -> None:
    # own-generator: the loader also draws each epoch's worker base seed from a `generator=`; the later epochs' order
    # must not depend on those draws, which no checkpoint replays
    torch.manual_seed(0)
    reference = _epochs(_loader(num_workers, generator), 3)  # 4 batches per epoch (the last one has 1 sample)
    flat = [batch for epoch in reference for batch in epoch]
    positions = range(1, len(flat)) if num_workers == 0 else (3, 4, 6)  # 4: the last batch of the first epoch
    for seen in positions:
        torch.manual_seed(0)
        original = _loader(num_workers, generator)
        iterator, taken, state = iter(original), 0, None
        while taken < seen:  # the state Lightning saves after `seen` batches (a new iterator per epoch)
            try:
                next(iterator)
                taken += 1
                state = original.state_dict()
            except StopIteration:
                iterator = iter(original)
        torch.manual_seed(123)  # the resumed process's global RNG differs; the checkpoint's generator decides
        resumed = _loader(num_workers, generator)
        resumed.load_state_dict(state)
        epochs_left = 3 - seen // 4
        rest = _epochs(resumed, epochs_left)
        assert all(rest), f"after {seen} batches the restored loader yielded an empty epoch: {rest}"
        assert [batch for epoch in rest for batch in epoch] == flat[seen:], f"restored after {seen} batches"


def _distributed_sampler(kind: str, dataset: TensorDataset) -> DistributedSampler:
    if kind == "DistributedSampler":  # a user's own, rank 1 of 2
        return DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=7)
    # What Lightning injects for a loader given a fixed order: it shuffles that order by seed and epoch.
    return DistributedSamplerWrapper(list(range(len(dataset)))[::-1], num_replicas=2, rank=1, shuffle=True, seed=7)


@pytest.mark.parametrize("kind", ["DistributedSampler", "DistributedSamplerWrapper"])
def test_a_loader_with_a_distributed_sampler_resumes_the_epoch_it_was_in_before_lightning_sets_the_epoch(
    kind: str,
) -> None:
    """Lightning's order on resume: the loader's state is loaded and its iterator created, *then* ``set_epoch`` is
    called with the epoch the fit continues in (the next one after a checkpoint on an epoch's last batch). The
    sampler's order depends on its epoch, which the loader's state must carry."""
    dataset = TensorDataset(torch.arange(20))

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(dataset, batch_size=3, sampler=_distributed_sampler(kind, dataset))

    original, reference, states = loader(), [], []
    for epoch in range(3):  # 4 batches per epoch on this rank (10 samples)
        original.sampler.set_epoch(epoch)
        for batch in original:
            reference.append(batch[0].tolist())
            states.append(original.state_dict())
    assert len({tuple(map(tuple, reference[i : i + 4])) for i in (0, 4, 8)}) == 3  # every epoch in its own order
    for seen in range(1, len(reference)):
        resumed = loader()
        resumed.load_state_dict(states[seen - 1])
        iterator = iter(resumed)  # Lightning's setup_data(), before the epoch is set
        epoch = seen // 4  # the epoch Lightning continues in: the next one after its last batch
        resumed.sampler.set_epoch(epoch)
        rest = [batch[0].tolist() for batch in iterator]
        for later in range(epoch + 1, 3):
            resumed.sampler.set_epoch(later)
            rest += [batch[0].tolist() for batch in resumed]
        assert rest == reference[seen:], f"resumed after {seen} batches"


@pytest.mark.parametrize(
    ("sampler", "fix"),
    [
        (lambda d: RandomSampler(d), "pass `shuffle=True` instead of a sampler"),
        (lambda d: WeightedRandomSampler([1.0] * len(d), len(d)), "pass `shuffle=True` instead of a sampler"),
        (
            lambda d: DistributedSamplerWrapper(RandomSampler(d), num_replicas=2, rank=0),
            "`Trainer(use_distributed_sampler=False)`",
        ),
    ],
    ids=["RandomSampler", "WeightedRandomSampler", "wrapped-RandomSampler"],
)
def test_a_loader_whose_order_no_checkpoint_can_hold_warns_once_when_it_starts_naming_the_fix(
    sampler: Any, fix: str
) -> None:
    dataset = TensorDataset(torch.arange(10))
    loader = ResumableDataLoader(dataset, batch_size=3, sampler=sampler(dataset))  # Lightning may still replace it
    with pytest.warns(UserWarning, match="a fit resumed from a checkpoint would see other batches") as caught:
        list(loader)
    assert len(caught) == 1 and fix in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(loader)  # once


def test_a_loader_whose_order_resumes_iterates_without_a_warning() -> None:
    dataset = TensorDataset(torch.arange(10))
    wrapped = DistributedSamplerWrapper([9, 8, 7, 6], num_replicas=2, rank=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for options in (
            {"shuffle": True},
            {"sampler": DistributedSampler(dataset, num_replicas=2, rank=0)},
            {"sampler": [9, 8, 7]},
            {"sampler": wrapped},
        ):
            list(ResumableDataLoader(dataset, batch_size=3, **options))


# ---- Lightning: resume from every kind of checkpoint ----------------------------------------------------------------

BATCHES_PER_EPOCH = 3


class Trace(Callback):
    """Records what each training batch sees: the step, the epoch, the batch index and the data."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, int, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batches.append((trainer.global_step, trainer.current_epoch, idx, int(batch["input_ids"].sum())))


class _OwnSamplerData(ScenarioDataModule):
    """The scenario's data through a user's own ``DistributedSampler`` (one replica here: the whole data)."""

    def train_dataloader(self) -> ResumableDataLoader:
        loader = super().train_dataloader()
        sampler = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        return ResumableDataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn
        )


def _fit(
    max_steps: int,
    checkpoint_dir: Path | None = None,
    ckpt_path: Path | None = None,
    hft: bool = False,
    own_sampler: bool = False,
) -> tuple[Trace, dict[str, torch.Tensor], list[dict[str, Any]], int]:
    pl.seed_everything(0)
    trace = Trace()
    callbacks: list[Callback] = [trace]
    if hft:
        callbacks.append(HalfFineTuning(redraw_every_n_epochs=2, seed=0))
    if checkpoint_dir is not None:
        callbacks.append(
            ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        )
    elif ckpt_path is not None:
        # A resumed fit has the checkpoint callback of the fit that wrote its checkpoint, as a user's would (Lightning
        # restores its state, and warns when it is missing); save_top_k=0: it writes nothing, so the directory keeps
        # the uninterrupted fit's checkpoints, which other cases resume from.
        callbacks.append(
            ModelCheckpoint(dirpath=Path(ckpt_path).parent, filename="{step}", every_n_train_steps=1, save_top_k=0)
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None or ckpt_path is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    config = {  # a dict: a PretrainedConfig object in the hyper-parameters needs weights_only=False to resume
        "model_type": "llama",
        "vocab_size": len(load_tokenizer()),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    module = CausalLMModule(model_config=config)
    data = (_OwnSamplerData if own_sampler else ScenarioDataModule)(
        num_train=16 * BATCHES_PER_EPOCH, num_val=0, batch_size=16
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    weights = {name: p.detach().clone() for name, p in module.state_dict().items()}
    history = next((c.history for c in trainer.callbacks if isinstance(c, HalfFineTuning)), [])
    return trace, weights, history, trainer.current_epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Any, ...]]:
    directory = tmp_path_factory.mktemp("checkpoints")
    return directory, _fit(3 * BATCHES_PER_EPOCH, checkpoint_dir=directory)


@pytest.mark.parametrize(
    "step",
    [2, 3, 4, 6],
    ids=["mid-epoch", "last-batch-of-epoch-0", "first-batch-of-epoch-1", "last-batch-of-epoch-1"],
)
def test_fit_resumed_from_any_checkpoint_sees_the_same_batches_epochs_and_ends_with_the_same_weights(
    uninterrupted: tuple[Path, tuple[Any, ...]], step: int
) -> None:
    directory, (trace, weights, _, final_epoch) = uninterrupted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, resumed_weights, _, resumed_final_epoch = _fit(
            3 * BATCHES_PER_EPOCH, ckpt_path=directory / f"step={step}.ckpt"
        )
    assert not [w for w in caught if "not resumable" in str(w.message)]
    # (step, current_epoch, batch index, data) of every batch after the checkpoint, as in the uninterrupted fit; a
    # checkpoint on the last batch of an epoch used to resume one epoch ahead (current_epoch one too high).
    assert resumed.batches == [b for b in trace.batches if b[0] >= step]
    assert resumed_final_epoch == final_epoch
    assert all(torch.equal(weights[name], resumed_weights[name]) for name in weights)


@pytest.fixture(scope="module")
def uninterrupted_with_own_sampler(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[Any, ...]]:
    directory = tmp_path_factory.mktemp("checkpoints_own_sampler")
    return directory, _fit(3 * BATCHES_PER_EPOCH, checkpoint_dir=directory, own_sampler=True)


@pytest.mark.parametrize("step", [3, 5, 6], ids=["last-batch-of-epoch-0", "mid-epoch-1", "last-batch-of-epoch-1"])
def test_fit_with_its_own_distributed_sampler_resumes_the_order_of_every_later_epoch(
    uninterrupted_with_own_sampler: tuple[Path, tuple[Any, ...]], step: int
) -> None:
    """A ``DistributedSampler``'s order is drawn from its seed and the epoch Lightning sets; a resumed fit used to
    replay epoch 0's order in every epoch after the first."""
    directory, (trace, weights, _, final_epoch) = uninterrupted_with_own_sampler
    epochs = [[b[3] for b in trace.batches if b[1] == epoch] for epoch in range(3)]
    assert len({tuple(e) for e in epochs}) == 3  # every epoch in its own order
    resumed, resumed_weights, _, resumed_final_epoch = _fit(
        3 * BATCHES_PER_EPOCH, ckpt_path=directory / f"step={step}.ckpt", own_sampler=True
    )
    assert resumed.batches == [b for b in trace.batches if b[0] >= step]
    assert resumed_final_epoch == final_epoch
    assert all(torch.equal(weights[name], resumed_weights[name]) for name in weights)


# ---- 2 processes: DDP and FSDP2 -------------------------------------------------------------------------------------

RESUME_ORDER = ROOT / "tests" / "scripts" / "resume_order.py"


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def distributed_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """One launch per strategy: the uninterrupted fit and its resumes from steps 2, 3 and 5 (about 30 s quiet); the
    launch's directory (its checkpoints under ``checkpoints/``) and what each rank recorded."""
    out_dir = tmp_path_factory.mktemp(f"resume_{request.param}")
    return out_dir, run_ranks(RESUME_ORDER, out_dir, "--strategy", request.param, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("step", [2, 3, 5], ids=["mid-epoch-0", "last-batch-of-epoch-0", "mid-epoch-1"])
def test_a_distributed_fit_resumed_from_any_checkpoint_sees_the_same_batches_and_ends_bit_identical(
    distributed_runs: tuple[Path, list[dict]], step: int
) -> None:
    """``ResumableDataLoader(shuffle=True)`` under DDP and FSDP2, sharded by Lightning's distributed sampler: its
    order used to be lost (Lightning wrapped the loader's sampler, whose state no checkpoint held)."""
    _, (rank0, rank1) = distributed_runs
    assert rank0["uninterrupted"]["batches"] != rank1["uninterrupted"]["batches"]  # each rank its own share
    for rank in (rank0, rank1):
        full, resumed = rank["uninterrupted"], rank[str(step)]
        assert [b[:2] for b in full["batches"]] == [(s, s // 3) for s in range(8)]  # 3 batches per epoch and rank
        assert resumed["batches"] == [b for b in full["batches"] if b[0] >= step]
        assert full["weights"].keys() == resumed["weights"].keys()
        assert all(torch.equal(full["weights"][n], resumed["weights"][n]) for n in full["weights"])


@pytest.mark.slow
@pytest.mark.parametrize("distributed_runs", ["fsdp2"], indirect=True)
def test_a_sharded_checkpoint_of_two_ranks_resumes_on_one_process_under_fsdp2(
    distributed_runs: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    """A sharded checkpoint is resharded onto another number of processes (the fix the CLI names when a sharded
    checkpoint is given to a 1-process or DDP run). One more launch, about 20 s quiet."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = distributed_runs[0] / "checkpoints" / "step=5.ckpt"
    result = run_script(
        RESUME_ORDER, str(tmp_path), "--strategy", "fsdp2", "--devices", "1", "--resume", str(checkpoint), timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(tmp_path / "rank0.pt", weights_only=False)["resumed"]
    saved = _load_distributed_checkpoint(checkpoint)["state_dict"]
    assert resumed["start"].keys() == saved.keys()
    assert all(torch.equal(resumed["start"][name], saved[name]) for name in saved)  # both ranks' shards, whole
    assert resumed["global_step"] == 8 and [b[0] for b in resumed["batches"]] == [5, 6, 7]


def test_half_finetuning_epoch_redraws_resume_on_schedule_from_a_last_batch_of_epoch_checkpoint(
    tmp_path: Path,
) -> None:
    steps = 4 * BATCHES_PER_EPOCH  # re-draws at the start of epochs 2 (step 6)
    _, weights, history, _ = _fit(steps, checkpoint_dir=tmp_path, hft=True)
    assert [(draw["step"], draw["epoch"]) for draw in history] == [(0, 0), (6, 2)]
    _, resumed_weights, resumed_history, _ = _fit(steps, ckpt_path=tmp_path / "step=6.ckpt", hft=True)
    assert resumed_history == history
    assert all(torch.equal(weights[name], resumed_weights[name]) for name in weights)
