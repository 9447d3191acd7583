"""The embedded scenario: a world of facts, a small Llama pre-trained on it, and a fine-tuning task — offline.

- :mod:`~lit_mofo.scenario.corpus`: seeded facts about generated entities (the "general knowledge").
- :mod:`~lit_mofo.scenario.task`: word-list problems; ``repeat`` (a skill of the base model), ``cipher`` (the
  fine-tuning task), ``reverse`` and ``reverse_cipher``, over entity names or relation values.
- :mod:`~lit_mofo.scenario.sequence`: :data:`TASK_SEQUENCE`, four tasks for continual fine-tuning.
- :mod:`~lit_mofo.scenario.vocab`: the shipped word-level tokenizer.
- :mod:`~lit_mofo.scenario.base_model`: builds and caches the base model (``python -m lit_mofo.scenario
  build-base``; built automatically on first use).
- :mod:`~lit_mofo.scenario.data`: :class:`ScenarioDataModule`, the fine-tuning data.
- :mod:`~lit_mofo.scenario.probes`: :class:`KnowledgeProbe` and :class:`TaskProbe` for the forgetting monitor.
- :mod:`~lit_mofo.scenario.scenarios`: the two scenarios, ``overlap`` (the task is written in half the facts'
  subjects; the default) and ``disjoint`` (no task word is a word of any fact), each with its base model.
"""

from lit_mofo.scenario.base_model import SCENARIO_MODEL, BaseModelRecipe, base_model_path, build_base_model
from lit_mofo.scenario.corpus import Fact, KnowledgeSpec, generate_facts
from lit_mofo.scenario.data import ScenarioDataModule
from lit_mofo.scenario.probes import KnowledgeProbe, TaskProbe, evaluate_knowledge, evaluate_task
from lit_mofo.scenario.scenarios import SCENARIOS, Scenario, ScenarioName, get_scenario
from lit_mofo.scenario.sequence import TASK_SEQUENCE, task_arguments
from lit_mofo.scenario.task import TASK_KINDS, WORD_POOLS, TaskExample, TaskSpec, generate_task
from lit_mofo.scenario.vocab import build_tokenizer, load_tokenizer

__all__ = [
    "SCENARIOS",
    "SCENARIO_MODEL",
    "TASK_KINDS",
    "TASK_SEQUENCE",
    "WORD_POOLS",
    "BaseModelRecipe",
    "Fact",
    "KnowledgeProbe",
    "KnowledgeSpec",
    "Scenario",
    "ScenarioDataModule",
    "ScenarioName",
    "TaskExample",
    "TaskProbe",
    "TaskSpec",
    "base_model_path",
    "build_base_model",
    "build_tokenizer",
    "evaluate_knowledge",
    "evaluate_task",
    "generate_facts",
    "generate_task",
    "get_scenario",
    "load_tokenizer",
    "task_arguments",
]
