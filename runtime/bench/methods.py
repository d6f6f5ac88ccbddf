"""`deepen bench --method deepen,unite,gac`: every ensemble method as its own series of one bench
run (interleaved with the members alone, bench.py), side by side: its step against the serial
floor (the members' steps alone, summed: what one process cannot beat) and the fused step's cost
and share of the step (rules, each member's part, the combination: bench.py's FUSION_PARTS)."""
from __future__ import annotations

import dataclasses

METHODS = ("deepen", "unite", "gac")


def parse_methods(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ValueError(f"--method: expected a comma list of {', '.join(METHODS)}, got {spec!r}")
    return list(dict.fromkeys(names))


def method_fusers(cfg, members, names: list[str], entry_of, make_fuser, log=print) -> dict:
    """{method: its fuser} from the config with `method` replaced (each with its own cache entry)."""
    out = {}
    for name in names:
        c = dataclasses.replace(cfg, method=name)
        out[name] = make_fuser(c, members, entry_of(c))
    return out


def series(result: dict, row: dict, first: str) -> dict:
    """The row's summaries per method: the bench's "ensemble" series is `first`."""
    return {first: row["ensemble"], **row.get("methods", {})}


def methods_table(result: dict, first: str) -> str:
    lines = ["| batch | method | tok/s (min / med / max) | step s | step / serial floor | fused step ms/step | "
             "fused step's share | rows fused (of all) |", "|---|---|---|---|---|---|---|---|"]
    for row in result["batches"]:
        floor = sum(v["step_s"]["median"] for v in row.get("members", {}).values()) or None
        for name, s in series(result, row, first).items():
            t = s["tokens_per_s"]
            step = s["step_s"]["median"]
            ratio = f"{step / floor:.2f}" if floor else "–"
            lines.append(f"| {row['batch']} | {name} | {t['min']:.1f} / {t['median']:.1f} / {t['max']:.1f} | "
                         f"{step:.3f} | {ratio} | {1000 * s['fusion_s_per_step']:.1f} | {s['fusion_share']:.1%} | "
                         f"{s.get('fused_rows', 0)} ({s.get('rows', 0)}) |")
        if floor:
            members = ", ".join(f"{n} {v['step_s']['median']:.3f} s" for n, v in row["members"].items())
            lines.append(f"| {row['batch']} | serial floor | | {floor:.3f} | 1.00 | | | {members} |")
    return "\n".join(lines)
