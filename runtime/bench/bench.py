"""Throughput, measured as ratios inside one run: the ensemble engine against each member
decoding alone through the same engine, and against the authors' style reference loop.

Every figure is over `repeat` repetitions after a warm-up, reported as min / median / max, so a
reader can see the noise of a shared machine next to the ratios."""
from __future__ import annotations

import statistics
import time

from ..engine.engine import Engine
from ..engine.reference import reference_decode
from ..engine.sampling import GREEDY, SamplingParams, stable_seed
from ..engine.sequence import Request
from ..members.ensemble import single_fuser


def cpu_flags() -> str:
    """The CPU's model and the flags that decide speed here (AVX-512 BF16 rows of P run 2.5x
    faster than AVX2 alone), for every printed figure."""
    import platform
    fields = {}
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    shown = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
    return f"{fields.get('model name', platform.machine())}; {', '.join(shown) or 'no AVX2'}"


def bench_prompts(path=None) -> list[str]:
    """The prompts a bench decodes: a JSON-lines file's 'prompt' fields, or by default 32
    TriviaQA dev 5-shot prompts (long enough that prefill and the cache matter)."""
    if path:
        from ..jobs.files import read_requests
        return [r.prompt for r in read_requests(path)]
    from ..evaluation.tasks import qa_prompts
    return qa_prompts("triviaqa", "dev", 32)


def exact_fuser_if_it_fits(config, members, entry, log=print):
    """An exact-mode Fuser where every member's dense P fits DEEPEN_DENSE_MAX_GB, else None."""
    from ..deepen.anchors import dense_budget, load_transfers
    from ..members.ensemble import make_fuser
    if all(t.num_tokens * t.num_anchors * 4 <= dense_budget() for t in load_transfers(entry, 0)):
        return make_fuser(config, members, entry, "exact")
    log("exact vs fast: skipped, exact mode's matrices do not fit DEEPEN_DENSE_MAX_GB "
        "(use a config with fewer anchors, e.g. configs/smol-gemma-8k.toml)")
    return None


