"""Token datasets from every kind of source, read one document at a time in shuffled order."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from actdb.store.files.token import TokenDataset
from tests.conftest import cli_call


def test_every_source_kind_gives_the_same_dataset(tmp_path, tokenizer_dir, text_dir):
    """JSONL, Parquet, an Arrow file and a `datasets` folder saved to disk hold the same documents, so they must
    pack into the same token ids; text files hold them one per file."""
    docs = [p.read_text() for p in sorted(text_dir.iterdir())]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n\n" for d in docs))
    table = pa.table({"body": docs, "other": list(range(len(docs)))})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=3)
    with pa.OSFile(str(tmp_path / "docs.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    saved = tmp_path / "saved"  # the layout `datasets.Dataset.save_to_disk` writes: an Arrow stream + state.json
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    home, db = tmp_path / "store", f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    assert cli_call(home, db, "init").exit_code == 0
    sources = {"jsonl": "docs.jsonl", "parquet": "docs.parquet", "arrow": "docs.arrow", "saved": "saved"}
    shas = {}
    for name, source in sources.items():
        r = cli_call(
            home,
            db,
            "dataset",
            "add",
            name,
            tmp_path / source,
            "--tokenizer",
            tokenizer_dir,
            "--field",
            "body",
            "--seq-len",
            64,
            "--tokens",
            3000,
            "--seed",
            3,
        )
        assert r.exit_code == 0, (name, r.stderr)
        shas[name] = TokenDataset.load(home / "datasets" / f"{name}.tokens.h5").sha256
    r = cli_call(
        home,
        db,
        "dataset",
        "add",
        "text",
        text_dir,
        "--tokenizer",
        tokenizer_dir,
        "--seq-len",
        64,
        "--tokens",
        3000,
        "--seed",
        3,
    )
    assert r.exit_code == 0, r.stderr
    shas["text"] = TokenDataset.load(home / "datasets" / "text.tokens.h5").sha256
    assert len(set(shas.values())) == 1, shas
    bad = cli_call(home, db, "dataset", "add", "x", tmp_path / "docs.parquet", "--tokenizer", tokenizer_dir)
    assert bad.exit_code == 1 and "no column 'text'" in bad.stderr and "body, other" in bad.stderr


def test_packing_stops_reading_once_full(tmp_path, tokenizer_dir, text_dir):
    """Documents are read lazily: with a small --tokens the unreadable documents later in the order never are."""
    good = [p.read_text() for p in sorted(text_dir.iterdir())][:6]
    lines = [json.dumps({"text": d}) for d in good] * 50 + ["{not json"]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    home, db = tmp_path / "store", f"sqlite:///{tmp_path / 'store' / 'actdb.sqlite'}"
    assert cli_call(home, db, "init").exit_code == 0
    small = cli_call(
        home,
        db,
        "dataset",
        "add",
        "small",
        tmp_path / "docs.jsonl",
        "--tokenizer",
        tokenizer_dir,
        "--seq-len",
        64,
        "--tokens",
        256,
        "--seed",
        1,
    )
    assert small.exit_code == 0, small.stderr
    whole = cli_call(
        home, db, "dataset", "add", "whole", tmp_path / "docs.jsonl", "--tokenizer", tokenizer_dir, "--seq-len", 64
    )
    assert whole.exit_code == 1 and "not a valid UTF-8 JSON line" in whole.stderr
