"""The union vocabulary of an ensemble, for the methods that fuse in token space (UniTE, GaC;
docs/methods.md): built from the tokens' BYTES (vocab.py), once per member set, cached like the
anchors (anchors.py):

    $DEEPEN_HOME/union/<key>/union.json          sizes, members, fingerprints
    $DEEPEN_HOME/union/<key>/maps.safetensors    to_union.<i>, from_union.<i>, exact.<i>

Entries: every byte string that is some member's token (special and control tokens excepted),
in order: the main member's tokens by id (its lowest id where two ids spell the same bytes),
then each assist's remaining tokens by id, and last one entry for end of text, which every
member's EOS token maps to. The order breaks ties: the lowest entry wins.

Per member i:
  to_union[i]    (|V_i|,) its id -> entry (-1: a special token, or no token at all)
  from_union[i]  (|U|,)  entry -> its id: the id spelling those bytes (a real piece before its
                 byte-fallback twin `<0x41>`), else the first token of its own encoding of them
                 (`first_token`), -1 where it has none
  exact[i]       (|U|,)  whether the entry is one of its tokens
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .anchors import new_entry
from .vocab import ids_by_bytes

FORMAT = 1


@dataclass
class UnionMaps:
    to_union: list[torch.Tensor]
    from_union: list[torch.Tensor]
    exact: list[torch.Tensor]
    eos: int                       # the end-of-text entry

    @property
    def size(self) -> int:
        return len(self.from_union[0])

    def to(self, devices) -> "UnionMaps":
        move = lambda ts: [t.to(d) for t, d in zip(ts, devices)]  # noqa: E731
        return UnionMaps(move(self.to_union), move(self.from_union), move(self.exact), self.eos)

    def entries(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        """Member i's ids (any shape) -> union entries (-1 past its tokenizer or special)."""
        table = self.to_union[i]
        inside = (ids >= 0) & (ids < len(table))
        return torch.where(inside, table[ids.clamp(0, len(table) - 1)], -1)

    def member_ids(self, i: int, entries: torch.Tensor) -> torch.Tensor:
        """Union entries (any shape, -1 allowed) -> member i's ids (-1: none)."""
        return torch.where(entries >= 0, self.from_union[i][entries.clamp_min(0)], -1)


def union_order(vocabs: list[list[bytes | None]]) -> list[bytes]:
    """The union's byte strings in entry order (module doc), EOS not included."""
    seen, order = set(), []
    for vocab in vocabs:
        for b in vocab:
            if b and b not in seen:
                seen.add(b)
                order.append(b)
    return order


def longest_prefix_token(b: bytes, index: dict[bytes, int], longest: int) -> int:
    """The id of the longest token that b starts with, -1 if none (bytes that are not UTF-8)."""
    for n in range(min(len(b), longest), 0, -1):
        if b[:n] in index:
            return index[b[:n]]
    return -1


def build_union(vocabs: list[list[bytes | None]], eos_ids: list[list[int]], fallback: list[set],
                first_tokens: list) -> UnionMaps:
    """The maps (module doc). `vocabs[i]`: member i's token bytes (vocab.token_bytes); `eos_ids[i]`:
    its end-of-text ids, the one it emits first (members/ensemble.py: its EOS and the other
    end-of-text specials GaC counts); `fallback[i]`: its byte-fallback ids (vocab.byte_fallback_ids);
    `first_tokens[i](texts) -> ids`: the first id of its own encoding of each text, or -1."""
    order = union_order(vocabs)
    position = {b: u for u, b in enumerate(order)}
    eos = len(order)
    maps = UnionMaps([], [], [], eos)
    for vocab, eos_id, avoid, first in zip(vocabs, eos_ids, fallback, first_tokens):
        to_union = torch.tensor([position[b] if b else -1 for b in vocab], dtype=torch.long)
        for e in eos_id:
            if e < len(vocab):
                to_union[e] = eos
        index = ids_by_bytes(vocab, frozenset(avoid))
        from_union = torch.full((eos + 1,), -1, dtype=torch.long)
        exact = torch.zeros(eos + 1, dtype=torch.bool)
        missing_text, missing_bytes = [], []
        for u, b in enumerate(order):
            if b in index:
                from_union[u], exact[u] = index[b], True
            else:
                try:
                    missing_text.append((u, b.decode("utf-8")))
                except UnicodeDecodeError:
                    missing_bytes.append((u, b))
        if missing_text:
            ids = first([t for _, t in missing_text])
            from_union[torch.tensor([u for u, _ in missing_text])] = torch.tensor(ids, dtype=torch.long)
        longest = max(map(len, index), default=0)
        for u, b in missing_bytes:
            from_union[u] = longest_prefix_token(b, index, longest)
        if eos_id:
            from_union[eos], exact[eos] = eos_id[0], True
        maps.to_union.append(to_union)
        maps.from_union.append(from_union)
        maps.exact.append(exact)
    return maps


def union_key(fingerprints: list[str]) -> str:
    body = json.dumps({"members": fingerprints, "union_format": FORMAT})
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def cached_union(fingerprints: list[str], root: Path) -> Path | None:
    out = root / union_key(fingerprints)
    return out if (out / "union.json").is_file() else None


def save_union(maps: UnionMaps, names: list[str], fingerprints: list[str], root: Path) -> Path:
    """Written atomically under root/<key>."""
    key = union_key(fingerprints)
    with new_entry(root, key) as tmp:
        tensors = {}
        for i in range(len(names)):
            tensors.update({f"to_union.{i}": maps.to_union[i], f"from_union.{i}": maps.from_union[i],
                            f"exact.{i}": maps.exact[i]})
        save_file(tensors, tmp / "maps.safetensors")
        info = {"key": key, "kind": "union", "members": names, "fingerprints": fingerprints, "size": maps.size,
                "eos": maps.eos, "exact": [int(e.sum()) for e in maps.exact],
                "first_token": [int(((f >= 0) & ~e).sum()) for f, e in zip(maps.from_union, maps.exact)],
                "none": [int((f < 0).sum()) for f in maps.from_union]}
        (tmp / "union.json").write_text(json.dumps(info, indent=1))
    return root / key


def load_union(entry: Path, device="cpu") -> UnionMaps:
    info = json.loads((entry / "union.json").read_text())
    t = load_file(str(entry / "maps.safetensors"), device=str(device))
    n = len(info["members"])
    return UnionMaps([t[f"to_union.{i}"] for i in range(n)], [t[f"from_union.{i}"] for i in range(n)],
                     [t[f"exact.{i}"] for i in range(n)], info["eos"])


def is_union_entry(entry: Path) -> bool:
    return (Path(entry) / "union.json").is_file()
