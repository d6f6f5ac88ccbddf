"""The Python API (runtime.Ensemble): the README's example, and the same records as the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.jobs.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs(tiny):
    """The README's five lines, with the tiny config (DEEPEN_HOME points at the test members)."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("configs/smol-gemma.toml", "configs/tiny.toml")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DEEPEN_HOME": str(tiny.home)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "the example printed nothing"


def test_generate_returns_the_cli_records_in_input_order(tiny, tmp_path):
    from runtime.api import Ensemble
    prompts = ["the cat sees", "日本 code", "a dog likes the"]
    ensemble = Ensemble(ROOT / "configs" / "tiny.toml", home=tiny.home)
    got = ensemble.generate([{"id": f"q{i}", "prompt": p, "topic": i} for i, p in enumerate(prompts)],
                            max_new_tokens=7, batch=2)
    assert [r["id"] for r in got] == ["q0", "q1", "q2"] and [r["topic"] for r in got] == [0, 1, 2]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p, "topic": i}) + "\n" for i, p in enumerate(prompts)))
    subprocess.run([sys.executable, "-m", "launcher.cli", "generate", "--config", "configs/tiny.toml", "--input",
                    str(inp), "--output", str(out), "--max-new-tokens", "7", "--batch", "2"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "DEEPEN_HOME": str(tiny.home)})
    assert sorted(read_jsonl(out), key=lambda r: r["id"]) == got
    plain = ensemble.generate("the cat sees", max_new_tokens=7)
    assert plain[0]["id"] == 0 and plain[0]["completion"] == got[0]["completion"]


def test_bad_prompts_are_named(tiny):
    from runtime.api import Ensemble
    ensemble = Ensemble(ROOT / "configs" / "tiny.toml", member="tiny-bpe", home=tiny.home)
    with pytest.raises(ValueError, match=r"prompts\[1\]: field 'prompt' must be a non-empty string"):
        ensemble.generate(["ok", ""])
    with pytest.raises(ValueError, match="no member named 'nope'"):
        Ensemble(ROOT / "configs" / "tiny.toml", member="nope", home=tiny.home)
