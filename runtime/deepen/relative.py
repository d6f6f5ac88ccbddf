"""Relative transfer matrices (ALGORITHM.md section 2) and products with them.

P[t] = softmax(temperature * R[t] / ||R[t]||),  R[t, j] = cos(E[t], E[a_j]).

P is |V| x |A|; dense it is 48 GB for Gemma-3 against all anchors, so it has two forms:

- `DenseTransfer` holds P itself: small vocabularies, exact-mode tests, golden conformance.
- `LowRankTransfer` holds what any row of P is made of: the unit-normalised embeddings (rank d),
  plus two exact scalars per token computed once at build time (1/||R_t|| and log Z_t, the
  softmax normaliser) and the mean row of P. A row is recomputed exactly from these
  (one d x |A| product), so nothing |V| x |A| is ever materialised. The rows decoding keeps
  needing stay in a row store (rowstore.py).

Both expose the operations that the fusion needs: `rows(ids)`, `gathered(ids, index)`, `weighted(ids, w) =
w @ rows(ids)`, `left(sigma) = sigma @ P` and `right(g) = g @ P^T` (the last two over the whole
vocabulary, chunked, for exact mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rowstore import RowStore

TEMPERATURE = 100.0
# Rows per chunk when P is built or swept chunk by chunk: 512 x 46k anchors x 4 B = 95 MB.
CHUNK_ROWS = 512


def unit_rows(emb: torch.Tensor) -> torch.Tensor:
    return F.normalize(emb.float(), dim=-1)


def transfer_rows_from_cos(cos: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Rows of P from rows of R (cosines to the anchors): L2-normalise, scale, softmax."""
    return torch.softmax(temperature * F.normalize(cos, dim=-1), dim=-1)


def dense_transfer_matrix(emb: torch.Tensor, anchor_ids: torch.Tensor,
                          temperature: float = TEMPERATURE) -> torch.Tensor:
    """The authors' P, built in chunks of rows. Use only where |V| x |A| fits in memory."""
    unit = unit_rows(emb)
    anchors_t = unit[anchor_ids].T.contiguous()
    out = torch.empty(unit.shape[0], anchors_t.shape[1], device=unit.device)
    for start in range(0, unit.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        out[start:stop] = transfer_rows_from_cos(unit[start:stop] @ anchors_t, temperature)
    return out


def kmeans_clusters(unit: torch.Tensor, clusters: int, iterations: int = 8, seed: int = 0) -> torch.Tensor:
    """Cluster id of every (unit-norm) row: spherical k-means, deterministic (seeded start)."""
    n = unit.shape[0]
    clusters = max(1, min(clusters, n))
    start = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:clusters].to(unit.device)
    centres = unit[start].clone()
    assign = torch.zeros(n, dtype=torch.long, device=unit.device)
    for _ in range(iterations):
        for lo in range(0, n, 8192):
            assign[lo:lo + 8192] = (unit[lo:lo + 8192] @ centres.T).argmax(-1)
        sums = torch.zeros_like(centres).index_add_(0, assign, unit)
        empty = sums.norm(dim=-1) == 0
        centres = torch.where(empty[:, None], centres, F.normalize(sums, dim=-1))
    return assign


