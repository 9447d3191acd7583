"""Fine-tuning data modules, and the DataLoader that resumes exactly from any checkpoint."""

from lit_mofo.data.instruction import InstructionCollator, InstructionDataModule, TokenizedExample, tokenize_example
from lit_mofo.data.loader import ResumableDataLoader

__all__ = [
    "InstructionCollator",
    "InstructionDataModule",
    "ResumableDataLoader",
    "TokenizedExample",
    "tokenize_example",
]
