"""Token text: each token's own bytes, and the one readable, escaped form every table, report and export shows.

A byte-level BPE token (GPT-2, Pythia, the zoo) is a run of bytes, not always whole UTF-8 characters: decoding one
alone gives '�' for a character split across tokens. So a token's text is kept as its bytes (stored as UTF-8
with `surrogateescape`, which round-trips any byte), consecutive tokens are joined before decoding (a split
character comes back whole), and `readable` shows what is left: bytes that are no character as `<0xE2>`, a
newline as ⏎, a tab as ⇥, other control characters as `<0x0D>`. No raw newline reaches a table row.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

NEWLINE, TAB = "⏎", "⇥"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback (Llama, Gemma, ...)


@functools.cache
def _byte_of_char() -> dict[str, int]:
    """The inverse of GPT-2's bytes-to-unicode table: byte-level BPE spells byte b as one printable character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kinds(tokenizer) -> set[str]:
    """The types of a fast tokenizer's decoder (a Sequence's members included); empty for slow tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    members = decoder.get("decoders") or [decoder]
    return {d.get("type", "") for d in members if isinstance(d, dict)} | {decoder.get("type", "")}


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """Each token's own bytes: byte-level BPE spellings mapped back to bytes, `<0xNN>` byte tokens to their byte,
    SentencePiece's ▁ to a space; special tokens as they are written; anything else as the tokenizer decodes it."""
    ids = [int(i) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    kinds = _decoder_kinds(tokenizer)
    byte_of = _byte_of_char()
    out = []
    for token_id, piece in zip(ids, pieces, strict=True):
        if piece is None:
            out.append(f"<{token_id}>".encode())
        elif token_id in special:
            out.append(piece.encode("utf-8"))
        elif "ByteLevel" in kinds and all(c in byte_of for c in piece):
            out.append(bytes(byte_of[c] for c in piece))
        elif match := _BYTE_TOKEN.fullmatch(piece):
            out.append(bytes([int(match.group(1), 16)]))
        elif "▁" in piece and kinds & {"Metaspace", "Replace"}:
            out.append(piece.replace("▁", " ").encode("utf-8"))
        else:
            out.append(tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8"))
    return out


def stored_text(raw: bytes) -> str:
    """A token's bytes as a str that keeps every byte (invalid UTF-8 as lone surrogates): `readable` and
    `.encode('utf-8', 'surrogateescape')` get the bytes back."""
    return raw.decode("utf-8", "surrogateescape")


def readable(text: str | bytes) -> str:
    """The one display form of token text (a token, or tokens joined): valid UTF-8 as characters, leftover
    bytes as `<0xE2>`, newline ⏎, tab ⇥, other control characters `<0x0D>`. Always one line."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    decoded = raw.decode("utf-8", "surrogateescape")
    out = []
    for ch in decoded:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that is not part of a whole character
            out.append(f"<0x{code - 0xDC00:02X}>")
        elif ch == "\n":
            out.append(NEWLINE)
        elif ch == "\t":
            out.append(TAB)
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0 or ch in "\u2028\u2029":
            out.append(f"<0x{code:02X}>" if code < 0x100 else f"<U+{code:04X}>")
        else:
            out.append(ch)
    return "".join(out)


def quoted(text: str | bytes) -> str:
    """A token alone in its readable form, quoted so leading and trailing spaces show."""
    return "'" + readable(text) + "'"
