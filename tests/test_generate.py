"""`deepen generate`: JSON lines in and out, bad input, interruption and --resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.jobs.files import InputError, finished_ids, read_requests
from runtime.jobs.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the cat", "a dog", "my friend", "the model", "this system", "café", "日本", "code"]


def write_prompts(path: Path, n: int):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]} sees",
                                "max_new_tokens": 6 + i % 7, "topic": i}) + "\n")


def deepen(home: Path, *args, **kw):
    env = {**os.environ, "DEEPEN_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def records(path: Path) -> dict:
    return {r["id"]: r for r in read_jsonl(path)}


def test_malformed_lines_are_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n\n{"id": 2, "prompt": "b"\n{"id": 3}\n{"id": 1, "prompt": "c"}\n')
    with pytest.raises(InputError, match=r"in.jsonl:3: not valid JSON"):
        read_requests(path)
    warnings = []
    ok = read_requests(path, skip_bad=True, warn=warnings.append)
    assert [r.id for r in ok] == [1]
    assert any(":4: field 'prompt'" in w for w in warnings)
    assert any(":5: duplicate id 1 (first on line 1)" in w for w in warnings)


def test_torn_last_line_is_cut_on_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "completion": "x"}\n{"id": "b", "compl')
    assert finished_ids(out) == {"a"}
    assert out.read_text() == '{"id": "a", "completion": "x"}\n'


def test_resume_reads_texts_with_unicode_line_separators(tmp_path):
    """json.dumps(ensure_ascii=False) leaves U+2028, U+0085 and U+001C-like separators raw in a
    line; they are not line ends (a real TriviaQA run generated one)."""
    from runtime.evaluation.run import read_results as _read
    from runtime.jobs.files import ResultWriter
    out = tmp_path / "out.jsonl"
    texts = ["a\u2028b", "c\x85d", "e\u2029f", "g\x1ch", "plain"]
    writer = ResultWriter(out, append=False)
    for i, text in enumerate(texts):
        writer.write({"id": i, "completion": text})
    writer.close()
    assert finished_ids(out) == set(range(len(texts)))
    assert [r["completion"] for r in _read(out)] == texts


def test_cli_stops_on_bad_line_before_any_work(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": 5}\n')
    proc = deepen(tmp_path, "generate", "--config", "configs/tiny.toml", "--input", str(path),
                  "--output", str(tmp_path / "out.jsonl"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1] == f"error: {path}:2: field 'prompt' must be a non-empty string"
    assert not (tmp_path / "out.jsonl").exists()


def test_interrupted_job_resumes_to_the_same_output(tiny, tmp_path):
    prompts = tmp_path / "in.jsonl"
    write_prompts(prompts, 12)
    common = ["generate", "--config", "configs/tiny.toml", "--input", str(prompts), "--batch", "3"]
    full = tmp_path / "full.jsonl"
    proc = deepen(tiny.home, *common, "--output", str(full))   # members and anchors prepared already
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    want = records(full)
    assert len(want) == 12 and want["p5"]["topic"] == 5

    part = tmp_path / "part.jsonl"
    proc = deepen(tiny.home, *common, "--output", str(part))
    deadline = time.time() + 240
    while time.time() < deadline and (not part.exists() or part.read_text().count('\n') < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a crash: no chance to clean up
    proc.communicate(timeout=60)
    done = part.read_text().count('\n')
    assert 5 <= done < 12, "the job was not interrupted mid-way"

    proc = deepen(tiny.home, *common, "--output", str(part))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume" in err  # never silently overwrites finished work
    proc = deepen(tiny.home, *common, "--output", str(part), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    lines = read_jsonl(part)
    assert len(lines) == 12 and len({r["id"] for r in lines}) == 12
    assert records(part) == want


@pytest.mark.parametrize("typed,want", [
    ("。", "。"), ("é", "é"), ("🤖", "🤖"), ("\n\n", "\n\n"), ("\\n", "\n"), ("\\n\\n", "\n\n"),
    ("\\t", "\t"), ("a\\\\nb", "a\\nb"), ("\\u3002", "。"), ("Answer:", "Answer:"), ("naïve\\n", "naïve\n"),
])
def test_stop_strings_keep_unicode_and_read_shell_escapes(typed, want):
    from runtime.engine.stops import parse_stop
    assert parse_stop(typed) == want


def test_stop_cuts_at_the_first_of_several():
    from runtime.engine.stops import completes_stop
    assert completes_stop("a, b。c", ("。", ",")) == "a"
    assert completes_stop("abc", ("x",)) is None


def test_a_non_ascii_stop_string_from_the_command_line_stops_the_completion(tiny, tmp_path):
    """`--stop é` (or any character the completion holds) reaches the engine as itself: the
    completion is the unstopped one cut right before it."""
    from runtime.api import Ensemble
    prompts = [WORDS[i % 8] + " " + WORDS[(i * 5) % 8] for i in range(8)]
    free = Ensemble(ROOT / "configs" / "tiny.toml", home=tiny.home).generate(prompts, max_new_tokens=16)
    char = next((c for r in free for c in r["completion"] if ord(c) > 127), None)
    assert char is not None, "no completion holds a non-ASCII character"
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p, "max_new_tokens": 16}) + "\n"
                           for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    proc = deepen(tiny.home, "generate", "--config", "configs/tiny.toml", "--input", str(inp), "--output",
                  str(out), "--stop", char)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    got = records(out)
    for i, want in enumerate(free):
        if char in want["completion"]:
            assert got[i]["finish_reason"] == "stop"
            assert got[i]["completion"] == want["completion"][:want["completion"].index(char)]
        else:
            assert got[i]["completion"] == want["completion"]


def test_progress_in_a_log_is_plain_periodic_lines():
    import io
    from runtime.jobs.progress import Progress
    log = io.StringIO()  # not a terminal
    with Progress(4, "triviaqa test", "questions", stream=log, every=0) as bar:
        for _ in range(4):
            bar.update(1, "2.0 tok/s")
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 5  # one per update (every=0) and the last
    assert lines[0].startswith("triviaqa test: 1/4 questions (25%)") and lines[-1].startswith("triviaqa test: 4/4")
    assert lines[-1].endswith("2.0 tok/s")
