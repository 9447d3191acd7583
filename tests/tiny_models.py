"""Tiny local stand-ins for real pre-trained models: a byte-level tokenizer with a ChatML chat template and Qwen2 or
Llama models built from transformers' config classes, saved with ``save_pretrained`` (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

# ChatML, as Qwen's instruct models write it: every turn is "<|im_start|>role\ncontent<|im_end|>\n".
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (one token per UTF-8 byte, like GPT-2's and Qwen's before their
    merges), ChatML's special tokens and ``chat_template``: any text tokenizes, and decoding gives it back exactly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(arch: Literal["qwen2", "llama"], vocab_size: int) -> Qwen2Config | LlamaConfig:
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    return Qwen2Config(**sizes) if arch == "qwen2" else LlamaConfig(**sizes)


def save_tiny_model(
    directory: Path,
    arch: Literal["qwen2", "llama"] = "qwen2",
    tokenizer: PreTrainedTokenizerFast | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Path:
    """A randomly initialised tiny model saved with ``save_pretrained`` (in ``dtype``, as Hub checkpoints are stored
    in bf16), with ``tokenizer`` (default :func:`byte_tokenizer`) beside it: what a real model directory holds."""
    tokenizer = tokenizer or byte_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer))
    model = Qwen2ForCausalLM(config) if arch == "qwen2" else LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
