"""Long contexts: prompts of a chosen length, and how a decode step's parts grow with the context.

`prompts_of_length` grows each bench prompt to about N tokens of a member (earlier bench prompts
before it, the question still at the end). `forward_vs_context` times a member's decode-step
forward pass at each length, through our engine and through transformers' `generate` on the same
prompts, so the two can be compared as the context grows (`deepen measure forward`).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..engine.engine import Engine
from ..engine.sequence import Request


def prompts_of_length(prompts: list[str], tokenizer, tokens: int, count: int) -> list[str]:
    """`count` prompts of about `tokens` tokens of `tokenizer` each: prompt i preceded by the
    other prompts (cycling, as demonstrations), cut at the front at a token boundary."""
    encoded = [tokenizer(p + "\n\n", add_special_tokens=False)["input_ids"] for p in prompts]
    out = []
    for i in range(count):
        own = i % len(prompts)
        ids, j = list(encoded[own]), own
        while len(ids) < tokens:   # the prompts before it, as demonstrations
            j = (j - 1) % len(prompts)
            ids = encoded[j] + ids
        out.append(tokenizer.decode(ids[len(ids) - tokens:]).rstrip("\n"))
    return out


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def engine_forward_s(member, prompts: list[str], new_tokens: int) -> float:
    """Seconds per decode step of the member's forward pass through our engine (member alone,
    every prompt in one batch; prefill excluded)."""
    from ..members.ensemble import single_fuser
    engine = Engine([member], single_fuser([member]), max_batch=len(prompts))
    engine.run([Request(i, p, new_tokens) for i, p in enumerate(prompts)])
    return engine.seconds[f"forward:{member.name}"] / max(engine.steps - 1, 1)


class _StepClock:
    """A logits processor that notes the time of every decoding step of `generate`."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def generate_forward_s(member, prompts: list[str], new_tokens: int) -> float:
    """Seconds per decode step of transformers' `generate` on the same prompts (left-padded,
    greedy): the median time between two steps, so the prefill is left out."""
    from transformers import LogitsProcessorList
    tok = member.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok([member.render(p) for p in prompts], return_tensors="pt", padding=True).to(member.device)
    finally:
        tok.padding_side = side
    pad = tok.pad_token_id if tok.pad_token_id is not None else member.eos_token_id
    clock = _StepClock(member.device)
    with torch.no_grad():
        member.model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              num_beams=1, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
    return statistics.median(b - a for a, b in zip(clock.times, clock.times[1:]))


def forward_vs_context(member, prompts: list[str], contexts: list[int], batch: int, new_tokens: int,
                       repeat: int, log=print) -> list[dict]:
    """Per context length: the member's decode forward pass per step, ours and `generate`'s
    (median over `repeat`), and their ratio."""
    rows = []
    for n in contexts:
        chosen = prompts_of_length(prompts, member.tokenizer, n, batch)
        lengths = [len(member.tokenizer(member.render(p))["input_ids"]) for p in chosen]
        ours, theirs = [], []
        engine_forward_s(member, chosen[:2], 3)   # warm-up at this length
        for r in range(repeat):
            log(f"context {n}: {member.name} {r + 1}/{repeat}")
            ours.append(engine_forward_s(member, chosen, new_tokens))
            theirs.append(generate_forward_s(member, chosen, new_tokens))
        rows.append({"context": n, "tokens": statistics.median(lengths), "batch": batch,
                     "engine_ms": 1e3 * statistics.median(ours), "generate_ms": 1e3 * statistics.median(theirs),
                     "engine_spread_ms": [1e3 * min(ours), 1e3 * max(ours)],
                     "generate_spread_ms": [1e3 * min(theirs), 1e3 * max(theirs)]})
        rows[-1]["ratio"] = rows[-1]["engine_ms"] / rows[-1]["generate_ms"]
    return rows


def forward_table(rows: list[dict]) -> str:
    lines = ["| context (tokens) | batch | ours ms/step (min..max) | generate ms/step (min..max) | ours / generate |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['tokens']:.0f} | {r['batch']} | {r['engine_ms']:.2f} ({r['engine_spread_ms'][0]:.2f}.."
                     f"{r['engine_spread_ms'][1]:.2f}) | {r['generate_ms']:.2f} ({r['generate_spread_ms'][0]:.2f}.."
                     f"{r['generate_spread_ms'][1]:.2f}) | {r['ratio']:.2f} |")
    return "\n".join(lines)


def host_table(result: dict) -> str:
    """Per step (`deepen bench`), by context length, batch size and host path: the members'
    forward passes, the fused step's math, the host's work and, of it, the assists' token sync
    (resync); the members' own host work alone (summed) and the ensemble's against it."""
    lines = ["| context (tokens) | batch | host path | step ms | forward+prefill ms | fusion ms | host ms (share) "
             "| resync ms (share) | members alone: host ms (sum) | host / members' |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["batches"]:
        e = row["ensemble"]
        step = e["step_s"]["median"]
        members = row.get("members_host_s_per_step")
        lines.append(f"| {row.get('context') or '–'} | {row['batch']} | {row.get('host_path', 'incremental')} | "
                     f"{1e3 * step:.1f} | {1e3 * e['forward_s_per_step']:.1f} | {1e3 * e['fusion_s_per_step']:.1f} | "
                     f"{1e3 * e['host_s_per_step']:.2f} ({e['host_s_per_step'] / step:.1%}) | "
                     f"{1e3 * e['resync_s_per_step']:.2f} ({e['resync_s_per_step'] / step:.1%}) | "
                     + (f"{1e3 * members:.2f} | {e['host_s_per_step'] / members:.2f} |" if members else "– | – |"))
    return "\n".join(lines)


def _axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(6, 4))


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path, legend: int = 8):
    """Log-2 x axis from the first length, y from 0, the legend; written and closed."""
    import matplotlib.pyplot as plt
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def host_plot(result: dict, path):
    """Host ms per step against context length, one line per batch size: the ensemble (solid)
    and its members alone, summed (dashed)."""
    rows = [r for r in result["batches"] if r.get("context") and r.get("host_path", "incremental") == "incremental"]
    fig, ax = _axes()
    for batch in sorted({r["batch"] for r in rows}):
        mine = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["context"])
        x = [r["context"] for r in mine]
        line, = ax.plot(x, [1e3 * r["ensemble"]["host_s_per_step"] for r in mine], marker="o",
                        label=f"ensemble, batch {batch}")
        if all(r.get("members_host_s_per_step") for r in mine):
            ax.plot(x, [1e3 * r["members_host_s_per_step"] for r in mine], marker="s", linestyle="--",
                    color=line.get_color(), label=f"members alone (sum), batch {batch}")
    return _save(fig, ax, "prompt length (tokens of the main member)", "host work per step (ms)",
                 f"Host work per step: {result.get('config', '')}", path, legend=7)


def forward_plot(result: dict, path):
    """ms per decode step against context length: our engine and transformers' `generate`."""
    rows = result["rows"]
    x = [r["tokens"] for r in rows]
    fig, ax = _axes()
    ax.plot(x, [r["engine_ms"] for r in rows], marker="o", label="our engine (member alone)")
    ax.plot(x, [r["generate_ms"] for r in rows], marker="s", linestyle="--", label="transformers generate")
    return _save(fig, ax, "context (tokens)", "forward pass per decode step (ms)",
                 f"{result['member']}, batch {rows[0]['batch']}", path)
