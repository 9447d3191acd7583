"""Checkpoints that a crash cannot leave half-written, what makes one complete, and the newest complete one of a run.

Lightning writes a checkpoint in place: a sharded checkpoint (``ModelParallelStrategy``, FSDP2) is a directory that
every rank writes its shard files into, ``torch.distributed.checkpoint``'s ``.metadata`` last, then rank zero's
``meta.pt`` (everything but the weights and optimizer states); a process killed in between leaves a directory named
like a finished checkpoint that cannot be loaded. A full checkpoint file goes through a temporary file in the system's
temporary directory, which is a copy, not an atomic rename, when that directory is on another file system.

:func:`save_checkpoints_atomically` makes a strategy write every local checkpoint under ``<name>.partial`` and rename
it to ``<name>`` once complete (the ``lit-mofo`` command does it for every run), so that a checkpoint under its final
name is always complete; a leftover ``.partial`` of a killed save is removed by the next save of the same name.
:func:`checkpoint_problem` says why a path is not a complete checkpoint (cheaply: the zip table of contents of a
file, the metadata and shard files of a directory), and :func:`newest_complete_checkpoint` finds the newest complete
checkpoint of the same run, by its hyper-parameters, in a set of directories. :func:`resume_problem` and
:func:`load_problem` are the ``lit-mofo`` command's checks of a ``--ckpt_path`` before and after the model and the
Trainer are built.

Two callbacks make a run's checkpoints survive an interruption (the shipped configs name both):

- :class:`AtomicCheckpoints` calls :func:`save_checkpoints_atomically` on the Trainer's strategy in ``setup``;
- :class:`CheckpointOnSigterm` writes the checkpoint of the step a SIGTERM (a scheduler's preemption) stopped.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lit_mofo.task_vectors import applied_edit

__all__ = [
    "PARTIAL_SUFFIX",
    "AtomicCheckpoints",
    "CheckpointOnSigterm",
    "checkpoint_problem",
    "complete_checkpoints",
    "hyper_parameters_match",
    "is_local_checkpoint_path",
    "load_problem",
    "module_hyper_parameters",
    "newest_complete_checkpoint",
    "read_checkpoint_meta",
    "replacement_checkpoint",
    "resume_problem",
    "save_checkpoints_atomically",
]

PARTIAL_SUFFIX = ".partial"  # a checkpoint being written: `epoch=0-step=3.ckpt.partial`
_REPLACED_SUFFIX = ".replaced"  # the previous checkpoint of the same name, while the new one takes its place
_DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's, written last (through a rename)
_LIGHTNING_META = "meta.pt"  # Lightning's, written by rank zero after the shards
_UNCOMPARED = frozenset({"_instantiator"})  # hyper-parameter entries that say nothing about the model


# ---------------------------------------------------------------------------------------------------- complete?
def _file_problem(path: Path) -> str | None:
    """Why the file ``path`` cannot be a checkpoint written by ``torch.save`` (a zip archive with a pickle), or None.

    Reads only the archive's table of contents: cheap for any size, and enough to catch an empty file, a file cut
    short while it was written (the table is at its end) and a file that is something else.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(1)
    except OSError as error:
        return f"the file cannot be read ({error.strerror})"
    if size == 0:
        return "the file is empty (0 bytes)"
    if head == b"\x80":  # a pickle written by torch.save before torch 1.6: torch checks it itself
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return (
            f"the file ({size} bytes) ends without the table of contents that torch.save writes last: it was cut "
            "short while being written, or it is not a checkpoint"
        )
    if not any(name.endswith("data.pkl") for name in names):
        return "the file is a zip archive but not a PyTorch checkpoint (no data.pkl inside)"
    return None


