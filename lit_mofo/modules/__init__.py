"""LightningModules."""

from lit_mofo.modules.causal_lm import CausalLMModule

__all__ = ["CausalLMModule"]
