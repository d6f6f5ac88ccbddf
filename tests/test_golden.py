"""Conformance with the authors' reference implementation (../shared/golden, README there)."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime.deepen.fusion import FastSettings, Fuser
from runtime.deepen.summary import aggregate
from runtime.deepen.relative import DenseTransfer, LowRankTransfer, dense_transfer_matrix
from runtime.deepen.search import SearchSettings, candidate_margin, search_exact

GOLDEN_DIR = Path(os.environ.get("DEEPEN_GOLDEN_DIR",
                                 Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"))


def golden_cases():
    pairs = sorted(GOLDEN_DIR.glob("*.json"))
    assert pairs, f"no golden cases in {GOLDEN_DIR}"
    for meta_path in pairs:
        tensors = load_file(str(meta_path.with_suffix(".safetensors")))
        for case in json.loads(meta_path.read_text())["cases"]:
            yield pytest.param(case, tensors, id=f"{meta_path.stem}:{case['name']}")


CASES = list(golden_cases())


def transfer_for(case, tensors, i, kind):
    name = case["name"]
    emb, anchors = tensors[f"{name}.embedding.{i}"], tensors[f"{name}.anchors.{i}"]
    if kind == "dense":
        return DenseTransfer(dense_transfer_matrix(emb, anchors, case["temperature"]))
    return LowRankTransfer.build(emb, anchors, case["temperature"], cache_rows=8)


@pytest.mark.parametrize("case,tensors", CASES)
def test_transfer_matrices(case, tensors):
    for i in range(len(case["vocab_sizes"])):
        key = f"{case['name']}.transfer.{i}"
        dense = transfer_for(case, tensors, i, "dense").matrix
        assert torch.allclose(dense.sum(-1), torch.ones(dense.shape[0]), atol=1e-5)
        if key in tensors:
            assert (dense - tensors[key]).abs().max() <= 1e-5
        low = transfer_for(case, tensors, i, "lowrank")
        ids = torch.randperm(dense.shape[0], generator=torch.Generator().manual_seed(i))[:20]
        assert (low.rows(ids) - dense[ids]).abs().max() <= 1e-5
        assert (low.rows(ids[:5]) - dense[ids[:5]]).abs().max() <= 1e-5  # through the cache
        assert (low.mean_row - dense.mean(0)).abs().max() <= 1e-6


def run_steps(case, tensors, kind, mode):
    name, n = case["name"], len(case["vocab_sizes"])
    fuser = Fuser([transfer_for(case, tensors, i, kind) for i in range(n)], case["weights"],
                  SearchSettings(eta=case["learning_rate"], steps=case["steps"]), mode=mode,
                  fast=FastSettings(mass_epsilon=1e-6, max_support=512),
                  eos_token_id=case["eos_token_id"])
    for s in range(case["decode_steps"]):
        logits = [tensors[f"{name}.step{s}.logits.{i}"] for i in range(n)]
        yield s, fuser.step(logits), fuser


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
@pytest.mark.parametrize("case,tensors", CASES)
def test_exact_mode_reproduces_reference(case, tensors, kind):
    name = case["name"]
    skipped = 0
    for s, result, fuser in run_steps(case, tensors, kind, "exact"):
        want_token = tensors[f"{name}.step{s}.token"]
        assert torch.equal(result.tokens, want_token), f"step {s}"
        assert torch.allclose(result.final_logits, tensors[f"{name}.step{s}.final_logits"],
                              rtol=1e-4, atol=1e-3), f"step {s}"
        if result.fused.all():
            want_r = tensors[f"{name}.step{s}.aggregated_relative"]
            assert torch.allclose(result.relative, want_r, rtol=1e-4, atol=1e-3), f"step {s}"
        else:  # the EOS rule: main's own argmax is EOS, logits returned unchanged
            skipped += 1
            assert int(want_token) == case["eos_token_id"]
            main = tensors[f"{name}.step{s}.logits.0"]
            assert torch.equal(result.final_logits, main)
            r = aggregate([fuser.member_relative(i, tensors[f"{name}.step{s}.logits.{i}"])[0]
                           for i in range(len(case["vocab_sizes"]))], fuser.weights)
            assert torch.allclose(r, tensors[f"{name}.step{s}.aggregated_relative"],
                                  rtol=1e-4, atol=1e-3)
    assert skipped >= 1  # every golden case has an EOS step: the rule must have been exercised


@pytest.mark.parametrize("case,tensors", CASES)
def test_fast_mode_chooses_reference_tokens(case, tensors):
    for s, result, _ in run_steps(case, tensors, "lowrank", "fast"):
        assert torch.equal(result.tokens, tensors[f"{case['name']}.step{s}.token"]), f"step {s}"


def test_eta_zero_returns_main_argmax():
    case, tensors = CASES[0].values
    main = tensors[f"{case['name']}.step0.logits.0"]
    n = len(case["vocab_sizes"])
    fuser = Fuser([transfer_for(case, tensors, i, "dense") for i in range(n)], case["weights"],
                  SearchSettings(eta=0.0), mode="exact", eos_token_id=0)
    result = fuser.step([tensors[f"{case['name']}.step0.logits.{i}"] for i in range(n)])
    assert not result.fused.any() and torch.equal(result.tokens, main.argmax(-1))


def test_candidate_margin_bounds_the_exact_search():
    """No token that starts further than the margin below the top may end as the argmax."""
    gen = torch.Generator().manual_seed(7)
    for eta in (0.15, 0.5, 1.0):
        settings = SearchSettings(eta=eta, steps=10)
        margin = candidate_margin(settings)
        for _ in range(20):
            vocab, anchors = 60, 30
            emb = torch.randn(vocab, 8, generator=gen)
            transfer = DenseTransfer(dense_transfer_matrix(emb, torch.arange(anchors)))
            main = torch.randn(1, vocab, generator=gen) * 2
            target = torch.softmax(torch.randn(1, anchors, generator=gen) * 3, -1)
            final = search_exact(main, target, transfer, settings)
            start_gap = main.max() - main[0, final.argmax()]
            assert start_gap <= margin
            moved = (final - main).abs().max()
            assert moved <= margin / 2 + main.abs().max() * 0.01 * eta * 10


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_a_decided_row_is_not_fused_and_its_token_is_what_the_search_gives(mode):
    """Rows whose top logit leads by more than candidate_margin: fast mode skips them (no
    relative vector, no search) and their token is the one the full search returns, in fast mode
    and in the authors' exact search, on random problems with gaps on both sides of the margin."""
    torch.manual_seed(3)
    vocab, anchors = 300, 120
    transfers = [LowRankTransfer.build(torch.randn(vocab, 16), torch.arange(0, vocab, 3)[:anchors], clusters=8),
                 LowRankTransfer.build(torch.randn(vocab, 16), torch.arange(1, vocab, 3)[:anchors], clusters=8)]
    settings = SearchSettings(eta=0.5, steps=5)
    margin = candidate_margin(settings)
    main = torch.randn(64, vocab) * 2
    lead = torch.linspace(0.0, 2 * margin, 64)  # the top logit's lead over the second
    top = main.argmax(-1)
    second = main.scatter(1, top[:, None], float("-inf")).amax(-1)
    main[torch.arange(64), top] = second + lead
    logits = [main, torch.randn(64, vocab) * 2]
    skipping = Fuser(transfers, [0.5, 0.5], settings, "fast", FastSettings(1e-3, 64, skip_decided=True))
    full = Fuser(transfers, [0.5, 0.5], settings, "fast", FastSettings(1e-3, 64, skip_decided=False))
    if mode == "exact":
        full = Fuser([DenseTransfer(dense_transfer_matrix(t.unit_emb, t.anchor_ids)) for t in transfers],
                     [0.5, 0.5], settings, "exact")
    a, b = skipping.step(logits), full.step(logits)
    decided = lead > margin
    assert decided.any() and (~decided).any()
    assert torch.equal(a.fused, ~decided) and bool(b.fused.all())
    assert torch.equal(a.tokens[decided], b.tokens[decided])
    assert torch.equal(a.tokens[decided], top[decided])
    assert int(skipping.decided_rows) == int(decided.sum())


