"""Anchors across tokenizer families, the anchors cache, and fusion on the tiny members."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from runtime.deepen.anchors import cached_entry, load_transfers
from runtime.members.ensemble import anchors_entry, make_fuser
from runtime.engine.reference import reference_decode
from runtime.deepen.vocab import BYTE_LEVEL, SENTENCEPIECE, find_anchors, token_bytes, tokenizer_family, tokenizer_json

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_families_detected(tiny):
    members = tiny.members
    families = {m.name: tokenizer_family(tokenizer_json(m.tokenizer)) for m in members}
    assert families == {"tiny-sp": SENTENCEPIECE, "tiny-bpe": BYTE_LEVEL, "tiny-bpe2": BYTE_LEVEL}


def test_every_text_token_stands_for_the_bytes_it_decodes_to(tiny):
    members = tiny.members
    for m in members:
        vocab_bytes = token_bytes(m.tokenizer)
        special = set(m.tokenizer.all_special_ids) | {
            t["id"] for t in tokenizer_json(m.tokenizer)["added_tokens"] if t["special"]}
        for i, b in enumerate(vocab_bytes):
            if i in special:
                assert b is None
                continue
            assert b is not None
            decoded = m.tokenizer.decode([i])
            if "\ufffd" not in decoded:  # a whole-character token: its text is exactly its bytes
                assert b == decoded.encode("utf-8"), (m.name, i)


def test_space_markers_of_both_families_meet(tiny):
    members = tiny.members
    sp, bpe = token_bytes(members[0].tokenizer), token_bytes(members[1].tokenizer)
    sp_id = members[0].tokenizer.convert_tokens_to_ids("\u2581the")
    bpe_id = members[1].tokenizer.convert_tokens_to_ids("\u0120the")
    assert sp[sp_id] == bpe[bpe_id] == b" the"
    anchors = find_anchors([sp, bpe])
    column = (anchors[0] == sp_id).nonzero()
    assert len(column) == 1 and anchors[1, column[0, 0]] == bpe_id


def test_anchors_are_the_intersection_in_main_order(tiny):
    members = tiny.members
    vocabs = [token_bytes(m.tokenizer) for m in members]
    anchors = find_anchors(vocabs)
    common = set(b for b in vocabs[0] if b) & set(b for b in vocabs[1] if b) & set(b for b in vocabs[2] if b)
    assert anchors.shape == (3, len(common))
    for row, vocab in zip(anchors, vocabs):
        assert [vocab[i] for i in row[:50].tolist()] == [vocabs[0][i] for i in anchors[0, :50].tolist()]
    assert anchors[0].tolist() == sorted(anchors[0].tolist())
    assert find_anchors(vocabs, max_anchors=10).tolist() == anchors[:, :10].tolist()


def test_anchor_cache_is_keyed_and_reused(tiny):
    cfg, members, home = tiny.cfg, tiny.members, tiny.home
    entry = anchors_entry(cfg, members, home, progress=False, log=lambda *a: None)
    stamp = (entry / "member0.safetensors").stat().st_mtime_ns
    assert anchors_entry(cfg, members, home, progress=False) == entry
    assert (entry / "member0.safetensors").stat().st_mtime_ns == stamp
    prints = [m.fingerprint for m in members]
    assert cached_entry(prints, 7, home / "anchors") is None  # another anchor cap: another key
    assert cached_entry(list(reversed(prints)), 0, home / "anchors") is None


def test_low_rank_transfer_equals_dense(tiny):
    cfg, members, home = tiny.cfg, tiny.members, tiny.home
    entry = anchors_entry(cfg, members, home, progress=False)
    lows = load_transfers(entry, cache_rows=4)
    exact = make_fuser(cfg, members, entry, "exact").transfers
    for low, dense in zip(lows, exact):
        ids = torch.arange(0, low.num_tokens, 7)
        assert torch.allclose(low.rows(ids), dense.matrix[ids], atol=1e-6)
        sigma = torch.softmax(torch.randn(2, low.num_tokens), -1)
        assert torch.allclose(low.left(sigma), dense.left(sigma), atol=1e-6)
        g = torch.randn(2, low.num_anchors)
        assert torch.allclose(low.right(g), dense.right(g), atol=1e-5)


def test_fast_mode_agrees_with_exact_on_tiny_members(tiny):
    """The reference loop with exact fusion; fast mode on the same logits at every step."""
    from runtime.bench.measure import agreement
    cfg, members, home = tiny.cfg, tiny.members, tiny.home
    entry = anchors_entry(cfg, members, home, progress=False)
    exact, fast = make_fuser(cfg, members, entry, "exact"), make_fuser(cfg, members, entry, "fast")
    prompts = ["The cat sees", "a dog likes the", "def f(x):\n", "café naïve", "my friend reads"]
    result = agreement(members, exact, fast, prompts, new_tokens=8, batch=3)
    assert result["steps"] >= 30
    assert result["agreement"] >= 0.97, result["disagreements"]


def test_fusion_changes_some_tokens_and_decode_stays_consistent(tiny):
    cfg, members, home = tiny.cfg, tiny.members, tiny.home
    entry = anchors_entry(cfg, members, home, progress=False)
    fuser = make_fuser(cfg, members, entry, "exact")
    changed = []

    def observe(step, rows, logits, result):
        changed.extend((result.tokens != logits[0].argmax(-1))[result.fused].tolist())

    rows = reference_decode(members, fuser, ["The cat sees", "the model builds"], 10, observe=observe)
    assert any(changed), "fusion never changed the main model's choice: the assists had no effect"
    for r in rows:
        assert r.text == members[0].tokenizer.decode(r.ids)
        assert r.finish in ("eos", "length", "stop")


@given(calls=st.lists(st.lists(st.integers(0, 599), min_size=1, max_size=80), min_size=1, max_size=6),
       keep=st.sampled_from([0, 8, 32]))
@settings(max_examples=25, deadline=None)
def test_row_store_returns_exact_rows(calls, keep):
    """Whatever the sequence of requests and the store's size, rows(), gathered() and
    weighted() return the rows of P (computed in another batch shape, so equal to float
    rounding); the store grows to hold a request, and a request repeated at once computes
    nothing."""
    from runtime.deepen.relative import LowRankTransfer
    torch.manual_seed(0)
    t = LowRankTransfer.build(torch.randn(600, 12), torch.arange(0, 600, 4), cache_rows=keep, clusters=4)
    for ids in calls:
        ids = torch.unique(torch.tensor(ids))
        want = t.compute_rows(ids)
        torch.testing.assert_close(t.rows(ids), want, rtol=1e-5, atol=1e-9)
        assert t.store.capacity >= max(len(ids), keep)
        index = torch.randint(0, len(ids), (3, 5))
        computed = t.computed
        torch.testing.assert_close(t.gathered(ids, index), want[index], rtol=1e-5, atol=1e-9)
        weights = torch.rand(4, len(ids))
        torch.testing.assert_close(t.weighted(ids, weights), weights @ want, rtol=1e-4, atol=1e-7)
        assert t.computed == computed   # held since the first request above


def test_row_store_keeps_recent_rows_and_replaces_the_oldest():
    from runtime.deepen.relative import LowRankTransfer
    torch.manual_seed(0)
    t = LowRankTransfer.build(torch.randn(300, 8), torch.arange(0, 300, 3), cache_rows=20, clusters=4)
    t.rows(torch.arange(0, 10))
    t.rows(torch.arange(10, 20))
    assert t.store.capacity == 20 and (t.hits, t.misses) == (0, 20)
    t.rows(torch.arange(0, 5))            # held: now the most recently used
    t.rows(torch.arange(20, 30))          # 10 rows replaced: 5..9 (the oldest) and 5 of 10..19
    t.rows(torch.arange(0, 5))
    t.rows(torch.arange(20, 30))
    assert t.misses == 30 and t.hits == 20
    t.rows(torch.arange(5, 10))
    assert t.misses == 35
    t.rows(torch.arange(100, 140))        # a larger request grows the store
    t.rows(torch.arange(100, 140))
    assert t.misses == 75 and t.store.capacity >= 40


def test_search_gathered_per_row_equals_the_dense_product(monkeypatch):
    from runtime.deepen import search
    from runtime.deepen.relative import LowRankTransfer
    torch.manual_seed(1)
    t = LowRankTransfer.build(torch.randn(400, 16), torch.arange(0, 400, 2), clusters=8)
    logits = torch.randn(5, 400) * 3
    r = torch.softmax(torch.randn(5, 200), -1)
    s = search.SearchSettings(eta=0.3, steps=5)
    include = torch.tensor([3, 7, 11])
    tokens, stats = search.search_fast(logits, r, t, s, 1e-3, 64, include)
    monkeypatch.setattr(search, "GATHER_BYTES", 0)
    dense_tokens, dense_stats = search.search_fast(logits, r, t, s, 1e-3, 64, include)
    assert torch.equal(tokens, dense_tokens)
    torch.testing.assert_close(stats["include_logits"], dense_stats["include_logits"])


def test_a_row_fused_from_its_summary_is_the_row_fused_from_its_logits():
    """split_fusion moves summaries, not logits (deepen/summary.py): through the wire form the
    relative vectors and the search's tokens are those computed from the logits, to the bit for
    the same rows; rows shared out between two owners get the same tokens as all rows together."""
    from runtime.deepen import search
    from runtime.deepen.fusion import relative_fast
    from runtime.deepen.relative import LowRankTransfer
    from runtime.deepen.summary import Summary, relative_from, summarize
    torch.manual_seed(2)
    t = LowRankTransfer.build(torch.randn(400, 16), torch.arange(0, 400, 2), clusters=8)
    logits = torch.randn(6, 400) * 1.5
    s = search.SearchSettings(eta=0.3, steps=5)
    wire = Summary.unpack(summarize(logits, t, 64, search=True).pack(), 64, 8, True)
    r, neglected = relative_fast(logits, t, 1e-3, 64)
    r2, neglected2 = relative_from(wire, t, 1e-3)
    assert torch.equal(r, r2) and torch.equal(neglected, neglected2) and neglected.max() > 0
    other = relative_fast(torch.randn(6, 400) * 4, t, 1e-3, 64)[0]   # a second member, disagreeing
    mixed = 0.5 * r + 0.5 * other
    tokens, _ = search.search_fast(logits, mixed, t, s, 1e-3, 64)
    assert torch.equal(tokens, search.search_from(wire, mixed, t, s, 1e-3)[0])
    assert not torch.equal(tokens, logits.argmax(-1))   # the search moved some row
    shared = torch.empty_like(tokens)
    for rows in (torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])):
        part = wire.select(rows)
        r_part, _ = relative_from(part, t, 1e-3)
        torch.testing.assert_close(r_part, r[rows], rtol=1e-5, atol=1e-7)
        shared[rows] = search.search_from(part, 0.5 * r_part + 0.5 * other[rows], t, s, 1e-3)[0]
    assert torch.equal(shared, tokens)


def test_the_anchors_key_comes_from_content_not_paths_or_times(tiny, tmp_path):
    """A member copied to another directory (new path, new times) keys the same anchors; a
    changed weight file does not. The checksums are computed once per file and remembered."""
    import shutil
    import time as clock
    from runtime.members.sources import fingerprint
    source = tiny.members[1].path
    copy = tmp_path / "copied-elsewhere"
    clock.sleep(0.01)
    shutil.copytree(source, copy)
    assert fingerprint(copy, tmp_path) == fingerprint(source, tmp_path)
    assert len(list((tmp_path / "checksums.json").read_text().splitlines())) > 1
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert fingerprint(copy, tmp_path) != fingerprint(source, tmp_path)


@pytest.fixture(scope="module")
def padded(tiny, tmp_path_factory):
    """tiny-bpe with its embedding and output layer padded from 400 to 448 rows (as Qwen2.5 pads
    151,665 tokens to 152,064), the padded rows made to win every step if they could."""
    import shutil

    from runtime.members.sources import load_model
    source = next(m for m in tiny.members if m.name == "tiny-bpe")
    out = tmp_path_factory.mktemp("padded") / "tiny-bpe-padded"
    shutil.copytree(source.path, out)
    model = load_model(source.path, source.config)
    model.resize_token_embeddings(448, mean_resizing=False)
    with torch.no_grad():
        model.get_output_embeddings().weight[400:] = 50 * model.get_output_embeddings().weight[:48]
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize("main", ["tiny-bpe-padded", "tiny-sp"])
def test_a_padded_vocabulary_never_wins_and_gives_no_anchor(tiny, padded, tmp_path, main):
    from runtime.engine.engine import Engine
    from runtime.engine.sequence import Request
    from runtime.members.config import parse_config
    from runtime.members.ensemble import load_members
    cfg = parse_config({"ensemble": {"main": main, "eta": 0.3, "mode": "fast"}, "members": [
        {"name": "tiny-sp", "source": "tiny:tiny-sp"}, {"name": "tiny-bpe-padded", "source": str(padded)}]})
    members = load_members(cfg, home=tiny.home, log=lambda m: None)
    index = [m.name for m in members].index("tiny-bpe-padded")
    assert members[index].model.get_output_embeddings().weight.shape[0] == 448 == len(members[index].tokenizer) + 48
    entry = anchors_entry(cfg, members, tiny.home, progress=False)
    fuser = make_fuser(cfg, members, entry, "fast")
    assert int(fuser.transfers[index].anchor_ids.max()) < 400
    results = Engine(members, fuser, 3).run([Request(i, p, 8) for i, p in enumerate(["the cat", "日本", "a dog likes"])])
    for r in results:
        assert r.ids and max(r.ids) < len(members[0].tokenizer), r.ids
        assert r.fused_steps > 0


@pytest.mark.parametrize("eta,steps", [(0.15, 5), (0.5, 10), (0.3, 12)])
def test_the_search_update_is_pytorchs_adamw_with_its_cosine_schedule_to_the_bit(eta, steps):
    """search.adamw (no optimizer or scheduler built per step) against torch.optim.AdamW stepped
    with CosineAnnealingLR on the same problems: the same logits, bit for bit."""
    from runtime.deepen.search import SearchSettings, _optimizer, adamw, kl_mean_per_row
    g = torch.Generator().manual_seed(int(eta * 100) + steps)
    s = SearchSettings(eta=eta, steps=steps)
    z0 = 3 * torch.randn(6, 300, generator=g)
    P = torch.softmax(4 * torch.randn(300, 40, generator=g), dim=-1)
    r = torch.softmax(torch.randn(6, 40, generator=g), dim=-1)
    loss_of = lambda z: kl_mean_per_row(r, torch.softmax(z, dim=-1) @ P)  # noqa: E731
    ours = adamw(z0.clone().requires_grad_(True), loss_of, s).detach()
    z = z0.clone().requires_grad_(True)
    opt, sched = _optimizer(z, s)
    for _ in range(steps):
        loss_of(z).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert torch.equal(ours, z.detach()) and not torch.equal(ours, z0)
