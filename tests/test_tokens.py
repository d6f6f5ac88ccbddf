"""Incremental tokens against the whole-row reference: an assist's windowed re-encode
(engine/retokenize.py) against `tokenizer(prompt + text)`, and the main member's incremental
text (engine/detokenize.py) against `tokenizer.decode(ids)`, over random and adversarial texts
and ids, for each tokenizer family here (SentencePiece BPE, GPT-2 and Qwen2 byte-level BPE, a
Metaspace/Llama-2 style and an NFC-normalising one built from them; the real members' too)."""
import random

import pytest

from runtime.engine.detokenize import Detokenizer, Text
from runtime.engine.retokenize import Retokenizer, Row
from runtime.engine.windows import policy_for

# pieces that trip tokenizers: whitespace runs, newlines, CJK, emoji (with modifiers and ZWJ),
# byte-fallback lookalikes, special tokens' text, numbers, code, combining marks, "▁"
PIECES = [" ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\r\n", "    ", "the", " the", "The", "cat", "ing",
          "é", "café", " naïve", "Zürich", "日本", "語", "北京是", "🤖", "👍🏽", "❤️", "👩‍💻", "1", "12", "123",
          "4567", "3.14", ",", ".", "!", "?", "'s", "'re", " '", "\"", "def", "(x)", ":", "{", "}", "==", "->",
          "x=1;", "\u00a0", "<0x41>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>", "<start_of_turn>",
          "\u2581", "a", "Q", "Ä", "ñ", "ﬁ", "Å", "\u0301", "e\u0301", "<table>", "  return x"]
CASES = 2500   # edits per tokenizer


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) if rng.random() < 0.75 else chr(rng.randrange(32, 0x3000))
                   for _ in range(n))


def edits(rng: random.Random, count: int):
    """(prompt, text before, text after, first changed character) as decoding makes them: mostly
    a piece appended, sometimes the last characters replaced (a byte completing a character)."""
    done = 0
    while done < count:
        prompt, text = random_text(rng, rng.randrange(1, 24)), ""
        for _ in range(25):
            old = text
            if text and rng.random() < 0.2:
                text = text[:rng.randrange(max(0, len(text) - 3), len(text) + 1)] + random_text(rng, rng.randrange(0, 3))
            else:
                text += random_text(rng, rng.randrange(1, 3))
            c = next((i for i, (a, b) in enumerate(zip(old, text)) if a != b), min(len(old), len(text)))
            yield prompt, old, text, c
            done += 1
            if done == count:
                return


def variants(tiny_members) -> dict:
    """The tiny members' tokenizers, plus two built from them: Llama-2/Mistral style (Metaspace
    with a prefix space on the first piece, byte fallback) and Qwen2 style with NFC."""
    import json
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    toks = {m.name: m.tokenizer for m in tiny_members}
    sp = json.loads(toks["tiny-sp"].backend_tokenizer.to_str())
    sp["normalizer"] = None
    sp["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    sp["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    toks["metaspace-first"] = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(sp)),
                                                      bos_token="<bos>", eos_token="<eos>", clean_up_tokenization_spaces=False)
    q = json.loads(toks["tiny-bpe2"].backend_tokenizer.to_str())
    q["normalizer"] = {"type": "NFC"}
    toks["qwen-nfc"] = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(q)),
                                               eos_token="<|im_end|>", clean_up_tokenization_spaces=False)
    return toks


def check_retokenizer(tokenizer, seed: int) -> Retokenizer:
    """Every edit: the windowed ids equal the full re-encode's, and the ids said kept are."""
    rt = Retokenizer(tokenizer)
    assert rt.policy.mode is not None, rt.policy.reason
    track, prompt = None, None
    for p, old, text, c in edits(random.Random(seed), CASES):
        if p != prompt:
            prompt, track = p, rt.encode([p])[0]
        before = list(track.ids)
        keep = rt.sync([track], [Row(prompt, text)], [len(prompt) + c])[0]
        want = tokenizer(prompt + text)["input_ids"]
        assert track.ids == want, (prompt, old, text)
        full = rt.policy.full.encode(prompt + text)   # what later windows start from is the full encode's too
        assert [(a, b) for a, b in zip(track.starts, track.ends) if a >= 0] == \
            [o for o, m in zip(full.offsets, full.special_tokens_mask) if not (m and o == (0, 0))], (prompt, old, text)
        assert boundaries(track.words) == boundaries(full.word_ids), (prompt, old, text)
        assert before[:keep] == want[:keep]
        assert rt.count(track, Row(prompt, text), len(prompt) + len(text)) == len(want)
    assert rt.windows + rt.fallbacks == CASES
    assert rt.windows > 0.6 * CASES, (rt.windows, rt.refusals)   # windows, not a full encode in disguise
    return rt


