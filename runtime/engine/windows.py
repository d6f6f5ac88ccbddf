"""Which re-encode windows are exact for a tokenizer (engine/retokenize.py uses them): the analysis
of its parts (normalizer, pre-tokenizer, model, post-processor, added tokens) and the tokenizers to
encode windows and whole rows with. docs/design.md ("Assists follow the committed text") gives the
argument; anything not recognised gets no windows, and `Policy.reason` says why.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .plainwindows import plain_windows

PROBES = ["Hello  world!\n\nThe 12,345 cafés  ", "def f(x):\n\treturn x*2  # ok", "日本語のテキスト 🤖👍🏽 end",
          "  leading\r\n spaces\u00a0and\ttabs", "ÅÉÎ naïve Zürich", "a" * 40 + " " * 7 + "b"]
NORMALIZERS_BY_CHARACTER = {"NFC", "NFD", "NFKC", "NFKD"}
SPLITTERS = {"ByteLevel", "Split", "Metaspace", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit",
             "BertPreTokenizer", "UnicodeScripts", "CharDelimiterSplit"}


@dataclass
class Policy:
    mode: str | None          # "segment" | "word" | None (always the full encode)
    margin: int = 8           # characters between a window's safe part and the first changed one
    first: str | None = None  # the added tokens' first characters (None: always keep `margin`)
    ascii_start: bool = False  # a window starts only before an ASCII character (composing normalizers)
    window: object = None     # tokenizers.Tokenizer for windows (no position-0 effects)
    full: object = None       # tokenizers.Tokenizer for full encodes with untrimmed offsets
    reason: str = ""
    plain: object = None      # plainwindows.PlainWindows: byte-level BPE windows split in Python


def _parts(node, key: str) -> list:
    """A component and, for a Sequence, its members (flattened)."""
    if node is None:
        return []
    if node.get("type") == "Sequence":
        return [p for sub in node.get(key, []) for p in _parts(sub, key)]
    return [node]


def _state(component) -> dict | None:
    """A tokenizer component's settings (its JSON), without serialising the whole tokenizer."""
    return None if component is None else json.loads(component.__getstate__())


