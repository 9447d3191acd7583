"""A tiny causal language model and a synthetic token task: the shared pieces of the examples and tests.

:class:`TinyCausalLM` wraps a Hugging Face causal LM (a small Llama built from its config, or a local checkpoint
given by ``pretrained``) and defines no ``configure_optimizers``, so LightningCLI's ``optimizer:`` block — e.g.
``configs/mofo.yaml`` — decides the optimizer. :class:`TinyCausalLMWithHelper` picks MoFO itself through
:func:`lit_mofo.mofo_configure_optimizers`. :class:`SyntheticTokenDataModule` serves arithmetic progressions
modulo the vocabulary size, generated from a seed, so every run sees the same data.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

import lit_mofo
from lit_mofo import MoFO
from lit_mofo.data import ResumableDataLoader
from lit_mofo.optim.helpers import Schedule

__all__ = ["SyntheticTokenDataModule", "TinyCausalLM", "TinyCausalLMWithHelper", "synthetic_progressions"]


def synthetic_progressions(num_sequences: int, seq_len: int, vocab_size: int, seed: int = 0) -> Tensor:
    """``num_sequences`` rows of ``x[t+1] = (x[t] + stride) % vocab_size``, start and stride (1-4) drawn per row.

    From the second token on a row is determined by the first and the stride, so a model that infers the stride
    in context drives the mean next-token loss towards ``log(4) / (seq_len - 1)``; a fresh model starts near
    ``log(vocab_size)``.
    """
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(vocab_size, (num_sequences, 1), generator=generator)
    stride = torch.randint(1, 5, (num_sequences, 1), generator=generator)
    return (start + stride * torch.arange(seq_len)) % vocab_size


class SyntheticTokenDataModule(pl.LightningDataModule):
    """Seeded synthetic progressions (see :func:`synthetic_progressions`), one ``input_ids`` tensor per batch.

    Args:
        num_sequences: size of the training set.
        seq_len: tokens per sequence.
        vocab_size: tokens are in ``[0, vocab_size)``; match the model's vocabulary.
        batch_size: sequences per batch (per process under DDP).
        shuffle: reshuffle every epoch, with a generator seeded by ``seed`` so the order is reproducible.
        seed: seeds both the data and the shuffling.
    """

    def __init__(
        self,
        num_sequences: int = 1024,
        seq_len: int = 32,
        vocab_size: int = 128,
        batch_size: int = 16,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_sequences = num_sequences
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed

    def train_dataloader(self) -> ResumableDataLoader:
        tokens = synthetic_progressions(self.num_sequences, self.seq_len, self.vocab_size, self.seed)
        generator = torch.Generator().manual_seed(self.seed) if self.shuffle else None
        # A drop-in DataLoader whose position and shuffling state go into checkpoints: exact mid-epoch resume.
        return ResumableDataLoader(
            TensorDataset(tokens), batch_size=self.batch_size, shuffle=self.shuffle, generator=generator
        )


class TinyCausalLM(pl.LightningModule):
    """Next-token training of a Hugging Face causal LM; the optimizer comes from outside (LightningCLI, a subclass).

    Args:
        pretrained: a local directory saved with ``save_pretrained``; if given, the model is loaded from it with
            ``AutoModelForCausalLM.from_pretrained`` and the size arguments are ignored.
        vocab_size: vocabulary size of the Llama built when ``pretrained`` is None.
        hidden_size: width of that Llama.
        intermediate_size: width of its MLP.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention when fewer than the query heads).
        max_position_embeddings: longest sequence.
        seed: seeds the initialisation, so every instance with the same arguments starts from the same weights
            (the global RNG is left untouched).

    When the optimizer is a :class:`lit_mofo.MoFO`, the realised update fraction of every step is logged as
    ``mofo/update_fraction`` (all stepped entries) and ``mofo/filtered_update_fraction`` (filtered tensors only).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        vocab_size: int = 128,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: PreTrainedModel
        if pretrained is not None:
            # from_pretrained returns the model in eval mode, and Lightning keeps submodules' modes during fit.
            self.model = AutoModelForCausalLM.from_pretrained(pretrained).train()
        else:
            config = LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                intermediate_size=intermediate_size,
                num_hidden_layers=num_hidden_layers,
                num_attention_heads=num_attention_heads,
                num_key_value_heads=num_key_value_heads,
                max_position_embeddings=max_position_embeddings,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = LlamaForCausalLM(config)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Next-token cross-entropy of ``input_ids`` (the model shifts the labels itself)."""
        return self.model(input_ids=input_ids, labels=input_ids).loss

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        loss = self(batch[0])
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Lightning's LightningOptimizer
        if isinstance(optimizer, MoFO) and optimizer.last_step_stats:
            total = optimizer.last_step_total
            self.log("mofo/update_fraction", total.fraction)
            self.log("mofo/filtered_update_fraction", total.filtered_fraction)


class TinyCausalLMWithHelper(TinyCausalLM):
    """:class:`TinyCausalLM` that configures MoFO itself, with the paper's warmup + cosine per-step schedule.

    Args:
        lr: peak learning rate (the paper's 2e-5 by default).
        fraction: MoFO's update fraction (the paper's 0.15).
        schedule: ``cosine``, ``linear`` or ``constant`` after the warmup.
        warmup_ratio: share of the optimizer steps spent warming up (the paper's 0.03).
        num_training_steps: length of the schedule; None takes ``trainer.estimated_stepping_batches``.
        **kwargs: the model arguments of :class:`TinyCausalLM`.
    """

    def __init__(
        self,
        lr: float = 2e-5,
        fraction: float = 0.15,
        schedule: Schedule = "cosine",
        warmup_ratio: float = 0.03,
        num_training_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.lr = lr
        self.fraction = fraction
        self.schedule: Schedule = schedule
        self.warmup_ratio = warmup_ratio
        self.num_training_steps = num_training_steps

    def configure_optimizers(self) -> dict[str, Any]:
        return lit_mofo.mofo_configure_optimizers(
            self,
            lr=self.lr,
            fraction=self.fraction,
            schedule=self.schedule,
            warmup_ratio=self.warmup_ratio,
            num_training_steps=self.num_training_steps,
        )
