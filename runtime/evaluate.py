"""`deepen eval`: one task, one split, several methods; per-question JSONL and a summary.

Results live in RESULTS/<task>-<split>[-free]/:
    <method>.jsonl    one line per question: id, prompt, prediction, answer, gold, correct
    summary.json      per method: questions, correct, accuracy, mode, eta, weights, seconds

Methods (`parse_methods`):
    single:<member>   the member alone, same prompt      single = every member
    deepen            DEEPEN with the config's weights     deepen-avg, deepen-adapt
    minED             edit-distance token map + averaging of distributions
    vote, mbr         majority / MBR over the members' answers (run after them)
    deepen+vote, deepen+mbr   the same, with DEEPEN's answer as one more candidate

Two modes. `choice` (multiple-choice tasks, the default there): one prefill per question and
member serves every method; the answer is the argmax over the option letters' tokens, after
fusion. `generate`: free generation through the decoding engine, answer read off the text.
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from .baselines import MinEDFuser, mbr, vote
from .engine import Engine, Request
from .fusion import Fuser, aggregate
from .jobs import ResultWriter, finished_ids
from .lanes import Lane
from .prompts import read_jsonl
from .tasks import Task, build_prompt, extract, gold, load_demos, score, token_f1
from .vocab import ids_by_bytes, token_bytes

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
    from copy import copy
    from dataclasses import replace

    from .ensemble import single_fuser
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


# ---- the run -----------------------------------------------------------------------------------

class Evaluation:
    def __init__(self, task: Task, split: str, questions: list[dict], members, folder: Path,
                 methods: list[str], fusers: dict, mode: str, meta: dict, batch: int = 8,
                 resume: bool = False, progress: bool = True, log=print):
        self.task, self.split, self.questions, self.members = task, split, questions, members
        self.folder, self.methods, self.fusers, self.mode = folder, methods, fusers, mode
        self.meta, self.batch, self.progress, self.log = meta, batch, progress, log
        demos = load_demos(task)
        self.prompts = {q["index"]: build_prompt(task, q, demos) for q in questions}
        self.golds = {q["index"]: gold(task, q) for q in questions}
        folder.mkdir(parents=True, exist_ok=True)
        self._relatives: dict = {}
        self.done = {}
        for m in methods:
            path = self.path(m)
            if path.exists() and not resume:
                raise FileExistsError(f"{path} exists: pass --resume to go on with it, or "
                                      f"--overwrite to start again")
            self.done[m] = finished_ids(path) if resume else set()

    def path(self, method: str) -> Path:
        return self.folder / f"{method.replace(':', '=')}.jsonl"

    def record(self, method: str, index: int, answer, **extra) -> dict:
        g = self.golds[index]
        return {"id": index, "prompt": self.prompts[index], "answer": answer, "gold": g,
                "correct": score(self.task, answer, g), **extra}

    def run(self):
        engine_methods = [m for m in self.methods if not reads_others(m)]
        if self.mode == "choice":
            self.run_choice(engine_methods)
        else:
            for k, m in enumerate(engine_methods):
                twin = next((t for t in engine_methods[:k]
                             if same_decoding(self.fusers[t][1], self.fusers[m][1])), None)
                if twin:
                    self.copy_generation(m, twin)
                else:
                    self.run_generate(m)
        for m in self.methods:
            if m in COMBINERS:
                self.run_combiner(m)
            elif reads_others(m):
                self.run_letters(m)

    # -- multiple choice: one prefill per question and member, every method from it
    def run_choice(self, methods: list[str]):
        pending = [q["index"] for q in self.questions if any(q["index"] not in self.done[m] for m in methods)]
        pending.sort(key=lambda i: len(self.prompts[i]))  # similar lengths share a batch
        ids = [letter_ids(m.tokenizer, self.task.letters) for m in self.members]
        flat_main = torch.tensor([i for group in ids[0] for i in group])
        groups = [len(g) for g in ids[0]]
        writers = {m: ResultWriter(self.path(m), append=True) for m in methods}
        seconds = {m: 0.0 for m in methods}
        bar = _bar(len(pending), f"{self.task.name} {self.split}", self.progress)
        t_all = time.perf_counter()
        try:
            for start in range(0, len(pending), self.batch):
                chunk = pending[start:start + self.batch]
                t0 = time.perf_counter()
                logits = [prefill(m, [self.prompts[i] for i in chunk]) for m in self.members]
                self._relatives = {}
                shared = time.perf_counter() - t0
                for m in methods:
                    t1 = time.perf_counter()
                    scores = self.choice_scores(m, logits, ids, flat_main, groups)
                    seconds[m] += shared + time.perf_counter() - t1
                    for row, i in enumerate(chunk):
                        if i in self.done[m]:
                            continue
                        s = scores[row]
                        answer = self.task.letters[int(s.argmax())]
                        probs = torch.softmax(s, -1)
                        writers[m].write(self.record(m, i, answer, prediction=answer, confidence=round(float(probs.max()), 4),
                                                     letter_logits=[round(float(x), 4) for x in s]))
                        self.done[m].add(i)
                bar.update(len(chunk))
        finally:
            bar.close()
            for w in writers.values():
                w.close()
        wall = time.perf_counter() - t_all
        for m in methods:
            self.summarize(m, seconds[m], extra={"pass_seconds": round(wall, 2)})

    def choice_scores(self, method, logits, ids, flat_main, groups) -> torch.Tensor:
        if method.startswith("single:"):
            i = [m.name for m in self.members].index(method[7:])
            return letter_scores(logits[i], ids[i])
        fuser = self.fusers[method][1]
        if isinstance(fuser, Fuser):
            result = self.fused(fuser, logits, flat_main)
        else:
            result = fuser.step(logits, include=flat_main)
        picked = result.include_logits.float()
        return torch.stack([part.amax(-1) for part in picked.split(groups, dim=1)], dim=1)

    def fused(self, fuser: Fuser, logits, include):
        """Fuser.step, with the members' relative vectors computed once per batch and shared by
        every DEEPEN method (an eta sweep only adds searches)."""
        fuse = fuser.rows_to_fuse(logits[0], None)
        if not fuse.any():
            return fuser.decide(logits[0], None, fuse, include=include)
        rows = fuse.nonzero(as_tuple=True)[0]
        key = (id(logits[0]), tuple(rows.tolist()))
        if self._relatives.get("key") != key:
            t0 = time.perf_counter()
            parts = [fuser.member_relative(i, l[rows])[0] for i, l in enumerate(logits)]
            self._relatives = {"key": key, "parts": parts}
            fuser.seconds["relative"] += time.perf_counter() - t0
        r = aggregate(self._relatives["parts"], fuser.weights)
        return fuser.decide(logits[0], r, fuse, {}, include)

    # -- free generation through the engine
    def run_generate(self, method: str):
        todo = [q["index"] for q in self.questions if q["index"] not in self.done[method]]
        members, fuser = self.fusers[method]
        engine = Engine(members, fuser, max_batch=self.batch)
        requests = [Request(i, self.prompts[i], self.meta.get("max_new_tokens") or self.task.max_new_tokens,
                            self.task.stop) for i in todo]
        writer = ResultWriter(self.path(method), append=True)
        bar = _bar(len(todo), f"{self.task.name} {self.split} {method}", self.progress)
        tokens = 0

        def on_result(result):
            nonlocal tokens
            tokens += len(result.ids)
            answer = extract(self.task, result.text)
            writer.write(self.record(method, result.request.id, answer, prediction=result.text,
                                     tokens=len(result.ids), finish_reason=result.finish,
                                     fused_steps=result.fused_steps))
            bar.update(1)

        t0 = time.perf_counter()
        try:
            engine.run(requests, on_result)
        finally:
            bar.close()
            writer.close()
        seconds = time.perf_counter() - t0 if todo else 0.0  # a resume with nothing to do took no time
        self.summarize(method, seconds, extra={"generated_tokens": tokens})

    def copy_generation(self, method: str, twin: str):
        """`method` decodes exactly as `twin`, which this run has just finished: its rows are
        the twin's texts and answers, scored again, marked `decoded_as`. No time is spent."""
        rows = {r["id"]: r for r in _read(self.path(twin))}
        writer = ResultWriter(self.path(method), append=True)
        keep = ("prediction", "tokens", "finish_reason", "fused_steps")
        try:
            for q in self.questions:
                i = q["index"]
                if i not in self.done[method]:
                    r = rows[i]
                    writer.write(self.record(method, i, r["answer"], decoded_as=twin,
                                             **{k: r[k] for k in keep if k in r}))
        finally:
            writer.close()
        self.log(f"{method}: the same decoding as {twin} (equal weights and settings); its texts reused")
        self.summarize(method, 0.0, extra={"decoded_as": twin})

    # -- a variant: DEEPEN over the option letters only
    def run_letters(self, method: str):
        """DEEPEN with every member's distribution restricted to the option letters (candidate
        restriction, off unless asked for): each member's letter logits, read from its single
        run, become a distribution over its ' A'..' D' tokens; those go to relative space,
        are averaged, and the main member's letters are searched. Choice mode only."""
        if self.mode != "choice":
            raise ValueError(f"{method}: only for multiple-choice tasks in choice mode")
        t0 = time.perf_counter()
        fuser = self.fusers[method][1]
        singles = [{r["id"]: r["letter_logits"] for r in _read(self.path(f"single:{m.name}"))}
                   for m in self.members]
        ids = [letter_ids(m.tokenizer, self.task.letters) for m in self.members]
        sizes = [m.model.get_output_embeddings().weight.shape[0] for m in self.members]
        todo = [q["index"] for q in self.questions if q["index"] not in self.done[method]
                and all(q["index"] in s for s in singles)]
        writer = ResultWriter(self.path(method), append=True)
        include = torch.tensor([g[0] for g in ids[0]])
        try:
            for start in range(0, len(todo), 64):
                chunk = todo[start:start + 64]
                logits = []
                for s, member_ids, size in zip(singles, ids, sizes):
                    full = torch.full((len(chunk), size), -1.0e4)  # probability exactly 0 in fp32
                    full[:, [g[0] for g in member_ids]] = torch.tensor([s[i] for i in chunk])
                    logits.append(full)
                scores = fuser.step(logits, include=include).include_logits
                for row, i in enumerate(chunk):
                    answer = self.task.letters[int(scores[row].argmax())]
                    writer.write(self.record(method, i, answer, prediction=answer,
                                             letter_logits=[round(float(x), 4) for x in scores[row]]))
        finally:
            writer.close()
        self.summarize(method, time.perf_counter() - t0, extra={"variant": "letters only"})

    # -- answer-level combiners over the files the engine methods wrote
    def run_combiner(self, method: str):
        names = [f"single:{m.name}" for m in self.members]
        voters = []
        if method.startswith("deepen+"):
            voters.append(next(m for m in self.methods if m.startswith("deepen") and m not in COMBINERS))
        voters += names
        answers = {v: {r["id"]: r["answer"] for r in _read(self.path(v))} for v in voters}
        order = list(range(len(voters)))  # ties: DEEPEN first, then the main member, ...
        writer = ResultWriter(self.path(method), append=False)
        try:
            for q in self.questions:
                i = q["index"]
                if any(i not in answers[v] for v in voters):
                    continue
                cands = [answers[v][i] for v in voters]
                if method.endswith("vote") or self.task.kind != "qa":
                    chosen = vote(cands, order)
                else:
                    chosen = mbr([c or "" for c in cands], token_f1, order)
                writer.write(self.record(method, i, chosen, prediction=chosen, candidates=cands))
        finally:
            writer.close()
        self.summarize(method, 0.0, extra={"voters": voters})

    def summarize(self, method: str, seconds: float, extra: dict | None = None):
        """Counts over this run's questions (a file resumed with another sample may hold more)."""
        wanted = set(self.prompts)
        rows = [r for r in _read(self.path(method)) if r["id"] in wanted]
        correct = sum(r["correct"] for r in rows)
        previous = read_summary(self.folder).get(method, {})
        resumed = bool(self.done.get(method))
        total_seconds = round(previous.get("seconds", 0.0) + seconds if resumed else seconds, 2)
        extra = dict(extra or {})
        if resumed:  # timings add up over the runs that filled the file
            for key in ("pass_seconds", "generated_tokens"):
                if key in extra:
                    extra[key] = round(previous.get(key, 0) + extra[key], 2)
        if "generated_tokens" in extra:
            extra["tokens_per_s"] = round(extra["generated_tokens"] / total_seconds, 3) if total_seconds else None
        entry = {"task": self.task.name, "split": self.split, "method": method, "mode": self.mode,
                 "questions": len(rows), "correct": correct,
                 "accuracy": correct / len(rows) if rows else 0.0,
                 "seconds": round(total_seconds, 2), **self.meta.get(method, {}), **extra}
        if "eta" not in entry and method.startswith("deepen") and method not in COMBINERS:
            entry["eta"] = method_eta(method, self.meta["eta"])
        write_summary(self.folder, method, entry)
        self.log(f"{self.task.name} {self.split} {method}: {correct}/{len(rows)} = "
                 f"{100 * entry['accuracy']:.2f}%")


def prefill(member, prompts: list[str]) -> torch.Tensor:
    """Next-token logits after each prompt (the member's own template), one batched pass."""
    lane = Lane(member)
    lane.admit(list(range(len(prompts))), prompts)
    return lane.logits


def _read(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, mininterval=2)

