"""`deepen report RESULTS`: the evaluation table (methods x tasks, deltas vs the best single
member) and plots, from the summary.json files `deepen eval` wrote."""
from __future__ import annotations

import json
import math
from pathlib import Path

TASK_ORDER = ["mmlu", "arc_challenge", "gsm8k", "piqa", "triviaqa", "nq"]
METHOD_ORDER = ["deepen", "deepen-avg", "deepen-adapt", "unite", "gac", "minED", "vote", "mbr", "deepen+vote",
                "deepen+mbr"]
FUSING = ("deepen-avg", "unite", "gac")   # the three methods the "best of the three" row compares


def collect(results: Path, split: str) -> dict:
    """{task: {method: summary entry}} for folders named <task>-<split> (choice mode) and
    <task>-<split>-free (free generation on a multiple-choice task, shown as its own column)."""
    out = {}
    for folder in sorted(results.iterdir()):
        summary = folder / "summary.json"
        if not summary.is_file():
            continue
        task, _, rest = folder.name.partition(f"-{split}")
        if task not in TASK_ORDER or rest not in ("", "-free"):
            continue
        out[task + rest] = json.loads(summary.read_text())
    return out


def _columns(data: dict) -> list[str]:
    return sorted(data, key=lambda c: (TASK_ORDER.index(c.split("-free")[0]), c))


def _rows(data: dict) -> list[str]:
    methods = {m for entries in data.values() for m in entries}
    singles = sorted(m for m in methods if m.startswith("single:"))
    rest = sorted((m for m in methods if not m.startswith("single:")),
                  key=lambda m: (METHOD_ORDER.index(m.split("@")[0]) if m.split("@")[0] in METHOD_ORDER else 99, m))
    return singles + rest


def ci95(p: float, n: int) -> float:
    return 196 * math.sqrt(p * (1 - p) / n) if n else 0.0


def table(data: dict, split: str) -> str:
    cols = _columns(data)
    rows = _rows(data)
    best = {}
    for c in cols:
        singles = [v["accuracy"] for m, v in data[c].items() if m.startswith("single:")]
        best[c] = max(singles) if singles else None
    head = "| method | " + " | ".join(c for c in cols) + " | wins vs best single |"
    lines = [f"Accuracy in % on the {split} split (delta vs the best single member, in points).", "",
             head, "|---|" + "---|" * (len(cols) + 1)]
    for m in rows:
        cells, wins, losses = [], 0, 0
        for c in cols:
            v = data[c].get(m)
            if v is None:
                cells.append("")
                continue
            cell = f"{100 * v['accuracy']:.2f}"
            if not m.startswith("single:") and best[c] is not None:
                delta = 100 * (v["accuracy"] - best[c])
                cell += f" ({delta:+.2f})"
                wins += delta > 0
                losses += delta < -0.5
            cells.append(cell)
        score = "" if m.startswith("single:") else f"{wins} wins, {losses} losses > 0.5"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {score} |")
    lines.append("| questions | " + " | ".join(
        str(max(v["questions"] for v in data[c].values())) for c in cols) + " | |")
    lines.append("| mode | " + " | ".join(
        next(iter(data[c].values()))["mode"] for c in cols) + " | |")
    lines.append("| ±95% CI (best single) | " + " | ".join(
        f"{ci95(best[c], max(v['questions'] for v in data[c].values())):.1f}" if best[c] is not None else ""
        for c in cols) + " | |")
    best3 = []
    for c in cols:
        found = [(100 * v["accuracy"], m) for m, v in data[c].items() if m in FUSING]
        if found and best[c] is not None:
            acc, m = max(found)
            best3.append(f"{acc:.2f} ({acc - 100 * best[c]:+.2f}, {m})")
        else:
            best3.append("")
    if any(best3):
        lines.insert(-3, "| best of DEEPEN-Avg, UniTE, GaC (picked on test) | " + " | ".join(best3) + " | |")
    settings = []
    for c in cols:
        for m, v in sorted(data[c].items()):
            keys = [k for k in ("eta", "k", "gate") if k in v]
            if keys and not m.startswith("single:"):
                text = ", ".join(f"{k} {v[k]:g}" for k in keys)
                text += " (dev's best)" if v.get("chosen_on_dev") else ""
                text += f", weights {v['weights']}" if "adapt" in m else ""
                settings.append(f"{c} {m}: {text}")
    if settings:
        lines += ["", "Settings: " + "; ".join(settings) + "."]
    lines += ["", "| task | wall time | questions | questions / min | generation tok/s per method |",
              "|---|---|---|---|---|"]
    for c in cols:
        entries = data[c]
        n = max(v["questions"] for v in entries.values())
        passes = [v["pass_seconds"] for v in entries.values() if "pass_seconds" in v]
        # choice mode: one prefill pass serves every method; generation: one run per method
        secs = max(passes) if passes else sum(v.get("seconds", 0.0) for v in entries.values())
        rates = ", ".join(f"{m} {v['tokens_per_s']:.1f}" for m, v in entries.items() if v.get("tokens_per_s"))
        twins = ", ".join(f"{m} = {v['decoded_as']}" for m, v in entries.items() if v.get("decoded_as"))
        rates += f" (texts reused, same decoding: {twins})" if twins else ""
        lines.append(f"| {c} | {secs / 60:.1f} min | {n} | {n / max(secs / 60, 1e-9):.1f} | {rates or '-'} |")
    return "\n".join(lines)


