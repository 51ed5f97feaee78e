"""Building a token dataset: read documents, tokenize, pack into fixed-length sequences with a counted mask.

Every sequence starts with the tokenizer's BOS token (when it has one); documents are separated by EOS;
the last sequence is padded. BOS, EOS and padding positions are not counted, as in Gurnee et al. (2024).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from actdb.store.errors import ActdbError, first_line
from actdb.store.hub import hub_options
from actdb.store.token_file import TokenDataset

TEXT_SUFFIXES_SKIPPED = {".h5", ".hdf5", ".npy", ".npz", ".png", ".jpg", ".gz", ".zip", ".pyc", ".so", ".bin"}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary and special tokens: equal fingerprints mean equal token ids."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_tokenizer(source: str, revision: str | None = None):
    from transformers import AutoTokenizer

    options, note = hub_options(source)
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, **options)
    except (OSError, ValueError) as exc:
        raise ActdbError(f"cannot load tokenizer {source!r}{note}: {first_line(exc)}") from None


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ActdbError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(record, dict) or field not in record:
            raise ActdbError(f"{path}:{lineno}: no field {field!r} (choose one with --field)")
        yield str(record[field])


def iter_documents(sources: Iterable[str], field: str = "text") -> Iterator[str]:
    """Documents from files, folders (recursively, sorted), JSONL files, or a Hugging Face dataset name."""
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in TEXT_SUFFIXES_SKIPPED)
            if not files:
                raise ActdbError(f"folder {path} holds no text files")
        elif path.is_file():
            files = [path]
        else:
            yield from _hub_dataset(source, field)
            continue
        for f in files:
            if f.suffix == ".jsonl":
                yield from _read_jsonl(f, field)
            else:
                yield _read_text(f)


def _read_text(path: Path) -> str:
    """A text file's contents; binary files (NUL bytes, or not UTF-8) are refused rather than tokenized."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ActdbError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\0" in data[:65536]:
        raise ActdbError(f"{path} is a binary file, not text; give text, JSONL or folders of text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ActdbError(f"{path} is not UTF-8 text (byte {exc.start}); convert it or leave it out") from None


def _hub_dataset(name: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ActdbError(
            f"{name!r} is not a file or folder; reading Hugging Face datasets needs `pip install datasets`"
        ) from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:
        raise ActdbError(f"{name!r} is not a file or folder, and not a reachable dataset: {first_line(exc)}") from None
    for record in ds:
        if field not in record:
            raise ActdbError(f"dataset {name!r} has no field {field!r} (choose one with --field)")
        yield str(record[field])


EXCLUSION_PRESETS = {
    # Gurnee et al. (2024) drop the newline token from every statistic, besides BOS/EOS/padding
    "gurnee": ["\n"],
}


def resolve_exclusions(tokenizer, spec: str | None) -> list[tuple[int, str]]:
    """(id, token) pairs from `--exclude-tokens`: comma-separated token ids, tokens as the vocabulary spells
    them, or text with Python escapes (`\\n`) that is exactly one token; a preset name (`gurnee`) expands."""
    if not spec:
        return []
    vocab = tokenizer.get_vocab()
    out: dict[int, str] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        for text in EXCLUSION_PRESETS.get(item, [item]):
            if text.isdigit():
                token_id = int(text)
                if token_id >= len(tokenizer):
                    raise ActdbError(f"token id {token_id} is outside the vocabulary ({len(tokenizer)} tokens)")
            elif text in vocab:
                token_id = vocab[text]
            else:
                try:
                    decoded = codecs.decode(text, "unicode_escape")
                except UnicodeDecodeError:
                    raise ActdbError(f"cannot read token {text!r}; write an id, a token, or text like \\n") from None
                ids = tokenizer(decoded, add_special_tokens=False)["input_ids"]
                if len(ids) != 1:
                    raise ActdbError(f"{text!r} is {len(ids)} tokens for this tokenizer, not one; give its id")
                token_id = ids[0]
            out[token_id] = tokenizer.convert_ids_to_tokens(token_id)
    return sorted(out.items())


def pack_documents(
    documents: list[str], tokenizer, seq_len: int, n_tokens: int | None, seed: int, excluded: list[int] = ()
) -> TokenDataset:
    """Shuffle documents with `seed`, tokenize, and pack into `(n_sequences, seq_len)` with a counted mask."""
    if seq_len < 2:
        raise ActdbError("--seq-len must be at least 2")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    special = [t for t in (bos, eos, tokenizer.pad_token_id) if t is not None]
    body = seq_len - (1 if bos is not None else 0)
    want_seqs = None if n_tokens is None else max(1, -(-n_tokens // seq_len))
    stream: list[int] = []
    sequences: list[list[int]] = []
    for i in order:
        ids = tokenizer(documents[i], add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        while len(stream) >= body and (want_seqs is None or len(sequences) < want_seqs):
            sequences.append(([bos] if bos is not None else []) + stream[:body])
            del stream[:body]
        if want_seqs is not None and len(sequences) >= want_seqs:
            break
    tail_len = seq_len
    if stream and (want_seqs is None or len(sequences) < want_seqs):
        tail = ([bos] if bos is not None else []) + stream
        tail_len = len(tail)
        padding = seq_len - tail_len
        if 2 * padding > (len(sequences) + 1) * seq_len:  # checked before the padding is allocated
            have = len(sequences) * body + len(stream)
            raise ActdbError(
                f"the documents hold {have} tokens, too few for --seq-len {seq_len}: most of the dataset would be "
                "padding; give more text or a smaller --seq-len"
            )
        sequences.append(tail + [pad] * padding)
    if not sequences:
        raise ActdbError("the documents hold no text to tokenize")
    tokens = np.asarray(sequences, dtype=np.int32)
    mask = ~np.isin(tokens, special + list(excluded))
    mask[-1, tail_len:] = False
    if mask.sum() < 2:
        raise ActdbError("the documents hold fewer than two tokens that count; give more text")
    return TokenDataset(tokens, mask, tokenizer_fingerprint(tokenizer), sorted(excluded))
