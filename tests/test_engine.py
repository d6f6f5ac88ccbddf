"""The engine against the reference loop, and the lanes' token/KV-cache invariants."""
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from runtime.deepen.protocol import LOCAL, LocalExchange
from runtime.engine.engine import Engine
from runtime.engine.pipeline import Pipeline, make_engine
from runtime.engine.sequence import Request
from runtime.members.ensemble import make_fuser, single_fuser
from runtime.engine.lane import Lane
from runtime.engine.reference import reference_decode

from helpers.greedy import TRICKY_PROMPTS, hf_greedy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sees", "a dog likes the", "def f(x):\n    return", "café naïve über",
           "my friend reads a book", "Question: what is 2+2?\nAnswer:", "日本語 🤖 x", "  spaces  ",
           "the model builds the answer in the morning", "1, 2, 3,"]


_REFERENCE: dict = {}


def reference(tiny, mode: str, stop: tuple):
    """The reference loop's decoding of PROMPTS (12 tokens), once per mode for the whole module:
    it is the slow loop (no cache, assists re-tokenised), and several tests compare with it."""
    cfg, members, entry, _ = tiny
    if (mode, stop) not in _REFERENCE:
        _REFERENCE[mode, stop] = reference_decode(members, make_fuser(cfg, members, entry, mode), PROMPTS, 12, stop)
    return _REFERENCE[mode, stop]


@pytest.mark.parametrize("mode,batch", [("exact", 3), ("exact", 8), ("fast", 4)])
def test_engine_matches_reference_loop(tiny, mode, batch):
    cfg, members, entry, _ = tiny
    stop = ("\n\n",)
    want = reference(tiny, mode, stop)
    engine = Engine(members, make_fuser(cfg, members, entry, mode), max_batch=batch)
    got = engine.run([Request(i, p, 12, stop) for i, p in enumerate(PROMPTS)])
    assert len(got) == len(PROMPTS)
    by_id = {r.request.id: r for r in got}
    for i, ref in enumerate(want):
        assert by_id[i].ids == ref.ids, f"prompt {i}"
        assert by_id[i].text == ref.text and by_id[i].finish == ref.finish


def test_completions_at_batch_1_equal_those_with_every_row_in_flight(tiny):
    """Fast mode, a stop string, prompts of different lengths: one row at a time or all ten at
    once (windows, caches and fusion shared by the batch), the same tokens and texts."""
    cfg, members, entry, _ = tiny
    run = lambda batch: {r.request.id: (r.ids, r.text, r.finish) for r in Engine(  # noqa: E731
        members, make_fuser(cfg, members, entry, "fast"), batch).run(
        [Request(i, p, 14, ("\n\n",)) for i, p in enumerate(PROMPTS)])}
    assert run(1) == run(len(PROMPTS))


def test_long_prompts_decode_what_the_reference_loop_does(tiny):
    """Prompts of about 1,500 tokens (past the old 512 positions), different lengths in one batch,
    a stop string: the engine (windows, slot caches) gives the reference loop's tokens."""
    from runtime.bench.context import prompts_of_length
    cfg, members, entry, _ = tiny
    prompts = prompts_of_length(PROMPTS, members[0].tokenizer, 1500, 3)
    prompts[1] = prompts[1][200:]
    want = reference_decode(members, make_fuser(cfg, members, entry, "exact"), prompts, 6, (".",))
    got = {r.request.id: r for r in Engine(members, make_fuser(cfg, members, entry, "exact"), 3).run(
        [Request(i, p, 6, (".",)) for i, p in enumerate(prompts)])}
    assert min(len(members[0].tokenizer(p).input_ids) for p in prompts) > 1200
    for i, ref in enumerate(want):
        assert got[i].ids == ref.ids and got[i].text == ref.text, i


