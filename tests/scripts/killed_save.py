"""A 2-process FSDP2 fit through the ``lit-mofo`` command, optionally killed in the middle of a sharded checkpoint save;
run by ``tests/test_cli.py``.

Usage::

    python tests/scripts/killed_save.py ROOT [--kill-at-save N] [lit-mofo fit options, e.g. --ckpt_path last]

The fit: a tiny Llama (``CausalLMModule(model_config=...)``) on :class:`~lit_mofo.scenario.ScenarioDataModule`,
``ModelParallelStrategy`` over 2 gloo processes, ``STEPS`` steps, a ``ModelCheckpoint`` after every step (sharded
directories under ``ROOT/lightning_logs/version_*/checkpoints``). With ``--kill-at-save N`` both ranks SIGKILL
themselves during the N-th checkpoint save, once ``torch.distributed.checkpoint`` has written every shard and its
``.metadata`` and before Lightning writes ``meta.pt``: the state a kill at that moment leaves, deterministically.
Lightning re-launches this very command for rank 1, so it must run as its own process, never inside pytest.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import torch

STEPS = 4
CONFIG = """
seed_everything: 0
torch_num_threads: 1
trainer:
  accelerator: cpu
  devices: 2
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args:
      data_parallel_size: 2
      tensor_parallel_size: 1
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        every_n_train_steps: 1
        save_top_k: -1
model:
  class_path: lit_mofo.modules.CausalLMModule
  init_args:
    model_config:
      model_type: llama
      vocab_size: {vocab}
      hidden_size: 32
      intermediate_size: 64
      num_hidden_layers: 2
      num_attention_heads: 4
      num_key_value_heads: 2
      max_position_embeddings: 64
data:
  class_path: lit_mofo.scenario.ScenarioDataModule
  init_args:
    num_train: 64
    num_val: 0
    batch_size: 4
"""


def kill_at_save(count: int) -> None:
    """SIGKILL this process in its ``count``-th sharded save, between the shards (with ``.metadata``) and
    ``meta.pt``."""
    import lightning.pytorch.strategies.model_parallel as model_parallel

    save = model_parallel._distributed_checkpoint_save
    calls = 0

    def killed(state: Any, path: Any) -> None:
        nonlocal calls
        calls += 1
        save(state, path)
        if calls == count:
            os.kill(os.getpid(), signal.SIGKILL)

    model_parallel._distributed_checkpoint_save = killed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--kill-at-save", type=int, default=None)
    args, rest = parser.parse_known_args()
    if args.kill_at_save is not None:
        kill_at_save(args.kill_at_save)
    from lit_mofo.cli import main as lit_mofo
    from lit_mofo.scenario import load_tokenizer

    config = args.root / "config.yaml"
    if os.environ.get("LOCAL_RANK", "0") == "0":
        args.root.mkdir(parents=True, exist_ok=True)
        config.write_text(CONFIG.format(steps=STEPS, vocab=len(load_tokenizer())))
    torch.set_num_threads(1)
    lit_mofo(["fit", "--config", str(config), f"--trainer.default_root_dir={args.root}", *rest])


if __name__ == "__main__":
    main()