def batch_of(prompts: list[str], size: int) -> list[str]:
    """`size` prompts, cycling through the list when the batch is larger than it."""
    return (prompts * (size // len(prompts) + 1))[:size]


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


ROW_COUNTS = ("rows", "fused_rows", "decided_rows", "agreeing_rows")
FUSION_PARTS = ("rules", "relative", "search")   # the fusion itself (one process: no gather)


def host_seconds(breakdown: dict, total: float) -> float:
    """The host's work in a run: everything but the members' forward passes (prefill included)
    and the fused step's math."""
    model = sum(v for k, v in breakdown.items() if k.startswith(("forward:", "prefill:")))
    return total - model - sum(breakdown.get(k, 0.0) for k in FUSION_PARTS)


def run_engine(members, fuser, prompts: list[str], batch: int, new_tokens: int, sampling=GREEDY,
               incremental: bool = True, clock=time.perf_counter) -> dict:
    """One timed run. `clock=time.thread_time` measures CPU time of this thread (bench --clock cpu)."""
    if hasattr(fuser, "reset_counts"):   # this run's time per part and row counts, not the fuser's so far
        fuser.reset_counts()
    if hasattr(fuser, "forget_rows"):   # every repetition starts with empty row stores
        fuser.forget_rows()
    engine = Engine(members, fuser, max_batch=batch, incremental=incremental)
    engine.clock = clock
    if hasattr(fuser, "clock"):
        fuser.clock = clock
    requests = [Request(i, p, new_tokens, sampling=sampling if sampling.greedy else
                        SamplingParams(**{**sampling.pack(), "seed": stable_seed("bench", i)}))
                for i, p in enumerate(prompts)]
    t0 = clock()
    results = engine.run(requests)
    seconds = clock() - t0
    tokens = sum(len(r.ids) for r in results)
    report = engine.report(seconds, tokens)
    return {"seconds": seconds, "tokens": tokens, "steps": engine.steps,
            **{k: report.get(k, 0) for k in ROW_COUNTS},
            "tokens_per_s": tokens / seconds, "step_s": seconds / max(engine.steps, 1),
            "ttft_s": statistics.median(r.first_token_s for r in results),
            "breakdown_s": engine.breakdown()}


def run_reference(members, fuser, prompts: list[str], new_tokens: int) -> dict:
    t0 = time.perf_counter()
    rows = reference_decode(members, fuser, prompts, new_tokens)
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.ids) for r in rows)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def bench(members, fuser, prompts: list[str], batches: list[int], new_tokens: int, repeat: int,
          compare: tuple[str, ...] = ("members", "reference"), reference_prompts: int = 2,
          reference_tokens: int = 8, log=print, exact_fuser=None, sampling=GREEDY,
          contexts: list[int] | None = None, incremental: bool = True, clock=time.perf_counter,
          methods: dict | None = None) -> dict:
    """Each batch size B decodes B prompts (all in flight at once) for `new_tokens` tokens
    (`sampling`: every series draws with these settings, seeded per prompt). `contexts`: run
    every batch size at each of these prompt lengths (tokens of the main member; the prompts
    grown or cut to it, bench/context.py). `incremental=False`: the old host path. `methods`:
    {name: fuser} of more ensemble series, interleaved with the others (bench/methods.py)."""
    from .context import prompts_of_length
    log("warm-up")
    run_engine(members, fuser, prompts[:2], 2, 2, incremental=incremental, clock=clock)
    out = {"new_tokens": new_tokens, "repeat": repeat, "batches": [], "incremental": incremental}
    for context, batch in [(c, b) for c in (contexts or [None]) for b in batches]:
        chosen = batch_of(prompts, batch) if context is None else \
            prompts_of_length(prompts, members[0].tokenizer, context, batch)
        # one repetition of every series, then the next: a slow minute on a shared machine
        # then slows all series alike instead of the one that happened to be running
        series = {"ensemble": (members, fuser)}
        series.update({f"method:{name}": (members, f) for name, f in (methods or {}).items()})
        if "members" in compare:
            series.update({m.name: ([m], single_fuser([m])) for m in members})
        runs = {name: [] for name in series}
        for r in range(repeat):
            for name, (group, f) in series.items():
                at = "" if context is None else f" context {context}"
                alone = '' if name == 'ensemble' or name.startswith('method:') else ' alone'
                log(f"batch {batch}{at}: {name}{alone} {r + 1}/{repeat}")
                runs[name].append(run_engine(group, f, chosen, batch, new_tokens, sampling, incremental, clock))
        row = {"batch": batch, "context": context, "host_path": "incremental" if incremental else "full",
               "ensemble": _summary(runs.pop("ensemble"))}
        if methods:
            row["methods"] = {name: _summary(runs.pop(f"method:{name}")) for name in methods}
        if runs:
            row["members"] = {name: _summary(v) for name, v in runs.items()}
            solo_sum = sum(v["step_s"]["median"] for v in row["members"].values())
            row["ensemble_step_over_sum_of_solo_steps"] = row["ensemble"]["step_s"]["median"] / solo_sum
            row["members_host_s_per_step"] = sum(v["host_s_per_step"] for v in row["members"].values())
        out["batches"].append(row)
    if "exact" in compare and exact_fuser is not None:
        runs = {"fast": [], "exact": []}
        chosen = prompts[:reference_prompts]
        for r in range(repeat):
            for name, f in (("fast", fuser), ("exact", exact_fuser)):
                log(f"{name} fusion {r + 1}/{repeat} ({len(chosen)} prompts x {reference_tokens} tokens)")
                runs[name].append(run_engine(members, f, chosen, len(chosen), reference_tokens))
        out["exact_vs_fast"] = {name: _summary(v) for name, v in runs.items()}
        out["exact_vs_fast"]["fast_speedup"] = (out["exact_vs_fast"]["exact"]["step_s"]["median"] /
                                                out["exact_vs_fast"]["fast"]["step_s"]["median"])
    if "reference" in compare:
        ref = []
        for r in range(repeat):
            log(f"reference loop {r + 1}/{repeat} ({reference_prompts} prompts x {reference_tokens} tokens)")
            ref.append(run_reference(members, fuser, prompts[:reference_prompts], reference_tokens))
        out["reference"] = {"prompts": reference_prompts, "new_tokens": reference_tokens,
                            "tokens_per_s": spread([x["tokens_per_s"] for x in ref])}
        for row in out["batches"]:
            row["speedup_vs_reference"] = (row["ensemble"]["tokens_per_s"]["median"] /
                                           out["reference"]["tokens_per_s"]["median"])
    return out


