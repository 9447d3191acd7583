"""Fine-tuning data modules."""

from lit_mofo.data.instruction import InstructionCollator, InstructionDataModule, TokenizedExample, tokenize_example

__all__ = ["InstructionCollator", "InstructionDataModule", "TokenizedExample", "tokenize_example"]
