"""Measurements of the fusion itself, on real members: fast-vs-exact token agreement, and the
time of one fused step next to the members' forward passes for that step."""
from __future__ import annotations

import statistics
import time

import torch

from .reference import reference_decode


def agreement(members, exact_fuser, fast_fuser, prompts: list[str], new_tokens: int,
              progress=None) -> dict:
    """Decode with exact mode (the authors' loop); at every fused step also run fast mode on the
    same logits and compare the chosen tokens."""
    seen = {"steps": 0, "agree": 0, "skipped": 0, "max_neglected_mass": 0.0,
            "max_search_tail_mass": 0.0, "capped": 0, "max_support": 0, "disagreements": []}

    def observe(step, rows, logits, exact):
        seen["skipped"] += int((~exact.fused).sum())
        if not exact.fused.any():
            return
        fast = fast_fuser.step(logits, ~exact.fused)
        fused = exact.fused.nonzero(as_tuple=True)[0].tolist()
        for i in fused:
            seen["steps"] += 1
            same = int(fast.tokens[i]) == int(exact.tokens[i])
            seen["agree"] += same
            if not same:
                seen["disagreements"].append({"prompt": prompts.index(rows[i].prompt), "step": step,
                                              "exact": int(exact.tokens[i]),
                                              "fast": int(fast.tokens[i])})
        s = fast.stats
        seen["max_neglected_mass"] = max([seen["max_neglected_mass"]] +
                                         [x for member in s["neglected_mass"] for x in member])
        seen["max_search_tail_mass"] = max([seen["max_search_tail_mass"]] + s["tail_mass"])
        seen["capped"] += sum(s["capped"])
        seen["max_support"] = max([seen["max_support"]] + s["support"])
        if progress:
            progress(len(fused))

    reference_decode(members, exact_fuser, prompts, new_tokens, observe=observe)
    seen["agreement"] = seen["agree"] / max(seen["steps"], 1)
    return seen


def _prefill(member, texts: list[str]):
    """Left-padded batch prefill with a KV cache; returns (next greedy ids, cache, mask)."""
    tok = member.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = member.model(**enc, use_cache=True)
    return out.logits[:, -1].float(), out.past_key_values, enc.attention_mask


def fusion_timing(members, fuser, prompts: list[str], batch: int, steps: int) -> dict:
    """Per decode step at this batch size: each member's cached one-token forward pass, and the
    fused step (relative transform + aggregation + search) on the logits it produced. Each member
    is fed its own greedy token: the forward pass costs the same whatever the token is."""
    texts = (prompts * (batch // len(prompts) + 1))[:batch]
    state = [_prefill(m, [m.render(t) for t in texts]) for m in members]
    forward = {m.name: [] for m in members}
    fused = []
    for _ in range(steps):
        logits = [s[0] for s in state]
        t0 = time.perf_counter()
        fuser.step(logits)
        fused.append(time.perf_counter() - t0)
        for k, m in enumerate(members):
            last, cache, mask = state[k]
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = m.model(input_ids=last.argmax(-1, keepdim=True), attention_mask=mask,
                              past_key_values=cache, use_cache=True)
            forward[m.name].append(time.perf_counter() - t0)
            state[k] = (out.logits[:, -1].float(), out.past_key_values, mask)
    fwd_total = [sum(ts) for ts in zip(*forward.values())]
    return {"batch": batch, "steps": steps,
            "fused_step_s": statistics.median(fused),
            "forward_s": {n: statistics.median(ts) for n, ts in forward.items()},
            "forward_total_s": statistics.median(fwd_total),
            "fusion_share": statistics.median(fused) / statistics.median(fwd_total),
            "fused_min_max_s": [min(fused), max(fused)]}
