"""Token text: byte-level BPE tokens decode to their own bytes, joined tokens give whole characters back, and the
one readable form escapes what would break a table (newlines, tabs, control characters, partial UTF-8 bytes)."""

import pytest

from actdb.store.files.explanation import pack_strings, unpack_strings
from actdb.store.token_text import quoted, readable, stored_text, token_bytes


@pytest.fixture(scope="module")
def unicode_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on text with multi-byte characters, which it splits into byte tokens."""
    from transformers import AutoTokenizer

    from actdb.store.ingest.zoo import stdlib_texts, train_tokenizer

    out = tmp_path_factory.mktemp("unicode-tokenizer")
    texts = stdlib_texts(max_files=6) + ["naïve café ’quoted’ — ✓ 日本語\n\tend"] * 3
    train_tokenizer(texts, vocab_size=300, out_dir=out)
    return AutoTokenizer.from_pretrained(out)


def test_readable_escapes_what_breaks_a_line():
    assert readable("a\nb\tc") == "a⏎b⇥c"
    assert readable(b"\r\x00\x7f") == "<0x0D><0x00><0x7F>"
    assert readable("’".encode()[:1]) == "<0xE2>"  # the first byte of a three-byte character alone
    assert readable("’".encode()) == "’" and readable(" café") == " café"
    assert quoted(b" \xe2\x80") == "' <0xE2><0x80>'"


def test_every_token_of_a_byte_level_vocabulary_is_readable_and_joins_back(unicode_tokenizer):
    tok = unicode_tokenizer
    raw = token_bytes(tok, range(len(tok)))
    shown = [readable(stored_text(b)) for b in raw]
    # the tokenizer's own decoding of one token alone gives '�' for partial characters; ours never does
    assert any("\ufffd" in tok.decode([i]) for i in range(len(tok)))
    assert not [s for s in shown if "\ufffd" in s or "\n" in s or "\t" in s]
    assert "<0xE2>" in shown and "⏎" in shown
    text = "x = ’naïve’ — ✓\n\tdone"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [stored_text(b) for b in token_bytes(tok, ids)]
    assert "".join(pieces).encode("utf-8", "surrogateescape") == text.encode()  # bytes exact
    assert readable("".join(pieces)) == readable(text) == "x = ’naïve’ — ✓⏎⇥done"


def test_stored_token_texts_keep_their_bytes(unicode_tokenizer):
    texts = [stored_text(b) for b in token_bytes(unicode_tokenizer, range(len(unicode_tokenizer)))]
    assert unpack_strings(pack_strings(texts)) == texts
