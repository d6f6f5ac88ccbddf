"""Build and cache what the relative transform needs, for one ensemble.

The cache entry is keyed by the members' content fingerprints (in main-first order), the anchor
cap and the softmax multiplier, so changing any member or option builds a new entry and an
unchanged ensemble loads in a second:

    $DEEPEN_HOME/anchors/<key>/anchors.json      counts, members, fingerprints
    $DEEPEN_HOME/anchors/<key>/member<i>.safetensors   LowRankTransfer state of member i
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from .relative import TEMPERATURE, DenseTransfer, LowRankTransfer, dense_transfer_matrix
from .vocab import anchor_digest, find_anchors, token_bytes


def cache_key(fingerprints: list[str], max_anchors: int, temperature: float = TEMPERATURE) -> str:
    body = json.dumps({"members": fingerprints, "max_anchors": max_anchors,
                       "temperature": temperature, "format": 2})
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def save_tensors(tensors: dict[str, torch.Tensor], path: Path):
    """Write a safetensors file straight from the tensors' memory (safetensors' own save_file
    first copies everything into one bytes object: +1 GB of peak memory for Gemma-3)."""
    names = {torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}
    header, offset = {}, 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            f.write(memoryview(t.contiguous().numpy()).cast("B"))


@contextmanager
def new_entry(root: Path, key: str):
    """A cache entry written atomically: yields a temporary folder beside root/<key>; when the
    block ends without an error, the folder replaces root/<key> (anchors here, the union maps in
    union.py); otherwise it is removed."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=key + ".", dir=root))
    try:
        yield tmp
        if (root / key).exists():
            shutil.rmtree(root / key)
        os.replace(tmp, root / key)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def build_anchor_cache(names: list[str], fingerprints: list[str], tokenizers: list,
                       load_embedding: list, max_anchors: int, out_root: Path,
                       progress=None, device="cpu") -> Path:
    """Anchors + one LowRankTransfer per member, written atomically under out_root/<key>.
    `load_embedding[i]()` returns member i's input embeddings as a fresh fp32 tensor that the
    build may overwrite (one member in memory at a time). `progress(total, description)`, if
    given, returns an object with update(n) and close() (runtime.jobs.progress.Progress).
    `device`: where the sweep over P runs (a GPU does Gemma-3's in a second); the cache is the
    same whichever device built it, up to float rounding."""
    key = cache_key(fingerprints, max_anchors)
    out = out_root / key
    vocabs = [token_bytes(t) for t in tokenizers]
    anchor_ids = find_anchors(vocabs, max_anchors)
    if anchor_ids.shape[1] == 0:
        raise ValueError("the members' vocabularies share no token: no anchors")
    vocab_sizes = []
    with new_entry(out_root, key) as tmp:
        for i, name in enumerate(names):
            emb = load_embedding[i]().to(device)
            vocab_sizes.append(int(emb.shape[0]))
            bar = progress(emb.shape[0], f"relative transfer {name}") if progress else None
            transfer = LowRankTransfer.build(emb, anchor_ids[i].to(device), progress=bar.update if bar else None,
                                             inplace=True)
            if bar:
                bar.close()
            save_tensors({k: v.cpu() for k, v in transfer.state().items()}, tmp / f"member{i}.safetensors")
            del emb, transfer
        info = {"key": key, "members": names, "fingerprints": fingerprints,
                "anchors": int(anchor_ids.shape[1]), "max_anchors": max_anchors,
                "temperature": TEMPERATURE, "anchor_digest": anchor_digest(anchor_ids),
                "vocab_sizes": vocab_sizes,
                "usable_tokens": [sum(b is not None for b in v) for v in vocabs]}
        (tmp / "anchors.json").write_text(json.dumps(info, indent=1))
    return out


def cached_entry(fingerprints: list[str], max_anchors: int, out_root: Path) -> Path | None:
    out = out_root / cache_key(fingerprints, max_anchors)
    return out if (out / "anchors.json").is_file() else None


def load_transfers(entry: Path, cache_rows: int = 512, only: int | None = None, devices=None) -> list:
    """Every member's transfer, or (with `only`) just member `only`'s, None for the others;
    member i's on devices[i] (default: the CPU)."""
    info = json.loads((entry / "anchors.json").read_text())
    transfers = []
    for i in range(len(info["members"])):
        if only is not None and i != only:
            transfers.append(None)
            continue
        device = str(devices[i]) if devices else "cpu"
        state = load_file(str(entry / f"member{i}.safetensors"), device=device)
        transfers.append(LowRankTransfer(state["unit_emb"], state["anchor_ids"], state["inv_norm"],
                                         state["log_z"], state["mean_row"], info["temperature"],
                                         cache_rows, state["cluster_of"], state["cluster_rows"]))
    return transfers


def dense_budget() -> int:
    return int(float(os.environ.get("DEEPEN_DENSE_MAX_GB", "12")) * 2**30)


def exact_transfers(transfers: list[LowRankTransfer], budget: int | None = None) -> list:
    """For exact mode: P materialised where it fits the budget (|V| x |A| x 4 bytes; env
    DEEPEN_DENSE_MAX_GB, default 12), else the low-rank form, swept chunk by chunk (exact too,
    but every search iteration recomputes all of P: slow for large vocabularies)."""
    budget = dense_budget() if budget is None else budget
    return [DenseTransfer(dense_transfer_matrix(t.unit_emb, t.anchor_ids, t.temperature))
            if t.num_tokens * t.num_anchors * 4 <= budget else t for t in transfers]


def anchor_info(entry: Path) -> dict:
    return json.loads((entry / "anchors.json").read_text())


def anchors_summary(entry: Path, row_cache: int) -> dict:
    """What `deepen anchors build` reports: the anchor count and, per member, its vocabulary,
    its text tokens and the transfer's resident size (row cache included)."""
    info = anchor_info(entry)
    transfers = load_transfers(entry, row_cache)
    resident = {n: round(t.nbytes() / 2**20, 1) for n, t in zip(info["members"], transfers)}
    return {"entry": str(entry), "anchors": info["anchors"], "members": info["members"],
            "vocab_sizes": info["vocab_sizes"], "usable_tokens": info["usable_tokens"],
            "resident_mb": resident, "resident_total_mb": round(sum(resident.values()), 1)}
