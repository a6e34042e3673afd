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

Output is deterministic for a given interpreter; docstrings differ slightly
between patch releases (the committed file was made with CPython 3.11.7, and
3.11.2 swaps about ten rows).
"""

from __future__ import annotations

import argparse
import cmd
import contextlib
import hashlib
import importlib
import inspect
import io
import itertools
import json
import pkgutil
import re
import statistics
import sys
import warnings
from pathlib import Path

SEED = 20240601
TOTAL = 1000
# (name, min_words, max_words, share of TOTAL)
BUCKETS = [
    ("tiny", 4, 7, 30),
    ("short", 8, 40, 670),
    ("medium", 41, 299, 250),
    ("long", 300, 600, 50),
]
MAX_WORDS = 600

MODULES = [
    "abc",
    "aifc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "bdb",
    "bisect",
    "bz2",
    "calendar",
    "cgi",
    "chunk",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "colorsys",
    "compileall",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "copyreg",
    "cProfile",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "getpass",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "mimetypes",
    "modulefinder",
    "multiprocessing",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pipes",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "py_compile",
    "pyclbr",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "rlcompleter",
    "runpy",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "site",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "stringprep",
    "struct",
    "subprocess",
    "sunau",
    "symtable",
    "sysconfig",
    "tabnanny",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "tracemalloc",
    "types",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "wsgiref",
    "xml",
    "xmlrpc",
    "zipapp",
    "zipfile",
    "zipimport",
    "zoneinfo",
]
# Never import these (side effects, GUI, or test-only code).
SKIP_PARTS = {"test", "tests", "__main__", "idle_test", "antigravity", "this"}

SIGNATURE_RE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.+)?$")
WORD_RE = re.compile(r"^[(\"'`]*[A-Za-z][A-Za-z'-]*[)\"'`.,;:!?]*$")


def iter_module_names() -> list[str]:
    names = set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # optional or removed module on this build
            continue
        names.add(name)
        if hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, name + ".", onerror=lambda n: None):
                parts = info.name.split(".")
                if SKIP_PARTS & set(parts) or any(x.startswith("_") for x in parts):
                    continue  # tests, scripts and private helper modules
                names.add(info.name)
    return sorted(names)


UNDERLINE_RE = re.compile(r"^\s*([*=~^#-])\1{2,}\s*$")


def is_code_paragraph(para: str, prev: str) -> bool:
    lines = [ln for ln in para.splitlines() if ln.strip()]
    if not lines:
        return True
    if any(UNDERLINE_RE.match(ln) for ln in lines):  # rST heading
        return True
    prompts = sum(1 for ln in lines if ln.lstrip().startswith((">>>", "...", "$ ", "% ")))
    if prompts / len(lines) >= 0.3:
        return True
    # rST literal block: indented paragraph introduced by "...:" or "::", or
    # an indented block that never ends a sentence (grammar rules, code).
    indented = all(ln.startswith((" ", "\t")) for ln in lines)
    introduced = prev.rstrip().endswith(":")
    if indented and (introduced or not re.search(r"[.!?][)\"']?$", para.rstrip())):
        return True
    if len(lines) == 1 and SIGNATURE_RE.match(lines[0].strip()):
        return True
    tokens = para.split()
    wordy = sum(1 for t in tokens if WORD_RE.match(t))
    return wordy / len(tokens) < 0.65


def strip_signature(doc: str) -> str:
    """Drop a leading "name(args) -> type -- " signature from old-style docstrings."""
    m = re.match(r"[\w.]+\(", doc)
    if not m:
        return doc
    depth, end = 0, None
    for i in range(m.end() - 1, len(doc)):
        if doc[i] in "([":
            depth += 1
        elif doc[i] in ")]":
            depth -= 1
            if depth == 0:
                end = i + 1
                break
    if end is None:
        return doc
    rest = re.sub(r"^\s*->\s*[\w.\[\], |]+?(?=\s+(--|-)\s)", "", doc[end:])
    sep = re.match(r"\s*(--|->|-|:|\.)?\s*", rest)
    rest = rest[sep.end() :]
    if sep.group(1) is None and rest and not rest.startswith("\n"):
        return doc  # the parenthesis is part of a sentence, not a signature
    return rest[:1].upper() + rest[1:]


def clean_doc(doc: str | None) -> str | None:
    if not doc:
        return None
    doc = doc.expandtabs()
    nonempty = [ln for ln in doc.splitlines() if ln.strip()]
    if not nonempty:
        return None
    doctest = sum(1 for ln in nonempty if ln.lstrip().startswith((">>>", "...")))
    if doctest / len(nonempty) >= 0.3:  # mostly doctest
        return None
    doc = re.sub(r"(?m)^\s*\.\. [\w:-]+::.*$", "", doc)  # rST directives
    doc = strip_signature(doc.strip("\n"))
    paragraphs = re.split(r"\n\s*\n", doc)
    kept = []
    for i, p in enumerate(paragraphs):
        prev = paragraphs[i - 1] if i else ""
        if is_code_paragraph(p, prev):
            continue
        nxt = paragraphs[i + 1] if i + 1 < len(paragraphs) else ""
        if p.rstrip().endswith(":") and (not nxt or is_code_paragraph(nxt, p)):
            # "For example::" introducing code we dropped: drop that sentence.
            flat = " ".join(p.split())
            cut = max(flat.rfind(". "), flat.rfind("? "), flat.rfind("! "))
            p = flat[: cut + 1] if cut > 0 else ""
        if p.strip():
            kept.append(p.replace("::\n", ":\n"))
    # Truncate at a paragraph boundary so no row exceeds MAX_WORDS.
    out, n = [], 0
    for p in kept:
        w = len(p.split())
        if n + w > MAX_WORDS:
            if n == 0:  # single huge paragraph: cut at a sentence boundary
                sentences = re.split(r"(?<=[.!?])\s+", " ".join(p.split()))
                for s in sentences:
                    if n + len(s.split()) > MAX_WORDS:
                        break
                    out.append(s)
                    n += len(s.split())
            break
        out.append(p)
        n += w
    text = " ".join(" ".join(out).split())
    if len(text.split()) < 4:
        return None
    return text


def iter_docs(modname: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # e.g. a platform-specific submodule
            return
    yield modname, inspect.getdoc(mod)
    for name in sorted(vars(mod)):
        if name.startswith("_"):
            continue
        obj = vars(mod)[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != modname:
            continue  # re-exported from elsewhere; count it once at home
        yield f"{modname}.{obj.__qualname__}", inspect.getdoc(obj)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                member = vars(obj)[attr]
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if not inspect.isroutine(member):
                    continue
                if attr.startswith("do_") and issubclass(obj, cmd.Cmd):
                    continue  # interactive help text ("c(ont(inue)) ..."), not prose
                qual = getattr(member, "__qualname__", f"{obj.__qualname__}.{attr}")
                # getdoc() would inherit the base class docstring; use our own.
                yield f"{modname}.{qual}", inspect.cleandoc(member.__doc__ or "")


def zen_of_python() -> str:
    import codecs

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def reference_topics():
    """Sections of the Python Language Reference bundled for pydoc's help()."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc_data.topics.{key}", topics[key]


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
