"""Random-weight models saved as safetensors, for the loading tests (weights ~N(0, 0.5), so
that logits differ clearly between tokens).

    python tests/helpers/random_model.py gemma3-tiny|gemma2-tiny|llama-300mb OUT_DIR
"""
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    # Gemma-3 text: scaled embedding, its own RMSNorm, sliding and full attention; 2 KV heads (tp 2)
    "gemma3-tiny": ("gemma3_text", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                        tie_word_embeddings=True)),
    # Gemma-2 (configs/70b-ensemble.toml has one): soft-capped logits, its own norms
    "gemma2-tiny": ("gemma2", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                   tie_word_embeddings=True)),
    # Llama, ~300 MB in fp32: large enough that a rank's memory shows what it holds
    "llama-300mb": ("llama", dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=5,
                                  num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)),
}


def build(shape: str, out: str) -> int:
    model_type, sizes = SHAPES[shape]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2]))
