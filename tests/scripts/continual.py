"""A continual run (three stages in one fit, every lit_mofo callback reacting to them) on 2 CPU processes (gloo),
under DDP or FSDP2 (``ModelParallelStrategy``); run by ``tests/test_continual.py``, which runs the same fit on one
process and compares.

Usage::

    python tests/scripts/continual.py OUT_DIR {ddp,fsdp2}

One launch, two fits: the run of :func:`continual_tasks.multi_process_run` (every rank fed the same batches), writing
a checkpoint at step 6 (the middle of stage 2, whose learning rate is its own), then the same run resumed from that
checkpoint. Lightning re-launches this very command for rank 1, so it must run as its own process. Each rank writes
``OUT_DIR/<strategy>.rank{r}.pt``: what it saw and measured in each fit, with the whole final weights (gathered from
the shards under FSDP2) on rank zero.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual_tasks import multi_process_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("strategy", choices=["ddp", "fsdp2"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    def strategy() -> DDPStrategy | ModelParallelStrategy:
        if args.strategy == "ddp":
            return DDPStrategy()
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

    directory = args.out_dir / args.strategy
    full = multi_process_run(directory, strategy(), devices=2, checkpoint_at=6)
    checkpoint = directory / "checkpoints" / "step=6.ckpt"
    resumed = multi_process_run(args.out_dir / f"{args.strategy}_resumed", strategy(), devices=2, ckpt_path=checkpoint)
    torch.save(
        {"full": full, "resumed": resumed, "seconds": time.perf_counter() - started},
        args.out_dir / f"{args.strategy}.rank{full['rank']}.pt",
    )


if __name__ == "__main__":
    main()
