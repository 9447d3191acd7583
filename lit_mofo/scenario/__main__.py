"""Command line of the embedded scenario.

::

    python -m lit_mofo.scenario build-base [--scenario overlap|disjoint] [--cache-dir DIR] [--force] [--threads N]
    python -m lit_mofo.scenario path [--scenario overlap|disjoint]  # where the base model is (or would be) cached
    python -m lit_mofo.scenario build-tokenizer # rewrite the shipped tokenizer files (maintainers)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lit_mofo.scenario.base_model import CACHE_ENV, METADATA_FILE, base_model_path, cache_root
from lit_mofo.scenario.scenarios import SCENARIOS
from lit_mofo.scenario.vocab import save_tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_mofo.scenario", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-base", help="pre-train and cache a scenario's base model (default: overlap)")
    build.add_argument("--scenario", choices=list(SCENARIOS), default="overlap", help="whose base model to build")
    build.add_argument("--cache-dir", default=None, help=f"cache root (default: ${CACHE_ENV} or ~/.cache/lit_mofo)")
    build.add_argument("--force", action="store_true", help="rebuild even if the model is cached")
    build.add_argument("--threads", type=int, default=1, help="torch threads while building (default 1)")
    path = commands.add_parser("path", help="print the base model's cache directory (exit 1 if not built yet)")
    path.add_argument("--cache-dir", default=None)
    path.add_argument("--scenario", choices=list(SCENARIOS), default="overlap")
    commands.add_parser("build-tokenizer", help="rewrite lit_mofo/scenario/tokenizer/ from the vocabulary")
    args = parser.parse_args(argv)

    if args.command == "build-base":
        recipe = SCENARIOS[args.scenario].recipe
        location = base_model_path(
            recipe, cache_dir=args.cache_dir, force=args.force, num_threads=args.threads, log=print
        )
        metadata = json.loads((location / METADATA_FILE).read_text())
        print(
            json.dumps(
                {
                    key: metadata[key]
                    for key in ("knowledge_accuracy", "copy_exact_match", "train_seconds")
                    if key in metadata
                }
            )
        )
        print(location)
    elif args.command == "path":
        recipe = SCENARIOS[args.scenario].recipe
        try:
            print(base_model_path(recipe, cache_dir=args.cache_dir, build=False))
        except FileNotFoundError as error:
            print(error, file=sys.stderr)
            print(cache_root(args.cache_dir) / "scenario" / f"base-{recipe.key()}")  # where it would be
            return 1
    else:
        print(save_tokenizer())
    return 0


if __name__ == "__main__":
    sys.exit(main())
