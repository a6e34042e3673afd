"""Turn a docstring into prose for examples/sample.jsonl: doctest, code and rST literal blocks, directives and
bare signatures dropped, whitespace collapsed, capped at MAX_WORDS on a paragraph (or sentence) boundary."""

from __future__ import annotations

import re

MAX_WORDS = 600
SIGNATURE_RE = re.compile(r"^[\w.]+\(.*\)(\s*->\s*.+)?$")
WORD_RE = re.compile(r"^[(\"'`]*[A-Za-z][A-Za-z'-]*[)\"'`.,;:!?]*$")
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
