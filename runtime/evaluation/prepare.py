"""From `deepen eval`'s options to a ready `Evaluation`: the task, its questions, the results
folder, the methods with their fusers, eta (given, swept, or the best on dev) and weights."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..members.config import load_config
from ..members.devices import pick_device
from ..members.ensemble import anchors_entry, load_members, make_fuser
from ..members.sources import deepen_home
from . import methods as ev
from .baselines import cached_min_edit_map
from .run import Evaluation
from .tasks import get_task, load_questions


def results_folder(out: Path, task, mode: str, split: str, data: str | None) -> Path:
    """RESULTS/<task>-<split>, with -free for free generation on a multiple-choice task, or
    RESULTS/<task>-<data file stem> for a file of one's own."""
    if data:
        return out / f"{task.name}-{Path(data).stem}"
    return out / (f"{task.name}-{split}" + ("-free" if task.kind == "choice" and mode == "generate" else ""))


def parse_etas(spec: str | None, default: float, out: Path, task, log) -> list[float]:
    if spec == "dev":
        eta = ev.best_dev_eta(out, task)
        log(f"eta {eta:g}: the best deepen-avg eta on {task.name} dev")
        return [eta]
    if not spec:
        return [default]
    try:
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--eta: expected a number, a comma list or 'dev', got {spec!r}") from None


def parse_list(option: str, spec: str | None, kind, check=None) -> list | None:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; None/'' -> None; 'dev' handled by the caller."""
    if not spec or spec == "dev":
        return None
    try:
        values = [kind(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"{option}: expected a comma list of numbers or 'dev', got {spec!r}") from None
    for v in values:
        if check and not check(v):
            raise ValueError(f"{option}: {v:g} is out of range")
    return values


def dev_choices(out: Path, task, methods: list[str], log) -> dict:
    """base method -> its settings with the best dev accuracy (deepen-adapt: deepen-avg's)."""
    chosen = {}
    for m in methods:
        base = ev.method_settings(m)[0]
        if base in chosen or not (base in ev.TOKEN_SPACE or base in ev.DEEPENS):
            continue
        source = "deepen-avg" if base in ("deepen", "deepen-adapt") else base
        try:
            chosen[base] = ev.best_dev(out, task, source)
        except ValueError:
            if base != "deepen-letters":
                raise
            source, chosen[base] = "deepen-avg", ev.best_dev(out, task, "deepen-avg")
        log(f"{base}: {chosen[base]} (the best {source} setting on {task.name} dev)")
    return chosen


def prepare(config: str, task: str, split: str = "test", method_spec: str = "single,deepen-avg,minED",
            limit: int = 0, seed: int = 0, data: str | None = None, answer_mode: str | None = None,
            eta_spec: str | None = None, fusion: str | None = None, out_root: str | None = None,
            batch: int = 8, max_new_tokens: int | None = None, resume: bool = False,
            overwrite: bool = False, log=print, progress: bool = True, device: str | None = None,
            gate_spec: str | None = None, k_spec: str | None = None) -> Evaluation:
    cfg = load_config(config)
    t = get_task(task)
    mode = answer_mode or ("choice" if t.kind == "choice" else "generate")
    if mode == "choice" and t.kind != "choice":
        raise ValueError(f"--mode choice: {task} is not a multiple-choice task")
    out = Path(out_root or Path("results") / Path(config).stem)
    folder = results_folder(out, t, mode, split, data)
    dev = "dev" in (eta_spec, gate_spec)
    etas = parse_etas(None if dev else eta_spec, cfg.eta, out, t, log)
    gates = parse_list("--gate", gate_spec, float, lambda g: 0 <= g <= 1)
    ks = parse_list("--unite-k", k_spec, int, lambda k: k >= 1)
    names = [m.name for m in cfg.ordered_members]
    methods = ev.parse_methods(method_spec, names, etas, gates, ks)
    chosen = dev_choices(out, t, methods, log) if dev else {}
    adapt = ev.adapt_weights(out, t, names) if any(m.startswith("deepen-adapt") for m in methods) else None
    questions = load_questions(t, split, data, limit, seed)
    if not questions:
        raise ValueError("no questions to score")
    if overwrite:
        for m in methods:
            path = folder / f"{m.replace(':', '=')}.jsonl"
            if path.exists():
                path.unlink()
    members = load_members(cfg, log=log, device=pick_device(device))
    home = deepen_home()
    mined_maps = lambda: [None] + [cached_min_edit_map(  # noqa: E731
        members[0], m, m.model.get_output_embeddings().weight.shape[0], home) for m in members[1:]]

    def make(kind):
        c = dataclasses.replace(cfg, method=kind)
        return make_fuser(c, members, anchors_entry(c, members, log=log), fusion)
    fusers = ev.method_fusers(methods, members, make, cfg.eta if len(etas) > 1 else etas[0], adapt, mined_maps,
                              chosen)
    meta = {"eta": etas[0], "max_new_tokens": max_new_tokens}
    for m, (_, fuser) in fusers.items():
        if m.startswith(("deepen", "unite", "gac")) or m == "minED":
            meta[m] = {"weights": dict(zip(names, [round(w, 4) for w in fuser.weights])),
                       "config": str(config), "fusion": getattr(fuser, "mode", None), **ev.fuser_settings(fuser)}
            if ev.method_settings(m)[0] in chosen:
                meta[m]["chosen_on_dev"] = True
            if adapt and m.startswith("deepen-adapt"):
                meta[m]["adapt"] = adapt
    log(f"{task} {split}: {len(questions)} questions, mode {mode}, methods {', '.join(methods)}")
    return Evaluation(t, split, questions, members, folder, methods, fusers, mode, meta, batch,
                      resume, progress=progress, log=log)
