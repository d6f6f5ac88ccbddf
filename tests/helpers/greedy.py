"""transformers' own greedy decoding of one prompt: the reference a member alone must match."""
import torch

# prompts that trip tokenisers: whitespace runs, blank lines, code, CJK, emoji, a trailing space
TRICKY_PROMPTS = [
    "Translate to French: Good morning ->", "Hello\n\n", "List three colors:\n1.", "The answer is  ",
    "def add(a, b):\n    ", "for i in range(3):\n\tprint(i)\n", "日本の首都は", "北京是中国的", "🤖 robots are",
    "I ❤️ Paris because", "  leading spaces and\ttabs", "Question: what is 2+2?\nAnswer:",
    "café naïve über ", "Line one\r\nLine two\r\n", "x = {'a': [1, 2, 3]}\n\n\n", "The cat",
    "Once upon a time, ", "Q: Who wrote Hamlet?\nA:", "1, 2, 3, 4,", "<html>\n  <body>\n",
    "Résumé: 10 years of", "Ñandú y pingüino:",
]


def hf_greedy(member, prompt: str, max_new_tokens: int) -> list[int]:
    """`generate` with do_sample=False on the prompt alone (no padding), cut at the member's EOS."""
    ids = member.tokenizer(member.render(prompt), return_tensors="pt").input_ids
    with torch.no_grad():
        out = member.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, pad_token_id=member.eos_token_id,
                                    eos_token_id=member.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(member.eos_token_id)] if member.eos_token_id in new else new
