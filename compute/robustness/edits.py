"""Input edits that mean the same thing in every seed: every seed reads the same edited context x'.

An edit is a pair of equal-length token sequences (clean, edited). They come from a file of text pairs or from a
generator over stored contexts: `replace` puts, at one counted position, another token of the same frequency bin;
`swap` exchanges every occurrence of two identifiers. A control edit changes as many positions as the edit did,
at random counted positions, each to a random token of the same frequency bin as the token it replaces.
"""

from __future__ import annotations

import json
import keyword
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actdb.store.errors import ActdbError

GENERATORS = ("replace", "swap")
N_BINS = 10


@dataclass(frozen=True)
class Edit:
    """One context and its edited version (equal lengths); `counted[t]` says whether position t counts."""

    clean: np.ndarray
    edited: np.ndarray
    counted: np.ndarray

    @property
    def changed(self) -> np.ndarray:
        return np.flatnonzero(self.clean != self.edited)

    def evaluated(self) -> np.ndarray:
        """Which next-token predictions `(seq - 1,)` count: those at or after the first edited position (earlier
        ones cannot see the edit in a causal model) whose target position is counted."""
        out = np.zeros(len(self.clean) - 1, dtype=bool)
        changed = self.changed
        if len(changed):
            out[changed[0] :] = True
        return out & self.counted[1:]


class FrequencyBins:
    """Token ids in `N_BINS` equal-size bins by their count in a dataset's counted positions (ties by id), so a
    replacement keeps the token's frequency class; ids in `never` (BOS/EOS, padding, exclusions) are never drawn."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, vocab_size: int, never: set[int]) -> None:
        counts = np.bincount(tokens[mask].ravel(), minlength=vocab_size)[:vocab_size]
        order = np.lexsort((np.arange(vocab_size), counts))
        self.bin_of = np.empty(vocab_size, dtype=np.int64)
        self.bin_of[order] = np.arange(vocab_size) * N_BINS // vocab_size
        allowed = np.ones(vocab_size, dtype=bool)
        allowed[[t for t in never if t < vocab_size]] = False
        self.members = [np.flatnonzero((self.bin_of == b) & allowed) for b in range(N_BINS)]

    def draw(self, token: int, rng: np.random.Generator) -> int:
        """Another token of `token`'s bin (the token itself when its bin holds no other)."""
        pool = self.members[self.bin_of[token]]
        pool = pool[pool != token]
        return int(rng.choice(pool)) if len(pool) else int(token)


def generate_edit(
    kind: str, clean: np.ndarray, counted: np.ndarray, bins: FrequencyBins, identifiers: np.ndarray, rng
) -> Edit | None:
    """The generator's edit of one context, or None when it has nothing to edit (fewer than two identifiers)."""
    edited = clean.copy()
    if kind == "replace":
        # one counted position in the middle half, so the edit has context before it and predictions after it
        n = len(clean)
        where = np.flatnonzero(counted[n // 4 : 3 * n // 4]) + n // 4
        if len(where) == 0:
            return None
        at = int(rng.choice(where))
        edited[at] = bins.draw(int(clean[at]), rng)
    elif kind == "swap":
        present = np.unique(clean[counted & identifiers[clean]])
        if len(present) < 2:
            return None
        a, b = rng.choice(present, size=2, replace=False)
        edited[clean == a], edited[clean == b] = b, a
    else:
        raise ActdbError(f"unknown generator {kind!r}; use {' or '.join(GENERATORS)}")
    edit = Edit(clean, edited, counted)
    return edit if len(edit.changed) else None


def control_edit(edit: Edit, bins: FrequencyBins, rng: np.random.Generator) -> Edit:
    """A random edit of the same span: as many counted positions as `edit` changed, each replaced by a token of
    the same frequency bin as the one there."""
    where = np.flatnonzero(edit.counted)
    span = min(len(edit.changed), len(where))
    edited = edit.clean.copy()
    for at in rng.choice(where, size=span, replace=False):
        edited[at] = bins.draw(int(edit.clean[at]), rng)
    return Edit(edit.clean, edited, edit.counted)


def identifier_tokens(texts: list[str]) -> np.ndarray:
    """Which token ids read as a Python-style identifier (letters, digits, underscores; not a keyword)."""
    return np.array(
        [t.strip().isidentifier() and not keyword.iskeyword(t.strip()) and len(t.strip()) > 1 for t in texts],
        dtype=bool,
    )


def read_edit_pairs(path: str | Path, tokenizer) -> list[Edit]:
    """Edits from a JSONL file of `{"context": ..., "edited": ...}` texts, tokenised without special tokens;
    a pair whose two texts tokenise to different lengths is refused (IR compares position by position)."""
    path = Path(path)
    if not path.is_file():
        raise ActdbError(f"edits file {path} does not exist")
    edits = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
            context, edited = str(pair["context"]), str(pair["edited"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ActdbError(f'{path}:{line_no}: expected a JSON object with "context" and "edited" texts') from None
        a = np.array(tokenizer(context, add_special_tokens=False)["input_ids"], dtype=np.int64)
        b = np.array(tokenizer(edited, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if len(a) != len(b):
            raise ActdbError(
                f"{path}:{line_no}: the edited context has {len(b)} tokens and the context {len(a)}; "
                "per-position comparison needs equal lengths"
            )
        if len(a) < 2:
            raise ActdbError(f"{path}:{line_no}: a context needs at least 2 tokens")
        edit = Edit(a, b, np.ones(len(a), dtype=bool))
        if not len(edit.changed):
            raise ActdbError(f"{path}:{line_no}: the edited context is the context itself")
        edits.append(edit)
    if not edits:
        raise ActdbError(f"edits file {path} holds no pairs")
    return edits