@pytest.mark.parametrize("mode,parts", [("fast", 2), ("exact", 3)])
def test_pipelined_micro_batches_decode_what_the_reference_loop_does(tiny, mode, parts):
    """engine/pipeline.py in one process: micro-batches of 2 rows, interleaved phase by phase,
    with prompts of different lengths entering as rows finish, give the reference loop's tokens;
    every row is counted once and each step advances every running micro-batch."""
    cfg, members, entry, _ = tiny
    stop = ("\n\n",)
    want = reference(tiny, mode, stop)
    pipeline = make_engine(members, make_fuser(cfg, members, entry, mode), 2 * parts,
                           {i: Lane(m) for i, m in enumerate(members)}, LOCAL, parts)
    assert isinstance(pipeline, Pipeline) and [e.max_batch for e in pipeline.parts] == [2] * parts
    requests = [Request(i, p, 12 - i % 4, stop) for i, p in enumerate(PROMPTS)]
    got = {r.request.id: r for r in pipeline.run(requests)}
    assert sorted(got) == list(range(len(PROMPTS)))
    for i, ref in enumerate(want):
        n = 12 - i % 4
        assert got[i].ids == ref.ids[:n], f"prompt {i}"
    report = pipeline.report(1.0, sum(len(r.ids) for r in got.values()))
    assert report["rows"] == sum(len(r.ids) + (r.finish == "eos") for r in got.values())
    assert max(len(r.ids) for r in got.values()) <= report["steps"] < report["rows"]


class CountingExchange(LocalExchange):
    """One process's exchange, counting the plans sent and the plans every rank foresaw."""

    def __init__(self):
        self.sent, self.foreseen = [], 0

    def share_plan(self, plan):
        self.sent.append(plan)
        return plan

    def foreseen_plan(self):
        self.foreseen += 1


@pytest.mark.parametrize("parts,source", [(1, False), (1, True), (2, True)])
def test_plans_are_sent_only_where_they_may_change_something(tiny, parts, source):
    """scheduler.Plans: where every rank can tell the next plan admits, drops and ends
    nothing, the plan is not sent (the root checks its scheduler agrees, and raises otherwise).
    With prompts given up front, from a source handing out a few at a time (replicas' queue), and
    pipelined: the same tokens as with every plan sent, most steps foreseen, and every plan that
    admitted, dropped, ended or closed the queue sent."""
    cfg, members, entry, _ = tiny
    requests = [Request(i, p, 3 + (5 * i) % 9, ("\n\n",)) for i, p in enumerate(PROMPTS * 2)]

    def run(foresee: bool):
        exchange = CountingExchange()
        engine = make_engine(members, make_fuser(cfg, members, entry, "fast"), 3 * parts,
                             {i: Lane(m) for i, m in enumerate(members)}, exchange, parts)
        for e in getattr(engine, "parts", [engine]):
            if not foresee:
                e.plans.quiet_foreseen = lambda slots: False
        queue = list(requests)
        take = lambda n: [queue.pop(0) for _ in range(min(n, 2, len(queue)))]  # noqa: E731
        got = engine.run([] if source else requests, source=take if source else None)
        return {r.request.id: (r.ids, r.finish) for r in got}, exchange

    want, every = run(False)
    got, exchange = run(True)
    assert got == want and len(got) == len(requests)
    assert every.foreseen == 0 and exchange.foreseen > len(exchange.sent)
    changes = lambda plans: [p for p in plans if not p.quiet]  # noqa: E731
    assert changes(exchange.sent) == changes(every.sent)   # what changed anything was sent, in order
    assert any(p.closes for p in exchange.sent)


@pytest.mark.parametrize("name", ["tiny-sp", "tiny-bpe", "tiny-bpe2"])
def test_a_member_alone_is_its_own_greedy_decoding(tiny, name):
    """--method single: the engine (batched, KV-cached, continuous batching) gives exactly what
    transformers' greedy `generate` gives for each prompt alone, token for token."""
    member = next(m for m in tiny.members if m.name == name)
    engine = Engine([member], single_fuser([member]), max_batch=4)
    got = {r.request.id: r.ids for r in engine.run([Request(i, p, 16) for i, p in enumerate(TRICKY_PROMPTS)])}
    for i, prompt in enumerate(TRICKY_PROMPTS):
        assert got[i] == hf_greedy(member, prompt, 16), f"prompt {prompt!r}"


def test_records_carry_the_requests_fields_and_member_token_counts(tiny):
    """A record has the request's own fields (its id wins over an 'id' among them), and each
    member's count of the completion's tokens: at least one, at most one per byte of text."""
    cfg, members, entry, _ = tiny
    engine = Engine(members, make_fuser(cfg, members, entry, "fast"), max_batch=3)
    results = engine.run([Request(i, p, 6, (), {"topic": i, "id": "ignored"}) for i, p in enumerate(PROMPTS)])
    assert sorted(r.request.id for r in results) == list(range(len(PROMPTS)))
    for r in results:
        record = r.record()
        assert record["id"] == r.request.id and record["topic"] == r.request.id
        assert record["tokens"] == len(r.ids) and record["finish_reason"] in ("eos", "length")
        assert set(record["member_tokens"]) == {m.name for m in members}
        for m in members:   # counted from windows, equal to the full encodes'
            prefix = m.render(r.request.prompt)
            full, head = m.tokenizer([prefix + r.text, prefix])["input_ids"]
            assert record["member_tokens"][m.name] == len(full) - len(head), (m.name, r.text)


