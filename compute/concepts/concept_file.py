"""Concepts files (JSONL, one concept a line) and human reference files: parsing and validation, one-line errors;
and reading back a concepts file stored under a name (`actdb concept add`).

A line: `{"concept": "dog", "parents": ["animal"], "positive": [texts...], "negative": [texts...]}`. Negatives
are optional; a concept without them gets as many of the other concepts' positives as it has positives (fewer
when fewer exist), never from its ancestors or descendants, drawn with a recorded seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from actdb.store.database.connection import Store
from actdb.store.database.tables import concept_set
from actdb.store.errors import ActdbError

KEYS = frozenset({"concept", "parents", "positive", "negative"})


@dataclass(frozen=True)
class Concept:
    name: str
    parents: tuple[str, ...]
    positive: tuple[str, ...]
    negative: tuple[str, ...] | None  # None: drawn from other concepts' positives


@dataclass(frozen=True)
class ConceptSet:
    """Validated concepts, in file order."""

    concepts: tuple[Concept, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def position(self, concept: str, set_name: str) -> int:
        """Where `concept` is in the file, or a one-line error naming the set's first concepts."""
        if concept not in self.names:
            raise ActdbError(f"concept {concept!r} is not in concept set {set_name!r} ({', '.join(self.names[:10])})")
        return self.names.index(concept)

    @property
    def parents(self) -> dict[str, tuple[str, ...]]:
        return {c.name: c.parents for c in self.concepts}

    def to_json(self) -> str:
        """Canonical JSONL (what is stored and fingerprinted)."""
        return "\n".join(
            json.dumps(
                {"concept": c.name, "parents": list(c.parents), "positive": list(c.positive)}
                | ({} if c.negative is None else {"negative": list(c.negative)}),
                sort_keys=True,
                ensure_ascii=False,
            )
            for c in self.concepts
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        todo = list(self.parents.get(name, ()))
        while todo:
            p = todo.pop()
            if p not in out:
                out.add(p)
                todo.extend(self.parents.get(p, ()))
        return out

    def descendants(self, name: str) -> set[str]:
        return {c for c in self.names if name in self.ancestors(c)}


def read_concepts(path: str | Path) -> ConceptSet:
    """Read and validate a concepts file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ActdbError(f"concepts file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ActdbError(f"cannot read concepts file {path}: {exc.strerror or exc}") from None
    return parse_concepts(text, str(path))


def parse_concepts(text: str, where: str = "concepts file") -> ConceptSet:
    """Parse JSONL text into a validated ConceptSet: empty lists, non-text items, duplicate concepts, a text both
    positive and negative, and cycles in `parents` are refused with one line naming the concept."""
    concepts: list[Concept] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        at = f"{where} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ActdbError(f"{at} is not JSON: {exc.msg}") from None
        if not isinstance(item, dict):
            raise ActdbError(f"{at} is not a JSON object")
        unknown = set(item) - KEYS
        if unknown:
            raise ActdbError(f"{at} has unknown keys {sorted(unknown)}; use {sorted(KEYS)}")
        name = item.get("concept")
        if not isinstance(name, str) or not name.strip():
            raise ActdbError(f"{at} needs a non-empty string 'concept'")
        if name in seen:
            raise ActdbError(f"{at}: concept {name!r} is listed twice")
        seen.add(name)
        parents = _texts(item.get("parents", []), f"{at} ({name}) parents", allow_empty=True)
        if name in parents:
            raise ActdbError(f"{at}: concept {name!r} is its own parent")
        positive = _texts(item.get("positive"), f"{at} ({name}) positive")
        negative = None if item.get("negative") is None else _texts(item["negative"], f"{at} ({name}) negative")
        if negative is not None and set(positive) & set(negative):
            raise ActdbError(f"{at}: concept {name!r} has a text that is both positive and negative")
        if len(set(positive)) != len(positive) or (negative is not None and len(set(negative)) != len(negative)):
            raise ActdbError(f"{at}: concept {name!r} lists a text twice")
        concepts.append(Concept(name, parents, positive, negative))
    if len(concepts) < 2:
        raise ActdbError(f"{where} holds {len(concepts)} concepts; a concept set needs at least 2")
    out = ConceptSet(tuple(concepts))
    _check_acyclic(out)
    return out


def _texts(value: object, what: str, allow_empty: bool = False) -> tuple[str, ...]:
    if value is None and not allow_empty:
        raise ActdbError(f"{what} is missing")
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise ActdbError(f"{what} must be a list of non-empty strings")
    if not value and not allow_empty:
        raise ActdbError(f"{what} is empty")
    return tuple(value)


def _check_acyclic(cs: ConceptSet) -> None:
    parents = cs.parents
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = path[path.index(node) :] + [node]
            raise ActdbError(f"the parents of the concepts form a cycle: {' -> '.join(cycle)}")
        state[node] = 1
        for p in parents.get(node, ()):
            visit(p, path + [node])
        state[node] = 2

    for name in cs.names:
        visit(name, [])


@dataclass(frozen=True)
class Sentences:
    """Every distinct text of a concept set once, and per concept the indices of its positives and negatives."""

    texts: list[str]
    positive: dict[str, np.ndarray]
    negative: dict[str, np.ndarray]


def sentences_of(cs: ConceptSet, seed: int) -> Sentences:
    """Distinct texts and each concept's positive/negative indices, drawing missing negatives (see module doc);
    a one-line error for a concept with no possible negatives."""
    texts: list[str] = []
    index: dict[str, int] = {}

    def idx(t: str) -> int:
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
        return index[t]

    positive = {c.name: np.array([idx(t) for t in c.positive]) for c in cs.concepts}
    negative: dict[str, np.ndarray] = {}
    rng = random.Random(seed)
    for c in cs.concepts:
        if c.negative is not None:
            negative[c.name] = np.array([idx(t) for t in c.negative])
            continue
        related = cs.ancestors(c.name) | cs.descendants(c.name) | {c.name}
        own = set(c.positive)
        pool = sorted({t for other in cs.concepts if other.name not in related for t in other.positive if t not in own})
        if not pool:
            raise ActdbError(
                f"concept {c.name!r} has no negatives and no other concept outside its ancestors and descendants "
                "to draw them from; give it a 'negative' list"
            )
        drawn = rng.sample(pool, min(len(c.positive), len(pool)))
        negative[c.name] = np.array([idx(t) for t in drawn])
    return Sentences(texts, positive, negative)


@dataclass(frozen=True)
class Reference:
    """A human reference: a similarity matrix over some concepts (pairs table or triplets) and the triplets."""

    name: str
    similarity: np.ndarray  # over `concepts` of the concept set, NaN where not given
    triplets: np.ndarray | None  # (t, 4) concept indices (a, b, c, odd) when the file held triplets
    n_ignored: int = 0  # rows naming a concept outside the set (a public dataset covers many more words)


def read_reference(path: str | Path, concepts: list[str]) -> Reference:
    """A `--human` file: CSV with header `concept_a,concept_b,similarity` (pairs) or `a,b,c,odd` (odd-one-out
    triplets). Rows naming a concept outside the set are left out (counted); every concept of the set must appear
    in a kept row, or the error lists the missing ones."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError) as exc:
        raise ActdbError(f"cannot read reference file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    index = {c: i for i, c in enumerate(concepts)}
    n = len(concepts)
    if {"concept_a", "concept_b", "similarity"} <= set(header):
        kept = [r for r in rows if r["concept_a"] in index and r["concept_b"] in index]
        ignored, rows = len(rows) - len(kept), kept
        _check_names(path, {r["concept_a"] for r in rows} | {r["concept_b"] for r in rows}, concepts)
        sim = np.full((n, n), np.nan)
        np.fill_diagonal(sim, 1.0)
        for r in rows:
            try:
                value = float(r["similarity"])
            except ValueError:
                raise ActdbError(f"{path}: similarity {r['similarity']!r} is not a number") from None
            i, j = index[r["concept_a"]], index[r["concept_b"]]
            if i != j:
                sim[i, j] = sim[j, i] = value
        return Reference(path.stem, sim, None, ignored)
    if {"a", "b", "c", "odd"} <= set(header):
        kept = [r for r in rows if all(r[k] in index for k in ("a", "b", "c", "odd"))]
        ignored, rows = len(rows) - len(kept), kept
        _check_names(path, {r[k] for r in rows for k in ("a", "b", "c", "odd")}, concepts)
        bad = [r for r in rows if r["odd"] not in (r["a"], r["b"], r["c"]) or len({r["a"], r["b"], r["c"]}) < 3]
        if bad:
            raise ActdbError(f"{path}: a triplet's odd one must be one of three distinct concepts a, b, c: {bad[0]}")
        from actdb.compute.concepts.math import triplet_similarity

        triplets = np.array([[index[r[k]] for k in ("a", "b", "c", "odd")] for r in rows])
        return Reference(path.stem, triplet_similarity(n, triplets), triplets, ignored)
    raise ActdbError(
        f"{path} has header {list(header)}; a reference is a CSV with concept_a,concept_b,similarity (pairs) "
        "or a,b,c,odd (odd-one-out triplets)"
    )


def _check_names(path: Path, named: set[str], concepts: list[str]) -> None:
    missing = [c for c in concepts if c not in named]
    if missing:
        raise ActdbError(f"{path} does not cover these concepts of the set: {', '.join(missing[:10])}")


def load_concept_set(store: Store, name: str) -> tuple[int, ConceptSet]:
    """A stored concept set (its row id and concepts) by name, or a one-line error listing the known ones."""
    c = concept_set
    row = store.query(select(c.c.id, c.c.body).where(c.c.name == name)).first()
    if row is None:
        known = store.query(select(c.c.name).order_by(c.c.name)).column("name")
        listed = ", ".join(known) if known else "none; add one with `actdb concept add NAME FILE`"
        raise ActdbError(f"unknown concept set {name!r} (known: {listed})")
    return row["id"], parse_concepts(row["body"], f"concept set {name}")
