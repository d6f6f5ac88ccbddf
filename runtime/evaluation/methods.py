"""The methods `deepen eval` compares, and how their fusers and weights are made.

    single:<member>   the member alone, same prompt      single = every member
    deepen            DEEPEN with the config's weights     deepen-avg, deepen-adapt
    deepen-letters    variant: every member restricted to the option letters (choice mode)
    unite, gac        UniTE and GaC (docs/methods.md) with the config's weights
    minED             edit-distance token map + averaging of distributions
    vote, mbr         majority / MBR over the members' answers (run after them)
    deepen+vote, deepen+mbr   the same, with DEEPEN's answer as one more candidate

Settings swept on dev are in a method's name after '@': the eta (DEEPEN), k<K> (UniTE's k) and
g<gate> (the gate, every method): `deepen-avg@0.15`, `deepen-avg@0g1`, `unite@k10g0.5`, `gac@g0.9`.
A setting with one value is left out of the name and stored in the summary.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from copy import copy
from dataclasses import replace
from pathlib import Path

import torch

from ..deepen.fusion import Fuser
from ..deepen.gate import Gate
from ..deepen.vocab import ids_by_bytes, token_bytes
from ..members.ensemble import single_fuser
from .baselines import MinEDFuser
from .tasks import Task

COMBINERS = ("vote", "mbr", "deepen+vote", "deepen+mbr")


# ---- methods -----------------------------------------------------------------------------------

TOKEN_SPACE = ("unite", "gac")
DEEPENS = ("deepen", "deepen-avg", "deepen-adapt", "deepen-letters")


def setting_name(eta=None, k=None, gate=None) -> str:
    """The part of a method's name after '@' (module doc); '' when nothing is swept."""
    text = (f"{eta:g}" if eta is not None else "") + (f"k{k}" if k is not None else "") + \
        (f"g{gate:g}" if gate is not None else "")
    return f"@{text}" if text else ""


SETTING = re.compile(r"^(?P<eta>[0-9.e+-]+)?(?:k(?P<k>\d+))?(?:g(?P<gate>[0-9.e+-]+))?$")


def method_settings(name: str) -> tuple[str, dict]:
    """'unite@k5g0.5' -> ('unite', {'k': 5, 'gate': 0.5}): the settings a name carries."""
    base, _, rest = name.partition("@")
    m = SETTING.match(rest) if rest else None
    if not m:
        return base, {}
    out = {key: (int(v) if key == "k" else float(v)) for key, v in m.groupdict().items() if v is not None}
    return base, out


def parse_methods(spec: str, member_names: list[str], etas: list[float], gates: list[float] | None = None,
                  ks: list[int] | None = None) -> list[str]:
    """'single,deepen-avg,vote' -> concrete method names, dependencies first (a combiner needs
    the singles, deepen+X needs deepen). Swept settings (several etas, gates, UniTE k's) make one
    method per combination, named as in the module doc."""
    out: list[str] = []
    gates, ks = gates or [None], ks or [None]
    sweep = lambda values: values if len(values) > 1 else [None]  # noqa: E731

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
        elif raw in DEEPENS:
            if raw == "deepen-letters":
                for n in member_names:
                    add(f"single:{n}")
            for eta in sweep(etas):
                for gate in sweep(gates):
                    name = raw + setting_name(eta, None, gate)
                    deepens.append(name)
                    add(name)
        elif raw in TOKEN_SPACE:
            for k in (sweep(ks) if raw == "unite" else [None]):
                for gate in sweep(gates):
                    add(raw + setting_name(None, k, gate))
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
                             f"deepen-avg, deepen-adapt, deepen-letters, unite, gac, minED, {', '.join(COMBINERS)})")
    # engine methods first, then what reads their files
    return [m for m in out if not reads_others(m)] + [m for m in out if reads_others(m)]


def reads_others(method: str) -> bool:
    """Combiners and the letters variant run after the single members, from their files."""
    return method in COMBINERS or method.startswith("deepen-letters")


