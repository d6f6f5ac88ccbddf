"""The paper's six benchmarks (ALGORITHM.md section 8): questions, prompts, answer extraction and
scoring. Everything here is a pure function of the data, so it is unit-tested exactly.

A question is a dict from the benchmark's JSONL (see ../shared/data/benchmarks/README.md); a
task turns it into a prompt, reads an answer out of a completion, and scores it against the gold.
"""
from __future__ import annotations

import os
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from ..jobs.files import read_jsonl

QA_HEADER = "Answer this questions:\n"

LETTERS = "ABCD"


def data_dir() -> Path:
    """The benchmarks: ../shared/data/benchmarks beside the checkout, or $DEEPEN_DATA_DIR."""
    default = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "benchmarks"
    return Path(os.environ.get("DEEPEN_DATA_DIR", default)).resolve()


@dataclass(frozen=True)
class Task:
    name: str
    kind: str                 # "choice" (letters), "qa" (exact match over aliases), "math" (GSM8K)
    max_new_tokens: int
    stop: tuple[str, ...]
    letters: str = ""         # choice tasks: the option letters
    has_demos: bool = False


TASKS = {
    "mmlu": Task("mmlu", "choice", 1, ("\n",), "ABCD", True),
    "arc_challenge": Task("arc_challenge", "choice", 1, ("\n",), "ABCD"),
    "piqa": Task("piqa", "choice", 1, ("\n",), "AB"),
    "gsm8k": Task("gsm8k", "math", 512, ("\n\n",), has_demos=True),
    "triviaqa": Task("triviaqa", "qa", 10, ("\n",), has_demos=True),
    "nq": Task("nq", "qa", 10, ("\n",), has_demos=True),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
    return TASKS[name]


# ---- questions ---------------------------------------------------------------------------------

def load_questions(task: Task, split: str = "test", data: str | Path | None = None,
                   limit: int = 0, seed: int = 0) -> list[dict]:
    """The questions of a split (or of any JSONL file in the same fields), each with an `index`
    (its line order in the file). `limit` keeps a seeded random sample, in file order: MMLU's
    files are sorted by subject, so the first N would be a handful of subjects."""
    path = Path(data) if data else data_dir() / task.name / f"{split}.jsonl"
    rows = read_jsonl(path, numbered=True)
    for i, (number, row) in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        _check_question(task, row, f"{path}:{number}")
        row["index"] = i
    rows = [row for _, row in rows]
    if limit and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    return rows


def _check_question(task: Task, row: dict, where: str):
    need = ["question", "answer"] + list(task.letters) + (["domain"] if task.name == "mmlu" else [])
    for key in need:
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    if task.kind == "choice":
        gold_letter(task, row)  # raises on an answer that is no option


def load_demos(task: Task) -> list[dict]:
    return read_jsonl(data_dir() / task.name / "demos.jsonl") if task.has_demos else []


# ---- prompts -----------------------------------------------------------------------------------

def _options(task: Task, q: dict) -> str:
    return "".join(f"{letter}. {q[letter]}\n" for letter in task.letters)


def _mmlu_block(q: dict) -> str:
    return (f"There is a single choice question about {q['domain']}. Answer the question by "
            f"replying A, B, C or D.\nQuestion: {q['question']}\n{_options(TASKS['mmlu'], q)}Answer:")


def build_prompt(task: Task, q: dict, demos: list[dict]) -> str:
    if task.name == "mmlu":
        shots = [d for d in demos if d["domain"] == q["domain"]][:5]
        return "".join(f"{_mmlu_block(d)} {d['answer']}\n" for d in shots) + _mmlu_block(q)
    if task.name == "arc_challenge":
        return f"Question: {q['question']}\n{_options(task, q)}Answer:"
    if task.name == "piqa":
        return f"{q['question']}\n{_options(task, q)}Answer:"
    if task.name == "gsm8k":
        block = "Question: {}\nLet's think step by step\nAnswer:"
        shots = "".join(f"{block.format(d['question'])} {d['answer']}\n\n" for d in demos)
        return shots + block.format(q["question"])
    shots = "".join(f"Question:{d['question']}\nAnswer:{d['answer']}\n" for d in demos)
    return f"{QA_HEADER}{shots}Question:{q['question']}\nAnswer:"


def qa_prompts(task: str = "triviaqa", split: str = "dev", limit: int = 20) -> list[str]:
    """The first `limit` questions of a QA split as the paper's 5-shot prompts (bench and
    measurement prompts: long enough that prefill and the cache matter)."""
    t = get_task(task)
    demos = load_demos(t)
    return [build_prompt(t, q, demos) for q in read_jsonl(data_dir() / task / f"{split}.jsonl")[:limit]]


# ---- gold and extraction -----------------------------------------------------------------------

def gold_letter(task: Task, q: dict) -> str:
    """ARC's answers are sometimes digits (1-4, the original labels): they name A-D."""
    answer = str(q["answer"]).strip()
    if answer.isdigit() and 1 <= int(answer) <= len(task.letters):
        answer = task.letters[int(answer) - 1]
    if answer not in task.letters:
        raise ValueError(f"answer {q['answer']!r} is not one of the options {', '.join(task.letters)}")
    return answer


def parse_letter(completion: str, letters: str = LETTERS) -> str | None:
    """The option letter a free-form completion answers with: `B`, ` B.`, `(B)`, `B) ...`,
    `Answer: B`. None when it does not start with one."""
    text = completion.strip()
    text = re.sub(r"^(the )?answer( is)?\s*[:：]?\s*", "", text, flags=re.IGNORECASE)
    m = re.match(r"^\(?([A-Z])(?:[).:,\s]|$)", text)
    if m and m.group(1) in letters:
        return m.group(1)
    return None


_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"


def _number(text: str) -> str | None:
    """'1,000' -> '1000', '$18' -> '18', '4.50' -> '4.5', '7.' -> '7'."""
    digits = re.sub(r"[\s$,]", "", text).rstrip(".")
    try:
        value = float(digits)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_gsm8k(text: str) -> str | None:
    """The number after the last "The answer is" (any case), as a canonical string."""
    found = re.findall(r"the answer is\s*[:：]?\s*(" + _NUMBER + ")", text, flags=re.IGNORECASE)
    return _number(found[-1]) if found else None


def normalize_answer(text: str) -> str:
    """SQuAD: lower-case, drop punctuation and the articles a/an/the, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def gold_aliases(q: dict) -> list[str]:
    answer = q["answer"]
    return [answer] if isinstance(answer, str) else list(answer)


def exact_match(prediction: str, aliases: list[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in aliases)


def token_f1(a: str, b: str) -> float:
    """SQuAD token F1 between two answers (MBR's agreement)."""
    x, y = normalize_answer(a).split(), normalize_answer(b).split()
    common = sum(min(x.count(t), y.count(t)) for t in set(x))
    if not x or not y or common == 0:
        return float(x == y)
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)


# ---- scoring -----------------------------------------------------------------------------------

def gold(task: Task, q: dict):
    if task.kind == "choice":
        return gold_letter(task, q)
    if task.kind == "math":
        return extract_gsm8k(q["answer"])
    return gold_aliases(q)


def extract(task: Task, completion: str) -> str | None:
    """The answer a completion gives, in the form `score` compares."""
    if task.kind == "choice":
        return parse_letter(completion, task.letters)
    if task.kind == "math":
        return extract_gsm8k(completion)
    return completion.strip()


def score(task: Task, answer: str | None, gold_value) -> bool:
    if answer is None:
        return False
    if task.kind == "qa":
        return exact_match(answer, gold_value)
    return answer == gold_value