def analyse(tokenizer) -> Policy:
    """Which windows are exact for this (Hugging Face, fast) tokenizer, and the tokenizers to encode
    them with; Policy(None, reason=...) when none can be shown to be."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Policy(None, reason="not a fast (Rust) tokenizer")
    model = backend.model
    kind = type(model).__name__
    if kind not in ("BPE", "WordPiece", "WordLevel", "Unigram"):
        return Policy(None, reason=f"model {kind!r}")
    if getattr(model, "dropout", None):
        return Policy(None, reason="BPE dropout")

    ascii_start, replaced = False, set()
    normalizer = _state(backend.normalizer)
    for n in _parts(normalizer, "normalizers"):
        if n["type"] == "Replace" and len(n["pattern"].get("String", "")) == 1:
            replaced.add(n["pattern"]["String"])
        elif n["type"] in NORMALIZERS_BY_CHARACTER:
            ascii_start = True
        elif n["type"] != "Prepend":   # Prepend acts on the start of the whole text: dropped for windows
            return Policy(None, reason=f"normalizer {n['type']}")

    splitting = False
    pre = _state(backend.pre_tokenizer)
    for p in _parts(pre, "pretokenizers"):
        kind_p = p["type"]
        if kind_p not in SPLITTERS:
            return Policy(None, reason=f"pre-tokenizer {kind_p}")
        if kind_p == "ByteLevel" and p.get("add_prefix_space"):
            return Policy(None, reason="ByteLevel add_prefix_space")
        if kind_p == "Metaspace" and p.get("prepend_scheme", "always") == "always":
            return Policy(None, reason="Metaspace prepend_scheme 'always'")
        noop_split = kind_p == "Split" and p["pattern"].get("String") in replaced   # Gemma: " " is gone by then
        if not noop_split and not (kind_p == "ByteLevel" and not p.get("use_regex", True)) \
                and not (kind_p == "Metaspace" and not p.get("split", True)):
            splitting = True

    post = _state(backend.post_processor)
    for p in _parts(post, "processors"):
        single = p.get("single") or []
        at = next((i for i, item in enumerate(single) if "Sequence" in item), None)
        if at is not None and at < len(single) - 1:
            return Policy(None, reason="the post-processor appends tokens after the text")
    added = backend.get_added_tokens_decoder()
    if any(a.lstrip or a.rstrip or a.single_word for a in added.values()):
        return Policy(None, reason="added tokens that strip whitespace or match whole words")
    margin = max([8] + [len(a.content) + 1 for a in added.values()])
    first = "".join(sorted({a.content[0] for a in added.values() if a.content}))
    if any(a.normalized for a in added.values()):   # matched after normalizing: what maps to them?
        first = "".join(sorted(set(first) | {n["pattern"]["String"] for n in _parts(normalizer, "normalizers")
                                             if n["type"] == "Replace" and n["content"][:1] in first}))
        if ascii_start:
            first = None
    segment = kind == "BPE" and not getattr(model, "ignore_merges", False) and not splitting

    # the same model and added tokens; offsets untrimmed; windows without position-0 effects
    for p in _parts(post, "processors") + _parts(pre, "pretokenizers"):
        if "trim_offsets" in p:
            p["trim_offsets"] = False
    try:
        full = _assemble(backend, added, normalizer, pre, post)
        for p in _parts(pre, "pretokenizers"):
            if p["type"] == "Metaspace":
                p["prepend_scheme"] = "never"
        # windows are encoded without special tokens, where a post-processor changes nothing but
        # costs a sixth of the encode: it is left out, once the probes show it changes nothing
        window = _assemble(backend, added, _without_prepend(normalizer), pre, None)
        with_post = _assemble(backend, added, _without_prepend(normalizer), pre, post)
    except ValueError as e:
        return Policy(None, reason=str(e))
    if [e.ids for e in full.encode_batch(PROBES)] != [tokenizer(t)["input_ids"] for t in PROBES]:
        return Policy(None, reason="the tokenizer's encode differs from its Rust tokenizer's")
    if [_fields(e) for e in window.encode_batch(PROBES, add_special_tokens=False)] != \
            [_fields(e) for e in with_post.encode_batch(PROBES, add_special_tokens=False)]:
        window = with_post
    contents = [a.content for a in added.values()] if first is not None else None   # None: normalized added tokens
    plain = plain_windows(backend, window, normalizer, pre, contents, PROBES) if not segment else None
    return Policy("segment" if segment else "word", margin, first, ascii_start, window, full, plain=plain)


def _fields(encoding) -> tuple:
    return encoding.ids, encoding.offsets, encoding.word_ids


def _without_prepend(node):
    """A normalizer's settings without Prepend (which belongs to the start of the whole text)."""
    if node is None or node.get("type") == "Prepend":
        return None
    if node.get("type") == "Sequence":
        return {**node, "normalizers": [n for n in map(_without_prepend, node["normalizers"]) if n is not None]}
    return node


def _assemble(backend, added: dict, normalizer, pre, post):
    """A tokenizer on `backend`'s model (shared, not copied) with these components (as JSON) and
    the same added tokens under the same ids."""
    from tokenizers import Tokenizer
    parts = Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": normalizer,
        "pre_tokenizer": pre, "post_processor": post, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"x": 0}, "unk_token": "x"}}))
    out = Tokenizer(backend.model)
    out.normalizer, out.pre_tokenizer, out.post_processor = parts.normalizer, parts.pre_tokenizer, parts.post_processor
    tokens = [added[i] for i in sorted(added)]
    out.add_special_tokens([t for t in tokens if t.special])
    out.add_tokens([t for t in tokens if not t.special])
    for i, token in added.items():
        if out.token_to_id(token.content) != i:
            raise ValueError(f"added token {token.content!r}: id {out.token_to_id(token.content)}, not {i}")
    return out


_POLICIES: dict[int, tuple] = {}


def policy_for(tokenizer) -> Policy:
    """`analyse`, once per tokenizer object (it reads the whole tokenizer)."""
    hit = _POLICIES.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = _POLICIES[id(tokenizer)] = (tokenizer, analyse(tokenizer))
    return hit[1]