def method_eta(name: str, default: float) -> float:
    return method_settings(name)[1].get("eta", default)


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
    return best_dev(results, task, method, "--eta dev")["eta"]


def best_dev(results: Path, task: Task, method: str, option: str = "--gate dev") -> dict:
    """The settings (eta, k, gate: those the entry has) of `method`'s best dev entry. Ties go to
    less fusion: the smaller gate, then the smaller eta, then the smaller k."""
    dev = read_summary(results / f"{task.name}-dev")
    found = [v for k, v in dev.items() if method_settings(k)[0] == method]
    if not found:
        raise ValueError(f"{option}: no {method} results in {results / (task.name + '-dev')}: sweep first "
                         f"(deepen eval --split dev --method {method} --gate 0,0.5,1 ...)")
    best = max(found, key=lambda v: (v["accuracy"], -v.get("gate", 1.0), -v.get("eta", 0.0), -v.get("k", 0)))
    return {key: best[key] for key in ("eta", "k", "gate") if key in best}


def same_decoding(a, b) -> bool:
    """Two DEEPEN fusers that decode identically: the same transfers, settings and weights
    (DEEPEN-Adapt with every member at chance on dev has DEEPEN-Avg's equal weights)."""
    return (isinstance(a, Fuser) and isinstance(b, Fuser) and a.transfers is b.transfers
            and a.search == b.search and a.mode == b.mode and a.fast == b.fast
            and a.eos_token_id == b.eos_token_id and a.gate == b.gate and len(a.weights) == len(b.weights)
            and all(abs(x - y) < 1e-9 for x, y in zip(a.weights, b.weights)))


def never_fuses(fuser) -> bool:
    """A fuser that takes the main member's own token on every row (DEEPEN at eta 0, any method
    behind a closed gate, a member alone): it decodes as its main member alone."""
    gate = getattr(fuser, "gate", None)
    return (isinstance(fuser, Fuser) and fuser.search.eta == 0) or (gate is not None and gate.threshold == 0)


def method_fusers(methods: list[str], members, make_fuser, eta: float, adapt: dict | None,
                  mined_maps=None, chosen: dict | None = None) -> dict:
    """method -> (the members it runs, its fuser). `make_fuser(kind)` gives the config's fuser of
    that kind ("deepen", "unite", "gac"); every method of a kind shares its transfers or maps and
    sets its own settings: those in its name, else `chosen[base]` (dev's best), else the config's."""
    out, bases = {}, {}
    chosen = chosen or {}
    for m in methods:
        if m in COMBINERS:
            continue
        if m.startswith("single:"):
            member = next(x for x in members if x.name == m[7:])
            out[m] = ([member], single_fuser([member]))
            continue
        if m == "minED":
            maps = mined_maps()
            out[m] = (members, MinEDFuser(maps, [1 / len(members)] * len(members)))
            continue
        base, named = method_settings(m)
        settings = {**chosen.get(base, {}), **named}
        kind = base if base in TOKEN_SPACE else "deepen"
        if kind not in bases:
            bases[kind] = make_fuser(kind)
        fuser = copy(bases[kind])
        fuser.seconds = defaultdict(float)
        if "gate" in settings:
            fuser.gate = Gate(settings["gate"], fuser.gate.member)
        if kind == "unite" and "k" in settings:
            fuser.k = settings["k"]
        if kind == "deepen":
            fuser.search = replace(fuser.search, eta=settings.get("eta", eta))
            if base in ("deepen-avg", "deepen-letters"):
                fuser.weights = [1 / len(members)] * len(members)
            elif base == "deepen-adapt":
                fuser.weights = [adapt["weights"][x.name] for x in members]
        out[m] = (members, fuser)
    return out


def fuser_settings(fuser) -> dict:
    """What a summary records of a method's fuser."""
    out = {"gate": fuser.gate.threshold} if hasattr(fuser, "gate") else {}
    if isinstance(fuser, Fuser):
        out.update(eta=fuser.search.eta, steps=fuser.search.steps)
    if hasattr(fuser, "k"):
        out["k"] = fuser.k
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


