"""The embedded scenario's task sequence for continual fine-tuning: four tasks the base model cannot do.

:data:`TASK_SEQUENCE` names the stages, in order, each a :class:`~lit_mofo.scenario.task.TaskSpec` of the
``overlap`` scenario (base model ``scenario:base``):

==================  ==========================================  =============================================
stage               problem                                     what it asks
==================  ==========================================  =============================================
``cipher``          ``cipher : daldre shartrak bruntel =``      the scenario's task: each name's code name
                                                                (a seeded derangement of names 0-63)
``reverse``         ``reverse : kixko pexsok =``                the two names in reverse order
``value_cipher``    ``cipher : kyiv rabbit chef =``             a second cipher, over the 56 relation values
                                                                (``pool="values"``): other words, other codes
``reverse_cipher``  ``reverse cipher : fasmar brexdres =``      the code names of ``cipher`` in reverse order:
                                                                stages 1 and 2 composed
==================  ==========================================  =============================================

Every word is a word of the shipped tokenizer (``TaskSpec.vocabulary``), so the cached base models serve as they
are; the general-capability probe is :class:`~lit_mofo.scenario.probes.KnowledgeProbe`. A stage's data and probe
take the same arguments, :func:`task_arguments`::

    for name, spec in TASK_SEQUENCE.items():
        data = ScenarioDataModule(**task_arguments(spec), batch_size=32)
        probe = TaskProbe(**task_arguments(spec), name=name)

**Measured** (CPU, 1 torch thread, batch 32, lr 1e-3, cosine schedule with 3% warm-up, ``Trainer.fit`` from the
base model; exact match on the 256 held-out problems that :class:`~lit_mofo.scenario.probes.TaskProbe` scores):

- **The base model** (``scenario:base``) scores 0.0 exact match on each stage (and 1.0 knowledge accuracy).
- **Each stage alone**, fine-tuned from the base model for 200 steps: the step (evaluated every 25) at which exact
  match first reaches 0.95, and the exact match at step 200 (AdamW seeds 0 / 1 / 2; MoFO 0.15 seed 0; none: not
  within 200 steps):

  ==================  ==================  =====================  ===================
  stage               AdamW: steps        AdamW: at 200          MoFO: steps, at 200
  ==================  ==================  =====================  ===================
  ``cipher``          100 / 100 / 100     0.996 / 0.996 / 0.992  100, 0.996
  ``reverse``         50 / 125 / 75       1.0 / 1.0 / 1.0        75, 1.0
  ``value_cipher``    125 / 125 / 125     1.0 / 1.0 / 1.0        125, 1.0
  ``reverse_cipher``  none / 125 / none   0.50 / 1.0 / 0.31      none, 0.32
  ==================  ==================  =====================  ===================

  ``reverse_cipher`` is the hard one from the base model (one seed in three jumps from 0.3 to 0.98 between steps
  100 and 125), but in the sequence, after ``cipher`` and ``reverse``, every run below learns it to 1.0.
- **The sequence** with plain AdamW: 200 steps per stage, a fresh optimizer and schedule per stage (one
  ``Trainer.fit`` per stage on the same module, data order seeded per stage), every stage's task probe and the
  knowledge probe after each stage; mean of seeds 0-2 (row: after that stage; column: that task's exact match):

  ==================  ==========  ===========  ================  ==================  =========
  after               ``cipher``  ``reverse``  ``value_cipher``  ``reverse_cipher``  knowledge
  ==================  ==========  ===========  ================  ==================  =========
  (base model)        0.00        0.00         0.00              0.00                1.00
  ``cipher``          1.00        0.00         0.00              0.00                0.32
  ``reverse``         0.00        1.00         0.00              0.00                0.25
  ``value_cipher``    0.00        0.30         0.89              0.00                0.15
  ``reverse_cipher``  0.00        0.00         0.00              1.00                0.15
  ==================  ==========  ===========  ================  ==================  =========

  Average accuracy after the last stage 0.25, backward transfer -0.96 (seeds: -1.00, -0.95, -0.94): plain
  sequential fine-tuning forgets each earlier stage entirely (``reverse`` keeps 0.89 through ``value_cipher`` on
  one seed in three). The same sequence, seed 0 only: MoFO 0.15 ends 0 / 0 / 0 / 1.0 too (and learns ``reverse``
  after ``cipher`` only to 0.04); ``HalfFineTuning()`` ends 0 / 0 / 0 / 1.0 with knowledge 0.24;
  ``L2ToPretrained(strength=1.0)`` anchored at each stage's start keeps ``reverse`` at 0.81 after ``value_cipher``
  and 0.27 at the end, with knowledge 0.77. AdamW at lr 3e-4 learns ``cipher`` only to 0.45 and ``value_cipher``
  not at all in 200 steps.

Measured on a shared 2-core machine (load average 6-7): 10-40 s per 200-step stage.
"""

from __future__ import annotations

from typing import Any

from lit_mofo.scenario.scenarios import ScenarioName, get_scenario
from lit_mofo.scenario.task import TaskSpec

__all__ = ["TASK_SEQUENCE", "task_arguments"]

TASK_SEQUENCE: dict[str, TaskSpec] = {
    "cipher": TaskSpec(kind="cipher"),
    "reverse": TaskSpec(kind="reverse", min_length=2, max_length=2),
    "value_cipher": TaskSpec(kind="cipher", pool="values", num_words=56),
    "reverse_cipher": TaskSpec(kind="reverse_cipher", min_length=2, max_length=2),
}


def task_arguments(spec: TaskSpec, scenario: ScenarioName = "overlap") -> dict[str, Any]:
    """The keyword arguments of :class:`~lit_mofo.scenario.data.ScenarioDataModule` and
    :class:`~lit_mofo.scenario.probes.TaskProbe` that select ``spec``'s problems in ``scenario``.

    Both choose the first word of the name pool through ``scenario``, so ``spec.first_word`` must be the one
    ``scenario`` uses (0 for ``overlap``, 128 for ``disjoint``; 0 for the ``values`` pool in every scenario):
    ``ValueError`` otherwise.
    """
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"spec={spec!r} is not a TaskSpec; pass one of TASK_SEQUENCE's values or a TaskSpec(...).")
    arguments: dict[str, Any] = {
        "kind": spec.kind,
        "pool": spec.pool,
        "num_words": spec.num_words,
        "min_length": spec.min_length,
        "max_length": spec.max_length,
        "seed": spec.seed,
    }
    chosen = get_scenario(scenario).task(**arguments)
    if chosen != spec:
        raise ValueError(
            f"spec.first_word={spec.first_word} is not the first word scenario={scenario!r} chooses for the "
            f"{spec.pool} pool ({chosen.first_word}); the data module and probe take the first word from their "
            f"`scenario`: pass the scenario the spec was made for, or get_scenario({scenario!r}).task(...)'s spec."
        )
    return {**arguments, "scenario": scenario}
