"""The token-space methods' decision rules, re-stated from the authors' code one row at a time
with dicts over token strings (UniTE: starrYYxuan/UniTE unite2.py `get_top_k_tokens`,
`update_vocab`, `vocab_softmax`, `average_and_sample`; GaC: yaoching0/GaC gac_gen_utils.py
`get_vocab_union_and_mapping`, `merge_and_convert_tokens`), with the departures docs/methods.md
lists: strings compared as the bytes they stand for, a claimed id scores -inf (not the raw logit 0),
special tokens other than end-of-text are no string, every member's end of text is one string.
Written here, apart from runtime/deepen: the tests check the runtime against it."""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from runtime.deepen.vocab import token_bytes

EOS = "EOS"
ENDS = ("<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|end|>")
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class Vocabulary:
    """One member's strings: id -> bytes (EOS, or None for other specials), and bytes -> the id it
    is fed (the real piece before a byte-fallback twin; else the first token of its encoding)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.strings = token_bytes(tokenizer)
        vocab = tokenizer.get_vocab()
        special = set(tokenizer.all_special_ids)
        ends = {tokenizer.eos_token_id} | {vocab[t] for t in ENDS if t in vocab and vocab[t] in special}
        for e in ends:
            if e is not None and e < len(self.strings):
                self.strings[e] = EOS
        fallback = {i for p, i in vocab.items() if BYTE_PIECE.match(p)} if "<0x41>" in vocab else set()
        self.ids: dict = {}
        for t, b in enumerate(self.strings):
            if b is None:
                continue
            if b not in self.ids or (self.ids[b] in fallback and t not in fallback):
                self.ids[b] = t
        self.ids[EOS] = tokenizer.eos_token_id
        self.longest = max(len(b) for b in self.ids if b != EOS)
        self._first: dict = {}

    def key(self, t: int):
        return self.strings[t] if t < len(self.strings) else None

    def id_for(self, b) -> int | None:
        """The id this member is given for string b (UniTE's `update_vocab`, GaC's `get_token_ids`)."""
        if b in self.ids:
            return self.ids[b]
        if b not in self._first:
            self._first[b] = self._encode_first(b)
        return self._first[b]

    def _encode_first(self, b: bytes) -> int | None:
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:   # a piece of a character: the longest token it starts with
            for n in range(min(len(b), self.longest), 0, -1):
                if b[:n] in self.ids:
                    return self.ids[b[:n]]
            return None
        tok = self.tokenizer
        head = tok(";", add_special_tokens=False)["input_ids"]
        ids = tok(";" + text, add_special_tokens=False)["input_ids"]
        ids = ids[len(head):] if ids[:len(head)] == head and len(ids) > len(head) else \
            tok(text, add_special_tokens=False)["input_ids"]
        return ids[0] if ids and ids[0] != tok.unk_token_id else None


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    if top == -math.inf:
        return [0.0] * len(values)
    e = [math.exp(v - top) for v in values]
    s = sum(e)
    return [x / s for x in e]


def unite(vocabs: list[Vocabulary], logits: list[torch.Tensor], weights: list[float], k: int,
          extra: list | None = None, carried: dict | None = None) -> tuple[int, float]:
    """(the main member's id, the winner's lead over the runner-up) for one row; `carried`, if
    given, receives the fused distribution over the main member's ids."""
    tops = []
    for v, z in zip(vocabs, logits):
        own = {}
        for t in torch.topk(z.float(), min(k, len(z))).indices.tolist():
            b = v.key(t)
            if b is not None and b not in own:   # the first (highest) of a repeated string
                own[b] = t
        tops.append(own)
    union = []
    for own in tops + [dict.fromkeys(extra or [])]:
        union += [b for b in own if b not in union]
    average = [0.0] * len(union)
    for i, (v, z, w) in enumerate(zip(vocabs, logits, weights)):
        scores, claimed, ids = dict(), set(), dict()
        for b, t in tops[i].items():
            scores[b], ids[b] = float(z[t]), t
            claimed.add(t)
        for b in union:
            if b in scores:
                continue
            t = ids[b] = v.id_for(b)
            scores[b] = -math.inf if t is None or t in claimed else float(z[t])
            if t is not None:
                claimed.add(t)
        for j, p in enumerate(softmax([scores[b] for b in union])):
            average[j] += w * p
        if i == 0:
            main_ids = ids
    j = max(range(len(union)), key=lambda x: (average[x], -x))
    rest = sorted(average, reverse=True)
    if carried is not None:
        for b, p in zip(union, average):
            if main_ids[b] is not None:
                carried[main_ids[b]] = carried.get(main_ids[b], 0.0) + p
    return main_ids[union[j]], rest[0] - (rest[1] if len(rest) > 1 else 0.0)


class Union:
    """GaC's union vocabulary in entry order (the main member's strings by id, then each assist's,
    end of text last) and, per member, each id's entry."""

    def __init__(self, vocabs: list[Vocabulary]):
        order = {}
        for v in vocabs:
            for b in v.strings:
                if b is not None and b != EOS and b not in order:
                    order[b] = len(order)
        order[EOS] = len(order)
        self.strings = list(order)
        self.entry = [np.array([order[b] if b is not None else -1 for b in v.strings]) for v in vocabs]
        self.vocabs = vocabs


def gac(u: Union, logits: list[torch.Tensor], weights: list[float], carried: dict | None = None) -> tuple[int, float]:
    """(the main member's id, the winner's lead) for one row, over whole distributions; `carried`,
    if given, receives the fused distribution over the main member's ids."""
    merged = np.zeros(len(u.strings))
    for entry, z, w in zip(u.entry, logits, weights):
        p = torch.softmax(z.double(), -1).numpy()[:len(entry)]
        ok = entry >= 0
        merged += w * np.bincount(entry[ok], weights=p[ok], minlength=len(u.strings))
    best = int(np.argmax(merged))   # the first of equal maxima
    rest = np.sort(merged)[::-1]
    if carried is not None:
        for b, p in zip(u.strings, merged):
            t = u.vocabs[0].id_for(b)
            if t is not None and p > 0:
                carried[t] = carried.get(t, 0.0) + float(p)
    return u.vocabs[0].id_for(u.strings[best]), float(rest[0] - rest[1])