def _directory_problem(path: Path) -> str | None:
    """Why the directory ``path`` is not a complete sharded checkpoint (``torch.distributed.checkpoint`` shards and
    their ``.metadata``, and Lightning's ``meta.pt``), or None."""
    try:
        entries = {entry.name for entry in path.iterdir()}
    except OSError as error:
        return f"the directory cannot be read ({error.strerror})"
    if _DCP_METADATA not in entries:
        if _LIGHTNING_META in entries or any(name.endswith(".distcp") for name in entries):
            return (
                "the sharded checkpoint was cut short while it was written: torch.distributed.checkpoint writes its "
                f"`{_DCP_METADATA}` file last, and it is missing"
            )
        return f"the directory is not a checkpoint (no `{_DCP_METADATA}` of torch.distributed.checkpoint inside)"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # a torn or foreign file: whatever unpickling it raises
        return f"its `{_DCP_METADATA}` cannot be read ({type(error).__name__}: {error})"
    storage = getattr(metadata, "storage_data", None) or {}
    shards = sorted({getattr(item, "relative_path", "") for item in storage.values()} - {""})
    missing = [name for name in shards if name not in entries]
    if missing:
        return f"shard file(s) {missing} of the sharded checkpoint are missing"
    if _LIGHTNING_META not in entries:
        return (
            f"the sharded checkpoint was cut short while it was written: Lightning writes its `{_LIGHTNING_META}` "
            "(everything but the weights and optimizer states) after the shards, and it is missing"
        )
    problem = _file_problem(path / _LIGHTNING_META)
    return None if problem is None else f"its `{_LIGHTNING_META}` is damaged: {problem}"


def checkpoint_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the local ``path`` is not a complete checkpoint (a file written by ``torch.save``, or a directory of a
    sharded checkpoint), or None when it is one. A missing path is a problem too."""
    path = Path(path)
    if path.is_dir():
        return _directory_problem(path)
    if not path.exists():
        return "there is no such file or directory"
    return _file_problem(path)


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The entries of the complete checkpoint ``path`` (a file, or a sharded checkpoint's ``meta.pt``): every entry
    of a file with its tensors memory-mapped, not read; a sharded checkpoint's entries but the weights and optimizer
    states (``state_dict``, ``optimizer_states``). Raises what ``torch.load`` raises for something else."""
    path = Path(path)
    file = path / _LIGHTNING_META if path.is_dir() else path
    options: dict[str, Any] = {"map_location": "cpu"}
    if file.read_bytes()[:1] != b"\x80":
        options["mmap"] = True  # a zip archive (torch >= 1.6): tensors are mapped, not read
    try:
        loaded = torch.load(file, weights_only=True, **options)
    except pickle.UnpicklingError:  # objects beyond tensors and containers, as Lightning itself loads them
        loaded = torch.load(file, weights_only=False, **options)
    if not isinstance(loaded, dict):
        raise TypeError(f"{file} holds a {type(loaded).__name__}, not a checkpoint's dict")
    return loaded


# ---------------------------------------------------------------------------------------------------- the same run
def _plain(value: Any) -> Any:
    """``value`` with Namespaces and mappings as dicts and tuples as lists, for comparing YAML and pickled values."""
    if hasattr(value, "as_dict") and callable(value.as_dict):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def hyper_parameters_match(candidate: Mapping[str, Any] | None, reference: Mapping[str, Any] | None) -> bool:
    """Whether a checkpoint's ``hyper_parameters`` (``candidate``) describe the same model as ``reference`` (another
    checkpoint's, or what the current run would save): every entry both have is equal, the class (``_class_path``,
    compared by class name) included, and they have at least one. Without hyper-parameters on either side, only
    another checkpoint without them matches."""
    ours = {k: v for k, v in _plain(dict(candidate or {})).items() if k not in _UNCOMPARED}
    theirs = {k: v for k, v in _plain(dict(reference or {})).items() if k not in _UNCOMPARED}
    if not ours or not theirs:
        return not ours and not theirs
    compared = False
    if "_class_path" in ours and "_class_path" in theirs:
        if str(ours["_class_path"]).rpartition(".")[2] != str(theirs["_class_path"]).rpartition(".")[2]:
            return False
        compared = True
    common = (ours.keys() & theirs.keys()) - {"_class_path"}
    return (compared or bool(common)) and all(ours[key] == theirs[key] for key in common)


def _written(path: Path) -> float:
    """When the checkpoint ``path`` was completed: the file's modification time, or its ``meta.pt``'s."""
    return (path / _LIGHTNING_META if path.is_dir() else path).stat().st_mtime


