#!/usr/bin/env python3
"""Generate examples/sample.jsonl: 1,000 rows of real English prose.

The text comes from docstrings of the Python standard library, supplemented
by the Language Reference sections bundled in ``pydoc_data.topics`` (used by
``help()``) and the Zen of Python from the ``this`` module, so the file can be
rebuilt offline with nothing but a Python 3.11 interpreter:

    python3 examples/make_sample.py            # writes examples/sample.jsonl
    python3 examples/make_sample.py -o out.jsonl

Each row is ``{"id": "<module>.<qualname>", "text": "..."}`` (reference
topics use ``pydoc_data.topics.<topic>``).  Docstrings are cleaned (doctest,
code and rST literal blocks, directives and bare signatures dropped,
whitespace collapsed), capped at 600 words on a paragraph boundary,
deduplicated, bucketed by word count and selected deterministically by a
seeded hash ranking, so the length distribution has a realistic long tail:

    tiny    4-7 words      3%
    short   8-40 words    67%
    medium  41-299 words  25%
    long    300-600 words  5%

Three parts: sample_docs.py finds the texts, sample_cleaning.py turns each into
prose, and this script picks the rows by bucket and writes them.

Output is deterministic for a given interpreter; docstrings differ slightly
between patch releases (the committed file was made with CPython 3.11.7, and
3.11.2 swaps about ten rows).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import sys
from pathlib import Path

# Run as a script: its own folder is on sys.path.
from sample_cleaning import clean_doc
from sample_docs import iter_docs, iter_module_names, reference_topics, zen_of_python

SEED = 20240601
TOTAL = 1000
# (name, min_words, max_words, share of TOTAL)
BUCKETS = [
    ("tiny", 4, 7, 30),
    ("short", 8, 40, 670),
    ("medium", 41, 299, 250),
    ("long", 300, 600, 50),
]


def collect() -> dict[str, str]:
    rows: dict[str, str] = {}
    seen: set[str] = set()

    def add(ident: str, doc: str | None) -> None:
        text = clean_doc(doc)
        if text is None or ident in rows or text in seen:
            return
        rows[ident] = text
        seen.add(text)

    for modname in iter_module_names():
        for ident, doc in iter_docs(modname):
            add(ident, doc)
    for ident, doc in reference_topics():
        add(ident, doc)
    add("this.s", zen_of_python())
    return rows


def rank(ident: str) -> str:
    return hashlib.sha256(f"{SEED}:{ident}".encode()).hexdigest()


def pct(sorted_vals: list[int], p: float) -> int:
    idx = min(len(sorted_vals) - 1, max(0, round(p / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).resolve().parent / "sample.jsonl")
    args = ap.parse_args()

    rows = collect()
    chosen: dict[str, str] = {}
    for bname, lo, hi, k in BUCKETS:
        pool = [i for i, t in rows.items() if lo <= len(t.split()) <= hi]
        if len(pool) < k:
            sys.exit(f"bucket {bname}: only {len(pool)} candidates, need {k}")
        # Seeded hash ranking rather than random.sample(): a docstring that
        # changes in another patch release only swaps out its own row instead
        # of reshuffling the whole selection.
        for ident in sorted(pool, key=lambda i: (rank(i), i))[:k]:
            chosen[ident] = rows[ident]
        print(f"bucket {bname:6s} {lo:>3}-{hi:<3} words: {k:4d} of {len(pool)} candidates")
    assert len(chosen) == TOTAL

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8", newline="\n") as f:
        for ident in sorted(chosen):
            f.write(json.dumps({"id": ident, "text": chosen[ident]}, ensure_ascii=False) + "\n")

    lengths = sorted(len(t.split()) for t in chosen.values())
    size = args.output.stat().st_size
    print(f"wrote {len(chosen)} rows to {args.output} ({size:,} bytes, {size / 1e6:.2f} MB)")
    print(
        f"words: min={lengths[0]} median={statistics.median(lengths):g} "
        f"mean={statistics.mean(lengths):.1f} p90={pct(lengths, 90)} "
        f"p99={pct(lengths, 99)} max={lengths[-1]}"
    )
    edges = [0, 8, 16, 24, 32, 41, 80, 150, 300, 450, 601]
    for a, b in itertools.pairwise(edges):
        n = sum(1 for x in lengths if a <= x < b)
        print(f"  {a:>3}-{b - 1:<3} {n:4d} {'#' * (n // 10)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
