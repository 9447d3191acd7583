"""Probes: what :class:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor` measures on the model."""

from lit_mofo.probes.base import Probe, find_language_model, move_batch, rank_share

__all__ = ["Probe", "find_language_model", "move_batch", "rank_share"]