def complete_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints (``*.ckpt`` files and sharded directories) in ``directory``, newest first; a link
    and its target count once."""
    directory = Path(directory)
    found: dict[Path, Path] = {}
    with contextlib.suppress(OSError):
        for entry in directory.glob("*.ckpt"):
            with contextlib.suppress(OSError):
                if checkpoint_problem(entry) is None:
                    found.setdefault(entry.resolve(), entry)
    return sorted(found.values(), key=lambda p: (_written(p), p.name), reverse=True)


def newest_complete_checkpoint(
    directories: Iterable[str | os.PathLike[str]],
    hyper_parameters: Mapping[str, Any] | None,
    *,
    exclude: str | os.PathLike[str] | None = None,
    before: float | None = None,
) -> Path | None:
    """The newest complete checkpoint in ``directories`` whose hyper-parameters match ``hyper_parameters`` (see
    :func:`hyper_parameters_match`), leaving out ``exclude``; with ``before`` (a modification time) the newest one
    written at or before it, else None."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    candidates: dict[Path, Path] = {}
    for directory in directories:
        for path in complete_checkpoints(directory):
            if path.resolve() != excluded:
                candidates.setdefault(path.resolve(), path)
    for path in sorted(candidates.values(), key=lambda p: (_written(p), p.name), reverse=True):
        if before is not None and _written(path) > before:
            continue
        try:
            meta = read_checkpoint_meta(path)
        except Exception:  # unreadable: not a checkpoint to resume from
            continue
        if "pytorch-lightning_version" in meta and hyper_parameters_match(
            meta.get("hyper_parameters"), hyper_parameters
        ):
            return path
    return None


def replacement_checkpoint(
    path: str | os.PathLike[str], hyper_parameters: Mapping[str, Any] | None
) -> tuple[Path, bool] | None:
    """What to resume from instead of the unusable checkpoint ``path``: the newest complete checkpoint of the same run
    (see :func:`hyper_parameters_match`) in its directory written before it (``(checkpoint, True)``), else the newest
    one there (``(checkpoint, False)``), else None."""
    path = Path(path)
    try:
        written = path.stat().st_mtime if path.exists() else None
    except OSError:
        written = None
    for before in ([written] if written is not None else []) + [None]:
        other = newest_complete_checkpoint([path.parent], hyper_parameters, exclude=path, before=before)
        if other is not None:
            return other, before is not None
    return None


def module_hyper_parameters(module: Any) -> dict[str, Any]:
    """The hyper-parameters ``module`` (a LightningModule) saves in its checkpoints, with its class as
    ``_class_path``, for :func:`hyper_parameters_match`."""
    cls = type(module)
    return {"_class_path": f"{cls.__module__}.{cls.__qualname__}", **dict(getattr(module, "hparams", {}) or {})}


# ---------------------------------------------------------------------------------------------------- atomic saves
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_into_place(partial: Path, final: Path) -> None:
    """Rename the complete checkpoint ``partial`` to ``final``, replacing what is there."""
    if final.is_dir() and not final.is_symlink():  # a sharded checkpoint of the same name: no atomic swap for that
        replaced = final.with_name(final.name + _REPLACED_SUFFIX)
        _remove(replaced)
        final.rename(replaced)
        partial.rename(final)
        shutil.rmtree(replaced)
    else:
        os.replace(partial, final)  # atomic, also over an existing file or link


