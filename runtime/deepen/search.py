"""Search-based inverse transformation (ALGORITHM.md section 4).

Find main-model logits z whose relative representation softmax(z) @ P_main is close to the
aggregated relative vector r: AdamW on z (PyTorch defaults, weight decay 0.01), cosine
schedule (T_max 10, eta_min eta/4), loss KL(r || q) with KLDivLoss's 'mean' reduction, i.e.
divided by the number of anchors. Rows of a batch are independent problems: the loss is the
sum of per-row losses, so batching never changes a row's gradient.

`search_exact` runs over the whole vocabulary (the authors' math, any size, chunked by the
transfer object). `search_fast` runs over the few tokens that can still become the argmax
(a provable bound on how far AdamW moves a logit in T steps) plus those that carry the main
model's probability mass; the rest of the vocabulary is frozen and enters as one tail term
per embedding cluster, at that cluster's mean row of P.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .summary import Summary, summarize, tail_of

PAD_LOGIT = -1.0e4  # padding entries of a batched fast search: softmax weight exactly 0
GATHER_BYTES = int(float(os.environ.get("DEEPEN_SEARCH_GATHER_MB", "2048")) * 2**20)  # see search_fast


@dataclass(frozen=True)
class SearchSettings:
    eta: float = 0.15
    steps: int = 5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    t_max: int = 10
    eta_min_ratio: float = 0.25


def _optimizer(z: torch.Tensor, s: SearchSettings):
    """PyTorch's own AdamW and CosineAnnealingLR: read once per settings (`learning_rates`); the
    search runs `adamw` with the rates they give."""
    opt = torch.optim.AdamW([z], lr=s.eta, betas=s.betas, eps=s.eps, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.t_max,
                                                       eta_min=s.eta * s.eta_min_ratio)
    return opt, sched


def adamw(z: torch.Tensor, loss_of, s: SearchSettings) -> torch.Tensor:
    """`s.steps` iterations of AdamW on z (a leaf, in place) with the cosine schedule: the
    operations of PyTorch's single-tensor AdamW (weight decay first, then lerp, addcmul, the bias
    corrections as Python floats, addcdiv) in its order, so the result is the same to the bit,
    without building an optimizer and a scheduler every decoding step. `loss_of(z)` -> a scalar."""
    b1, b2 = s.betas
    exp_avg, exp_avg_sq = torch.zeros_like(z), torch.zeros_like(z)
    for t, lr in enumerate(learning_rates(s), start=1):
        with torch.enable_grad():
            grad, = torch.autograd.grad(loss_of(z), z)
        with torch.no_grad():
            z.mul_(1 - lr * s.weight_decay)
            exp_avg.lerp_(grad, 1 - b1)
            exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            step_size = lr / (1 - b1 ** float(t))
            denom = (exp_avg_sq.sqrt() / (1 - b2 ** float(t)) ** 0.5).add_(s.eps)
            z.addcdiv_(exp_avg, denom, value=-step_size)
    return z


def kl_mean_per_row(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """nn.KLDivLoss()(q.log(), r) for each row (reduction 'mean' over the anchors), summed."""
    return (F.kl_div(q.log(), r, reduction="none").sum(-1) / r.shape[-1]).sum()


class _TransferProduct(torch.autograd.Function):
    """sigma @ P with P behind a transfer object (dense or recomputed chunk by chunk)."""

    @staticmethod
    def forward(ctx, sigma, transfer):
        ctx.transfer = transfer
        return transfer.left(sigma)

    @staticmethod
    def backward(ctx, grad):
        return ctx.transfer.right(grad), None


def search_exact(main_logits: torch.Tensor, r: torch.Tensor, transfer, s: SearchSettings) -> torch.Tensor:
    """The authors' search over the full vocabulary. Returns the final logits (B x |V|)."""
    z = main_logits.detach().float().clone().requires_grad_(True)
    adamw(z, lambda z: kl_mean_per_row(r, _TransferProduct.apply(torch.softmax(z, dim=-1), transfer)), s)
    return z.detach()


