"""The embedded scenario's "general knowledge": seeded facts about generated entities.

Each entity (an invented name from :data:`~lit_mofo.scenario.vocab.ENTITY_POOL`) gets one value per relation —
where it lives, its job, its favourite colour, its animal — drawn with a seeded generator, and every fact is one
sentence (``"brafu lives in lisbon ."``). The base model is pre-trained on these sentences; the knowledge probe
asks for the value after the sentence's prompt (``"brafu lives in"``). The same :class:`KnowledgeSpec` always
gives the same facts, on every platform and Python version (only :class:`random.Random` is used).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from lit_mofo.scenario.vocab import ENTITY_POOL, RELATION_VALUES

__all__ = ["RELATION_TEMPLATES", "Fact", "KnowledgeSpec", "generate_facts"]

RELATION_TEMPLATES: dict[str, str] = {
    "city": "{entity} lives in",
    "job": "{entity} works as a",
    "color": "{entity} likes the color",
    "animal": "{entity} owns a",
}


@dataclass(frozen=True)
class Fact:
    """One fact: ``entity``'s ``relation`` is ``value``; its sentence is ``f"{prompt} {value} ."``."""

    entity: str
    relation: str
    value: str

    @property
    def prompt(self) -> str:
        return RELATION_TEMPLATES[self.relation].format(entity=self.entity)

    @property
    def sentence(self) -> str:
        return f"{self.prompt} {self.value} ."

    @property
    def choices(self) -> tuple[str, ...]:
        """The values this relation can take (the multiple-choice options of the knowledge probe)."""
        return RELATION_VALUES[self.relation]


@dataclass(frozen=True)
class KnowledgeSpec:
    """Which facts the scenario's world holds.

    Args:
        num_entities: entities (the first ``num_entities`` names of the pool, at most 256); each has one fact
            per relation, so there are ``num_entities * len(relations)`` facts.
        relations: relations used, among ``city``, ``job``, ``color``, ``animal``.
        seed: seeds the values; a different seed is a different world over the same vocabulary.
    """

    num_entities: int = 128
    relations: tuple[str, ...] = ("city", "job", "color", "animal")
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_entities <= len(ENTITY_POOL):
            raise ValueError(
                f"num_entities={self.num_entities} is outside [1, {len(ENTITY_POOL)}]: the shipped vocabulary "
                f"has {len(ENTITY_POOL)} entity names."
            )
        unknown = [r for r in self.relations if r not in RELATION_TEMPLATES]
        if unknown or not self.relations:
            raise ValueError(
                f"relations={list(self.relations)!r} must be a non-empty subset of {list(RELATION_TEMPLATES)}."
            )
        object.__setattr__(self, "relations", tuple(self.relations))

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "relations": list(self.relations)}


def generate_facts(spec: KnowledgeSpec | None = None) -> list[Fact]:
    """All facts of ``spec`` (default :class:`KnowledgeSpec`), ordered by entity, then by relation.

    Values are drawn so that every value of a relation is used about equally often (a shuffled round-robin),
    which keeps the majority-class baseline of the knowledge probe at ``1 / len(choices)``.
    """
    spec = spec or KnowledgeSpec()
    rng = random.Random(spec.seed)
    entities = ENTITY_POOL[: spec.num_entities]
    values_by_relation: dict[str, list[str]] = {}
    for relation in spec.relations:
        choices = RELATION_VALUES[relation]
        values = [choices[i % len(choices)] for i in range(spec.num_entities)]
        rng.shuffle(values)
        values_by_relation[relation] = values
    return [
        Fact(entity, relation, values_by_relation[relation][index])
        for index, entity in enumerate(entities)
        for relation in spec.relations
    ]
