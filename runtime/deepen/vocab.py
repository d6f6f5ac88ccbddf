"""Token strings -> the bytes they stand for, and the anchor set (ALGORITHM.md section 1).

Tokens of different tokenizer families are compared by the exact bytes of text they produce:
- byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM): each character of the token string stands for
  one byte (GPT-2's byte-to-unicode table), so `ĠcafÃ©` is b" caf\\xc3\\xa9";
- SentencePiece style (Llama-2, Gemma, Mistral): `▁` is a space, `<0xHH>` byte-fallback
  pieces are the byte 0xHH, anything else is its UTF-8, so `▁café` is b" caf\\xc3\\xa9" too.
Special and control tokens (added tokens marked special, the tokenizer's special ids) stand
for no text and are never anchors. Where one vocabulary has several ids for the same bytes
(a piece and its byte-fallback twin), the lowest id is used.

The anchor set is the intersection of all members' byte strings, ordered by the main member's
token id (in BPE and SentencePiece vocabularies low ids are the frequent pieces), so
`max_anchors = N` keeps the N most frequent common pieces.
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache

import torch

BYTE_LEVEL, SENTENCEPIECE = "byte_level", "sentencepiece"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no `tokenizers` backend; "
                         "only fast (tokenizer.json) tokenizers are supported")
    return json.loads(backend.to_str())


def tokenizer_family(spec: dict) -> str:
    decoder = json.dumps(spec.get("decoder"), ensure_ascii=False)
    if '"ByteLevel"' in decoder:
        return BYTE_LEVEL
    if "\u2581" in decoder or '"Metaspace"' in decoder:
        return SENTENCEPIECE
    raise ValueError("unsupported tokenizer family: its decoder is neither byte-level BPE nor "
                     f"SentencePiece-style ({decoder[:120]})")


def token_bytes(tokenizer) -> list[bytes | None]:
    """For every id, the bytes the token stands for, or None for special/control tokens."""
    spec = tokenizer_json(tokenizer)
    family = tokenizer_family(spec)
    byte_fallback = '"ByteFallback"' in json.dumps(spec.get("decoder"))
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    special |= set(tokenizer.all_special_ids)
    table = byte_level_decoder()
    out: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for piece, i in vocab.items():
        if i in special:
            continue
        if family == BYTE_LEVEL:
            try:
                out[i] = bytes(table[c] for c in piece)
            except KeyError:  # an added token written as plain text, not byte characters
                out[i] = piece.encode("utf-8")
        else:
            m = _BYTE_PIECE.match(piece)
            out[i] = bytes([int(m.group(1), 16)]) if (m and byte_fallback) else \
                piece.replace("\u2581", " ").encode("utf-8")
    return out


def ids_by_bytes(vocab_bytes: list[bytes | None], avoid=frozenset()) -> dict[bytes, int]:
    """Each token's bytes -> its lowest id (a vocabulary can spell the same bytes twice); an id in
    `avoid` only where no other id spells those bytes."""
    index: dict[bytes, int] = {}
    for i, b in enumerate(vocab_bytes):
        if b and (b not in index or (index[b] in avoid and i not in avoid)):
            index[b] = i
    return index


def byte_fallback_ids(tokenizer) -> set[int]:
    """The ids of a SentencePiece vocabulary's byte-fallback pieces (`<0x41>` ...): the tokenizer
    produces them only for bytes no other piece covers, so a model has barely seen `<0x41>` where
    it reads "A". An id that is fed to a model (a token chosen for it) must be the real piece."""
    return {i for piece, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items()
            if _BYTE_PIECE.match(piece)}


def find_anchors(vocabs: list[list[bytes | None]], max_anchors: int = 0) -> torch.Tensor:
    """Anchor ids, one row per member (vocabs[0] is the main member): (N, |A|) long tensor."""
    indexes = [ids_by_bytes(v) for v in vocabs]
    common = set(indexes[0])
    for index in indexes[1:]:
        common &= set(index)
    ordered = sorted(common, key=lambda b: indexes[0][b])
    if max_anchors:
        ordered = ordered[:max_anchors]
    return torch.tensor([[index[b] for b in ordered] for index in indexes], dtype=torch.long)


def anchor_digest(anchor_ids: torch.Tensor) -> str:
    return hashlib.sha256(anchor_ids.numpy().tobytes()).hexdigest()[:16]
