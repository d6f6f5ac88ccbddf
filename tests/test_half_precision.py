"""Half-precision members: the fusion math stays fp32 whatever the members' dtype."""
import dataclasses
from pathlib import Path

import pytest
import torch

from runtime.engine.engine import Engine
from runtime.engine.sequence import Request
from runtime.evaluation.run import prefill
from runtime.members.ensemble import load_members, make_fuser

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sees", "a dog likes the", "def f(x):\n    return", "café naïve über", "日本語 🤖 x",
           "my friend reads a book", "1, 2, 3,", "the model builds the answer"]


def in_dtype(cfg, dtype: str):
    return dataclasses.replace(cfg, members=tuple(dataclasses.replace(m, dtype=dtype) for m in cfg.members))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_the_fused_step_on_bf16_logits_equals_it_on_their_fp32_values(tiny, mode):
    """Given the same logits, the fused step is the same whether they arrive in bf16 (a bf16
    member's output) or as fp32 copies: the relative transform and the search run in fp32."""
    cfg, members, entry, home = tiny
    half = load_members(in_dtype(cfg, "bfloat16"), home=home, log=lambda m: None)
    assert all(next(m.model.parameters()).dtype == torch.bfloat16 for m in half)
    # a bf16 model's logits are bf16 numbers: the lane's fp32 copy of them casts back exactly
    logits = [prefill(m, PROMPTS[:4]).to(torch.bfloat16) for m in half]
    fuser = make_fuser(cfg, members, entry, mode)
    a = fuser.step(logits)
    b = fuser.step([x.float() for x in logits])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.fused, b.fused) and bool(a.fused.all())
    assert torch.equal(a.relative, b.relative)


def test_bf16_members_decode_and_their_agreement_with_fp32_is_reported(tiny, capsys):
    """bf16 members run end to end (prefill, KV cache, fusion); their tokens are compared with
    fp32 members' and the agreement is printed, not asserted: bf16 rounding moves logits."""
    cfg, members, entry, home = tiny
    half = load_members(in_dtype(cfg, "bfloat16"), home=home, log=lambda m: None)
    assert prefill(half[0], PROMPTS[:2]).dtype == torch.float32  # lanes keep fp32 logits
    requests = [Request(i, p, 10) for i, p in enumerate(PROMPTS)]
    got = {r.request.id: r for r in Engine(half, make_fuser(cfg, half, entry, "fast"), 4).run(requests)}
    want = {r.request.id: r for r in Engine(members, make_fuser(cfg, members, entry, "fast"), 4).run(requests)}
    assert sorted(got) == list(range(len(PROMPTS)))
    assert all(r.finish in ("eos", "length") and r.fused_steps > 0 for r in got.values())
    same = sum(a == b for i in got for a, b in zip(got[i].ids, want[i].ids))
    total = sum(min(len(got[i].ids), len(want[i].ids)) for i in got)
    identical = sum(got[i].ids == want[i].ids for i in got)
    with capsys.disabled():
        print(f"\nbf16 vs fp32 tiny members (fast mode): {identical}/{len(PROMPTS)} completions identical, "
              f"{same}/{total} tokens equal position by position")