class DenseTransfer:
    def __init__(self, matrix: torch.Tensor, clusters: torch.Tensor | None = None):
        self.matrix = matrix
        self.mean_row = matrix.mean(0)
        self.cluster_of = clusters if clusters is not None else \
            torch.zeros(len(matrix), dtype=torch.long, device=matrix.device)
        n = int(self.cluster_of.max()) + 1
        counts = torch.bincount(self.cluster_of, minlength=n).clamp_min(1)
        self.cluster_rows = matrix.new_zeros(n, matrix.shape[1]).index_add_(0, self.cluster_of, matrix) / counts[:, None]

    @property
    def num_tokens(self) -> int:
        return self.matrix.shape[0]

    @property
    def num_anchors(self) -> int:
        return self.matrix.shape[1]

    @property
    def device(self) -> torch.device:
        return self.matrix.device

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.matrix[ids]

    def gathered(self, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.matrix[ids[index]]

    def weighted(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return weights @ self.matrix[ids]

    def left(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma @ self.matrix

    def right(self, g: torch.Tensor) -> torch.Tensor:
        return g @ self.matrix.T


class LowRankTransfer:
    """Exact rows of P from normalised embeddings and per-token scalars (see module doc)."""

    def __init__(self, unit_emb: torch.Tensor, anchor_ids: torch.Tensor, inv_norm: torch.Tensor,
                 log_z: torch.Tensor, mean_row: torch.Tensor, temperature: float = TEMPERATURE,
                 cache_rows: int = 512, cluster_of: torch.Tensor | None = None,
                 cluster_rows: torch.Tensor | None = None):
        self.unit_emb = unit_emb
        # The vocabulary in clusters of similar embeddings, with each cluster's mean row of P:
        # what fast mode uses for the rows of the tokens it does not compute (the tail).
        self.cluster_of = cluster_of if cluster_of is not None else \
            torch.zeros(len(unit_emb), dtype=torch.long, device=unit_emb.device)
        self.cluster_rows = cluster_rows if cluster_rows is not None else mean_row[None, :]
        self.anchor_ids = anchor_ids
        self.anchors_t = unit_emb[anchor_ids].T.contiguous()  # d x |A|, contiguous for matmul speed
        self.inv_norm = inv_norm
        self.log_z = log_z
        self.mean_row = mean_row
        self.temperature = temperature
        self.cache_rows = cache_rows
        self.product = torch.float32   # the dtype of a row's d x |A| product (see use_product)
        self._low = None
        self._reset_cache()

    def use_product(self, dtype: torch.dtype) -> "LowRankTransfer":
        """Compute rows of P from a `dtype` copy of the embeddings (bf16: about 3x faster on CPUs
        with AVX-512 BF16/AMX and on GPUs); the accumulation, the scale, the normaliser and the
        exponential stay fp32. Fast mode only: exact mode's P is the authors' fp32."""
        self.product = dtype
        # only the anchors get a low-precision copy: a row's own embedding is converted as it is
        # gathered (n x d, nothing next to the anchors' d x |A|), so no second |V| x d copy stays
        self._low = None if dtype == torch.float32 else self.anchors_t.to(dtype)
        self._reset_cache()
        return self

    @property
    def device(self) -> torch.device:
        return self.unit_emb.device

    def to(self, device) -> "LowRankTransfer":
        """The same transfer with every tensor on `device` (its row cache starts empty)."""
        state = {k: v.to(device) for k, v in self.state().items()}
        return LowRankTransfer(state["unit_emb"], state["anchor_ids"], state["inv_norm"], state["log_z"],
                               state["mean_row"], self.temperature, self.cache_rows, state["cluster_of"],
                               state["cluster_rows"]).use_product(self.product)

    def _reset_cache(self):
        self.forget_rows()
        self.computed = 0     # rows of P computed (the cost that matters in fast mode)

    def forget_rows(self):
        """The rows of P kept between requests (runtime/deepen/rowstore.py), emptied."""
        self.store = RowStore(self.compute_rows, self.num_tokens, self.num_anchors, self.device, self.cache_rows)

    @property
    def hits(self) -> int:
        return int(self.store.counts[0])

    @property
    def misses(self) -> int:
        return int(self.store.counts[1])

    @classmethod
    def build(cls, emb: torch.Tensor, anchor_ids: torch.Tensor, temperature: float = TEMPERATURE,
              cache_rows: int = 512, progress=None, inplace: bool = False,
              clusters: int = 256) -> "LowRankTransfer":
        """Sweep P once, chunk by chunk, keeping the two scalars per token, the mean row, and the
        mean row of each of `clusters` k-means clusters of the embeddings.
        `inplace` normalises `emb` itself (a caller's own fp32 copy) instead of copying it."""
        device = emb.device
        if inplace and emb.dtype == torch.float32 and emb.is_contiguous():
            unit = emb.div_(emb.norm(dim=-1, keepdim=True).clamp_min(1e-12))  # = F.normalize
        else:
            unit = unit_rows(emb).contiguous()
        anchors_t = unit[anchor_ids].T.contiguous()
        vocab = unit.shape[0]
        cluster_of = kmeans_clusters(unit, clusters)
        n_clusters = int(cluster_of.max()) + 1
        inv_norm = torch.empty(vocab, device=device)
        log_z = torch.empty(vocab, device=device)
        cluster_sum = torch.zeros(n_clusters, anchors_t.shape[1], dtype=torch.float64, device=device)
        for start in range(0, vocab, CHUNK_ROWS):
            cos = unit[start:start + CHUNK_ROWS] @ anchors_t
            inv = 1.0 / cos.norm(dim=-1).clamp_min(1e-12)  # F.normalize's eps
            logits = cos.mul_(inv[:, None] * temperature)
            lz = torch.logsumexp(logits, dim=-1)
            rows = logits.sub_(lz[:, None]).exp_()
            cluster_sum.index_add_(0, cluster_of[start:start + len(inv)], rows.double())
            inv_norm[start:start + len(inv)] = inv
            log_z[start:start + len(inv)] = lz
            if progress is not None:
                progress(len(inv))
        counts = torch.bincount(cluster_of, minlength=n_clusters).clamp_min(1)
        mean_row = (cluster_sum.sum(0) / vocab).float()
        cluster_rows = (cluster_sum / counts[:, None]).float()
        return cls(unit, anchor_ids, inv_norm, log_z, mean_row, temperature, cache_rows,
                   cluster_of, cluster_rows)

    def state(self) -> dict[str, torch.Tensor]:
        return {"unit_emb": self.unit_emb, "anchor_ids": self.anchor_ids,
                "inv_norm": self.inv_norm, "log_z": self.log_z, "mean_row": self.mean_row,
                "cluster_of": self.cluster_of, "cluster_rows": self.cluster_rows}

    @property
    def num_tokens(self) -> int:
        return self.unit_emb.shape[0]

    @property
    def num_anchors(self) -> int:
        return self.anchors_t.shape[1]

    def nbytes(self) -> int:
        tensors = [self.unit_emb, self.anchors_t, self.inv_norm, self.log_z, self.mean_row,
                   self.anchor_ids, self.cluster_of, self.cluster_rows, self.store.scratch,
                   *(() if self._low is None else (self._low,))]
        return sum(t.numel() * t.element_size() for t in tensors) + \
            max(self.cache_rows, self.store.capacity) * self.num_anchors * 4

    def compute_rows(self, ids: torch.Tensor) -> torch.Tensor:
        self.computed += len(ids)
        if self._low is not None:
            logits = (self.unit_emb[ids].to(self._low.dtype) @ self._low).float()
        else:
            logits = self.unit_emb[ids] @ self.anchors_t
        logits.mul_((self.inv_norm[ids] * self.temperature)[:, None])
        return logits.sub_(self.log_z[ids][:, None]).exp_()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of P for `ids` (distinct), through the row store: each row is computed once
        while it stays there."""
        return self.store.gather(ids)

    def gathered(self, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows of ids[index] (index: positions into the distinct `ids`, any shape), shaped
        index.shape + (|A|,), in one gather into a buffer the row store reuses: valid until the
        next call."""
        return self.store.gathered(ids, index)

    def weighted(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights @ rows(ids), without gathering the rows where the store can be read whole."""
        return self.store.weighted(ids, weights)

    def left(self, sigma: torch.Tensor) -> torch.Tensor:
        out = sigma.new_zeros(sigma.shape[0], self.num_anchors)
        for start in range(0, self.num_tokens, CHUNK_ROWS):
            ids = torch.arange(start, min(start + CHUNK_ROWS, self.num_tokens), device=self.device)
            out += sigma[:, start:start + len(ids)] @ self.compute_rows(ids)
        return out

    def right(self, g: torch.Tensor) -> torch.Tensor:
        out = g.new_empty(g.shape[0], self.num_tokens)
        for start in range(0, self.num_tokens, CHUNK_ROWS):
            ids = torch.arange(start, min(start + CHUNK_ROWS, self.num_tokens), device=self.device)
            out[:, start:start + len(ids)] = g @ self.compute_rows(ids).T
        return out
