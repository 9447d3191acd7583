"""The embedded scenarios: one world of facts, two fine-tuning set-ups that differ in the words the task is written in.

- ``overlap`` (the first scenario; ``model: scenario:base``): the ``cipher`` task and the base model's copying skill
  are written in entity names 0-63, the subjects of 256 of the 512 facts: the task is written in the names of half
  the entities the knowledge probe asks about.
- ``disjoint`` (``model: scenario:disjoint``): the same task and skill over entity names 128-191, which are no
  fact's subject and no word of any fact.

Both base models are pre-trained the same way on the same 512 facts (:class:`~lit_mofo.scenario.base_model.
BaseModelRecipe`'s defaults: same architecture, seed, steps and schedule) and differ only in the word list of the
copying skill, which is the task's word list; so the knowledge probe asks the same questions in both, and what
differs is whether the fine-tuning data names the entities the facts are about. Fine-tuning ``overlap`` rewrites
the embeddings of half the facts' subjects; ``disjoint`` leaves every fact's words out of the task, so whatever it
forgets comes from the weights the facts and the task share.

Why a second base model rather than a task over words the first one already knows: the first base model can copy
only the 64 names it was pre-trained to copy, which are fact subjects (its ``repeat`` exact match on names 64-127
and 128-191 is 0.0), and the other words it knows are the facts' own words (the relations' values, which the
knowledge probe scores, and the templates' words). A cipher over names it never saw is not learnt in the
benchmark's budget (37% exact match after 200 steps at lr 1e-3, where ``overlap`` reaches 100%), so it would not
be the same task. The cost is one more base model to build (about 2 minutes on 2 CPU cores, cached like the first).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from lit_mofo.scenario.base_model import SCENARIO_MODEL, BaseModelRecipe
from lit_mofo.scenario.corpus import KnowledgeSpec, generate_facts
from lit_mofo.scenario.task import TaskKind, TaskSpec, WordPool

__all__ = ["SCENARIOS", "Scenario", "ScenarioName", "get_scenario", "scenario_for_model"]

ScenarioName = Literal["overlap", "disjoint"]
_MODEL_PREFIX = "scenario:"


@dataclass(frozen=True)
class Scenario:
    """A named scenario: its base model's recipe and the word list its tasks are written in.

    Args:
        name: ``overlap`` or ``disjoint``.
        first_word: index in :data:`~lit_mofo.scenario.vocab.ENTITY_POOL` of the first of the task's
            ``TaskSpec.num_words`` words (the fine-tuning task's and the base model's copying skill's).
        model: what ``CausalLMModule(model=...)`` takes for this scenario's base model.
        description: one line for tables and reports.
    """

    name: str
    first_word: int
    model: str
    description: str

    @property
    def recipe(self) -> BaseModelRecipe:
        """The base model: the default recipe with the copying skill over this scenario's words."""
        default = BaseModelRecipe()
        return replace(default, skill=replace(default.skill, first_word=self.first_word))

    def task(self, kind: TaskKind = "cipher", pool: WordPool = "names", **options: int) -> TaskSpec:
        """The scenario's ``kind`` problems (``cipher``: the fine-tuning task; ``repeat``: the copying skill): over
        its names, or over the relation values (``pool="values"``: the same words in every scenario)."""
        first_word = self.first_word if pool == "names" else 0
        return TaskSpec(kind=kind, first_word=first_word, pool=pool, **options)

    def overlap(self, kind: TaskKind = "cipher") -> set[str]:
        """The words of the scenario's ``kind`` task that are also words of a fact of its world (empty for
        ``disjoint``)."""
        fact_words = {word for fact in generate_facts(self.recipe.knowledge) for word in fact.sentence.split()}
        return set(self.task(kind).words) & fact_words


SCENARIOS: dict[str, Scenario] = {
    "overlap": Scenario(
        name="overlap",
        first_word=0,
        model=SCENARIO_MODEL,
        description="cipher over 64 of the world's 128 entity names",
    ),
    "disjoint": Scenario(
        name="disjoint",
        first_word=KnowledgeSpec.num_entities,  # the names right after the world's entities: no fact is about them
        model=f"{_MODEL_PREFIX}disjoint",
        description="cipher over 64 names that no fact is about",
    ),
}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; ``ValueError`` naming the valid ones otherwise."""
    if not isinstance(name, str) or name not in SCENARIOS:
        raise ValueError(f"scenario={name!r} is not an embedded scenario; choose one of {list(SCENARIOS)}.")
    return SCENARIOS[name]


def scenario_for_model(model: str) -> Scenario | None:
    """The scenario whose base model ``model`` names (``"scenario:base"`` or ``"scenario:<scenario name>"``), None
    for a name without the ``scenario:`` prefix (a Hugging Face name or a path); ``ValueError`` for an unknown
    ``scenario:`` name."""
    if not model.startswith(_MODEL_PREFIX):
        return None
    for scenario in SCENARIOS.values():
        if model in (scenario.model, f"{_MODEL_PREFIX}{scenario.name}"):
            return scenario
    valid = sorted({s.model for s in SCENARIOS.values()} | {f"{_MODEL_PREFIX}{name}" for name in SCENARIOS})
    raise ValueError(f"model={model!r} names no embedded scenario's base model; choose one of {valid}.")
