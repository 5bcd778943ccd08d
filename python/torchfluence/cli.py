"""Command-line entry point: ``torchfluence demo`` and ``torchfluence info``."""

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
    args = parser.parse_args(argv)

    if args.command == "info":
        import torchfluence

        print(json.dumps(torchfluence.build_info(), indent=2))
        return 0
    from .demo import run_demo

    run_demo(out_dir=args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
