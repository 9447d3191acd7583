"""Probes: what :class:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor` measures on the model.

A probe evaluates the current model and returns named metrics, each with a fixed higher-is-better direction
(:class:`Probe`). Built in: language-model loss/perplexity on reference text (:class:`LanguageModelProbe`),
classification accuracy (:class:`AccuracyProbe`), multiple-choice accuracy by log-likelihood
(:class:`MultipleChoiceProbe`), lm-evaluation-harness tasks (:class:`LMEvalProbe`, optional extra ``lmeval``) and
any user function (:class:`CallableProbe`). :func:`run_batches` is how each of them splits its reference batches
across processes (equal forward counts per rank, as FSDP2 needs, and failing together); custom probes can use it too.
:func:`language_model_kind` says what kind of language model a model is (``"causal"``, ``"seq2seq"``, ``"masked"``,
``"other"`` or ``"unknown"``): the next-token probes measure causal LMs and refuse the others in ``setup``.
"""

from lit_mofo.probes._inspect import language_model_kind
from lit_mofo.probes.accuracy import AccuracyProbe, MultipleChoiceProbe
from lit_mofo.probes.base import Probe, find_language_model, move_batch
from lit_mofo.probes.callable import CallableProbe
from lit_mofo.probes.distribution import rank_share, run_batches
from lit_mofo.probes.language_model import LanguageModelProbe
from lit_mofo.probes.lm_eval import LMEvalProbe

__all__ = [
    "AccuracyProbe",
    "CallableProbe",
    "LMEvalProbe",
    "LanguageModelProbe",
    "MultipleChoiceProbe",
    "Probe",
    "find_language_model",
    "language_model_kind",
    "move_batch",
    "rank_share",
    "run_batches",
]
