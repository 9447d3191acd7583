"""The stages of a continual fine-tuning run and the data module that serves them, one Lightning epoch per stage.

A :class:`Stage` names its data (any :class:`~lightning.pytorch.LightningDataModule`), its task probe (a
:class:`~lit_mofo.probes.Probe`: the column of the accuracy matrix), and optionally its own budget of optimizer steps
and learning rate. :class:`StageSequence` is the run's data module: it serves stage ``k``'s training batches during
epoch ``k`` (exactly the stage's budget of batches, cycling its loader when that is shorter), its validation
batches, and the stage list that :class:`~lit_mofo.continual.ContinualLearning` drives. :func:`stage_steps` is
how a module's ``configure_optimizers`` reads the budget its schedule must span.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lit_mofo.probes.base import Probe

__all__ = ["Stage", "StageLoader", "StageSequence", "derived_seed", "run_seed", "stage_steps"]


def run_seed() -> int:
    """The run's seed: the one of Lightning's ``seed_everything`` (its ``PL_GLOBAL_SEED``, the same on every process),
    else 0."""
    try:
        return int(os.environ.get("PL_GLOBAL_SEED", "0")) % 2**63
    except ValueError:
        return 0


def derived_seed(seed: int, *parts: int) -> int:
    """A seed for one part of a run, from the run's seed and the part's coordinates (a stage, a pass): the first 8
    bytes of BLAKE2b of ``"<seed>/<part>/..."``, little-endian, below 2**63. The same on every process and platform."""
    digest = hashlib.blake2b("/".join(str(int(x)) for x in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def _check_stage_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or any(c.isspace() for c in name):
        raise MisconfigurationException(
            f"{where}: name={name!r} is invalid; a stage name is a non-empty string without '/' or whitespace (it "
            "names the task's column of the accuracy matrix and its logged metrics), e.g. 'cipher'."
        )
    return name


@dataclass
class Stage:
    """One stage of a continual fine-tuning run.

    Args:
        name: the stage's (and its task's) name: the matrix column, the metric names, the report. Non-empty, no ``/``
            or whitespace, unique in the run.
        data: its training data (and validation data, if the data module has some): a LightningDataModule.
        probe: its task probe (the column of the accuracy matrix, evaluated before stage 1 and after every stage);
            it takes the stage's name. None: the probe is given in ``StageSequence(probes={name: probe})``.
        max_steps: the stage's budget of optimizer steps, >= 1; its loader is cycled when it is shorter and cut when it
            is longer. None: one pass over its training loader.
        lr: the stage's learning rate, > 0: every param group's rate is scaled by ``lr / optimizer.defaults['lr']``
            (keeping the ratios between groups) and so is its schedule. None: the optimizer's own.
    """

    name: str
    data: pl.LightningDataModule
    probe: Probe | None = None
    max_steps: int | None = None
    lr: float | None = None

    def __post_init__(self) -> None:
        where = f"Stage({self.name!r})" if isinstance(self.name, str) else "Stage"
        _check_stage_name(self.name, where)
        if not isinstance(self.data, pl.LightningDataModule):
            raise MisconfigurationException(
                f"{where}: data={self.data!r:.80} is a {type(self.data).__name__}; give a LightningDataModule (in "
                "YAML a `class_path`/`init_args` block, e.g. `class_path: lit_mofo.scenario.ScenarioDataModule`)."
            )
        if self.probe is not None and not isinstance(self.probe, Probe):
            raise MisconfigurationException(
                f"{where}: probe={self.probe!r:.80} is a {type(self.probe).__name__}, not a lit_mofo.probes.Probe; "
                "give the stage's task probe (e.g. `class_path: lit_mofo.scenario.TaskProbe`), or wrap a function in "
                "lit_mofo.probes.CallableProbe."
            )
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise MisconfigurationException(
                f"{where}: max_steps={self.max_steps!r} is invalid; the valid range is an integer >= 1 (the stage's "
                "optimizer steps), or None for one pass over its training data."
            )
        if self.lr is not None and (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not math.isfinite(self.lr)
            or self.lr <= 0
        ):
            raise MisconfigurationException(
                f"{where}: lr={self.lr!r} is invalid; the valid range is a finite number > 0 (e.g. 2e-5), or None for "
                "the optimizer's own learning rate."
            )
        if self.lr is not None:
            self.lr = float(self.lr)


def _describe_data(data: pl.LightningDataModule) -> dict[str, Any]:
    hparams = json.loads(json.dumps(dict(getattr(data, "hparams", {}) or {}), default=repr, sort_keys=True))
    return {"class": f"{type(data).__module__}.{type(data).__qualname__}", "hparams": hparams}


class StageLoader:
    """The training batches of one stage: exactly ``num_batches`` of ``loader``'s batches, re-iterating ``loader``
    (a new pass, with ``set_epoch(pass)`` on a distributed sampler) when it runs out first, and stopping early when it
    is longer.

    Lightning checkpoints its state with every checkpoint: the stage, the position in the stage and in the pass, and
    the state of ``loader`` when that has ``state_dict``/``load_state_dict``
    (:class:`~lit_mofo.data.ResumableDataLoader`, torchdata's ``StatefulDataLoader``), so a run resumed mid-stage gets
    exactly the batches the uninterrupted run got. A loader without state restarts its pass from its first batch
    (with a warning), as Lightning does.

    Every pass starts (``iter(loader)``, where a loader draws its workers' seeds) with torch's RNG seeded by
    :func:`derived_seed` of ``(seed, stage, pass)`` and given back afterwards, so what the stage's data looks like
    depends on nothing that ran before it: the same on every process, and in a resumed run.

    Args:
        loader: the stage's training loader (already prepared for the strategy: distributed sampler and so on).
        num_batches: batches to yield, >= 1.
        stage: the stage's index, checked against a checkpoint's.
        name: the stage's name, for messages.
        seed: the run's seed (:func:`run_seed`).
    """

    def __init__(
        self, loader: Iterable[Any], num_batches: int, stage: int = 0, name: str = "stage", seed: int = 0
    ) -> None:
        if num_batches < 1:
            raise ValueError(f"StageLoader: num_batches={num_batches} must be >= 1.")
        self.loader = loader
        self.num_batches = int(num_batches)
        self.stage = stage
        self.name = name
        self.seed = seed
        self._yielded = 0  # batches of this stage handed out
        self._pass = 0  # passes over `loader` begun
        self._in_pass = 0  # batches of the current pass handed out
        self._iterator: Iterator[Any] | None = None
        self._restored = False

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        while self._yielded < self.num_batches:
            if self._iterator is None:
                self._set_epoch(self._pass)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derived_seed(self.seed, self.stage, self._pass))
                    self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                if self._in_pass == 0 and not self._restored:
                    raise MisconfigurationException(
                        f"The training loader of stage {self.name!r} yielded no batch; give the stage's data module "
                        "training data."
                    ) from None
                self._restored = False
                self._pass += 1
                self._in_pass = 0
                continue
            self._restored = False
            self._yielded += 1
            self._in_pass += 1
            yield batch

    def _set_epoch(self, epoch: int) -> None:
        """``set_epoch`` on the loader's sampler and its batch sampler's sampler, as Lightning does for a fit's loader
        at every epoch: a distributed sampler shuffles per epoch (here: per pass)."""
        samplers = [
            getattr(self.loader, "sampler", None),
            getattr(getattr(self.loader, "batch_sampler", None), "sampler", None),
        ]
        for sampler in {id(s): s for s in samplers if s is not None}.values():
            set_epoch = getattr(sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        inner = self.loader.state_dict() if _stateful(self.loader) else None
        return {
            "stage": self.stage,
            "yielded": self._yielded,
            "pass": self._pass,
            "in_pass": self._in_pass,
            "loader": inner,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["stage"] != self.stage:
            raise MisconfigurationException(
                f"The checkpoint's training loader state is of stage {state['stage'] + 1}, but it is being restored "
                f"into stage {self.stage + 1} ({self.name!r})'s: the checkpoint does not belong to this stage list."
            )
        self._yielded, self._pass, self._in_pass = state["yielded"], state["pass"], state["in_pass"]
        self._iterator = None
        if state["loader"] is not None and _stateful(self.loader):
            self.loader.load_state_dict(state["loader"])
            self._restored = True  # its restored iterator may be at the end of its pass: that ends the pass quietly
        elif self._in_pass:
            rank_zero_warn(
                f"Stage {self.name!r}: its training loader has no state_dict, so the resumed run starts the "
                f"interrupted pass over its data again from the first batch (it had handed out {self._in_pass}). For "
                "an exact resume use lit_mofo.data.ResumableDataLoader (or torchdata's StatefulDataLoader)."
            )
            self._in_pass = 0


def _stateful(loader: object) -> bool:
    """Whether ``loader`` saves and restores its position (what Lightning checkpoints of a fit's loaders)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


def _train_loader(trainer: pl.Trainer, data: pl.LightningDataModule, seed: int = 0) -> Iterable[Any]:
    """``data``'s training loader, built with torch's RNG seeded by ``seed`` (a shuffling sampler draws its generator
    then; the global RNG is given back afterwards), and prepared as Lightning prepares the loader of a fit's data
    module.

    Lightning injects a ``DistributedSampler`` (per ``use_distributed_sampler``), lets the strategy wrap the loader,
    checks the workers and seeds them — but only for the loader the fit's own data module returns, which here is the
    :class:`StageLoader` around this one. This is the one place lit_mofo relies on Lightning internals
    (``_replace_dunder_methods``, which records a ``DataLoader``'s arguments so that Lightning can rebuild it with a
    sampler, and ``_process_dataloader``; Lightning 2.x), covered by ``tests/test_continual.py``.
    """
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.connectors.data_connector import _process_dataloader
    from lightning.pytorch.trainer.states import RunningStage, TrainerFn
    from torch.utils.data import BatchSampler, DataLoader

    with (
        torch.random.fork_rng(devices=[]),
        _replace_dunder_methods(DataLoader, "dataset"),
        _replace_dunder_methods(BatchSampler),
    ):
        torch.manual_seed(seed)
        loader = data.train_dataloader()
    return _process_dataloader(trainer, TrainerFn.FITTING, RunningStage.TRAINING, loader)  # type: ignore[return-value]


class StageSequence(pl.LightningDataModule):
    """The data of a continual fine-tuning run: stage after stage, one Lightning epoch per stage.

    Use it as the fit's data module with a :class:`~lit_mofo.continual.ContinualLearning` callback on the Trainer
    (which refuses to run without it, and it without the callback). During epoch ``k`` it serves stage ``k``'s
    training loader, cut or cycled to exactly the stage's budget (:class:`StageLoader`): ``max_steps`` optimizer steps
    (times the Trainer's ``accumulate_grad_batches`` batches), or one pass over its data. Each stage's loader is
    prepared as Lightning prepares a fit's loader (a ``DistributedSampler`` under DDP/FSDP2 unless
    ``Trainer(use_distributed_sampler=False)``; worker seeding), and its validation loader (if its data module defines
    ``val_dataloader``) is the validation data during that stage. Each stage's loader is built, and each pass over
    it begun, with torch's RNG seeded from the run's seed (``seed_everything``'s) and the stage (and pass), then
    given back (:func:`derived_seed`): a loader that shuffles from the global RNG, as lit_mofo's data modules do,
    gives every stage an order of its own that is the same on every process and in a resumed run. The Trainer must
    reload dataloaders every epoch (``reload_dataloaders_every_n_epochs=1``; ContinualLearning sets it when left at
    0). Batch hooks
    (``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``) are the current stage's
    data module's. ``prepare_data`` and ``setup`` run for every stage's data module at the start of fit (so bad data
    in the last stage fails before the first one trains); each stage's data module gets this one's ``trainer``.

    **Why a data module.** The stage list is the run's data, so it sits where LightningCLI users put data (``data:``),
    and Lightning asks the data module for each epoch's loaders through public hooks; a callback could not hand
    Lightning a new training loader at a stage boundary without reaching into the fit loop.

    **Probes.** Every stage has one task probe: ``Stage.probe``, or an entry of ``probes`` keyed by the stage's name
    (for configs that keep the data and the evaluation apart); the probe takes the stage's name.

    **Checked at construction** (in a LightningCLI config: when it is parsed), each refusal naming the stage and the
    fix: an empty stage list, a stage that is not a :class:`Stage`, duplicate names, a stage with no task probe or
    with two, a ``probes`` entry that names no stage, a budget < 1, a learning rate <= 0 (the last two by
    :class:`Stage`).

    **Resume.** The checkpoint holds the stage list as it was (names, budgets, learning rates, each data module's class
    and hyper-parameters, each probe's class): a run resumed with another list is refused, naming the difference. It
    also holds the stage whose optimizers are built and each stage data module's own ``state_dict``.

    Args:
        stages: the stages, in training order (a list of :class:`Stage`, or of dicts with its fields).
        probes: task probes by stage name, for stages without ``probe``.

    Example::

        sequence = StageSequence([
            Stage("cipher", ScenarioDataModule(kind="cipher"), TaskProbe(kind="cipher"), max_steps=100),
            Stage("reverse", ScenarioDataModule(kind="reverse"), TaskProbe(kind="reverse"), max_steps=100, lr=5e-4),
        ])
        trainer = Trainer(callbacks=[ContinualLearning()])
        trainer.fit(CausalLMModule("scenario:base"), datamodule=sequence)
    """

    def __init__(self, stages: Sequence[Stage], probes: Mapping[str, Probe] | None = None) -> None:
        super().__init__()
        where = "StageSequence()"
        if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence) or not stages:
            raise MisconfigurationException(
                f"{where}: stages={stages!r:.80} is empty or not a list; give at least one stage, e.g. "
                "[Stage('cipher', ScenarioDataModule(kind='cipher'), TaskProbe(kind='cipher'), max_steps=100)] (in "
                "YAML a list of `name:`/`data:`/`probe:` entries)."
            )
        checked: list[Stage] = []
        for index, stage in enumerate(stages):
            if isinstance(stage, Mapping):
                try:
                    stage = Stage(**stage)
                except TypeError as error:
                    raise MisconfigurationException(f"{where}: stage {index + 1}: {error}") from error
            if not isinstance(stage, Stage):
                raise MisconfigurationException(
                    f"{where}: stage {index + 1} is a {type(stage).__name__}; give a lit_mofo.continual.Stage "
                    "(name, data, probe, max_steps, lr)."
                )
            checked.append(stage)
        seen: dict[str, int] = {}
        for index, stage in enumerate(checked):
            if stage.name in seen:
                raise MisconfigurationException(
                    f"{where}: stages {seen[stage.name] + 1} and {index + 1} are both named {stage.name!r}; a name "
                    "identifies a stage's task in the accuracy matrix and its metrics, so give each stage its own "
                    f"(e.g. {stage.name + '_2'!r})."
                )
            seen[stage.name] = index
        probes = dict(probes or {})
        unknown = [name for name in probes if name not in seen]
        if unknown:
            raise MisconfigurationException(
                f"{where}: `probes` has {'an entry' if len(unknown) == 1 else 'entries'} {unknown} that "
                f"{'names no stage' if len(unknown) == 1 else 'name no stage'}; the stages are {list(seen)}. Key each "
                "probe by the name of the stage whose task it measures."
            )
        self._probes: dict[str, Probe] = {}
        for stage in checked:
            inline, mapped = stage.probe, probes.get(stage.name)
            if inline is not None and mapped is not None:
                raise MisconfigurationException(
                    f"{where}: stage {stage.name!r} has two task probes, its own `probe` and probes[{stage.name!r}]; "
                    "keep one."
                )
            probe = inline if inline is not None else mapped
            if probe is None:
                raise MisconfigurationException(
                    f"{where}: stage {stage.name!r} has no task probe, so its column of the accuracy matrix cannot be "
                    f"measured. Give it `probe:` (e.g. `class_path: lit_mofo.scenario.TaskProbe`), or an entry "
                    f"probes[{stage.name!r}]."
                )
            if not isinstance(probe, Probe):
                raise MisconfigurationException(
                    f"{where}: probes[{stage.name!r}] is a {type(probe).__name__}, not a lit_mofo.probes.Probe."
                )
            probe.name = stage.name
            self._probes[stage.name] = probe
        self._stages: tuple[Stage, ...] = tuple(checked)
        self._current = 0  # the stage whose optimizers are (being) built: ContinualLearning moves it
        self._budgets: dict[int, int] = {}
        self._set_up = False

    # ------------------------------------------------------------------ the stages
    @staticmethod
    def of(trainer: pl.Trainer | None) -> StageSequence | None:
        """The fit's stage sequence (``trainer.datamodule``), or None when the fit has another data source."""
        datamodule = getattr(trainer, "datamodule", None)
        return datamodule if isinstance(datamodule, StageSequence) else None

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self._stages

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self._stages]

    @property
    def task_probes(self) -> dict[str, Probe]:
        """Each stage's task probe, by stage name, in stage order."""
        return dict(self._probes)

    def __len__(self) -> int:
        return len(self._stages)

    @property
    def current(self) -> int:
        """The index (0-based) of the stage whose optimizers are built, or being built: what :func:`stage_steps`
        answers for. :class:`~lit_mofo.continual.ContinualLearning` moves it at every stage start."""
        return self._current

    @current.setter
    def current(self, index: int) -> None:
        if not 0 <= index < len(self._stages):
            raise IndexError(f"StageSequence has stages 0..{len(self._stages) - 1}; got {index}.")
        self._current = index

    def describe(self) -> list[dict[str, Any]]:
        """The stage list as plain data (what a checkpoint keeps to refuse a changed list on resume)."""
        return [
            {
                "name": stage.name,
                "max_steps": stage.max_steps,
                "lr": stage.lr,
                "data": _describe_data(stage.data),
                "probe": f"{type(self._probes[stage.name]).__module__}.{type(self._probes[stage.name]).__qualname__}",
            }
            for stage in self._stages
        ]

    def budget(self, index: int) -> int:
        """Stage ``index``'s optimizer steps: its ``max_steps``, or the steps of one pass over its training loader
        (``ceil(batches / accumulate_grad_batches)``, the loader prepared for this process)."""
        if index not in self._budgets:
            stage = self._stages[index]
            if stage.max_steps is not None:
                self._budgets[index] = stage.max_steps
            else:
                self._budgets[index] = math.ceil(self._pass_length(index) / self._accumulation())
        return self._budgets[index]

    def _accumulation(self) -> int:
        return int(getattr(self.trainer, "accumulate_grad_batches", 1) or 1)

    def _pass_length(self, index: int) -> int:
        stage = self._stages[index]
        loader = _train_loader(self._require_trainer(), stage.data, derived_seed(run_seed(), index))
        try:
            length = len(loader)  # type: ignore[arg-type]
        except TypeError:
            raise MisconfigurationException(
                f"Stage {stage.name!r} has no max_steps and its training loader has no length (an iterable "
                "dataset), so the stage's budget is unknown; give the stage `max_steps`."
            ) from None
        if length < 1:
            raise MisconfigurationException(
                f"Stage {stage.name!r}: its training loader has no batch on this process; give it training data (or "
                "fewer processes)."
            )
        return length

    def _require_trainer(self) -> pl.Trainer:
        if self.trainer is None:
            raise RuntimeError("StageSequence: the stage budgets and loaders are known during fit only.")
        return self.trainer

    def _stage_at(self, epoch: int) -> int:
        if epoch >= len(self._stages):
            raise RuntimeError(
                f"StageSequence: epoch {epoch} is past the last stage ({len(self._stages)}); ContinualLearning ends "
                "the fit after it."
            )
        return epoch

    def _current_data(self) -> pl.LightningDataModule:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self._stages[min(epoch, len(self._stages) - 1)].data

    # ------------------------------------------------------------------ LightningDataModule
    @override
    def prepare_data(self) -> None:
        for stage in self._stages:
            stage.data.prepare_data()

    @override
    def setup(self, stage: str) -> None:
        from lit_mofo.continual.callback import continual_learning  # here: the callback module imports this one

        if stage == "fit" and self.trainer is not None and continual_learning(self.trainer) is None:
            raise MisconfigurationException(
                "StageSequence serves its stages one epoch each, and a ContinualLearning callback runs them (a fresh "
                "optimizer per stage, the end of the fit after the last stage, the accuracy matrix); the Trainer has "
                "none. Add lit_mofo.continual.ContinualLearning() to its callbacks (in YAML under "
                "trainer.callbacks: `- class_path: lit_mofo.continual.ContinualLearning`)."
            )
        for item in self._stages:
            item.data.trainer = self.trainer
            item.data.setup(stage)
        self._set_up = True

    @override
    def teardown(self, stage: str) -> None:
        for item in self._stages:
            item.data.teardown(stage)

    @override
    def train_dataloader(self) -> StageLoader:
        trainer = self._require_trainer()
        index = self._stage_at(trainer.current_epoch)
        stage = self._stages[index]
        seed = run_seed()
        loader = _train_loader(trainer, stage.data, derived_seed(seed, index))
        batches = self.budget(index) * self._accumulation() if stage.max_steps is not None else None
        if batches is None:
            batches = len(loader)  # type: ignore[arg-type]
        return StageLoader(loader, batches, stage=index, name=stage.name, seed=seed)

    @override
    def val_dataloader(self) -> Any:
        data = self._current_data()
        if not is_overridden("val_dataloader", data, pl.LightningDataModule):
            return []
        return data.val_dataloader()

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._current_data().on_before_batch_transfer(batch, dataloader_idx)

    @override
    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return self._current_data().transfer_batch_to_device(batch, device, dataloader_idx)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self._current_data().on_after_batch_transfer(batch, dataloader_idx)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "stages": self.describe(),
            "current": self._current,
            "data": [stage.data.state_dict() for stage in self._stages],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        differences = stage_list_differences(state_dict["stages"], self.describe())
        if differences:
            raise MisconfigurationException(
                "The checkpoint was written by a run with another stage list: "
                + "; ".join(differences)
                + ". Resume with the stages that wrote the checkpoint, or start a new run (without --ckpt_path)."
            )
        self._current = int(state_dict["current"])
        for stage, data_state in zip(self._stages, state_dict["data"], strict=True):
            if data_state:
                stage.data.load_state_dict(data_state)


def stage_list_differences(saved: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> list[str]:
    """How two stage lists (:meth:`StageSequence.describe`) differ, one phrase per difference; empty if they agree."""
    out: list[str] = []
    if [s["name"] for s in saved] != [s["name"] for s in now]:
        out.append(f"the checkpoint's stages are {[s['name'] for s in saved]}, now they are {[s['name'] for s in now]}")
    for index, (old, new) in enumerate(zip(saved, now, strict=False)):
        for key in ("max_steps", "lr", "data", "probe"):
            if old.get(key) != new.get(key):
                out.append(
                    f"stage {index + 1} ({new['name']!r}) has {key}={_short(new.get(key))}, the checkpoint's "
                    f"{key}={_short(old.get(key))}"
                )
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=repr, sort_keys=True) if isinstance(value, (dict, list)) else repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def stage_steps(trainer: pl.Trainer) -> int | float:
    """The optimizer steps the schedule being configured must span: the current stage's budget in a continual run
    (a :class:`StageSequence` data module), else ``trainer.estimated_stepping_batches`` (the whole fit).

    Call it from ``configure_optimizers`` instead of ``trainer.estimated_stepping_batches``, so that the schedule
    of every stage's fresh optimizer starts and ends with the stage::

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(self.parameters(), lr=1e-4)
            steps = lit_mofo.continual.stage_steps(self.trainer)
            return {"optimizer": optimizer, "lr_scheduler": warmup_lr_scheduler(optimizer, steps)}

    :class:`~lit_mofo.modules.CausalLMModule` and :func:`~lit_mofo.optim.helpers.mofo_configure_optimizers` do.
    """
    sequence = StageSequence.of(trainer)
    if sequence is None:
        return trainer.estimated_stepping_batches
    return sequence.budget(sequence.current)