def full_logits(member, ids):
    with torch.no_grad():
        return member.model(torch.tensor([ids])).logits[0, -1].float()


TEXT = st.text(alphabet=st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)),
               max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(TEXT, min_size=1, max_size=3), appends=st.lists(TEXT, min_size=1, max_size=6))
def test_lane_ids_and_cache_follow_committed_text(tiny, prompts, appends):
    """After every sync + forward, each slot's ids are the member's encoding of its template +
    committed text, decode back to exactly it, fill its cache, and the cached logits equal a
    no-cache pass. Texts grow and sometimes lose their last characters (as a byte-fallback
    character completes), so windows, crops and re-prefills all happen."""
    members = tiny.members
    prompts = [p or "x" for p in prompts]
    for member in members[1:]:
        lane = Lane(member)
        lane.follows_text = True
        lane.admit(list(range(len(prompts))), prompts)
        texts = [""] * len(prompts)
        for n, chunk in enumerate(appends):
            old = texts
            texts = [t[:len(t) - (n + k) % 3 * (n % 2)] + chunk[: (k % 3) + len(chunk) // 2 + 1]
                     for k, t in enumerate(texts)]
            changed = [next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
                       if o != t else None for o, t in zip(old, texts)]
            slots = list(range(len(prompts)))
            lane.forward(slots, lane.sync(slots, texts, changed))
            for s, (p, t) in enumerate(zip(prompts, texts)):
                full = member.render(p) + t
                assert lane.ids[s] == member.tokenizer(full).input_ids
                assert member.tokenizer.decode(lane.ids[s], skip_special_tokens=True) == full
                assert lane.lengths[s] == len(lane.ids[s])
                assert torch.allclose(lane.logits[s], full_logits(member, lane.ids[s]), atol=1e-4)


@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_a_sliding_window_member_sees_exactly_its_window_after_a_crop(tiny, kind):
    """A member with a 64-token window (Mistral: every layer; Gemma-3: sliding layers beside full
    ones, one mask per kind), contexts past the window, crops and re-prefills of different widths
    in one batch: each slot's logits equal a fresh forward pass over its ids."""
    from types import SimpleNamespace
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM
    base = tiny.members[0]   # tiny-sp's tokenizer
    common = dict(vocab_size=len(base.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  pad_token_id=base.tokenizer.pad_token_id)
    torch.manual_seed(5)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=64, **common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(sliding_window=64, head_dim=8,
                                                   layer_types=["sliding_attention", "full_attention"], **common))
    model.eval()
    member = SimpleNamespace(name=kind, model=model, tokenizer=base.tokenizer, device="cpu",
                             render=lambda p: p, eos_token_id=base.eos_token_id)
    lane = Lane(member)
    lane.follows_text = True
    prompts = ["the cat sees the ball today. " * 9, "a dog likes the garden at night; " * 7, "hi"]
    lane.admit([0, 1, 2], prompts)
    assert min(lane.lengths[:2]) > 64
    texts = ["", "", ""]
    for step, (add, cut) in enumerate([("The", 0), (" model", 0), ("  builds", 2), ("\n\nit", 3), (" ok", 1)]):
        old = texts
        texts = [t[:len(t) - cut] + add * (1 + k) for k, t in enumerate(texts)]
        changed = [next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
                   for o, t in zip(old, texts)]
        lane.forward([0, 1, 2], lane.sync([0, 1, 2], texts, changed))
        for s in range(3):
            assert lane.ids[s] == base.tokenizer(prompts[s] + texts[s]).input_ids
            assert torch.allclose(lane.logits[s], full_logits(member, lane.ids[s]), atol=1e-4), (step, s)


def test_bench_compare_flags_runs_outside_each_others_noise():
    from runtime.bench.compare import compare_runs
    spread = lambda lo, med, hi: {"min": lo, "median": med, "max": hi}
    run = lambda e: {"batches": [{"batch": 8, "ensemble": {"tokens_per_s": e},
                                  "members": {"m": {"tokens_per_s": spread(9, 10, 11)}}}]}
    text, ok = compare_runs(run(spread(3.0, 3.2, 3.4)), run(spread(3.3, 3.5, 3.6)))
    assert ok and "| 8 | ensemble | 3.00 / 3.20 / 3.40 | 3.30 / 3.50 / 3.60 | +9.4% | yes |" in text
    text, ok = compare_runs(run(spread(3.0, 3.2, 3.4)), run(spread(3.5, 3.6, 3.7)))
    assert not ok and "| NO |" in text


def test_bench_compare_cli_names_a_file_that_is_no_bench_result(tmp_path):
    import subprocess
    import sys
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"batches": []}')
    bad.write_text('{"rows": []}')
    run = lambda a, b: subprocess.run([sys.executable, "-m", "launcher.cli", "bench-compare", str(a), str(b)],  # noqa: E731
                                      cwd=ROOT, capture_output=True, text=True)
    proc = run(good, bad)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {bad}: no 'batches' list: not a `deepen bench --output` result"
    bad.write_text("{")
    proc = run(bad, good)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {bad}: not JSON")
    assert run(good, good).returncode == 0