@lru_cache(maxsize=32)  # once per settings, not once per decoding step
def learning_rates(s: SearchSettings) -> tuple[float, ...]:
    """The learning rate of each iteration, read off PyTorch's own scheduler."""
    z = torch.zeros(1, requires_grad=True)
    opt, sched = _optimizer(z, s)
    rates = []
    for _ in range(s.steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: changes nothing, keeps the scheduler's call order
        sched.step()
    return tuple(rates)


@lru_cache(maxsize=32)  # once per settings, not once per decoding step
def candidate_margin(s: SearchSettings) -> float:
    """How far below the top logit a token can start and still be the argmax after the search.

    Adam's step at iteration t is lr_t * m_hat / (sqrt(v_hat) + eps). By Cauchy-Schwarz,
    |m_hat| / sqrt(v_hat) <= (1-b1)/(1-b1^t) * sqrt(sum_{i<t} (b1^2/b2)^i) * sqrt((1-b2^t)/(1-b2))
    whatever the gradients are (it is 1 at t = 1). Two logits close a gap by at most twice that per
    step; weight decay scales every logit, and so every gap, by (1 - lr_t * wd), which keeps order.
    """
    b1, b2 = s.betas
    total, shrink = 0.0, 1.0
    for t, lr in enumerate(learning_rates(s), start=1):
        series = sum((b1 * b1 / b2) ** i for i in range(t))
        bound = (1 - b1) / (1 - b1 ** t) * math.sqrt(series) * math.sqrt((1 - b2 ** t) / (1 - b2))
        total += lr * bound
        shrink *= 1 - lr * s.weight_decay
    return 2 * total / shrink + 1e-6


def search_fast(main_logits: torch.Tensor, r: torch.Tensor, transfer, s: SearchSettings,
                mass_epsilon: float = 1e-4, max_support: int = 256,
                include: torch.Tensor | None = None, keep: bool = False):
    """Search restricted to the tokens that can still win. Returns (tokens, stats).

    Support per row: the top-k prefix of the main logits that holds both every candidate (logit
    within `candidate_margin` of the top) and 1 - mass_epsilon of the probability, at most
    `max_support` tokens. stats: support sizes, frozen tail mass, and whether a row's candidate
    set was larger than max_support (then the result may differ from exact mode).
    `include` (1-D token ids): searched in every row whatever their rank (the option letters of a
    choice-constrained answer); stats["include_logits"] (B x n) holds their final logits.
    `keep`: stats["searched"] = (ids, final logits) of each row's support, every column (a
    column outside the live support holds its starting logit): the fused distribution, with
    the rest of the vocabulary frozen at the main model's logits.
    """
    summary = summarize(main_logits, transfer, max_support, relative=False, search=True)
    return search_from(summary, r, transfer, s, mass_epsilon, include, keep, main_logits)


def search_from(m: Summary, r: torch.Tensor, transfer, s: SearchSettings, mass_epsilon: float = 1e-4,
                include: torch.Tensor | None = None, keep: bool = False, main_logits: torch.Tensor | None = None):
    """`search_fast` from the main member's summary (summary.py); `include` needs the logits."""
    rows_n, k0 = m.z.shape
    top_z, top_ids, lse = m.z, m.z_ids, m.lse
    cum = torch.exp(top_z - lse).cumsum(-1)
    k_mass = (cum < 1 - mass_epsilon).sum(-1) + 1
    k_cand = (top_z >= top_z[:, :1] - candidate_margin(s)).sum(-1)
    capped = k_cand >= k0
    k = torch.maximum(k_mass, k_cand).clamp(max=k0)
    k_max = int(k.max())
    live = torch.arange(k_max, device=top_z.device)[None, :] < k[:, None]
    tail_mass = (1 - cum.gather(1, (k - 1)[:, None])).clamp_min(0).squeeze(1)
    ids, start, taken = top_ids[:, :k_max], top_z[:, :k_max], m.z_probs[:, :k_max]
    if include is not None:  # extra columns, live where the prefix does not hold them already
        z0 = main_logits.detach().float()
        include = include.to(z0.device)
        extra = include[None, :].expand(rows_n, -1)
        held = ((ids[:, :, None] == include[None, None, :]) & live[:, :, None]).any(1)
        ids, start = torch.cat([ids, extra], 1), torch.cat([start, z0.gather(1, extra)], 1)
        taken = torch.cat([taken, torch.softmax(z0, dim=-1).gather(1, extra)], 1)
        live = torch.cat([live, ~held], 1)
        k_max = ids.shape[1]
    # the rest of the vocabulary: frozen, one term per embedding cluster (its probability, at
    # the cluster's mean row of P)
    tail = tail_of(m.mass, ids, taken, live, transfer.cluster_of)
    tail_logit = torch.where(tail > 1e-30, lse + tail.clamp_min(1e-30).log(),
                             torch.full_like(tail, PAD_LOGIT))

    uniq, inverse = torch.unique(ids[live], return_inverse=True)
    index = torch.zeros(rows_n, k_max, dtype=torch.long, device=top_z.device)
    index[live] = inverse
    # the frozen tail is one fixed direction per row: its clusters' rows, weighted by their share
    # of the tail; only its total weight changes as the support's logits move
    tail_lse = torch.logsumexp(tail_logit, dim=1, keepdim=True)
    tail_row = torch.softmax(tail_logit, dim=1) @ transfer.cluster_rows

    # each row's own rows of P, gathered once (B x k x |A|): an iteration then costs B*k*|A|
    # instead of B*|union of supports|*|A|, k times B less at large batches
    per_row = basis = None
    if rows_n * k_max * transfer.num_anchors * 4 <= GATHER_BYTES:
        per_row = transfer.gathered(uniq, index)   # valid until the transfer's next gathered()
    else:
        basis = transfer.rows(uniq)

    def product(sigma):
        if per_row is not None:
            return torch.bmm(sigma[:, None, :], per_row).squeeze(1)
        return sigma.new_zeros(rows_n, basis.shape[0]).scatter_add(1, index, sigma) @ basis

    def loss_of(z):
        sigma = torch.softmax(torch.cat([z, tail_lse], dim=1), dim=-1)
        return kl_mean_per_row(r, product(sigma[:, :-1]) + sigma[:, -1:] * tail_row)

    z = torch.where(live, start, torch.full_like(start, PAD_LOGIT)).requires_grad_(True)
    z = adamw(z, loss_of, s).detach().masked_fill(~live, float("-inf"))
    tokens = ids.gather(1, z.argmax(-1, keepdim=True)).squeeze(1)
    searched = (ids, torch.where(live, z, start)) if keep and include is None else None
    # tensors on the search's device: a caller that wants numbers reads them (no per-step transfer)
    stats = {"support": k, "candidates": k_cand, "tail_mass": tail_mass, "capped": capped}
    if keep:
        if searched is None:
            raise ValueError("sampling with `include` (a choice-constrained answer) is not supported")
        stats["searched"] = searched
    if include is not None:
        match = (ids[:, :, None] == include[None, None, :]) & live[:, :, None]
        stats["include_logits"] = torch.where(match, z[:, :, None], float("-inf")).amax(1)
    return tokens, stats