def eta_sweeps(results: Path) -> dict:
    """{task: [(eta, accuracy, questions)]} from the dev folders' deepen-avg@eta entries."""
    out = {}
    for task in TASK_ORDER:
        summary = results / f"{task}-dev" / "summary.json"
        if not summary.exists():
            continue
        entries = json.loads(summary.read_text())
        points = sorted((v["eta"], v["accuracy"], v["questions"]) for m, v in entries.items()
                        if m.startswith("deepen-avg@") and v.get("gate", 1.0) == 1.0)
        singles = {m: v["accuracy"] for m, v in entries.items() if m.startswith("single:")}
        if points:
            out[task] = {"points": points, "singles": singles}
    return out


def dev_sweeps(results: Path) -> str:
    """Every fusing method's dev accuracy per setting, per task (the test split's choice in bold)."""
    from .methods import method_settings
    lines = ["| task | method | dev accuracy per setting (bold: the one the test run used) |", "|---|---|---|"]
    for task in TASK_ORDER:
        dev, test = results / f"{task}-dev" / "summary.json", results / f"{task}-test" / "summary.json"
        if not dev.exists():
            continue
        entries = json.loads(dev.read_text())
        used = json.loads(test.read_text()) if test.exists() else {}
        for base in ("deepen-avg", "unite", "gac"):
            runs = sorted((k, v) for k, v in entries.items() if method_settings(k)[0] == base)
            if len(runs) < 2:
                continue
            chosen = used.get(base, {})
            cells = []
            for k, v in runs:
                label = ", ".join(f"{key} {v[key]:g}" for key in ("eta", "k", "gate") if key in v)
                mark = chosen.get("chosen_on_dev") and all(chosen.get(key) == v.get(key)
                                                           for key in ("eta", "k", "gate"))
                cell = f"{label}: {100 * v['accuracy']:.1f}"
                cells.append(f"**{cell}**" if mark else cell)
            n = max(v["questions"] for _, v in runs)
            lines.append(f"| {task} ({n}) | {base} | " + "; ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _answers(path: Path) -> dict:
    from ..jobs.files import read_jsonl
    return {r["id"]: r for r in read_jsonl(path)} if path.exists() else {}


def paired(results: Path, data: dict, split: str, method: str = "deepen-avg") -> str:
    """Question by question, `method` against the best single member of each task: answers
    changed, gained (it right, the single wrong), lost, and the oracle of the single members
    (any of them right): what an ensemble could reach at most by picking among them."""
    lines = [f"| task | questions | {method} answers differ | gained | lost | oracle of the members |",
             "|---|---|---|---|---|---|"]
    for c in _columns(data):
        singles = [m for m in data[c] if m.startswith("single:")]
        if method not in data[c] or not singles:
            continue
        best = max(singles, key=lambda m: data[c][m]["accuracy"])
        folder = results / f"{c.split('-free')[0]}-{split}{'-free' if c.endswith('-free') else ''}"
        ours = _answers(folder / f"{method}.jsonl")
        members = {m: _answers(folder / f"{m.replace(':', '=')}.jsonl") for m in singles}
        ids = set(ours).intersection(*members.values())
        if not ids:
            continue
        theirs = members[best]
        differ = sum(ours[i]["answer"] != theirs[i]["answer"] for i in ids)
        gained = sum(ours[i]["correct"] and not theirs[i]["correct"] for i in ids)
        lost = sum(theirs[i]["correct"] and not ours[i]["correct"] for i in ids)
        oracle = sum(any(m[i]["correct"] for m in members.values()) for i in ids)
        lines.append(f"| {c} | {len(ids)} | {differ} | {gained} | {lost} | {oracle} ({100 * oracle / len(ids):.1f}%) |")
    return "\n".join(lines) if len(lines) > 2 else ""


def render(results: Path, out_dir: Path, split: str = "test") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    data = collect(results, split)
    if not data:
        raise FileNotFoundError(f"no <task>-{split}/summary.json under {results}: run `deepen eval` first")
    text = ["# Evaluation results", "", table(data, split)]
    for method, label in (("deepen-avg", "DEEPEN-Avg"), ("unite", "UniTE"), ("gac", "GaC")):
        pairs = paired(results, data, split, method)
        if pairs:
            text += ["", f"## Question by question: {label} vs the best single member", "", pairs]
    sweeps_table = dev_sweeps(results)
    if sweeps_table:
        text += ["", "## Settings on dev (every fusing method)", "", sweeps_table]
    sweeps = eta_sweeps(results)
    if sweeps:
        text += ["", "## eta on dev (DEEPEN-Avg)", "", "| task | " + " | ".join(
            f"{e:g}" for e in sorted({p[0] for s in sweeps.values() for p in s["points"]})) + " |"]
        all_etas = sorted({p[0] for s in sweeps.values() for p in s["points"]})
        text.append("|---|" + "---|" * len(all_etas))
        for task, s in sweeps.items():
            acc = {p[0]: p[1] for p in s["points"]}
            text.append(f"| {task} | " + " | ".join(f"{100 * acc[e]:.2f}" if e in acc else "" for e in all_etas) + " |")
    (out_dir / "report.md").write_text("\n".join(text) + "\n")
    paths = [out_dir / "report.md"]

    cols = _columns(data)
    rows = _rows(data)
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.6), squeeze=False)
    for ax, c in zip(axes[0], cols):
        methods = [m for m in rows if m in data[c]]
        values = [100 * data[c][m]["accuracy"] for m in methods]
        colors = ["#999999" if m.startswith("single:") else "#1f77b4" if m.startswith("deepen")
                  else "#2ca02c" if m.startswith(("unite", "gac")) else "#ff7f0e" for m in methods]
        ax.bar(range(len(methods)), values, color=colors)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([m.replace("single:", "") for m in methods], rotation=70, fontsize=7)
        ax.set_title(f"{c} (n={max(v['questions'] for v in data[c].values())})", fontsize=9)
        ax.set_ylabel("accuracy %")
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task, s in sweeps.items():
            etas = [p[0] for p in s["points"]]
            best = max(s["singles"].values()) if s["singles"] else None
            line, = ax.plot(etas, [100 * p[1] for p in s["points"]], marker="o", label=task)
            if best is not None:
                ax.axhline(100 * best, color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xlabel("eta (relative ensemble learning rate)")
        ax.set_ylabel("dev accuracy %")
        ax.set_title("DEEPEN-Avg vs eta on dev (dotted: best single member)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "eta_sweep.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
