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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actdb.store.errors import ActdbError, first_line
from actdb.store.files.token import TokenDataset
from actdb.store.ingest.hub import hub_options, written_as_path

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


TABLE_SUFFIXES = {".parquet", ".arrow"}
DOCUMENT_SUFFIXES = {".txt", ".md", ".py", ".json", ".jsonl", ".csv", *TABLE_SUFFIXES}  # names meant as files


@dataclass(frozen=True)
class DocumentRef:
    """Where one document is, so that documents are read one at a time in shuffled order: a text file, a line
    of a JSONL file (its byte offset), or a row of a table (Parquet, Arrow, a `datasets` folder saved to disk)."""

    kind: str  # "text", "jsonl", "table" or "memory" (hub datasets, which cannot be addressed)
    source: str
    index: int = 0


def document_refs(sources: Iterable[str], field: str = "text") -> tuple[list[DocumentRef], DocumentReader]:
    """References to every document of the sources, in a fixed order, and the reader that loads them."""
    reader = DocumentReader(field)
    refs: list[DocumentRef] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir() and (path / "state.json").exists():
            refs += reader.add_table(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix not in TEXT_SUFFIXES_SKIPPED)
            if not files:
                raise ActdbError(f"folder {path} holds no text files")
            refs += [r for f in files for r in _file_refs(f, reader)]
        elif path.is_file():
            refs += _file_refs(path, reader)
        elif _looks_like_path(source):
            raise ActdbError(f"no such file or folder: {path}")
        else:
            refs += reader.add_memory(source, list(_hub_dataset(source, field)))
    return refs, reader


def _looks_like_path(source: str) -> bool:
    """Whether a source that is neither a file nor a folder was meant as one (a typo, not a Hugging Face dataset
    name, which is `name` or `owner/name`): written as a path (`written_as_path`), a suffix of the files actdb
    reads, or a parent folder that exists."""
    path = Path(source)
    return (
        written_as_path(source)
        or path.suffix.lower() in DOCUMENT_SUFFIXES
        or (path.parent != Path(".") and path.parent.is_dir())
    )


def _file_refs(path: Path, reader: DocumentReader) -> list[DocumentRef]:
    if path.suffix == ".jsonl":
        return _jsonl_refs(path)
    if path.suffix in TABLE_SUFFIXES:
        return reader.add_table(path)
    return [DocumentRef("text", str(path))]


def _jsonl_refs(path: Path) -> list[DocumentRef]:
    refs, offset = [], 0
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                refs.append(DocumentRef("jsonl", str(path), offset))
            offset += len(line)
    return refs


class DocumentReader:
    """Loads documents by reference; table columns are kept as Arrow arrays (compact strings), never as Python
    lists of every document."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.columns: dict[str, object] = {}

    def add_table(self, path: Path) -> list[DocumentRef]:
        column = _table_column(path, self.field)
        self.columns[str(path)] = column
        return [DocumentRef("table", str(path), i) for i in range(len(column))]

    def add_memory(self, name: str, texts: list[str]) -> list[DocumentRef]:
        self.columns[name] = texts
        return [DocumentRef("memory", name, i) for i in range(len(texts))]

    def read(self, ref: DocumentRef) -> str:
        if ref.kind == "text":
            return _read_text(Path(ref.source))
        if ref.kind == "jsonl":
            return self._jsonl(ref)
        value = self.columns[ref.source][ref.index]
        value = value.as_py() if hasattr(value, "as_py") else value
        return "" if value is None else str(value)

    def _jsonl(self, ref: DocumentRef) -> str:
        with open(ref.source, "rb") as fh:
            fh.seek(ref.index)
            raw = fh.readline()
        where = f"{ref.source} (byte {ref.index})"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ActdbError(f"{where}: not a valid UTF-8 JSON line") from None
        if not isinstance(record, dict) or self.field not in record:
            raise ActdbError(f"{where}: no field {self.field!r} (choose one with --field)")
        return str(record[self.field])


def _table_column(path: Path, field: str):
    """The text column of a Parquet or Arrow file, or of a `datasets` folder saved with `save_to_disk`."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ActdbError(f"reading {path} needs pyarrow: pip install 'actdb[tables]'") from None
    try:
        if path.is_dir():
            state = json.loads((path / "state.json").read_text())
            tables = [_arrow_file(path / f["filename"], pa) for f in state.get("_data_files", [])]
            table = pa.concat_tables(tables) if tables else None
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
        else:
            table = _arrow_file(path, pa)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise ActdbError(f"cannot read table {path}: {first_line(exc)}") from None
    if table is None or field not in table.column_names:
        names = ", ".join(table.column_names) if table is not None else "none"
        raise ActdbError(f"{path} has no column {field!r} (columns: {names}; choose one with --field)")
    return table.column(field)


def _arrow_file(path: Path, pa):
    """An Arrow IPC file in either layout (`datasets` writes the stream layout)."""
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()


def _read_text(path: Path) -> str:
    """A text file's contents; binary files (NUL bytes, or not UTF-8) are refused rather than tokenized."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ActdbError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\0" in data[:65536]:
        raise ActdbError(f"{path} is a binary file, not text; give text, JSONL, Parquet/Arrow or folders of text")
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
    refs: list[DocumentRef],
    reader: DocumentReader,
    tokenizer,
    seq_len: int,
    n_tokens: int | None,
    seed: int,
    excluded: list[int] = (),
) -> TokenDataset:
    """Shuffle documents with `seed`, read and tokenize them one at a time, and pack them into
    `(n_sequences, seq_len)` with a counted mask; reading stops as soon as `n_tokens` are packed."""
    if seq_len < 2:
        raise ActdbError("--seq-len must be at least 2")
    order = list(range(len(refs)))
    random.Random(seed).shuffle(order)
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    special = [t for t in (bos, eos, tokenizer.pad_token_id) if t is not None]
    head = [bos] if bos is not None else []
    body = seq_len - len(head)
    want_seqs = None if n_tokens is None else max(1, -(-n_tokens // seq_len))
    stream: list[int] = []
    sequences: list[np.ndarray] = []
    for i in order:
        ids = tokenizer(reader.read(refs[i]), add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        used = 0
        while len(stream) - used >= body and (want_seqs is None or len(sequences) < want_seqs):
            sequences.append(np.asarray(head + stream[used : used + body], dtype=np.int32))
            used += body
        del stream[:used]  # once per document: packing stays linear in the number of tokens
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
        sequences.append(np.asarray(tail + [pad] * padding, dtype=np.int32))
    if not sequences:
        raise ActdbError("the documents hold no text to tokenize")
    tokens = np.stack(sequences)
    mask = ~np.isin(tokens, special + list(excluded))
    mask[-1, tail_len:] = False
    if mask.sum() < 2:
        raise ActdbError("the documents hold fewer than two tokens that count; give more text")
    return TokenDataset(tokens, mask, tokenizer_fingerprint(tokenizer), sorted(excluded))
