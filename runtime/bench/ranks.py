"""`deepen bench` under the launcher: one record per rank and run, summarised on rank 0."""
from __future__ import annotations

import statistics

from ..jobs.progress import peak_rss_mb
from .bench import spread

COMMUNICATION = ("gather", "broadcast", "control")


def rank_run(engine, seconds: float, results: list) -> dict:
    """What one rank measured in one run (rank 0 also has the results)."""
    tokens = sum(len(r.ids) for r in results)
    lane, = engine.lanes.values()
    return {"rank": engine.exchange.world.rank, "member": lane.member.name, "seconds": seconds,
            "steps": engine.steps, "tokens": tokens, "breakdown_s": engine.breakdown(),
            "rows_fused_here": int(getattr(engine.fuser, "rows_fused_here", 0)),
            "ttft_s": statistics.median(r.first_token_s for r in results) if results else None,
            "peak_rss_mb": peak_rss_mb()}


def summarize_ranks(batch: int, runs: list[list[dict]], micro_batches: int = 1) -> dict:
    """runs[r][rank]: one batch size's repetitions. Tokens/s and step time come from rank 0; each
    rank's breakdown is its median seconds per part over its median run time. The communication
    share counts the time a rank spends in collectives, waiting for others included (a rank that
    finished its forward early waits in the broadcast of the chosen tokens)."""
    lead = [run[0] for run in runs]
    out = {"batch": batch, "micro_batches": micro_batches, "tokens_per_s": spread([r["tokens"] / r["seconds"] for r in lead]),
           "step_s": spread([r["seconds"] / max(r["steps"], 1) for r in lead]),
           "ttft_s": spread([r["ttft_s"] for r in lead if r["ttft_s"] is not None] or [0.0]),
           "tokens": lead[0]["tokens"], "ranks": []}
    for rank in range(len(runs[0])):
        mine = [run[rank] for run in runs]
        total = statistics.median(r["seconds"] for r in mine)
        keys = sorted({k for r in mine for k in r["breakdown_s"]})
        share = {k: statistics.median(r["breakdown_s"].get(k, 0.0) for r in mine) / total for k in keys}
        out["ranks"].append({"rank": rank, "member": mine[0]["member"], "share": share,
                             "communication_share": sum(share.get(k, 0.0) for k in COMMUNICATION),
                             "rows_fused_here": statistics.median(r.get("rows_fused_here", 0) for r in mine),
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in mine)})
    return out


def rank_table(result: dict) -> str:
    lines = ["| batch | micro-batches | tok/s (min/med/max) | step s (med) | rank | member | forward+prefill | "
             "relative | search | resync | busy / communication + wait | rows fused here | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["batches"]:
        t = row["tokens_per_s"]
        for i, r in enumerate(row["ranks"]):
            s = r["share"]
            fwd = sum(v for k, v in s.items() if k.startswith(("forward:", "prefill:")))
            head = (f"| {row['batch']} | {row.get('micro_batches', 1)} | {t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f} | "
                    f"{row['step_s']['median']:.3f} |" if i == 0 else "| | | | |")
            lines.append(f"{head} {r['rank']} | {r['member']} | {fwd:.1%} | {s.get('relative', 0):.1%} | "
                         f"{s.get('search', 0):.1%} | {s.get('resync', 0):.1%} | "
                         f"{1 - r['communication_share']:.1%} / {r['communication_share']:.1%} | "
                         f"{r.get('rows_fused_here', 0):g} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


