"""The GPU path: skipped without CUDA; `scripts/device-check.sh` runs these on a GPU machine."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.engine.engine import Engine
from runtime.engine.sequence import Request
from runtime.jobs.files import read_jsonl
from runtime.members.ensemble import load_members, make_fuser

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sees", "a dog likes the", "def f(x):\n    return", "café naïve über", "日本語 🤖 x",
           "my friend reads a book", "1, 2, 3,", "the model builds the answer", "  spaces  "]


def decode(cfg, home, mode, device, dtype="float32", batch=4):
    cfg = dataclasses.replace(cfg, members=tuple(dataclasses.replace(m, dtype=dtype) for m in cfg.members),
                              # fp32 rows of P: the GPU's and the CPU's bf16 products round differently
                              anchors=dataclasses.replace(cfg.anchors, row_product="fp32"))
    members = load_members(cfg, home=home, log=lambda m: None, device=device)
    from runtime.members.ensemble import anchors_entry
    fuser = make_fuser(cfg, members, anchors_entry(cfg, members, home, progress=False), mode)
    engine = Engine(members, fuser, batch)
    results = engine.run([Request(i, p, 12, ("\n\n",)) for i, p in enumerate(PROMPTS)])
    return {r.request.id: r for r in results}, engine, fuser


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_the_engine_on_cuda_equals_it_on_the_cpu(tiny, mode):
    gpu, engine, fuser = decode(tiny.cfg, tiny.home, mode, "cuda")
    cpu, _, _ = decode(tiny.cfg, tiny.home, mode, "cpu")
    assert all(lane.logits.is_cuda and all(k.is_cuda for k in lane.cache.keys) for lane in engine.lanes.values())
    assert all(t.device.type == "cuda" for t in fuser.transfers)
    for i in cpu:
        assert gpu[i].ids == cpu[i].ids, f"prompt {PROMPTS[i]!r}"
        assert gpu[i].finish == cpu[i].finish and gpu[i].fused_steps == cpu[i].fused_steps


def test_bf16_members_decode_on_cuda(tiny):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    got, engine, _ = decode(tiny.cfg, tiny.home, "fast", "cuda", "bfloat16")
    assert sorted(got) == list(range(len(PROMPTS)))
    assert all(r.finish in ("eos", "stop", "length") and r.fused_steps > 0 for r in got.values())
    assert all(lane.logits.dtype == torch.float32 for lane in engine.lanes.values())


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_a_one_rank_nccl_launcher_run_equals_one_process(tiny, tmp_path):
    """World size 1 on one GPU (NCCL needs a GPU per rank): the launcher's run, through the
    cpu:gloo,cuda:nccl world and the exchange, equals `deepen generate` on the same GPU."""
    config = tmp_path / "one.toml"
    config.write_text('[ensemble]\nmain = "tiny-sp"\neta = 0.3\nmode = "fast"\n'
                      '[[members]]\nname = "tiny-sp"\nsource = "tiny:tiny-sp"\n')
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": p, "max_new_tokens": 10}) + "\n" for i, p in enumerate(PROMPTS)))
    env = {**os.environ, "DEEPEN_HOME": str(tiny.home)}
    run = lambda *args: subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # noqa: E731
    proc = run(sys.executable, "-m", "launcher.cli", "anchors", "build", str(config))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run(sys.executable, "-m", "launcher.cli", "generate", "--config", str(config), "--input", str(inp),
               "--output", str(tmp_path / "one.jsonl"), "--device", "cuda:0", "--batch", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = tmp_path / "stats.json"  # the deepspeed launcher, run as a module (its script may be elsewhere)
    proc = run(sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "launcher/run.py", "--config", str(config), "--input", str(inp),
               "--output", str(tmp_path / "launched.jsonl"), "--batch", "3", "--stats", str(stats))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    records = lambda p: {r["id"]: r for r in read_jsonl(p)}  # noqa: E731
    assert records(tmp_path / "launched.jsonl") == records(tmp_path / "one.jsonl")
    assert json.loads(stats.read_text())["fused_rows"] > 0