def test_rows_of_p_from_a_bf16_product_stay_within_bf16_rounding():
    """fast mode's bf16 product (fp32 accumulation, scale, normaliser and exp): a cosine of unit
    vectors moves by at most 3 bf16 roundings (both inputs and the output: 3 x 2^-9), so every
    log P[t, j] moves by at most that times temperature / ||R_t||; the relative vectors of a
    member's distribution within the same factor in L1; back to fp32 gives the fp32 rows again."""
    torch.manual_seed(5)
    emb = torch.randn(2000, 64)
    transfer = LowRankTransfer.build(emb, torch.arange(0, 2000, 2), clusters=8)
    ids = torch.arange(0, 2000, 7)
    exact = transfer.compute_rows(ids)
    low = transfer.use_product(torch.bfloat16).compute_rows(ids)
    bound = 3 * 2 ** -9 * transfer.temperature * transfer.inv_norm[ids]
    assert ((low.log() - exact.log()).abs().amax(-1) <= bound).all()
    assert (low.log() - exact.log()).abs().max() > 0   # it is a different product
    probs = torch.softmax(torch.randn(4, 2000) * 3, -1)[:, ids]
    r, r_low = probs @ exact, probs @ low
    assert ((r - r_low).abs().sum(-1) / r.abs().sum(-1)).max() <= bound.max().exp() - 1   # entries >= 0
    assert torch.equal(transfer.use_product(torch.float32).compute_rows(ids), exact)


