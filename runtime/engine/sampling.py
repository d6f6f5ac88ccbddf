"""Sampling from the fused distribution, and log-probabilities (per request, as vLLM's
SamplingParams).

The fused distribution of a row is the softmax of its final logits: in exact mode the searched
logits over the whole vocabulary; in fast mode the searched logits over the row's support and the
main model's own logits for the frozen tail (ALGORITHM.md; `Fuser.decide`); for a row that was not
fused (eta 0, its own argmax is EOS, a stop string) the main model's logits. Temperature 0 is
greedy decoding: the fuser's token, untouched.

Reproducible: row r's draw at its step t is one uniform number derived from (seed, t) by a hash,
never from a shared generator, so the same seed gives the same completion whatever else is in the
batch, on whichever replica or rank, and after a resume. A request without a seed gets one from
the job's seed and its id (stable hash). Sampling is inverse-CDF over the tokens sorted by
probability, after temperature, top-k and top-p.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0: greedy (the fuser's token)
    top_p: float = 1.0         # nucleus: the smallest set of most likely tokens holding top_p
    top_k: int = 0             # 0: no limit
    seed: int | None = None    # None: from the job's seed and the request id
    n: int = 1                 # samples per prompt (ids <id>#<k>)
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self, where: str = "") -> "SamplingParams":
        """Raises ValueError naming the field."""
        def fail(field, why):
            raise ValueError(f"{where}{': ' if where else ''}field '{field}' {why}")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(name, "must be a number")
        if self.temperature < 0:
            fail("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        for name, low in (("top_k", 0), ("n", 1), ("seed", 0), ("logprobs", 0)):
            v = getattr(self, name)
            if v is None and name in ("seed", "logprobs"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                fail(name, f"must be an integer >= {low}")
        if self.n > 1 and self.greedy:
            fail("n", "> 1 needs temperature > 0 (greedy samples are all the same)")
        return self

    def pack(self) -> dict:
        return asdict(self)


GREEDY = SamplingParams()


def stable_seed(*parts) -> int:
    """A 63-bit seed from any values, the same in every process (not Python's hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def uniform(seed: int, step: int) -> float:
    """The draw of a row at its step t: in [0, 1), from (seed, t) alone."""
    return (stable_seed("u", seed, step) >> 10) / 2.0 ** 53


class Sampler:
    """One step's sampling for the active rows: built by the engine, called by the fuser on the
    process that decides tokens, with the rows' final (fused) logits."""

    def __init__(self, params: list[SamplingParams], seeds: list[int], steps: list[int]):
        self.params, self.seeds, self.steps = params, seeds, steps
        self.sampled = [not p.greedy for p in params]
        self.logprobs = [p.logprobs for p in params]

    @property
    def needs_logits(self) -> bool:
        return any(self.sampled) or any(k is not None for k in self.logprobs)

    def argmax_only(self, device) -> torch.Tensor:
        """Rows for which only the fused argmax matters (greedy, no log-probabilities): the
        fuser's skips (decided rows, agreeing members) hold for these rows only."""
        return torch.tensor([not s and k is None for s, k in zip(self.sampled, self.logprobs)],
                            dtype=torch.bool, device=device)

    def __call__(self, final: torch.Tensor, main: torch.Tensor, tokens: torch.Tensor):
        """(tokens, per-row log-probability records or None). `final`, `main`: (B, V) logits."""
        tokens = tokens.clone()
        rows = [i for i, s in enumerate(self.sampled) if s]
        if rows:
            tokens[rows] = self._draw(final[rows], [self.params[i] for i in rows],
                                      [uniform(self.seeds[i], self.steps[i]) for i in rows])
        want = [i for i, k in enumerate(self.logprobs) if k is not None]
        if not want:
            return tokens, None
        fused = torch.log_softmax(final[want].float(), -1)
        own = torch.log_softmax(main[want].float(), -1)
        chosen = tokens[want][:, None]
        k = max(self.logprobs[i] for i in want)
        top = fused.topk(k, -1) if k else None
        # one transfer to the host for the rows that asked
        lp, main_lp = fused.gather(1, chosen).squeeze(1).tolist(), own.gather(1, chosen).squeeze(1).tolist()
        top_v, top_i = (top.values.tolist(), top.indices.tolist()) if top is not None else ([], [])
        out = [None] * len(self.params)
        for j, i in enumerate(want):
            n = self.logprobs[i]
            out[i] = {"logprob": lp[j], "main_logprob": main_lp[j],
                      "top": list(zip(top_i[j][:n], top_v[j][:n])) if n else []}
        return tokens, out

    @staticmethod
    def _draw(logits: torch.Tensor, params: list[SamplingParams], u: list[float]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        probs = torch.softmax(logits.float() / temperature[:, None], -1)
        sorted_p, order = probs.sort(-1, descending=True)
        rank = torch.arange(probs.shape[1], device=device)[None, :]
        top_k = torch.tensor([p.top_k or probs.shape[1] for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        before = sorted_p.cumsum(-1) - sorted_p          # mass of the more likely tokens
        keep = (rank < top_k[:, None]) & (before < top_p[:, None])
        kept = torch.where(keep, sorted_p, 0.0)
        cdf = kept.cumsum(-1)
        target = torch.tensor(u, device=device, dtype=cdf.dtype)[:, None] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
        pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)   # never past the kept tokens
        return order.gather(1, pick).squeeze(1)


def note_logprobs(tokenizer, eos: int | None, rows: list, tokens: list[int], records: list):
    """Each row's log-probability record for this step's token, with the tokens as text (the
    root only: the tokens' decider)."""
    piece = lambda t: tokenizer.decode([t])  # noqa: E731
    for row, token, rec in zip(rows, tokens, records):
        if rec is not None and token != eos:
            row.logprobs.append({"token": token, "text": piece(token), "logprob": rec["logprob"],
                                 "main_logprob": rec["main_logprob"],
                                 "top": [{"token": t, "text": piece(t), "logprob": v} for t, v in rec["top"]]})
