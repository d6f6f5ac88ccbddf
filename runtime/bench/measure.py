"""Measurements of the fusion itself, on real members: fast-vs-exact token agreement, and the
time of one fused step next to the members' forward passes for that step."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..deepen.protocol import StepResult, WholeStep
from ..engine.engine import Engine
from ..engine.lane import cache_keyword, without_padding
from ..engine.reference import reference_decode
from ..engine.sequence import Request


class ComparingFuser(WholeStep):
    """Decides with `exact`; at every fused step also runs each fast fuser on the same logits and
    records whether it chose the same tokens, how long it took and what it neglected."""

    def __init__(self, exact, fast: dict, capture=None):
        self.exact, self.fast = exact, fast
        self.capture = capture  # a folder: each step's logits and exact tokens, for `replay`
        self.steps = 0
        self.seen = {name: {"steps": 0, "agree": 0, "seconds": 0.0, "max_neglected_mass": 0.0,
                            "max_search_tail_mass": 0.0, "capped": 0, "max_support": 0,
                            "disagreements": []} for name in fast}
        self.skipped = 0

    def step(self, logits, skip=None, **kw):
        result = self.exact.step(logits, skip, **kw)
        self.skipped += int((~result.fused).sum())
        if self.capture is not None:
            from safetensors.torch import save_file
            items = logits.items() if isinstance(logits, dict) else enumerate(logits)
            tensors = {f"logits.{i}": l.contiguous() for i, l in items}
            tensors.update({"tokens": result.tokens, "fused": result.fused.to(torch.uint8)})
            save_file(tensors, str(Path(self.capture) / f"step{self.steps:05d}.safetensors"))
        self.steps += 1
        self.compare(logits, result)
        return result

    def compare(self, logits, result):
        if not result.fused.any():
            return
        fused_rows = result.fused.nonzero(as_tuple=True)[0].tolist()
        for name, fuser in self.fast.items():
            seen = self.seen[name]
            t0 = time.perf_counter()
            fast = fuser.step(logits, ~result.fused)
            seen["seconds"] += time.perf_counter() - t0
            for i in fused_rows:
                seen["steps"] += 1
                same = int(fast.tokens[i]) == int(result.tokens[i])
                seen["agree"] += same
                if not same:
                    seen["disagreements"].append({"exact": int(result.tokens[i]), "fast": int(fast.tokens[i])})
            s = fast.stats
            if "tail_mass" not in s:   # every row decided before the search (skip_decided)
                continue
            seen["max_neglected_mass"] = max([seen["max_neglected_mass"]] +
                                             [float(m.max()) for m in s["neglected_mass"] if len(m)])
            seen["max_search_tail_mass"] = max(seen["max_search_tail_mass"], float(s["tail_mass"].max()))
            seen["capped"] += int(s["capped"].sum())
            seen["max_support"] = max(seen["max_support"], int(s["support"].max()))


def agreement(members, exact_fuser, fast_fusers, prompts: list[str], new_tokens: int,
              batch: int = 32, progress=None, capture=None) -> dict:
    """Decode with exact mode through the engine (equal to the authors' loop, tested); at every
    fused step also run each fast fuser ({name: Fuser}) on the same logits and compare tokens."""
    if not isinstance(fast_fusers, dict):
        fast_fusers = {"fast": fast_fusers}
    if capture is not None:
        Path(capture).mkdir(parents=True, exist_ok=True)
    fuser = ComparingFuser(exact_fuser, fast_fusers, capture)
    engine = Engine(members, fuser, max_batch=batch)
    engine.run([Request(i, p, new_tokens) for i, p in enumerate(prompts)],
               on_result=(lambda r: progress(1)) if progress else None)
    for seen in fuser.seen.values():
        seen["agreement"] = seen["agree"] / max(seen["steps"], 1)
        seen["seconds_per_step"] = seen["seconds"] / max(engine.steps, 1)
    out = dict(fuser.seen)
    out["skipped_rows"] = fuser.skipped
    out["exact_seconds_per_step"] = fuser.exact.seconds["search"] / max(engine.steps, 1)
    if len(fast_fusers) == 1:  # one setting: its figures at the top level
        out = {**next(iter(fuser.seen.values())), **{k: v for k, v in out.items() if k not in fuser.seen}}
    return out


def replay(capture, fast_fusers: dict) -> dict:
    """Fast mode on captured steps of an exact run (`measure agreement --capture`): agreement
    of each setting without re-running the exact search."""
    from safetensors.torch import load_file
    fuser = ComparingFuser(None, fast_fusers)
    for path in sorted(Path(capture).glob("step*.safetensors")):
        t = load_file(str(path))
        n = len([k for k in t if k.startswith("logits.")])
        logits = [t[f"logits.{i}"] for i in range(n)]
        fuser.compare(logits, StepResult(t["tokens"], t["fused"].bool(), None))
    for seen in fuser.seen.values():
        seen["agreement"] = seen["agree"] / max(seen["steps"], 1)
    return fuser.seen


def equality(members, fuser, prompts: list[str], new_tokens: int, batch: int = 8) -> dict:
    """The engine against the reference loop (full re-tokenisation, no cache), token for token."""
    t0 = time.perf_counter()
    want = reference_decode(members, fuser, prompts, new_tokens)
    reference_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = {r.request.id: r for r in Engine(members, fuser, max_batch=batch).run(
        [Request(i, p, new_tokens) for i, p in enumerate(prompts)])}
    engine_s = time.perf_counter() - t0
    same = [got[i].ids == ref.ids for i, ref in enumerate(want)]
    first = {}
    for i, ref in enumerate(want):
        if got[i].ids != ref.ids:
            k = next((j for j, (a, b) in enumerate(zip(got[i].ids, ref.ids)) if a != b),
                     min(len(got[i].ids), len(ref.ids)))
            first[i] = k
    return {"prompts": len(prompts), "identical": sum(same), "tokens": sum(len(r.ids) for r in want),
            "first_divergence": first, "reference_s": reference_s, "engine_s": engine_s}


def fast_fusers(config, members, entry, settings=()) -> dict:
    """{setting: fast-mode Fuser} for each MASS_EPSILON:MAX_SUPPORT setting (default: the config's)."""
    from ..members.config import with_fast_setting
    from ..members.ensemble import make_fuser
    settings = settings or [f"{config.anchors.mass_epsilon}:{config.anchors.max_support}"]
    return {s: make_fuser(with_fast_setting(config, s), members, entry, "fast") for s in settings}


def zero_shot_prompts(n: int) -> list[str]:
    """The first n TriviaQA dev questions as 0-shot prompts (`deepen measure equality`)."""
    from ..evaluation.tasks import data_dir
    from ..jobs.files import read_jsonl
    return [f"Question: {q['question']}\nAnswer:" for q in read_jsonl(data_dir() / "triviaqa" / "dev.jsonl")[:n]]


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def _prefill(member, texts: list[str]):
    """Left-padded batch prefill with a KV cache; returns (next greedy ids, cache, mask)."""
    tok = member.tokenizer
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True).to(member.device)
    with torch.no_grad():
        out = member.model(**enc, use_cache=True)
    return without_padding(out.logits[:, -1].float(), len(tok)), _cache_of(out), enc.attention_mask


def synchronize(members):
    """Wait for the members' GPUs (their work is asynchronous: a timer must not stop early)."""
    for device in {m.device for m in members if m.device.type == "cuda"}:
        torch.cuda.synchronize(device)


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
        synchronize(members)
        t0 = time.perf_counter()
        fuser.step(logits).tokens.tolist()   # as the engine does: the step ends with the ids on the host
        fused.append(time.perf_counter() - t0)
        for k, m in enumerate(members):
            last, cache, mask = state[k]
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = m.model(input_ids=last.argmax(-1, keepdim=True), attention_mask=mask,
                              use_cache=True, **{cache_keyword(m.model): cache})
            synchronize([m])
            forward[m.name].append(time.perf_counter() - t0)
            state[k] = (without_padding(out.logits[:, -1].float(), len(m.tokenizer)), _cache_of(out), mask)
    fwd_total = [sum(ts) for ts in zip(*forward.values())]
    return {"batch": batch, "steps": steps,
            "fused_step_s": statistics.median(fused),
            "forward_s": {n: statistics.median(ts) for n, ts in forward.items()},
            "forward_total_s": statistics.median(fwd_total),
            "fusion_share": statistics.median(fused) / statistics.median(fwd_total),
            "fused_min_max_s": [min(fused), max(fused)]}
