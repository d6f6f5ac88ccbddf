"""`deepen bench-compare`: do two bench results agree within the noise they report?"""
from __future__ import annotations


def compare_runs(a: dict, b: dict) -> tuple[str, bool]:
    """Do two bench results agree within the noise they report? For every batch size and series
    (the ensemble, each member alone, the reference loop), the two runs' tokens/s ranges
    (min..max over repetitions) must overlap. Returns (markdown table, all agree)."""
    def series(result):
        out = {}
        for row in result["batches"]:
            out[(row["batch"], "ensemble")] = row["ensemble"]["tokens_per_s"]
            for name, m in row.get("members", {}).items():
                out[(row["batch"], f"{name} alone")] = m["tokens_per_s"]
        if "reference" in result:
            out[(0, "reference loop")] = result["reference"]["tokens_per_s"]
        return out

    sa, sb = series(a), series(b)
    lines = ["| batch | series | run 1 tok/s (min/med/max) | run 2 tok/s (min/med/max) | median diff | ranges overlap |",
             "|---|---|---|---|---|---|"]
    ok = True
    for key in sorted(set(sa) & set(sb)):
        x, y = sa[key], sb[key]
        overlap = x["min"] <= y["max"] and y["min"] <= x["max"]
        ok &= overlap
        diff = (y["median"] - x["median"]) / x["median"]
        fmt = lambda s: f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"
        lines.append(f"| {key[0] or '-'} | {key[1]} | {fmt(x)} | {fmt(y)} | {diff:+.1%} | {'yes' if overlap else 'NO'} |")
    return "\n".join(lines), ok
