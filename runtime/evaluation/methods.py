"""The methods `deepen eval` compares, and how their fusers and weights are made.

    single:<member>   the member alone, same prompt      single = every member
    deepen            DEEPEN with the config's weights     deepen-avg, deepen-adapt
    deepen-letters    variant: every member restricted to the option letters (choice mode)
    minED             edit-distance token map + averaging of distributions
    vote, mbr         majority / MBR over the members' answers (run after them)
    deepen+vote, deepen+mbr   the same, with DEEPEN's answer as one more candidate
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from copy import copy
from dataclasses import replace
from pathlib import Path

import torch

from ..deepen.fusion import Fuser
from ..deepen.vocab import ids_by_bytes, token_bytes
from ..members.ensemble import single_fuser
from .baselines import MinEDFuser
from .tasks import Task

COMBINERS = ("vote", "mbr", "deepen+vote", "deepen+mbr")


# ---- methods -----------------------------------------------------------------------------------

def parse_methods(spec: str, member_names: list[str], etas: list[float]) -> list[str]:
    """'single,deepen-avg,vote' -> concrete method names, dependencies first (a combiner needs
    the singles, deepen+X needs deepen). With several etas each DEEPEN method is `name@eta`."""
    out: list[str] = []

    def add(name):
        if name not in out:
            out.append(name)

    deepens = []
    for raw in [s.strip() for s in spec.split(",") if s.strip()]:
        if raw == "single":
            for n in member_names:
                add(f"single:{n}")
        elif raw.startswith("single:"):
            if raw[7:] not in member_names:
                raise ValueError(f"--method {raw}: no member named {raw[7:]!r} (members: {', '.join(member_names)})")
            add(raw)
        elif raw in ("deepen", "deepen-avg", "deepen-adapt", "deepen-letters"):
            if raw == "deepen-letters":
                for n in member_names:
                    add(f"single:{n}")
            for eta in etas:
                name = raw if len(etas) == 1 else f"{raw}@{eta:g}"
                deepens.append(name)
                add(name)
        elif raw in ("minED", "mined"):
            add("minED")
        elif raw in COMBINERS:
            for n in member_names:
                add(f"single:{n}")
            if raw.startswith("deepen+") and not deepens:
                raise ValueError(f"--method {raw}: also name the DEEPEN method it combines "
                                 "(e.g. --method deepen-avg,{raw})")
            add(raw)
        else:
            raise ValueError(f"--method: unknown method {raw!r} (single, single:<member>, deepen, "
                             f"deepen-avg, deepen-adapt, deepen-letters, minED, {', '.join(COMBINERS)})")
    # engine methods first, then what reads their files
    return [m for m in out if not reads_others(m)] + [m for m in out if reads_others(m)]


def reads_others(method: str) -> bool:
    """Combiners and the letters variant run after the single members, from their files."""
    return method in COMBINERS or method.startswith("deepen-letters")


def method_eta(name: str, default: float) -> float:
    return float(name.split("@", 1)[1]) if "@" in name else default


def adapt_rule(dev_scores: dict[str, float], chance: float) -> dict[str, float]:
    """DEEPEN-Adapt's weights from the members' dev accuracies: proportional to each member's
    score above chance (a member at chance adds nothing a coin would not), with a floor of 0.01
    so no member is switched off entirely; equal weights if every member is at chance."""
    lift = {n: max(s - chance, 0.0) + 0.01 for n, s in dev_scores.items()}
    total = sum(lift.values())
    return {n: v / total for n, v in lift.items()}


def read_summary(folder: Path) -> dict:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_summary(folder: Path, method: str, entry: dict):
    summary = read_summary(folder)
    summary[method] = entry
    tmp = folder / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, sort_keys=True))
    os.replace(tmp, folder / "summary.json")


def adapt_weights(results: Path, task: Task, member_names: list[str]) -> dict:
    """The Adapt weights for `task`, from the single members' dev run in `results`."""
    dev = read_summary(results / f"{task.name}-dev")
    scores = {n: dev.get(f"single:{n}", {}).get("accuracy") for n in member_names}
    missing = [n for n, s in scores.items() if s is None]
    if missing:
        raise ValueError(f"deepen-adapt needs the members' dev scores: run `deepen eval --task "
                         f"{task.name} --split dev --method single` with --out {results} first "
                         f"(missing: {', '.join(missing)})")
    chance = 1 / len(task.letters) if task.kind == "choice" else 0.0
    return {"weights": adapt_rule(scores, chance), "dev_scores": scores, "chance": chance}