def save_checkpoints_atomically(strategy: Strategy) -> None:
    """Make ``strategy`` write every local checkpoint under ``<name>.partial`` and rename it to ``<name>`` when it is
    complete, so that no crash leaves an incomplete checkpoint under a checkpoint's name.

    Covers one process (``SingleDeviceStrategy``), DDP and ``ModelParallelStrategy`` (FSDP2), with sharded
    directories (renamed by rank zero once every rank's shards, the ``.metadata`` and ``meta.pt`` are written) and
    full files; other strategies (DeepSpeed writes its own directories rank by rank) and remote paths (``s3://...``)
    are left as they are. Idempotent; wraps the strategy object's ``save_checkpoint`` for its lifetime. The
    ``lit-mofo`` command calls it for every run; call it on ``trainer.strategy`` after building a Trainer.
    """
    if "save_checkpoint" in vars(strategy) or not isinstance(
        strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
    ):
        return
    save = strategy.save_checkpoint
    sharded = isinstance(strategy, ModelParallelStrategy) and bool(
        getattr(strategy, "_save_distributed_checkpoint", True)
    )

    def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if "://" in str(filepath):
            save(checkpoint, filepath, storage_options)
            return
        # Every rank writes a sharded checkpoint, at rank zero's path; otherwise rank zero alone writes.
        final = Path(strategy.broadcast(str(filepath)) if sharded else filepath)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if strategy.is_global_zero:
            _remove(partial)  # left by a save that was killed
        if sharded:
            strategy.barrier("lit_mofo_checkpoint_partial")  # removed before any rank writes its shard into it
        save(checkpoint, partial, storage_options)
        if strategy.is_global_zero and partial.exists():
            _move_into_place(partial, final)

    save_checkpoint._lit_mofo_atomic = True  # type: ignore[attr-defined]
    strategy.save_checkpoint = save_checkpoint  # type: ignore[method-assign]


class AtomicCheckpoints(Callback):
    """Makes the Trainer's strategy write every checkpoint atomically (:func:`save_checkpoints_atomically`), from
    ``setup`` on: no crash leaves an incomplete checkpoint under a checkpoint's name.

    Example::

        trainer = Trainer(callbacks=[AtomicCheckpoints(), ModelCheckpoint(every_n_train_steps=100)])
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        save_checkpoints_atomically(trainer.strategy)


class CheckpointOnSigterm(Callback):
    """Saves a checkpoint when a fit is stopped by SIGTERM (what schedulers send before preemption).

    Lightning turns SIGTERM into a ``SIGTERMException`` at the end of the training step it arrives in (a
    ``SystemExit`` with exit status 0). This callback writes that step's checkpoint beside the ``ModelCheckpoint``'s
    (same directory and naming, e.g. ``epoch=0-step=137.ckpt``; ``<log dir>/checkpoints`` without one) — the
    state at the end of a complete step, so it resumes like any other — and records it in :attr:`path` and
    :attr:`step`. The ``lit-mofo`` command then prints where it stopped and how to resume, and exits with status 143
    (128 + SIGTERM), so the job reads as interrupted.

    Example::

        trainer = Trainer(callbacks=[CheckpointOnSigterm()])
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.path: Path | None = None

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        self.step = trainer.global_step
        saver = trainer.checkpoint_callback
        if saver is not None and getattr(saver, "dirpath", None):
            path = Path(saver.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step}))
        else:
            path = (
                Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / f"step={trainer.global_step}.ckpt"
            )
        if not path.exists():  # ModelCheckpoint may have written this step already
            trainer.save_checkpoint(path, weights_only=False)
        self.path = path


# ---------------------------------------------------------------------------------------------------- --ckpt_path
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


def is_local_checkpoint_path(ckpt_path: str) -> bool:
    """Whether ``ckpt_path`` names a local file or directory (not ``last``/``best``/``hpc``, a URL or a registry)."""
    return ckpt_path not in _SPECIAL_CKPT_PATHS and "://" not in ckpt_path and not ckpt_path.startswith("registry:")


def _resume_hint(path: Path, hyper_parameters: Mapping[str, Any] | None) -> str:
    """What to resume from instead of the unusable checkpoint ``path`` (see :func:`replacement_checkpoint`)."""
    found = replacement_checkpoint(path, hyper_parameters)
    if found is None:
        return f"There is no other complete checkpoint of this run in {path.parent}; start without --ckpt_path."
    other, before = found
    which = "The previous" if before else "The newest"
    return (
        f"{which} complete checkpoint of this run in that directory is {other}: resume from it with --ckpt_path {other}"
    )