def test_agreeing_members_skip_fusion_only_with_skip_agreeing():
    """skip_agreeing: a row where both members' argmax is the same anchor is not fused and
    takes the main model's argmax; a row where they differ, or the argmax is no anchor, is fused."""
    torch.manual_seed(4)
    vocab, anchors = 300, 120
    transfers = [LowRankTransfer.build(torch.randn(vocab, 16), torch.arange(0, vocab, 2)[:anchors], clusters=8),
                 LowRankTransfer.build(torch.randn(vocab, 16), torch.arange(1, vocab, 2)[:anchors], clusters=8)]
    main, other = torch.randn(6, vocab), torch.randn(6, vocab)
    # column j is main id 2j and assist id 2j+1; rows 0-2 agree on columns 5, 7, 9
    for row, column in enumerate((5, 7, 9)):
        main[row, 2 * column] = other[row, 2 * column + 1] = 20.0
    main[3, 2 * 11] = other[3, 2 * 12 + 1] = 20.0   # different anchors
    main[4, 1] = 20.0                               # the main's argmax is no anchor (odd id)
    other[4, 1 + 1] = 20.0                          # the assist's argmax is no anchor (even id)
    settings = SearchSettings(eta=0.3, steps=5)
    agreeing = Fuser(transfers, [0.5, 0.5], settings, "fast", FastSettings(1e-3, 64, False, skip_agreeing=True))
    full = Fuser(transfers, [0.5, 0.5], settings, "fast", FastSettings(1e-3, 64, False))
    a, b = agreeing.step([main, other]), full.step([main, other])
    assert a.fused.tolist() == [False, False, False, True, True, True]
    assert bool(b.fused.all()) and int(agreeing.agreeing_rows) == 3 and int(full.agreeing_rows) == 0
    assert a.tokens[:3].tolist() == [10, 14, 18]
    assert torch.equal(a.tokens[3:], b.tokens[3:])