def _summary(runs: list[dict]) -> dict:
    keys = sorted({k for r in runs for k in r["breakdown_s"]})
    total = statistics.median(r["seconds"] for r in runs)
    breakdown = {k: statistics.median(r["breakdown_s"].get(k, 0.0) for r in runs) for k in keys}
    forward = sum(v for k, v in breakdown.items() if k.startswith(("forward:", "prefill:")))
    steps = max(runs[0]["steps"], 1)
    return {"tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
            # per run, then the median: a residual of medians taken part by part is noise where
            # prefill dominates (long prompts), even below zero
            "host_s_per_step": statistics.median(host_seconds(r["breakdown_s"], r["seconds"]) for r in runs) / steps,
            "resync_s_per_step": breakdown.get("resync", 0.0) / steps,
            "forward_s_per_step": forward / steps,
            "fusion_s_per_step": sum(breakdown.get(k, 0.0) for k in FUSION_PARTS) / steps,
            "step_s": spread([r["step_s"] for r in runs]),
            "ttft_s": spread([r["ttft_s"] for r in runs]),
            "tokens": runs[0]["tokens"], "steps": runs[0]["steps"],
            **{k: runs[0].get(k, 0) for k in ROW_COUNTS},
            "share": {k: v / total for k, v in breakdown.items()},
            "fusion_share": sum(breakdown.get(k, 0.0) for k in FUSION_PARTS) / total,
            "outside_forward_share": 1 - forward / total}


def table(result: dict) -> str:
    """Markdown for people."""
    def cell(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    rows = result["batches"]
    labelled = any(r.get("context") for r in rows) or len({r.get("host_path") for r in rows}) > 1
    label = lambda r: f"{r['batch']} @ {r.get('context') or '–'}, {r.get('host_path', 'incremental')}"  # noqa: E731
    lines = [("| batch @ context, host path" if labelled else "| batch") + " | ensemble tok/s (min/med/max) | " +
             " | ".join(f"{n} alone tok/s" for n in result["batches"][0].get("members", {})) +
             " | step / sum of solo steps | fusion | outside forward | rows fused / decided / agreeing "
             "(of all) | vs reference |",
             "|---|---|" + "---|" * len(result["batches"][0].get("members", {})) + "---|---|---|---|---|"]
    for row in result["batches"]:
        e = row["ensemble"]["tokens_per_s"]
        solo = " | ".join(f"{v['tokens_per_s']['median']:.1f}" for v in row.get("members", {}).values())
        lines.append(f"| {label(row) if labelled else row['batch']} | {e['min']:.1f} / {e['median']:.1f} / {e['max']:.1f} | {solo} | "
                     f"{cell(row.get('ensemble_step_over_sum_of_solo_steps'), '.2f')} | "
                     f"{cell(row['ensemble'].get('fusion_share'), '.1%')} | "
                     f"{row['ensemble']['outside_forward_share']:.1%} | {_rows(row['ensemble'])} | "
                     f"{cell(row.get('speedup_vs_reference'), '.1f')}{'' if row.get('speedup_vs_reference') is None else 'x'} |")
    if "exact_vs_fast" in result:
        e = result["exact_vs_fast"]
        lines.append(f"\nexact vs fast fusion (same engine): {e['exact']['step_s']['median']:.2f} s vs "
                     f"{e['fast']['step_s']['median']:.3f} s per step ({e['fast_speedup']:.0f}x)")
    if "reference" in result:
        r = result["reference"]
        lines.append(f"\nreference loop ({r['prompts']} prompts x {r['new_tokens']} tokens): "
                     f"{r['tokens_per_s']['median']:.2f} tok/s")
    return "\n".join(lines)


def _rows(summary: dict) -> str:
    if not summary.get("rows"):
        return "–"
    return " / ".join(str(summary.get(k, 0)) for k in ROW_COUNTS[1:]) + f" ({summary['rows']})"


def plot(result: dict, out_dir) -> list:
    """tokens/s vs batch (ensemble, each member alone, reference) and the stacked step breakdown."""
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result["batches"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    med = [r["ensemble"]["tokens_per_s"]["median"] for r in rows]
    err = [[m - r["ensemble"]["tokens_per_s"]["min"] for m, r in zip(med, rows)],
           [r["ensemble"]["tokens_per_s"]["max"] - m for m, r in zip(med, rows)]]
    ax.errorbar(batches, med, yerr=err, marker="o", label="ensemble (DEEPEN)", capsize=3)
    for name in rows[0].get("members", {}):
        ax.plot(batches, [r["members"][name]["tokens_per_s"]["median"] for r in rows], marker="s",
                linestyle="--", label=f"{name} alone")
    if "reference" in result:
        ax.axhline(result["reference"]["tokens_per_s"]["median"], color="grey", linestyle=":",
                   label="reference loop (authors' style)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (rows in flight)")
    ax.set_ylabel("new tokens / s")
    ax.set_title(f"Throughput: {result.get('config', '')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "throughput.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    parts = sorted({k for r in rows for k in r["ensemble"]["share"]})
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [r["ensemble"]["share"].get(part, 0.0) for r in rows]
        ax.bar([str(b) for b in batches], values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("batch")
    ax.set_ylabel("share of decoding time")
    ax.set_title("Where the time goes (ensemble)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths.append(out_dir / "breakdown.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
