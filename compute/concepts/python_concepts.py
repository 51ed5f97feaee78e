"""A concepts file for Python source, written by the project itself from held-out standard-library files.

Taxonomy (the reference the demo aligns with): control_flow > loop, conditional, exception_handling;
data > list, dict, string_literal, number. Snippets are single source lines found by `ast`: a statement's header
line (`for x in y:`, `if a:`, `try:` with its `except ...:` line) or the line holding a literal. Each concept's
positives are distinct lines; the parents take their own lines of their children's kinds (none shared with the
children), so a parent is a concept with sentences of its own. Negatives are drawn from other concepts outside
the ancestors and descendants (see `concept_file.sentences_of`).
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

TAXONOMY = {
    "loop": "control_flow",
    "conditional": "control_flow",
    "exception_handling": "control_flow",
    "list": "data",
    "dict": "data",
    "string_literal": "data",
    "number": "data",
}
MAX_CHARS = 100


def _line(lines: list[str], number: int) -> str | None:
    text = lines[number - 1].strip() if 0 < number <= len(lines) else ""
    return text if 8 <= len(text) <= MAX_CHARS and text.isascii() else None


STATEMENTS = ("loop", "conditional", "exception_handling")


def snippets_by_kind(paths: list[Path]) -> dict[str, list[str]]:
    """Distinct one-line snippets of each leaf concept from these files, in file order. A statement's header line
    is that statement's (whatever literals it holds); a data line counts only when it holds literals of one
    kind and starts no statement, so `{'a': 1}` is neither a string nor a number example."""
    found: dict[str, list[str]] = {kind: [] for kind in TAXONOMY}
    claimed: set[str] = set()
    for path in paths:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        kinds: dict[int, set[str]] = {}
        texts: dict[tuple[int, str], str] = {}
        for node in ast.walk(tree):
            kind = _kind(node)
            if kind is None:
                continue
            kinds.setdefault(node.lineno, set()).add(kind)
            if kind == "exception_handling" and node.handlers:
                handler = _line(lines, node.handlers[0].lineno)
                if handler:
                    texts[(node.lineno, kind)] = f"try:\n    ...\n{handler}"
        for number in sorted(kinds):
            statement = [k for k in STATEMENTS if k in kinds[number]]
            if statement:
                kind = statement[0]
            elif len(kinds[number]) == 1:
                (kind,) = kinds[number]
            else:
                continue
            text = texts.get((number, kind)) if kind == "exception_handling" else _line(lines, number)
            if text and text not in claimed:
                claimed.add(text)
                found[kind].append(text)
    return found


def _kind(node: ast.AST) -> str | None:
    if isinstance(node, ast.For | ast.While):
        return "loop"
    if isinstance(node, ast.If):
        return "conditional"
    if isinstance(node, ast.Try):
        return "exception_handling"
    if isinstance(node, ast.List | ast.ListComp) and getattr(node, "elts", [1]):
        return "list"
    if isinstance(node, ast.Dict | ast.DictComp):
        return "dict"
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and not isinstance(node.value, bool):
        return "string_literal"
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return "number"
    return None


def python_concepts(paths: list[Path], per_concept: int = 24, seed: int = 0) -> list[dict]:
    """Concept lines: `per_concept` positives for each leaf and each parent (the parent's drawn evenly from its
    children's kinds, disjoint from the children's own positives)."""
    found = snippets_by_kind(paths)
    rng = random.Random(seed)
    lines: list[dict] = []
    parents: dict[str, list[str]] = {}
    for kind, parent in TAXONOMY.items():
        pool = found[kind][:]
        rng.shuffle(pool)
        if len(pool) < per_concept + per_concept // 2:
            raise ValueError(f"only {len(pool)} {kind} snippets in the held-out files")
        lines.append({"concept": kind, "parents": [parent], "positive": pool[:per_concept]})
        parents.setdefault(parent, []).extend(pool[per_concept : per_concept + per_concept // 2])
    for parent, pool in parents.items():
        rng.shuffle(pool)
        lines.insert(0, {"concept": parent, "parents": [], "positive": pool[:per_concept]})
    return lines


def write_python_concepts(paths: list[Path], out: Path, per_concept: int = 24, seed: int = 0) -> Path:
    """Write the JSONL concepts file."""
    out.write_text("\n".join(json.dumps(x) for x in python_concepts(paths, per_concept, seed)) + "\n")
    return out