def resume_problem(value: str, hyper_parameters: Mapping[str, Any] | None, fitting: bool) -> str | None:
    """Why the local ``--ckpt_path`` ``value`` cannot continue the run whose model would save ``hyper_parameters``
    (missing, incomplete, damaged, not written by Lightning, or, for a fit (``fitting``), holding weights a
    ``TaskVectorScaling`` edited), naming the checkpoint to use instead; None when it can. Reads the archive's table
    of contents (or a sharded checkpoint's metadata) and the pickled entries without the tensors."""
    path = Path(value).expanduser()
    if not path.exists() and not path.parent.is_dir():
        return f"--ckpt_path {value}: no such file, and no directory {path.parent}."
    problem = checkpoint_problem(path)
    if problem is not None:
        what = ": no such file" if not path.exists() else f" is not a valid checkpoint: {problem}"
        return f"--ckpt_path {value}{what}. {_resume_hint(path, hyper_parameters)}"
    try:
        meta = read_checkpoint_meta(path)
    except Exception as error:  # whatever unpickling a foreign file raises
        return f"--ckpt_path {value} cannot be read as a checkpoint ({type(error).__name__}: {error})."
    if "pytorch-lightning_version" not in meta:
        keys = sorted(map(str, meta))[:6]
        return (
            f"--ckpt_path {value} is not a checkpoint written by Lightning (no 'pytorch-lightning_version' entry; it "
            f"holds {keys}): it cannot resume a fit. To start from weights saved by another program, load them into "
            "the model (CausalLMModule(model=...) takes a save_pretrained directory); to continue a run, give one of "
            f"its checkpoints. {_resume_hint(path, hyper_parameters)}"
        )
    edited = applied_edit(meta) if fitting else None
    if edited is not None:
        return (
            f"--ckpt_path {value} holds the weights TaskVectorScaling edited at the end of its fit ({edited}: "
            "θ₀ + λ·Δ), not the fine-tune's, while its optimizer state is the fine-tune's: training on from it "
            "would mix the two, and a second sweep would edit the edit. To train further, resume from a "
            "checkpoint written before the edit (one of an earlier step, or of a ModelCheckpoint with a monitor, "
            "which keeps the weights its score was measured on); to fine-tune the edited model anew, load its "
            "weights without --ckpt_path; to evaluate it, use `lit-mofo validate` or `test` with --ckpt_path."
        )
    return None


def _saved_weight_names(path: Path) -> set[str]:
    """The names in the checkpoint's ``state_dict``: a file's keys (tensors not read), or the ``state_dict.*``
    entries of a sharded checkpoint's metadata."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {key.removeprefix("state_dict.") for key in keys if key.startswith("state_dict.")}
    return set(read_checkpoint_meta(path).get("state_dict") or {})


def load_problem(value: str, strategy: Strategy, module: LightningModule) -> str | None:
    """Why the complete local checkpoint ``value`` cannot be loaded into ``module`` under ``strategy``, now that both
    are built and before anything is restored: a sharded directory given to a strategy that reads single files, or
    another model's weights (tensors of ``module`` that are not in it, with ``strict_loading``); None when it fits."""
    path = Path(value).expanduser()
    if path.is_dir() and not isinstance(strategy, ModelParallelStrategy):
        return (
            f"--ckpt_path {value} is a sharded checkpoint (a torch.distributed.checkpoint directory written "
            f"by ModelParallelStrategy/FSDP2), which `{type(strategy).__name__}` cannot load: it reads a single "
            "checkpoint file. Resume it with the strategy that wrote it (ModelParallelStrategy, with any number of "
            "processes: it reshards), or have that run write single files with "
            "`ModelParallelStrategy(save_distributed_checkpoint=False)`. For the weights alone: "
            f"`python -m torch.distributed.checkpoint.format_utils dcp_to_torch {value} weights.pt`."
        )
    expected = set(module.state_dict())
    if not expected or not module.strict_loading:
        return None
    saved = _saved_weight_names(path)
    missing = sorted(expected - saved)
    if not saved or not missing:
        return None
    unexpected = sorted(saved - expected)
    written_by = (read_checkpoint_meta(path).get("hyper_parameters") or {}).get("_class_path") or "another module"
    return (
        f"--ckpt_path {value} holds the weights of another model: {len(missing)} of this model's "
        f"{len(expected)} tensors are not in it (e.g. {missing[:2]})"
        + (f" and {len(unexpected)} of its tensors are not in this model (e.g. {unexpected[:2]})" if unexpected else "")
        + f". It was written by {written_by} with other settings (an adapter, another architecture). Resume "
        "with the config it was written with (its run directory's config.yaml), or start without --ckpt_path."
    )
