"""The main member's committed text, token by token (incremental detokenisation).

The committed text of a row is what the main member's ids decode to, `tokenizer.decode(ids)`.
Decoding the whole row every step costs time in proportion to the row; `Detokenizer` decodes a
short window instead, the way vLLM and TGI do: with `p <= r` token offsets, the text is

    text = text[:stable] + decode(ids[p:])[len(decode(ids[p:r])):]

where `text[:stable]` is the decode of ids[:r] and no later token can change it. Both decodes start
at p, so what a decoder does to the first token of a string (SentencePiece's leading-space strip)
cancels out. r advances to the end when the window is split-safe there: its text does not end in
U+FFFD (bytes of a character still incomplete), and the last token is not a byte-fallback token
(SentencePiece decodes a run of byte tokens together: one more byte may turn the run's characters
into U+FFFDs). If decode(ids[p:]) does not start with decode(ids[p:r]) the row is decoded whole
(counted). Decoders with parts not listed in `STEPS`, and Hugging Face's clean-up of spaces before
punctuation, look across the whole text: those tokenizers decode whole rows every step.

Stop strings are looked for only where they can newly appear: from `max stop length - 1`
characters before the first changed one.
"""
from __future__ import annotations

import json

# decoder steps that act token by token, on the first token of a string, or on runs of byte tokens
STEPS = {"ByteLevel", "ByteFallback", "Fuse", "Replace", "Strip", "Metaspace"}


def _steps(node) -> list:
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [s for d in node.get("decoders", []) for s in _steps(d)]
    return [node]


_ANALYSED: dict[int, tuple] = {}


def _analyse(tokenizer, backend) -> tuple[bool, frozenset]:
    """(whether windows decode exactly, the byte-fallback token ids), once per tokenizer."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False, frozenset()
    decoder = backend.decoder
    steps = _steps(None if decoder is None else json.loads(decoder.__getstate__()))
    if any(s["type"] not in STEPS for s in steps):
        return False, frozenset()
    byte_ids = frozenset()
    if any(s["type"] == "ByteFallback" for s in steps):
        byte_ids = frozenset(i for i in (backend.token_to_id(f"<0x{b:02X}>") for b in range(256)) if i is not None)
    probe = tokenizer("Hello  world\n\n日本 🤖 naïve <0x41>")["input_ids"]
    return backend.decode(probe, skip_special_tokens=False) == tokenizer.decode(probe), byte_ids


class Text:
    """A row's committed text and its decode window."""
    __slots__ = ("text", "p", "r", "stable", "anchor")

    def __init__(self):
        self.text, self.p, self.r, self.stable, self.anchor = "", 0, 0, 0, ""


class Detokenizer:
    """`incremental=False` decodes whole rows (the old path, and the fallback). `windows` and
    `fallbacks` count the rows decoded each way."""

    def __init__(self, tokenizer, incremental: bool = True):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.incremental, self.byte_ids = incremental and self.backend is not None, frozenset()
        self.windows = self.fallbacks = 0
        if self.incremental:
            self.incremental = self._analyse()

    def _analyse(self) -> bool:
        hit = _ANALYSED.get(id(self.tokenizer))
        if hit is None or hit[0] is not self.tokenizer:
            hit = _ANALYSED[id(self.tokenizer)] = (self.tokenizer, *_analyse(self.tokenizer, self.backend))
        self.byte_ids = hit[2]
        return hit[1]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def update(self, states: list[Text], ids: list[list[int]]) -> list[int]:
        """Each row's ids gained tokens: bring its text up to date. Returns the index of each row's
        first changed character."""
        if not self.incremental:
            changed = []
            for st, row in zip(states, ids):
                new = self.decode(row)
                changed.append(_first_difference(st.text, new, 0))
                st.text = new
            self.fallbacks += len(states)
            return changed
        texts = self._windows(states, ids, [None] * len(states))
        changed = []
        for st, row, new in zip(states, ids, texts):
            changed.append(_first_difference(st.text, new, st.stable))
            st.text = new
            self._advance(st, row, new)
        return changed

    def peek(self, states: list[Text], ids: list[list[int]], tokens: list[int]) -> list[tuple[str, int]]:
        """(text, first changed character) of each row if `tokens[i]` were appended; nothing changes."""
        if not self.incremental:
            out = []
            for st, row, t in zip(states, ids, tokens):
                new = self.decode(row + [t])
                out.append((new, _first_difference(st.text, new, 0)))
            return out
        return [(new, _first_difference(st.text, new, st.stable))
                for st, new in zip(states, self._windows(states, ids, tokens))]

    def _windows(self, states, ids, extra) -> list[str]:
        """text[:stable] + the window's new text, per row (one batched decode)."""
        sequences, need_anchor = [], []
        for st, row, t in zip(states, ids, extra):
            sequences.append(row[st.p:] if t is None else row[st.p:] + [t])
            need_anchor.append(st.anchor is None)
        sequences += [row[st.p:st.r] for st, row, need in zip(states, ids, need_anchor) if need]
        decoded = self.backend.decode_batch(sequences, skip_special_tokens=False)
        anchors = iter(decoded[len(states):])
        out = []
        for i, (st, row, t) in enumerate(zip(states, ids, extra)):
            if need_anchor[i]:
                st.anchor = next(anchors)
            tail = decoded[i]
            if tail.startswith(st.anchor):
                out.append(st.text[:st.stable] + tail[len(st.anchor):])
                self.windows += 1
            else:
                out.append(self.decode(row if t is None else row + [t]))
                self.fallbacks += 1
        return out

    def _advance(self, st: Text, row: list[int], text: str):
        """Move the window on where the text can no longer change (module doc)."""
        if text.endswith("\ufffd") or (row and row[-1] in self.byte_ids):
            return
        st.p, st.r, st.stable, st.anchor = st.r, len(row), len(text), None


def _first_difference(old: str, new: str, start: int) -> int:
    """The first index at which `new` differs from `old`, given that old[:start] == new[:start]."""
    n = min(len(old), len(new))
    i = start
    if old[start:n] == new[start:n]:   # the usual case: characters appended
        return n
    while i < n and old[i] == new[i]:
        i += 1
    return i