def boundaries(words: list) -> list[bool]:
    """Where a pre-token begins (special tokens: -1 or None)."""
    words = [-1 if w is None else w for w in words]
    return [i == 0 or w != words[i - 1] for i, w in enumerate(words)]


def check_detokenizer(tokenizer, seed: int):
    """Every appended id: the incremental text (and a peek at it) equals the whole decode."""
    d = Detokenizer(tokenizer)
    assert d.incremental
    rng = random.Random(seed)
    tricky = tokenizer("日本語 🤖👍🏽 café  \n\n naïve x", add_special_tokens=False)["input_ids"]
    pool = sorted(d.byte_ids) or tricky
    for _ in range(CASES // 25):
        ids, state = [], Text()
        for _ in range(25):
            r = rng.random()
            t = rng.choice(pool) if r < 0.3 else rng.choice(tricky) if r < 0.6 else \
                rng.choice(tokenizer.all_special_ids) if r < 0.63 else rng.randrange(len(tokenizer))
            (peeked, _), = d.peek([state], [ids], [t])
            ids.append(t)
            d.update([state], [ids])
            assert state.text == peeked == tokenizer.decode(ids), ids
    assert d.fallbacks == 0 and d.windows >= CASES


@pytest.mark.parametrize("name", ["tiny-sp", "tiny-bpe", "tiny-bpe2", "metaspace-first", "qwen-nfc"])
def test_windowed_resync_equals_the_full_reencode(tiny, name):
    toks = variants(tiny.members)
    plain = policy_for(toks[name]).plain   # one policy per tokenizer: its count so far
    used = plain.used if plain is not None else 0
    rt = check_retokenizer(toks[name], seed=hash(name) % 1000)
    assert rt.policy.mode == ("segment" if name == "tiny-sp" else "word") or name == "metaspace-first"
    if name in ("tiny-bpe", "tiny-bpe2", "qwen-nfc"):   # byte-level: windows split in Python (plainwindows.py)
        assert rt.policy.plain is not None
        # qwen-nfc's NFC admits ASCII alone: few of these random windows are
        assert rt.policy.plain.used - used > (0.02 if name == "qwen-nfc" else 0.5) * rt.windows, (rt.policy.plain.used - used, rt.windows)
    else:
        assert rt.policy.plain is None


def test_python_windows_admit_only_what_both_engines_agree_on(tiny):
    """A character is admitted once the library and Python's regex put it in the same classes;
    with a case-insensitive pattern (Qwen2's), not one that case-folds to ASCII (the long s); an
    added token in a window leaves it to the library."""
    toks = variants(tiny.members)
    gpt2, qwen = (Retokenizer(toks[n]).policy.plain for n in ("tiny-bpe", "tiny-bpe2"))
    assert gpt2.pieces("x ſ y") is not None and qwen.pieces("x ſ y") is None
    assert qwen.pieces("a <b> c") is not None and qwen.pieces("a <|im_end|> c") is None
    window = Retokenizer(toks["tiny-bpe"]).policy.window
    for text in ("\u00a0\u3000\x85 x  \u2028y", "naïve 😀 \t\r\n 12.5 ½ ٣", "x" + " " * 9 + "日本"):
        want = window.encode(text, add_special_tokens=False)
        assert gpt2.encode(text) == (want.ids, want.offsets, want.word_ids), text


@pytest.mark.parametrize("name", ["tiny-sp", "tiny-bpe", "tiny-bpe2", "metaspace-first"])
def test_incremental_text_equals_the_whole_decode(tiny, name):
    check_detokenizer(variants(tiny.members)[name], seed=7)


def test_a_tokenizer_the_window_cannot_be_shown_exact_for_re_encodes_whole_rows(tiny):
    """A normalizer outside the known list (lower-casing looks at the next character for a final
    sigma) gets no windows: its lane re-encodes whole rows, as before, and says why."""
    import json
    from types import SimpleNamespace
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from runtime.engine.lane import Lane
    spec = json.loads(tiny.members[1].tokenizer.backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Lowercase"}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), clean_up_tokenization_spaces=False)
    lane = Lane(SimpleNamespace(model=None, tokenizer=tok, name="lower", device="cpu"))
    assert not lane.windowed and lane.retokenizer.policy.reason == "normalizer Lowercase"


@pytest.mark.real
@pytest.mark.parametrize("index", [0, 1], ids=["gemma3-270m", "smollm2-135m"])
def test_real_tokenizers_resync_and_decode_incrementally(index):
    from runtime.members.config import load_config
    from runtime.members.ensemble import load_members
    from pathlib import Path
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smol-gemma.toml")
    tok = load_members(cfg, with_models=False, log=lambda *a: None)[index].tokenizer
    check_retokenizer(tok, seed=index)
    check_detokenizer(tok, seed=index)
