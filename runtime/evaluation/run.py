"""`deepen eval`: one task, one split, several methods; per-question JSONL and a summary.

Results live in RESULTS/<task>-<split>[-free]/:
    <method>.jsonl    one line per question: id, prompt, prediction, answer, gold, correct
    summary.json      per method: questions, correct, accuracy, mode, eta, weights, seconds

Methods: evaluation/methods.py.

Two modes. `choice` (multiple-choice tasks, the default there): one prefill per question and
member serves every method; the answer is the argmax over the option letters' tokens, after
fusion. `generate`: free generation through the decoding engine, answer read off the text.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..deepen.fusion import Fuser
from ..engine.engine import Engine
from ..engine.lane import Lane
from ..engine.sequence import Request
from ..jobs.files import ResultWriter, finished_ids, read_jsonl
from ..jobs.progress import Progress
from .baselines import mbr, vote
from .methods import (COMBINERS, letter_ids, letter_scores, method_eta, never_fuses, read_summary, reads_others,
                      same_decoding, write_summary)
from .tasks import Task, build_prompt, extract, gold, load_demos, score, token_f1


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
                twin = next((t for t in engine_methods[:k] if self.decodes_alike(t, m)), None)
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
        bar = Progress(len(pending), f"{self.task.name} {self.split}", "questions", self.progress)
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
        # every DEEPEN method of the batch shares the members' relative vectors (an eta sweep
        # only adds searches)
        memo = self._relatives if isinstance(fuser, Fuser) else None
        picked = fuser.step(logits, include=flat_main, memo=memo).include_logits.float()
        return torch.stack([part.amax(-1) for part in picked.split(groups, dim=1)], dim=1)

    # -- free generation through the engine
    def run_generate(self, method: str):
        todo = [q["index"] for q in self.questions if q["index"] not in self.done[method]]
        members, fuser = self.fusers[method]
        engine = Engine(members, fuser, max_batch=self.batch)
        requests = [Request(i, self.prompts[i], self.meta.get("max_new_tokens") or self.task.max_new_tokens,
                            self.task.stop) for i in todo]
        writer = ResultWriter(self.path(method), append=True)
        bar = Progress(len(todo), f"{self.task.name} {self.split} {method}", "questions", self.progress)
        tokens = 0

        def on_result(result):
            nonlocal tokens
            tokens += len(result.ids)
            answer = extract(self.task, result.text)
            writer.write(self.record(method, result.request.id, answer, prediction=result.text,
                                     tokens=len(result.ids), finish_reason=result.finish,
                                     fused_steps=result.fused_steps))
            bar.update(1, f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")

        t0 = time.perf_counter()
        try:
            engine.run(requests, on_result)
        finally:
            bar.close()
            writer.close()
        seconds = time.perf_counter() - t0 if todo else 0.0  # a resume with nothing to do took no time
        self.summarize(method, seconds, extra={"generated_tokens": tokens})

    def decodes_alike(self, a: str, b: str) -> bool:
        """Equal settings, or both never fuse with the same main member (DEEPEN at eta 0, a gate
        at 0, the member alone): the same texts, token for token (tests/test_eval.py)."""
        (ma, fa), (mb, fb) = self.fusers[a], self.fusers[b]
        return same_decoding(fa, fb) or (never_fuses(fa) and never_fuses(fb) and ma[0] is mb[0])

    def copy_generation(self, method: str, twin: str):
        """`method` decodes exactly as `twin`, which this run has just finished: its rows are
        the twin's texts and answers, scored again, marked `decoded_as`. No time is spent."""
        rows = {r["id"]: r for r in read_results(self.path(twin))}
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
        self.log(f"{method}: the same decoding as {twin} (equal settings, or neither fuses); its texts reused")
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
        singles = [{r["id"]: r["letter_logits"] for r in read_results(self.path(f"single:{m.name}"))}
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
                for s, member_ids, size, member in zip(singles, ids, sizes, self.members):
                    full = torch.full((len(chunk), size), -1.0e4)  # probability exactly 0 in fp32
                    full[:, [g[0] for g in member_ids]] = torch.tensor([s[i] for i in chunk])
                    full = full.to(member.device)
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
        answers = {v: {r["id"]: r["answer"] for r in read_results(self.path(v))} for v in voters}
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
        rows = [r for r in read_results(self.path(method)) if r["id"] in wanted]
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


def read_results(path: Path) -> list[dict]:
    return read_jsonl(path) if path.exists() else []
