"""The embedded scenario's fine-tuning data: problems of a word-list task as prompt/response batches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException
from transformers import PreTrainedTokenizerBase

from lit_mofo.data.instruction import InstructionDataModule
from lit_mofo.scenario.scenarios import ScenarioName, get_scenario
from lit_mofo.scenario.task import TaskKind, TaskSpec, WordPool, generate_task
from lit_mofo.scenario.vocab import load_tokenizer

__all__ = ["ScenarioDataModule"]


class ScenarioDataModule(InstructionDataModule):
    """Fine-tuning data of the embedded scenario: seeded problems of a word-list task (``cipher`` by default).

    Training problems are ``"cipher : w1 w2 w3 ="`` prompts with their answers; the loss is on the answer and
    ``<eos>`` only. Validation uses the task's held-out problems — the same ones
    :class:`~lit_mofo.scenario.probes.TaskProbe` scores — which no training problem repeats. Tokenized with the
    scenario's shipped tokenizer; no file, no network. Everything else (padding or packing, workers, exact resume
    from any checkpoint) is
    :class:`~lit_mofo.data.instruction.InstructionDataModule`'s.

    Args:
        kind: ``cipher`` (the fine-tuning task), ``repeat``, ``reverse`` or ``reverse_cipher`` (see
            :mod:`lit_mofo.scenario.task`; :data:`~lit_mofo.scenario.sequence.TASK_SEQUENCE` lists the continual
            sequence's tasks and their arguments).
        num_words: how many words of the pool the problems draw from (at most 56 with ``pool="values"``).
        min_length: shortest word list.
        max_length: longest word list.
        seed: seeds the problems and the cipher (match it in ``TaskProbe``); the training order comes from
            ``seed_everything``.
        num_train: training problems (may repeat); one epoch is ``num_train / batch_size`` steps per process.
        num_val: held-out validation problems.
        batch_size: problems per batch and process.
        eval_batch_size: problems per validation batch (default ``batch_size``).
        packing: pack problems into rows of ``block_size`` tokens instead of one problem per row.
        block_size: row length with ``packing``.
        num_workers: DataLoader worker processes.
        scenario: which embedded scenario's words the problems are written in: ``overlap`` (the names of 64 of the
            world's entities, the default) or ``disjoint`` (names no fact is about; fine-tune ``model:
            scenario:disjoint``), see :mod:`lit_mofo.scenario.scenarios`.
        pool: ``names`` (entity names: the scenario's, the default) or ``values`` (the world's 56 relation values,
            the same words in every scenario).
    """

    def __init__(
        self,
        kind: TaskKind = TaskSpec.kind,
        num_words: int = TaskSpec.num_words,
        min_length: int = TaskSpec.min_length,
        max_length: int = TaskSpec.max_length,
        seed: int = TaskSpec.seed,
        num_train: int = 8192,
        num_val: int = 256,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        packing: bool = False,
        block_size: int = 64,
        num_workers: int = 0,
        scenario: ScenarioName = "overlap",
        pool: WordPool = TaskSpec.pool,
    ) -> None:
        super().__init__(
            max_length=block_size,
            packing=packing,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        try:
            self.spec = get_scenario(scenario).task(
                kind, pool=pool, num_words=num_words, min_length=min_length, max_length=max_length, seed=seed
            )
        except ValueError as error:
            raise MisconfigurationException(f"ScenarioDataModule: {error}") from error
        if num_train < 1 or num_val < 0:
            raise MisconfigurationException(f"num_train={num_train} must be >= 1 and num_val={num_val} >= 0.")
        self.num_train = num_train
        self.num_val = num_val

    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The scenario's shipped tokenizer, whatever the LightningModule's."""
        return load_tokenizer()

    def load_records(self) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]] | None]:
        try:
            train, val = generate_task(self.spec, num_train=self.num_train, num_eval=self.num_val)
        except ValueError as error:
            raise MisconfigurationException(f"ScenarioDataModule: {error}") from error
        return [e.to_dict() for e in train], ([e.to_dict() for e in val] or None)
