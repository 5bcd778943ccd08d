"""Rewrite pyDVL's test files to import the influence API from torchfluence.pydvl.

Usage: python tools/swap_pydvl_imports.py FILE...   (rewrites the files in place)

Only names that torchfluence.pydvl exports move: the influence classes, the enums, the
preconditioners and the exception classes. Everything else (oracles, operators, utilities,
the calculators) keeps its pyDVL import, so pyDVL's own code judges the results.
"""

import re
import sys

import torchfluence.pydvl

SWAPPED = set(torchfluence.pydvl.__all__)
IMPORT = re.compile(r"^from (pydvl[\w.]*) import (\([^)]*\)|[^\n]*)", re.MULTILINE)


def swap(match: re.Match) -> str:
    names = [n.strip() for n in match.group(2).strip("()").replace("\n", " ").split(",") if n.strip()]
    kept = [n for n in names if n.split(" as ")[0] not in SWAPPED]
    moved = [n for n in names if n.split(" as ")[0] in SWAPPED]
    lines = [f"from {match.group(1)} import {', '.join(kept)}"] if kept else []
    return "\n".join(lines + ([f"from torchfluence.pydvl import {', '.join(moved)}"] if moved else []))


for path in sys.argv[1:]:
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(IMPORT.sub(swap, text))