def best_dev_eta(results: Path, task: Task, method: str = "deepen-avg") -> float:
    """The eta with the best dev accuracy among `method@eta` entries (ties: the smaller eta)."""
    dev = read_summary(results / f"{task.name}-dev")
    found = [(v["accuracy"], -v["eta"], v["eta"]) for k, v in dev.items()
             if k.startswith(method + "@") or k == method]
    if not found:
        raise ValueError(f"--eta dev: no {method} results in {results / (task.name + '-dev')}: "
                         f"sweep first (deepen eval --split dev --method {method} --eta 0.05,0.15,...)")
    return max(found)[2]


def same_decoding(a, b) -> bool:
    """Two DEEPEN fusers that decode identically: the same transfers, settings and weights
    (DEEPEN-Adapt with every member at chance on dev has DEEPEN-Avg's equal weights)."""
    return (isinstance(a, Fuser) and isinstance(b, Fuser) and a.transfers is b.transfers
            and a.search == b.search and a.mode == b.mode and a.fast == b.fast
            and a.eos_token_id == b.eos_token_id and len(a.weights) == len(b.weights)
            and all(abs(x - y) < 1e-9 for x, y in zip(a.weights, b.weights)))


def method_fusers(methods: list[str], members, make_fuser, eta: float, adapt: dict | None,
                  mined_maps=None) -> dict:
    """method -> (the members it runs, its fuser). `make_fuser(weights)` gives a DEEPEN Fuser
    (weights None: the config's); every DEEPEN method shares one Fuser's transfers."""
    out, bases = {}, {}
    for m in methods:
        if m in COMBINERS:
            continue
        if m.startswith("single:"):
            member = next(x for x in members if x.name == m[7:])
            out[m] = ([member], single_fuser([member]))
        elif m == "minED":
            maps = mined_maps()
            out[m] = (members, MinEDFuser(maps, [1 / len(members)] * len(members)))
        else:
            kind = m.split("@")[0]
            if "base" not in bases:
                bases["base"] = make_fuser(None)
            fuser = copy(bases["base"])
            fuser.seconds = defaultdict(float)
            fuser.search = replace(fuser.search, eta=method_eta(m, eta))
            if kind == "deepen-avg":
                fuser.weights = [1 / len(members)] * len(members)
            elif kind == "deepen-letters":
                fuser.weights = [1 / len(members)] * len(members)
            elif kind == "deepen-adapt":
                fuser.weights = [adapt["weights"][x.name] for x in members]
            out[m] = (members, fuser)
    return out


# ---- letters -----------------------------------------------------------------------------------

def letter_ids(tokenizer, letters: str) -> list[list[int]]:
    """Per letter, the single tokens that spell it after 'Answer:' (' A' and 'A')."""
    index = ids_by_bytes(token_bytes(tokenizer))
    out = []
    for letter in letters:
        ids = [index[b] for b in (f" {letter}".encode(), letter.encode()) if b in index]
        if not ids:
            raise ValueError(f"the tokenizer has no single token for option {letter!r}")
        out.append(ids)
    return out


def letter_scores(logits: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """(B, letters): each letter's best logit over its spellings."""
    return torch.stack([logits[:, i].amax(-1) for i in ids], dim=1)


