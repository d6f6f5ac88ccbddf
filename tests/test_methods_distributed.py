"""UniTE and GaC under the real `deepspeed` launcher (CPU, gloo, the tiny members): one run per
method, each against one process on the same prompts. UniTE: the main member at tp 2 (a rank that
leads nothing), every row sampled with log-probabilities. GaC: three leaders, the batch in two
pipelined micro-batches, gated by an assist (its flags cross to the main leader)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.jobs.files import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
WORDS = ["the cat", "a dog", "my friend", "the model", "café", "日本", "code", "this system"]
RUNS = {
    # method, config it starts from, extra [ensemble] keys, ranks, options of both runs, micro-batches
    "unite": ("configs/tiny-tp.toml", "", 4,
              ["--batch", "3", "--temperature", "0.8", "--seed", "3", "--logprobs", "2"], 1),
    "gac": ("configs/tiny.toml", 'gate = 0.12\ngate_member = "tiny-bpe"\n', 3, ["--batch", "3"], 2),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tiny, tmp_path_factory):
    """The session's tiny home (members built once); each method's config and union maps."""
    configs = tmp_path_factory.mktemp("configs")
    for method, (base, extra, *_rest) in RUNS.items():
        text = (ROOT / base).read_text().replace('mode = "exact"', f'mode = "fast"\nmethod = "{method}"\n{extra}')
        (configs / f"{method}.toml").write_text(text)
        cli(tiny.home, "anchors", "build", str(configs / f"{method}.toml"))
    return tiny.home, configs


def cli(home, *args):
    """A `deepen` command in this process (click's runner): no interpreter start-up per call."""
    from click.testing import CliRunner

    from launcher.cli import main
    result = CliRunner().invoke(main, list(args), env={"DEEPEN_HOME": str(home)}, catch_exceptions=False)
    assert result.exit_code == 0, result.output[-3000:]


def env(home):
    return {**os.environ, "DEEPEN_HOME": str(home), "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("method", sorted(RUNS))
def test_a_method_under_the_launcher_gives_the_single_process_results(home, tmp_path, method):
    """Same completions (and samples and log-probabilities), finish reasons and fused steps; the same
    rows, fused rows, tokens, neglected mass; the bytes the main leader received per row."""
    _, _, ranks, options, micro = RUNS[method]
    home, configs = home
    config = str(configs / f"{method}.toml")
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(7):
            f.write(json.dumps({"id": i, "prompt": f"{WORDS[i % 8]} {WORDS[(i * 5) % 8]} reads",
                                "max_new_tokens": 8 + i % 5}) + "\n")
    single, single_stats = tmp_path / "single.jsonl", tmp_path / "single-stats.json"
    cli(home, "generate", "--config", config, "--input", str(inp), "--output", str(single), "--stats",
        str(single_stats), *options)
    multi, stats = tmp_path / "multi.jsonl", tmp_path / "stats.json"
    batch = ["--batch", str(3 * micro)] + options[2:]
    proc = subprocess.Popen([DEEPSPEED, "--num_accelerators", str(ranks), "--master_port", str(free_port()),
                             "launcher/run.py", "--config", config, "--input", str(inp), "--output", str(multi),
                             "--stats", str(stats), "--micro-batches", str(micro), *batch],
                            cwd=ROOT, env=env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    got, want = ({r["id"]: r for r in read_jsonl(p)} for p in (multi, single))
    assert {i: {k: v for k, v in r.items() if k != "logprobs"} for i, r in got.items()} == \
        {i: {k: v for k, v in r.items() if k != "logprobs"} for i, r in want.items()}
    if method == "unite":   # the main member's forward pass at tp 2 sums its shards' halves in another order
        for i, r in want.items():
            assert [s["token"] for s in got[i]["logprobs"]] == [s["token"] for s in r["logprobs"]]
            assert [s["logprob"] for s in got[i]["logprobs"]] == pytest.approx([s["logprob"] for s in r["logprobs"]],
                                                                              abs=1e-4)
    got_s, want_s = json.loads(stats.read_text()), json.loads(single_stats.read_text())
    assert got_s["world_size"] == ranks
    for key in ("rows", "fused_rows", "tokens", "partial_rows") + (("steps",) if micro == 1 else ()):
        assert got_s[key] == want_s[key], key
    assert 0 < got_s["fused_rows"] < got_s["rows"] if method == "gac" else got_s["fused_rows"] == got_s["rows"]
    if method == "gac":
        assert got_s["undecided_rows"] == want_s["undecided_rows"]
        assert got_s["neglected_mass_sum"] == pytest.approx(want_s["neglected_mass_sum"], rel=1e-5, abs=1e-7)
    # bytes per fused row the main leader received: UniTE every top-k entry (3 members x k=10 int64)
    # and every member's probabilities over the union (3 x (30 + 1) fp32); GaC every member's
    # top probabilities as union entries (3 x (2 x 256 + 1 + 1) fp32)
    per_row = {"unite": 3 * 10 * 8 + 3 * 31 * 4, "gac": 3 * (2 * 256 + 2) * 4}[method]
    assert got_s["gathered_bytes_per_row_step"] == per_row
    print(f"\n{method}: {got_s['gathered_bytes_per_row_step']} bytes per fused row to the main leader")
