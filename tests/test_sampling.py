"""Sampling from the fused distribution and log-probabilities (engine/sampling.py), tiny members."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.engine.sampling import Sampler, SamplingParams, uniform
from runtime.jobs.files import InputError, read_jsonl, read_requests

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the cat sees", "日本 code", "a dog likes the", "my friend and", "café au", "this system"]


@pytest.fixture(scope="module", params=["fast", "exact"])
def ensemble(tiny, request):
    from runtime.api import Ensemble
    return Ensemble(ROOT / "configs" / "tiny.toml", home=tiny.home, mode=request.param)


def test_temperature_zero_is_greedy_and_its_logprobs_name_the_fused_argmax(ensemble):
    """temperature 0 with log-probabilities: the same tokens as plain greedy decoding; one record
    per token; the chosen token is the fused distribution's most likely one (top[0]), and a
    log-probability is <= 0 and the top list is sorted."""
    greedy = ensemble.generate(PROMPTS, max_new_tokens=6, batch=4)
    scored = ensemble.generate(PROMPTS, max_new_tokens=6, batch=4, temperature=0.0, logprobs=3)
    assert [g["completion"] for g in greedy] == [s["completion"] for s in scored]
    assert all("logprobs" not in g for g in greedy)
    for s in scored:
        assert len(s["logprobs"]) == s["tokens"]
        for step in s["logprobs"]:
            assert step["token"] == step["top"][0]["token"] and len(step["top"]) == 3
            assert step["logprob"] == pytest.approx(step["top"][0]["logprob"]) and step["logprob"] <= 0
            assert step["main_logprob"] <= 0
            values = [t["logprob"] for t in step["top"]]
            assert values == sorted(values, reverse=True)
    fused = [step["logprob"] != pytest.approx(step["main_logprob"], abs=1e-4)
             for s in scored for step in s["logprobs"]]
    assert any(fused), "fusion moved no log-probability: the fused distribution was not reported"


def test_a_seed_gives_the_same_sample_whatever_the_batch(ensemble):
    """The same seeds at batch 1 and 8, and with other prompts around them; other seeds differ."""
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=50, top_p=0.95)
    alone = ensemble.generate(PROMPTS[:3], batch=1, **kw)
    crowd = ensemble.generate([{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:3])] +
                              [{"id": f"x{i}", "prompt": p} for i, p in enumerate(PROMPTS[3:])], batch=8, **kw)
    assert [a["completion"] for a in alone] == [c["completion"] for c in crowd[:3]]
    other = ensemble.generate(PROMPTS[:3], batch=8, job_seed=1, **kw)
    greedy = ensemble.generate(PROMPTS[:3], batch=8, max_new_tokens=8)
    assert [a["completion"] for a in alone] != [o["completion"] for o in other]
    assert [a["completion"] for a in alone] != [g["completion"] for g in greedy]


def test_n_samples_have_their_own_ids_and_seeds(ensemble):
    out = ensemble.generate(["the cat sees"], max_new_tokens=8, temperature=1.0, n=3, seed=11)
    assert [r["id"] for r in out] == ["0#0", "0#1", "0#2"] and [r["sample"] for r in out] == [0, 1, 2]
    assert len({r["completion"] for r in out}) > 1
    again = ensemble.generate(["the cat sees"], max_new_tokens=8, temperature=1.0, n=3, seed=11, batch=1)
    assert [r["completion"] for r in out] == [r["completion"] for r in again]


def test_draws_follow_the_distribution_after_temperature_top_k_and_top_p():
    """Inverse-CDF draws over many seeds: the frequencies of a 5-token distribution at
    temperature 2, within 4 standard errors; top_k and top_p keep only the tokens they name."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    draws = 6000

    def frequencies(params):
        sampler = Sampler([params] * draws, list(range(draws)), [3] * draws)
        tokens, _ = sampler(logits.expand(draws, -1), logits.expand(draws, -1), torch.zeros(draws, dtype=torch.long))
        return torch.bincount(tokens, minlength=5).double() / draws

    want = torch.softmax(logits[0].double() / 2, -1)
    got = frequencies(SamplingParams(temperature=2.0))
    assert ((got - want).abs() <= 4 * (want * (1 - want) / draws).sqrt()).all(), (got, want)
    assert frequencies(SamplingParams(temperature=2.0, top_k=2))[2:].sum() == 0
    p = torch.softmax(logits[0] / 2, -1)                       # 0.40, 0.24, 0.19, 0.15, 0.09
    nucleus = frequencies(SamplingParams(temperature=2.0, top_p=float(p[0] + p[1]) - 0.01))
    assert nucleus[2:].sum() == 0 and nucleus[:2].min() > 0
    assert all(0 <= uniform(s, t) < 1 for s in range(20) for t in range(20))


def test_sampling_fields_are_checked_naming_field_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "prompt": "a", "temperature": 0.7, "n": 2, "seed": 3}\n'
                    '{"id": 2, "prompt": "b", "top_p": 1.5}\n')
    with pytest.raises(InputError, match=r"in.jsonl:2: field 'top_p' must be in \(0, 1\]"):
        read_requests(path)
    path.write_text('{"id": 1, "prompt": "a", "temperature": 0.7, "n": 2, "seed": 3}\n'
                    '{"id": 2, "prompt": "b", "n": 2}\n')
    with pytest.raises(InputError, match="in.jsonl:2: field 'n' > 1 needs temperature > 0"):
        read_requests(path)
    path.write_text('{"id": 1, "prompt": "a", "temperature": 0.7, "n": 2, "seed": 3}\n')
    ids = [(r.id, r.sampling.seed) for r in read_requests(path)]
    assert [i for i, _ in ids] == ["1#0", "1#1"] and ids[0][1] != ids[1][1]


def test_cli_samples_resume_to_the_same_lines(tiny, tmp_path):
    """`deepen generate --temperature --n --logprobs`: a job cut short and resumed writes the
    lines a full run writes."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:4])))
    env = {**os.environ, "DEEPEN_HOME": str(tiny.home)}

    def run(out, *extra):
        subprocess.run([sys.executable, "-m", "launcher.cli", "generate", "--config", "configs/tiny.toml",
                        "--input", str(inp), "--output", str(out), "--max-new-tokens", "6", "--batch", "3",
                        "--temperature", "0.9", "--top-p", "0.9", "--samples", "2", "--seed", "5", "--logprobs", "1",
                        *extra], cwd=ROOT, env=env, check=True, capture_output=True)

    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    run(full)
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 8
    cut.write_text("".join(lines[:3]) + lines[3][:20])   # a torn last line, as a kill leaves it
    run(cut, "--resume")
    by_id = lambda path: {r["id"]: r for r in read_jsonl(path)}  # noqa: E731
    got, want = by_id(cut), by_id(full)
    strip = lambda r: {k: v for k, v in r.items() if k != "logprobs"}  # noqa: E731
    assert {i: strip(r) for i, r in got.items()} == {i: strip(r) for i, r in want.items()}
    for i in want:   # other rows in the batch move the logits in their last bits only
        assert [s["token"] for s in got[i]["logprobs"]] == [s["token"] for s in want[i]["logprobs"]]
        assert [s["logprob"] for s in got[i]["logprobs"]] == pytest.approx([s["logprob"] for s in want[i]["logprobs"]], abs=1e-4)
    assert all(math.isfinite(s["logprob"]) for r in read_jsonl(full) for s in r["logprobs"])


def test_cli_names_a_bad_sampling_option(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "a"}\n')
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "generate", "--config", "configs/tiny.toml",
                           "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), "--top-p", "0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--top-p must be in (0, 1]" in proc.stderr
