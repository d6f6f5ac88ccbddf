"""Benchmark data and the paper's prompts (ALGORITHM.md section 8), as far as the core needs
them: open-domain QA (TriviaQA, NQ) few-shot prompts for measurements on real text."""
from __future__ import annotations

import json
import os
from pathlib import Path

QA_HEADER = "Answer this questions:\n"


def data_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "benchmarks"
    return Path(os.environ.get("DEEPEN_DATA_DIR", default)).resolve()


def read_jsonl(path: Path, numbered: bool = False) -> list:
    """The objects of a JSON-lines file (blank lines skipped); `numbered`: (line number, object)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON: {e.msg}") from None
            rows.append((number, obj) if numbered else obj)
    return rows


def qa_prompt(question: str, demos: list[dict]) -> str:
    shots = "".join(f"Question:{d['question']}\nAnswer:{d['answer']}\n" for d in demos)
    return f"{QA_HEADER}{shots}Question:{question}\nAnswer:"


def qa_prompts(task: str = "triviaqa", split: str = "dev", limit: int = 20) -> list[str]:
    folder = data_dir() / task
    demos = read_jsonl(folder / "demos.jsonl")
    return [qa_prompt(q["question"], demos) for q in read_jsonl(folder / f"{split}.jsonl")[:limit]]
