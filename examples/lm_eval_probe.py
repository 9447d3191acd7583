"""Score a Hugging Face causal LM on lm-evaluation-harness tasks with lit_mofo's LMEvalProbe.

This is the measurement ForgettingMonitor repeats during a fine-tune (``ForgettingMonitor({"arc": LMEvalProbe(...)})``);
here it runs once, on the model as loaded, so you can check tasks, ``limit`` and cost before a long run. Needs the
``lmeval`` extra (``pip install "lit-mofo[lmeval]"``) and, for hub models and built-in tasks, the network::

    python examples/lm_eval_probe.py --model Qwen/Qwen2.5-0.5B --tasks arc_easy,hellaswag --limit 100

Offline, point ``--model`` at a local ``save_pretrained`` directory and ``--include-path`` at a folder of task
YAML files with local data (``--no-builtin-tasks`` skips indexing lm-eval's thousands of built-in tasks).
"""

from __future__ import annotations

import argparse
import json
import time

from lit_mofo.callbacks.forgetting_monitor import isolated_evaluation
from lit_mofo.modules import CausalLMModule
from lit_mofo.probes import LMEvalProbe


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="hub name or local directory of a causal LM")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=float, default=100, help="examples per task (a float < 1 is a fraction)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--include-path", default=None, help="directory of extra task YAML files")
    parser.add_argument("--no-builtin-tasks", action="store_true", help="index only --include-path tasks")
    args = parser.parse_args(argv)

    module = CausalLMModule(model=args.model)  # from_pretrained, with its tokenizer
    limit = int(args.limit) if args.limit >= 1 else args.limit
    probe = LMEvalProbe(
        [task.strip() for task in args.tasks.split(",")],
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=args.batch_size,
        include_path=args.include_path,
        include_defaults=not args.no_builtin_tasks,
    )
    start = time.perf_counter()
    probe.setup(None, module)
    with isolated_evaluation(module):  # eval mode, no_grad, RNG and module modes restored afterwards
        values = probe.evaluate(None, module)
    seconds = time.perf_counter() - start
    for name, value in values.items():
        direction = "higher" if probe.higher_is_better[name] else "lower"
        print(f"{name:40s} {value:.4f}  ({direction} is better)")
    print(f"evaluated in {seconds:.1f} s; as a ForgettingMonitor probe this is the cost of one evaluation")
    print(json.dumps(values))
    return values


if __name__ == "__main__":
    main()
