"""Command-line entry point: ``torchfluence demo``, ``torchfluence info`` and ``torchfluence score``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="torchfluence", description="Fast influence functions for PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="find flipped labels in digits with influence functions")
    demo.add_argument("--out", default="demo_out", help="folder for the report and PNG figures")
    demo.add_argument("--seed", type=int, default=0)
    commands.add_parser("info", help="print what the compiled extension contains")
    score = commands.add_parser(
        "score", help="influence scores for your own model and data",
        description="Influence of every training point on every test point for a trained classifier "
                    "(cross-entropy loss). Writes influences.npy, top_k.json, summary.json, PNG plots "
                    "and report.html to --out.")
    from .score_command import add_arguments

    add_arguments(score)
    args = parser.parse_args(argv)

    if args.command == "info":
        import torchfluence

        print(json.dumps(torchfluence.build_info(), indent=2))
        return 0
    if args.command == "score":
        from .score_command import run_score

        try:
            run_score(args)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            print(f"torchfluence score: error: {exc}", file=sys.stderr)
            return 2
        return 0
    from .demo import run_demo
    from .distributed import process_group_from_environment

    with process_group_from_environment():  # under torchrun the processes share the job
        run_demo(out_dir=args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