def test_each_bench_run_counts_only_its_own_rows(tiny):
    """The fuser lives across runs; a run's decided and fused row counts are that run's."""
    from runtime.bench.bench import run_engine
    from runtime.deepen.search import SearchSettings
    cfg, members, entry, _ = tiny
    fuser = make_fuser(cfg, members, entry, "fast")
    fuser.search = SearchSettings(eta=0.02)   # a small bound: some rows are decided
    first, second = (run_engine(members, fuser, PROMPTS[:3], 3, 4) for _ in range(2))
    assert first["decided_rows"] > 0 and first["fused_rows"] > 0
    assert [first[k] for k in ("rows", "fused_rows", "decided_rows")] == \
        [second[k] for k in ("rows", "fused_rows", "decided_rows")]


def test_bench_interleaves_series_and_decodes_what_the_engine_decodes(tiny):
    """Every series gets `repeat` runs, one repetition of all series after another; each series
    decodes the tokens the engine gives on the same prompts; comparisons not run show "–"."""
    from runtime.bench.bench import bench, table
    cfg, members, entry, _ = tiny
    fuser = make_fuser(cfg, members, entry, "fast")
    lines = []
    out = bench(members, fuser, PROMPTS[:3], [1, 2], new_tokens=3, repeat=2, compare=("members",),
                log=lines.append)
    names = [m.name for m in members]
    order = [line.split(": ", 1)[1] for line in lines if line.startswith("batch 2")]
    assert order == [f"{n} {r}/2" for r in (1, 2) for n in ["ensemble"] + [f"{m} alone" for m in names]]
    row = out["batches"][1]   # after batch 1's runs on the same fuser: its counts are its own
    assert set(row["members"]) == set(names)
    tokens = lambda ms, f: sum(len(r.ids) for r in Engine(ms, f, 2).run(  # noqa: E731
        [Request(i, p, 3) for i, p in enumerate(PROMPTS[:2])]))
    assert row["ensemble"]["tokens"] == tokens(members, make_fuser(cfg, members, entry, "fast"))
    for m in members:
        assert row["members"][m.name]["tokens"] == tokens([m], single_fuser([m]))
    engine = Engine(members, make_fuser(cfg, members, entry, "fast"), 2)
    engine.run([Request(i, p, 3) for i, p in enumerate(PROMPTS[:2])])
    counts = engine.report(1.0, 1)
    assert {k: row["ensemble"][k] for k in ("rows", "fused_rows", "decided_rows")} == \
        {k: counts[k] for k in ("rows", "fused_rows", "decided_rows")} and counts["rows"] > 0
    text = table(out)
    assert "nan" not in text and text.splitlines()[2].endswith("| – |")  # no reference loop run
    from runtime.engine.sampling import SamplingParams
    sampled = bench(members, fuser, PROMPTS[:3], [2], new_tokens=3, repeat=1, compare=(), log=lambda *a: None,
                    sampling=SamplingParams(temperature=1.0))
    assert sampled["batches"][0]["ensemble"]["fused_rows"] == sampled["batches"][0]["ensemble"]["rows"] > 0
